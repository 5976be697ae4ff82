"""The scheduled maintenance pass: every table, every 3 hours, in one run (`maintain_all_tables`)."""

from __future__ import annotations

import dagster as dg

from k2_assets.maintenance.jobs import MAINTENANCE_CRON, all_tables_maintenance_job
from k2_assets.resources import schedule_status

maintenance_schedule = dg.ScheduleDefinition(
    name=f"{all_tables_maintenance_job.name}_schedule",
    job=all_tables_maintenance_job,
    cron_schedule=MAINTENANCE_CRON,
    execution_timezone="UTC",
    default_status=schedule_status(),
)
