"""Daily Bronze retention per exchange."""

from __future__ import annotations

import dagster as dg

from k2_assets.bronze.jobs import retention_jobs
from k2_assets.resources import schedule_status

retention_schedules = [
    dg.ScheduleDefinition(
        name=f"{job.name}_daily",
        job=job,
        cron_schedule="30 2 * * *",
        execution_timezone="UTC",
        default_status=schedule_status(),
    )
    for job in retention_jobs.values()
]
