"""Per-exchange Bronze jobs: long-running ingestion, and daily retention that really frees storage."""

# No `from __future__ import annotations` here: Dagster reads op parameter annotations at definition time.

from datetime import UTC, datetime
from typing import ClassVar

import dagster as dg
from pydantic import Field
from pyiceberg.expressions import LessThan
from pyiceberg.table import Table
from pyiceberg.table.snapshots import ancestors_of

from k2_assets.bronze.assets import bronze_asset_key
from k2_assets.bronze.ingestion import (
    LIVE_FETCH_MIN_BYTES,
    BronzeIngestionConfig,
    CommitReport,
    TopicIngestion,
)
from k2_assets.bronze.tables import bronze_table_spec
from k2_assets.tunables import Tunables
from k2_resources.exchanges import EXCHANGES, ExchangeConfig
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.iceberg_maintenance import (
    DEFAULT_ORPHAN_MIN_AGE_MINUTES,
    DEFAULT_SNAPSHOT_MAX_AGE_HOURS,
    MIN_ORPHAN_AGE_MINUTES,
    MIN_SNAPSHOT_AGE_HOURS,
    SNAPSHOT_MAX_AGE_PROPERTY,
    MaintenanceConfigError,
    MaintenancePolicy,
    reclaim_storage,
    retry_on_conflict,
    snapshot_max_age_hours,
)
from k2_resources.kafka import KafkaResource, close_consumer

INGESTION_TAG = "k2/ingestion"
# Runs that maintain tables carry this tag; dagster.yaml limits how many run at once.
MAINTENANCE_TAG = "k2/maintenance"
# Half as long again as a run's default max_runtime_seconds: run monitoring ends a run that
# hangs, and the sensor then starts the next one.
INGESTION_MAX_RUNTIME_SECONDS = int(1.5 * BronzeIngestionConfig.default_of("max_runtime_seconds"))
# A retention run that has not finished in this long is hung; the next day's run starts afresh.
RETENTION_MAX_RUNTIME_SECONDS = 3 * 3600


def build_ingestion_job(exchange: ExchangeConfig) -> dg.JobDefinition:
    """`bronze_<exchange>_ingestion`: consume the topic into Bronze until drained, stopped or timed out."""
    table_spec = bronze_table_spec(exchange)
    asset_key = bronze_asset_key(exchange)

    @dg.op(
        name=f"ingest_{exchange.name}_trades",
        description=f"Consume {exchange.topic} into {table_spec.identifier}.",
    )
    def ingest(
        context: dg.OpExecutionContext,
        config: BronzeIngestionConfig,
        kafka: KafkaResource,
        iceberg: IcebergCatalogResource,
    ) -> None:
        settings = config.settings(exchange)
        table = iceberg.ensure_table(table_spec)
        kafka.wait_until_reachable(settings.broker_timeout_seconds)
        # A fetch.min.bytes set by configuration (K2_KAFKA__FETCH_MIN_BYTES) wins.
        fetch = {} if "fetch.min.bytes" in kafka.client_config else {"fetch.min.bytes": LIVE_FETCH_MIN_BYTES}
        consumer = kafka.consumer(exchange.consumer_group, **fetch)

        def report(commit: CommitReport) -> None:
            context.log_event(dg.AssetMaterialization(asset_key=asset_key, metadata=commit.metadata()))

        try:
            ingestion = TopicIngestion(
                table=table,
                consumer=consumer,
                topic=exchange.topic,
                settings=settings,
                run_id=context.run_id,
                watermarks=lambda ps, cached: kafka.watermarks(consumer, exchange.topic, ps, cached),
                partitions=lambda: kafka.partitions(consumer, exchange.topic),
                topic_id=kafka.topic_id(exchange.topic),
                on_commit=report,
            )
            summary = ingestion.run()
        finally:
            close_consumer(consumer)
        context.log.info(
            f"Ingested {summary.rows} records of {exchange.topic} in {summary.commits} commits; "
            f"stopped: {summary.stop_reason}; offsets {summary.start_offsets} -> {summary.end_offsets}"
        )
        if summary.gaps:
            context.log.warning(f"Accepted Kafka gaps: {summary.gaps}")

    @dg.job(
        name=f"bronze_{exchange.name}_ingestion",
        description=f"Long-running ingestion of {exchange.topic} into {table_spec.identifier}, exactly once.",
        tags={INGESTION_TAG: exchange.name, "dagster/max_runtime": str(INGESTION_MAX_RUNTIME_SECONDS)},
    )
    def ingestion_job() -> None:
        ingest()

    return ingestion_job


