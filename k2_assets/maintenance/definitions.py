"""Maintenance: one asset, job and schedule per table, and the Spark resource they share."""

from __future__ import annotations

import dagster as dg

from k2_assets.maintenance.jobs import maintenance_assets, maintenance_jobs
from k2_assets.maintenance.schedules import maintenance_schedules
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.spark import IcebergSparkResource

defs = dg.Definitions(
    assets=maintenance_assets,
    jobs=list(maintenance_jobs.values()),
    schedules=maintenance_schedules,
    # The same (environment-configured) catalog as the `iceberg` resource every layer uses.
    resources={"spark": IcebergSparkResource(iceberg=IcebergCatalogResource())},
)
