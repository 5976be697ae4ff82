"""Maintenance: one asset and job per table, one scheduled job over all of them, and the Spark resource."""

from __future__ import annotations

import dagster as dg

from k2_assets.maintenance.jobs import all_tables_maintenance_job, maintenance_assets, maintenance_jobs
from k2_assets.maintenance.schedules import maintenance_schedule
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.spark import IcebergSparkResource

defs = dg.Definitions(
    assets=maintenance_assets,
    jobs=[*maintenance_jobs.values(), all_tables_maintenance_job],
    schedules=[maintenance_schedule],
    # The same (environment-configured) catalog as the `iceberg` resource every layer uses.
    resources={"spark": IcebergSparkResource(iceberg=IcebergCatalogResource())},
)
