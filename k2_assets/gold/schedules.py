"""The hourly Gold dedup."""

from __future__ import annotations

import dagster as dg

from k2_assets.gold.jobs import gold_dedup_job
from k2_assets.resources import schedule_status

gold_dedup_hourly = dg.ScheduleDefinition(
    name="gold_dedup_hourly",
    job=gold_dedup_job,
    cron_schedule="20 * * * *",
    execution_timezone="UTC",
    default_status=schedule_status(),
)
