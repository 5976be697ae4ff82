"""One schedule per maintained table, at the target's cron (Bronze hourly, the rest every 3 hours)."""

from __future__ import annotations

import dagster as dg

from k2_assets.maintenance.jobs import TARGETS, maintenance_jobs
from k2_assets.resources import schedule_status

maintenance_schedules = [
    dg.ScheduleDefinition(
        name=f"{maintenance_jobs[t.spec.name].name}_schedule",
        job=maintenance_jobs[t.spec.name],
        cron_schedule=t.cron,
        execution_timezone="UTC",
        default_status=schedule_status(),
    )
    for t in TARGETS
]
