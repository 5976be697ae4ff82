"""Bronze: Kafka topics, Bronze tables, ingestion and retention jobs, their sensors and schedules."""

from __future__ import annotations

import dagster as dg

from k2_assets.bronze.assets import bronze_tables, kafka_topics
from k2_assets.bronze.checks import bronze_freshness_checks, bronze_freshness_rules
from k2_assets.bronze.jobs import ingestion_jobs, retention_jobs
from k2_assets.bronze.schedules import retention_schedules
from k2_assets.bronze.sensors import ingestion_halted_checks, ingestion_sensors

freshness_rules = bronze_freshness_rules  # evaluated by the freshness sensor (k2_assets/definitions.py)

defs = dg.Definitions(
    assets=[*kafka_topics, *bronze_tables],
    asset_checks=[*bronze_freshness_checks, *ingestion_halted_checks],
    jobs=[*ingestion_jobs.values(), *retention_jobs.values()],
    sensors=ingestion_sensors,
    schedules=retention_schedules,
)
