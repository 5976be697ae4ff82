"""`silver_dlq_replay`: after a fix, send DLQ rows of chosen categories through Silver again.

The replay works from the DLQ's own copy of the raw bytes, not from Bronze, because the DLQ keeps 30
days while Bronze may already have dropped the records. For each (exchange, Silver partition) holding
rows of the chosen categories it decodes and validates those rows with the current code, then
rewrites the Silver partition with the recovered rows added (skipping any (topic, partition, offset)
Silver already has, so nothing is doubled) and rewrites the DLQ slice without them (rows that still
fail stay, with their new category). Each rewrite is one atomic commit; a run that dies between the
two is completed by the next one, which finds the recovered rows already in Silver and only drops
them from the DLQ. Conservation holds again once both commits are in.
"""

# No `from __future__ import annotations`: Dagster reads op parameter annotations at definition time.

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from k2_assets.partitions import hour_window
from k2_assets.silver.assets import (
    EVENT_HOURS_ADDED,
    SilverConfig,
    count_event_hours,
    dlq_asset_key,
    event_hour_keys,
    silver_asset_key,
)
from k2_assets.silver.rules import DlqCategory
from k2_assets.silver.tables import DLQ_TABLE_SPEC, silver_table_spec
from k2_assets.silver.transform import WriterSchemas, transform_batches
from k2_resources.exchanges import EXCHANGES, ExchangeConfig, exchange
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.io_manager import RowScope, read_scope, replace_rows
from k2_resources.kafka import SchemaRegistryResource


class DlqReplayConfig(SilverConfig):
    """Which DLQ rows to replay, validated with Silver's timestamp bounds."""

    categories: list[str] = Field(description="DLQ error categories to replay, e.g. ['VALIDATION_SIDE'].")
    exchanges: list[str] = Field(default_factory=list, description="Exchanges to replay; empty means all.")
    since_hours: int = Field(24 * 30, gt=0, description="Replay Silver partitions of the last N hours.")

    def validated(self) -> tuple[list[ExchangeConfig], list[str]]:
        known = {c.value for c in DlqCategory}
        unknown = sorted(set(self.categories) - known)
        if not self.categories or unknown:
            raise dg.Failure(f"categories must name DLQ categories from {sorted(known)}; unknown: {unknown}")
        chosen = [exchange(name) for name in self.exchanges] if self.exchanges else list(EXCHANGES)
        return chosen, list(self.categories)


def coordinates(rows: pa.Table | pa.RecordBatch) -> pa.Array:
    """`topic|partition|offset`, the identity of a Kafka record."""
    parts = [rows.column(name).cast(pa.string()) for name in ("topic", "partition", "offset")]
    return pc.binary_join_element_wise(*parts, "|")


def as_bronze(dlq: pa.Table) -> pa.Table:
    """DLQ rows in the shape Silver reads from Bronze."""
    ingested = dlq.column("bronze_ingestion_timestamp")
    return pa.table(
        {
            "raw_bytes": dlq.column("raw_bytes"),
            "message_key": dlq.column("message_key"),
            "topic": dlq.column("topic"),
            "partition": dlq.column("partition"),
            "offset": dlq.column("offset"),
            "kafka_timestamp": dlq.column("kafka_timestamp"),
            "ingestion_timestamp": ingested,
            "ingestion_date": dlq.column("dlq_date"),
        }
    )