class BronzeRetentionConfig(Tunables):
    """Row retention defaults to the exchange's; snapshots expire after hours; the orphan grace has a floor."""

    bounds_error: ClassVar[type[ValueError]] = MaintenanceConfigError

    retention_days: int | None = Field(
        None, ge=1, description="Rows kept (whole days). Default: the exchange's Bronze retention."
    )
    snapshot_max_age_hours: float | None = Field(
        None,
        ge=MIN_SNAPSHOT_AGE_HOURS,
        description="Expire snapshots superseded this long ago (hours): a run still reading a younger one "
        f"would lose its files. Default: the table's {SNAPSHOT_MAX_AGE_PROPERTY} property, else "
        f"{DEFAULT_SNAPSHOT_MAX_AGE_HOURS:g}. The offsets tag's snapshot never expires.",
    )
    orphan_min_age_minutes: float = Field(
        DEFAULT_ORPHAN_MIN_AGE_MINUTES,
        ge=MIN_ORPHAN_AGE_MINUTES,
        description="Unreferenced files younger than this (minutes) are kept: a write still in flight "
        "could be younger, and deleting its files would corrupt the table when it commits.",
    )

    def policy(self, exchange: ExchangeConfig, table: Table) -> MaintenancePolicy:
        """The validated policy: refuses settings that would lose rows or delete files in flight."""
        days = self.retention_days if self.retention_days is not None else exchange.retention_days
        snapshot_age = snapshot_max_age_hours(self.snapshot_max_age_hours, table.properties)
        return MaintenancePolicy(days, snapshot_age, self.orphan_min_age_minutes).validate()


def apply_bronze_retention(table: Table, policy: MaintenancePolicy, now: datetime) -> dict[str, int | float]:
    """Delete rows older than the retention, expire old snapshots, delete files nothing references."""
    cutoff = policy.rows_expire_before(now)
    assert cutoff is not None, "Bronze always has a row retention"

    def delete_old(t: Table) -> tuple[Table, int]:
        before = t.current_snapshot()
        t.delete(
            LessThan("ingestion_date", cutoff.date().isoformat()),
            snapshot_properties={"k2.retention": "rows"},
        )
        # Counted from the delete's own snapshots: ingestion may commit rows meanwhile.
        deleted = 0
        for snapshot in ancestors_of(t.current_snapshot(), t.metadata):
            if before is not None and snapshot.snapshot_id == before.snapshot_id:
                break
            deleted += int(snapshot.summary.additional_properties.get("deleted-records", 0))
        return t.refresh(), deleted

    table, deleted_rows = retry_on_conflict(table, delete_old)
    reclaimed = reclaim_storage(table, policy.snapshots_expire_before(now), policy.orphan_min_age)
    return {
        "retention_days": policy.retention_days or 0,
        "snapshot_max_age_hours": policy.snapshot_max_age_hours,
        "deleted_rows": deleted_rows,
        "rows": table.scan().count(),
        "expired_snapshots": reclaimed.expired_snapshots,
        "deleted_files": reclaimed.deleted_files,
        "deleted_bytes": reclaimed.deleted_bytes,
    }


def build_retention_job(exchange: ExchangeConfig) -> dg.JobDefinition:
    """`bronze_<exchange>_retention`: delete old rows, expire old snapshots, delete unreferenced files."""
    table_spec = bronze_table_spec(exchange)

    @dg.op(name=f"apply_{exchange.name}_bronze_retention")
    def apply_retention(
        context: dg.OpExecutionContext, config: BronzeRetentionConfig, iceberg: IcebergCatalogResource
    ) -> None:
        table = iceberg.ensure_table(table_spec)
        policy = config.policy(exchange, table)
        metadata = apply_bronze_retention(table, policy, datetime.now(UTC))
        context.log_event(
            dg.AssetMaterialization(
                asset_key=bronze_asset_key(exchange), metadata=metadata, description="retention"
            )
        )

    @dg.job(
        name=f"bronze_{exchange.name}_retention",
        description=f"Daily retention of {table_spec.identifier}.",
        tags={MAINTENANCE_TAG: "bronze", "dagster/max_runtime": str(RETENTION_MAX_RUNTIME_SECONDS)},
    )
    def retention_job() -> None:
        apply_retention()

    return retention_job


ingestion_jobs = {e.name: build_ingestion_job(e) for e in EXCHANGES}
retention_jobs = {e.name: build_retention_job(e) for e in EXCHANGES}
