"""Maintenance: one asset and job per table, one scheduled job over all of them, and the Spark resource."""

from __future__ import annotations

import dagster as dg

from k2_assets.maintenance.jobs import all_tables_maintenance_job, maintenance_assets, maintenance_jobs
from k2_assets.maintenance.schedules import maintenance_schedule
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.spark import SHORT_RUN_JAVA_OPTIONS, IcebergSparkResource


def maintenance_spark(
    iceberg: IcebergCatalogResource, spark_config: dict[str, str] | None = None
) -> IcebergSparkResource:
    """The Spark resource of maintenance runs: a short-lived local driver (SHORT_RUN_JAVA_OPTIONS).

    The driver keeps its 2g ceiling: with the serial collector the heap only grows as far as a pass
    needs (a small table's run held the same with a 1g ceiling), and a day's compaction, which runs in
    the driver on a local master, keeps its headroom.
    """
    return IcebergSparkResource(
        iceberg=iceberg, local_java_options=SHORT_RUN_JAVA_OPTIONS, spark_config=spark_config or {}
    )


defs = dg.Definitions(
    assets=maintenance_assets,
    jobs=[*maintenance_jobs.values(), all_tables_maintenance_job],
    schedules=[maintenance_schedule],
    # The same (environment-configured) catalog as the `iceberg` resource every layer uses.
    resources={"spark": maintenance_spark(IcebergCatalogResource())},
)