def replay_partition(
    context: dg.OpExecutionContext,
    iceberg: IcebergCatalogResource,
    ex: ExchangeConfig,
    hour: str,
    categories: list[str],
    schemas: WriterSchemas,
    config: DlqReplayConfig,
) -> dict[str, int]:
    scope = RowScope(*hour_window(hour))
    dlq_table = iceberg.ensure_table(DLQ_TABLE_SPEC)
    slice_rows = read_scope(dlq_table, DLQ_TABLE_SPEC, RowScope(scope.start, scope.end, ex.name))
    dlq_rows = pa.Table.from_batches(list(slice_rows.batches()), schema=dlq_table.schema().as_arrow())
    chosen = pc.is_in(dlq_rows.column("error_category"), value_set=pa.array(categories))
    replayed, kept = dlq_rows.filter(chosen), dlq_rows.filter(pc.invert(chosen))
    results = list(
        transform_batches(
            as_bronze(replayed).to_batches(), ex, schemas, config.rules(), hour, datetime.now(UTC)
        )
    )
    recovered = (
        pa.Table.from_batches([s for s, _ in results], schema=results[0][0].schema) if results else None
    )
    still_failing = (
        pa.Table.from_batches([d for _, d in results], schema=results[0][1].schema) if results else None
    )

    silver_spec = silver_table_spec(ex)
    silver_table = iceberg.ensure_table(silver_spec)
    existing = read_scope(silver_table, silver_spec, scope)
    present = pa.concat_arrays([coordinates(b) for b in existing.batches()] or [pa.array([], pa.string())])
    new_rows = (
        recovered.filter(pc.invert(pc.is_in(coordinates(recovered), value_set=present)))
        if recovered
        else None
    )
    properties = {
        "dagster.run-id": context.run_id,
        "dagster.partition-key": hour,
        "k2.dlq-replay": ",".join(categories),
    }
    if new_rows is not None and new_rows.num_rows:
        replace_rows(
            silver_table,
            silver_spec,
            _with(read_scope(silver_table, silver_spec, scope).batches(), new_rows),
            scope,
            properties,
        )
    remaining = (
        pa.concat_tables([kept, still_failing.cast(kept.schema)]) if still_failing is not None else kept
    )
    replace_rows(dlq_table, DLQ_TABLE_SPEC, remaining, RowScope(scope.start, scope.end, ex.name), properties)
    counts = {
        "replayed": replayed.num_rows,
        "recovered": recovered.num_rows if recovered else 0,
        "added_to_silver": new_rows.num_rows if new_rows is not None else 0,
        "still_failing": still_failing.num_rows if still_failing is not None else 0,
    }
    # The event hours of the rows added to Silver: the Gold late-data sensor folds them into Gold.
    added: Counter[int] = Counter()
    if new_rows is not None and new_rows.num_rows:
        count_event_hours(added, new_rows)
    silver_metadata = {**counts, EVENT_HOURS_ADDED: dg.MetadataValue.json(event_hour_keys(added))}
    for key, metadata in ((silver_asset_key(ex), silver_metadata), (dlq_asset_key(ex), counts)):
        context.log_event(
            dg.AssetMaterialization(
                asset_key=key, partition=hour, metadata=metadata, description="silver_dlq_replay"
            )
        )
    return counts


def _with(batches: Iterator[pa.RecordBatch], extra: pa.Table) -> Iterator[pa.RecordBatch]:
    yield from batches
    yield from extra.to_batches()


def hours_with(
    iceberg: IcebergCatalogResource, ex: ExchangeConfig, categories: list[str], since: datetime
) -> list[str]:
    dlq_table = iceberg.ensure_table(DLQ_TABLE_SPEC)
    stream = read_scope(
        dlq_table,
        DLQ_TABLE_SPEC,
        RowScope(since, datetime.now(UTC) + timedelta(hours=1), ex.name),
        columns=("error_category", "silver_partition"),
    )
    hours: set[str] = set()
    for batch in stream.batches():
        chosen = batch.filter(pc.is_in(batch.column("error_category"), value_set=pa.array(categories)))
        hours |= set(chosen.column("silver_partition").to_pylist())
    return sorted(hours)


@dg.op(description="Replay DLQ rows of the chosen categories through the current Silver code.")
def replay_dlq_rows(
    context: dg.OpExecutionContext,
    config: DlqReplayConfig,
    schema_registry: SchemaRegistryResource,
    iceberg: IcebergCatalogResource,
) -> None:
    chosen, categories = config.validated()
    since = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=config.since_hours)
    schemas = WriterSchemas(schema_registry.client())
    for ex in chosen:
        for hour in hours_with(iceberg, ex, categories, since):
            counts = replay_partition(context, iceberg, ex, hour, categories, schemas, config)
            context.log.info(f"{ex.name} {hour}: {counts}")


# A replay of 30 days of DLQ is long but not endless: past this it is hung and run monitoring ends it.
REPLAY_MAX_RUNTIME_SECONDS = 6 * 3600


@dg.job(
    description="Send DLQ rows of chosen categories through Silver again after a fix, without doubling any.",
    tags={"dagster/max_runtime": str(REPLAY_MAX_RUNTIME_SECONDS)},
)
def silver_dlq_replay() -> None:
    replay_dlq_rows()
