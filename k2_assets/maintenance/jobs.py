"""Per-table maintenance jobs: retention, compaction, manifests, snapshot expiry, orphan files.

Every K2 table gets an asset `maintenance/<table>` whose materialization is one maintenance pass
(k2_assets/maintenance/actions.py); its metadata (files, bytes, snapshots and manifests before and
after, rows deleted, snapshots expired, orphans removed, seconds per step) is numeric, so the UI
plots it run over run. Row retention is the table's `k2.retention-days` property: Bronze 7/14
days from the exchange config, Silver and the DLQ 30 days; Gold and the dedup audit have none and
keep rows forever.

The jobs run tagged `k2/maintenance`: dagster.yaml lets one such run go at a time, in a run slot
of its own, so maintenance never holds ingestion's or Silver/Gold's slots; `dagster/max_runtime`
ends one that hangs before the next is due.
"""

# No `from __future__ import annotations`: Dagster reads asset parameter annotations at definition time.

from datetime import UTC, datetime
from typing import ClassVar

import dagster as dg
from pydantic import Field
from pyiceberg.table import Table

from k2_assets.bronze.jobs import MAINTENANCE_TAG
from k2_assets.bronze.tables import bronze_table_spec
from k2_assets.gold.tables import DEDUP_AUDIT_TABLE_SPEC, GOLD_TABLE_SPEC
from k2_assets.maintenance.actions import COMPACT_BY_DEFAULT, MaintenanceTarget, maintain_table
from k2_assets.silver.tables import DLQ_TABLE_SPEC, silver_table_spec
from k2_assets.tunables import Tunables
from k2_resources.exchanges import EXCHANGES
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.iceberg_maintenance import (
    DEFAULT_SNAPSHOT_MAX_AGE_HOURS,
    MIN_SNAPSHOT_AGE_HOURS,
    SNAPSHOT_MAX_AGE_PROPERTY,
    MaintenanceConfigError,
    MaintenancePolicy,
    snapshot_max_age_hours,
)
from k2_resources.spark import IcebergSparkResource

RETENTION_PROPERTY = "k2.retention-days"
# Iceberg's remove_orphan_files procedure refuses a grace under 24 hours (its own guard against
# deleting files of commits in flight), so that is the floor and the default here.
SPARK_MIN_ORPHAN_AGE_MINUTES = 24 * 60.0
# Every table is maintained by one run every 3 hours. Most of a pass's CPU is starting Spark's driver
# (bench/README.md, "Live cost"): one run for all tables starts it once per pass, not once per table.
# Snapshots superseded less than snapshot_max_age_hours ago are kept whatever the cadence; Bronze, which
# commits every 10-30 s, declares 1 hour (bronze/tables.py), so it holds 1 to 4 hours of commits.
# At :14, midway between the running hour's refresh ticks at :12 and :16 (REFRESH_CRON, every 4 minutes)
# and after the closed hour's completions (:05, :10): a pass (~1 minute; a Spark driver and a run worker,
# 0.7-0.9 GiB) then runs between two refresh runs (~0.3-0.4 GiB each) instead of beside one, so the live
# tree's peak is rest + pass, not rest + pass + refresh; at :15 a pass of a minute ran into the :16
# refresh. Placement, not a guarantee: a pass or a refresh that runs long still overlaps, harmlessly
# (each retries a commit that meets the other's), only with the higher peak. The run queue could keep
# them apart only by serializing every automation run too (dagster.yaml's tag limits), and a refresh
# waiting out a pass would add its minute to Gold's lag.
MAINTENANCE_CRON = "14 */3 * * *"
# Longer than any pass should take, shorter than the schedule's period: a hung run ends before the next.
MAINTENANCE_MAX_RUNTIME_SECONDS = 170 * 60

TARGETS: tuple[MaintenanceTarget, ...] = (
    *(MaintenanceTarget(bronze_table_spec(e), "ingestion_date") for e in EXCHANGES),
    *(MaintenanceTarget(silver_table_spec(e), "exchange_date") for e in EXCHANGES),
    MaintenanceTarget(DLQ_TABLE_SPEC, "dlq_date"),
    MaintenanceTarget(GOLD_TABLE_SPEC, "exchange_date"),
    MaintenanceTarget(DEDUP_AUDIT_TABLE_SPEC, "exchange_date"),
)


class MaintenanceConfig(Tunables):
    """One pass's settings; the defaults suit scheduled runs. Unsafe values are refused, by name."""

    bounds_error: ClassVar[type[ValueError]] = MaintenanceConfigError

    snapshot_max_age_hours: float | None = Field(
        None,
        ge=MIN_SNAPSHOT_AGE_HOURS,
        description="Expire snapshots superseded this long ago (hours): a run still reading a younger one "
        f"would lose its files. Default: the table's {SNAPSHOT_MAX_AGE_PROPERTY} property, else "
        f"{DEFAULT_SNAPSHOT_MAX_AGE_HOURS:g}. Branch and tag heads (Bronze's offsets) never expire.",
    )
    orphan_min_age_minutes: float = Field(
        SPARK_MIN_ORPHAN_AGE_MINUTES,
        ge=SPARK_MIN_ORPHAN_AGE_MINUTES,
        description="Unreferenced files younger than this (minutes) are kept; Iceberg's "
        "remove_orphan_files refuses less.",
    )
    retention_days: int | None = Field(
        None,
        ge=1,
        description=f"Rows kept (whole days). Default: the table's {RETENTION_PROPERTY} property; "
        "none keeps rows forever.",
    )
    compact: bool = Field(COMPACT_BY_DEFAULT, description="Compact closed days with rewrite_data_files.")

    def policy(self, table: Table) -> MaintenancePolicy:
        """The validated policy for this table."""
        days = self.retention_days
        if days is None and RETENTION_PROPERTY in table.properties:
            days = int(table.properties[RETENTION_PROPERTY])
        snapshot_age = snapshot_max_age_hours(self.snapshot_max_age_hours, table.properties)
        return MaintenancePolicy(days, snapshot_age, self.orphan_min_age_minutes).validate()


def maintenance_asset_key(target: MaintenanceTarget) -> dg.AssetKey:
    return dg.AssetKey(["maintenance", target.spec.name])


def build_maintenance_asset(target: MaintenanceTarget) -> dg.AssetsDefinition:
    """`maintenance/<table>`: one pass over the table; its materialization metadata is the report."""
    spec = target.spec

    @dg.asset(
        key=maintenance_asset_key(target),
        group_name="maintenance",
        kinds={"iceberg", "spark"},
        description=f"Retention, compaction, manifest rewrite, snapshot expiry and orphan removal of {spec.identifier}.",
        metadata={"maintained_table": spec.identifier},
    )
    def maintenance(
        context: dg.AssetExecutionContext,
        config: MaintenanceConfig,
        iceberg: IcebergCatalogResource,
        spark: IcebergSparkResource,
    ) -> dg.MaterializeResult:
        table = iceberg.ensure_table(spec)
        policy = config.policy(table)
        report = maintain_table(
            spark.spark_session, spark.catalog_name, table, target, policy, datetime.now(UTC), config.compact
        )
        context.log.info(
            f"{spec.identifier}: {report.before.storage_files} -> {report.after.storage_files} files on disk, "
            f"{report.snapshots_expired} snapshots expired, {report.orphans_removed} orphans removed "
            f"in {report.duration_seconds:.1f} s"
        )
        return dg.MaterializeResult(metadata=report.metadata())

    return maintenance


def build_maintenance_job(name: str, targets: tuple[MaintenanceTarget, ...], description: str):
    """An asset job over `targets`' maintenance assets (an unresolved asset job: not exported by dagster)."""
    return dg.define_asset_job(
        name=name,
        selection=[maintenance_asset_key(t) for t in targets],
        description=description,
        tags={
            MAINTENANCE_TAG: targets[0].spec.name if len(targets) == 1 else "all",
            "dagster/max_runtime": str(MAINTENANCE_MAX_RUNTIME_SECONDS),
        },
    )


maintenance_assets = [build_maintenance_asset(t) for t in TARGETS]
# One job per table, to maintain one table by hand or from CI.
maintenance_jobs = {
    t.spec.name: build_maintenance_job(
        f"maintain_{t.spec.name}",
        (t,),
        f"Maintenance pass over {t.spec.identifier} with Iceberg's Spark procedures.",
    )
    for t in TARGETS
}
# The scheduled pass: every table, one after the other, on one Spark driver.
all_tables_maintenance_job = build_maintenance_job(
    "maintain_all_tables", TARGETS, "Maintenance pass over every K2 table with Iceberg's Spark procedures."
)
