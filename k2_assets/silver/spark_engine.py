"""Silver's pass as Spark jobs (K2_ENGINE=spark): the same decode, validation and DLQ routing.

The Bronze window is read through Iceberg's Spark runtime at the snapshot the driver pinned, and
every Spark task runs the embedded engine's own transformation (`transform_batches`) on its Arrow
batches inside `mapInArrow`. Decoding by schema id with schema resolution, the DLQ categories and
their messages, and the per-batch conservation check are therefore the embedded engine's, not a
re-implementation: both engines give the same rows by construction, which the differential test
checks. (Why not spark-avro's `from_avro`: it reads one fixed writer schema per call, knows nothing of
Confluent's 5-byte header or of schema ids, and in PERMISSIVE mode turns a bad record into a null
without saying why, so the DLQ categories could not be told apart; bench/README.md has the figures.)

Writer schemas are fetched once on the driver for the schema ids Bronze holds and shipped to the
tasks as a read-only registry snapshot, so executors never need the registry, and a registry that
answers wrongly fails the run on the driver before any task starts, as in the embedded engine.

The routed rows are persisted on disk (bounded memory per executor: Arrow batches of
`spark.sql.execution.arrow.maxRecordsPerBatch` rows), counted once, then written as one
overwrite-by-filter commit per table (Silver first, then the exchange's DLQ slice), exactly the
scopes the embedded engine replaces.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from k2_assets.bronze.tables import bronze_table_spec
from k2_assets.partitions import HOUR_KEY_FORMAT, MICROS_PER_HOUR
from k2_assets.silver.assets import (
    EVENT_HOURS,
    PASS_PARTITIONS,
    dlq_asset_key,
    event_hour_keys,
    refuse_if_bronze_expired,
    silver_asset_key,
)
from k2_assets.silver.checks import conservation_result, dlq_rate_result
from k2_assets.silver.rules import ValidationRules
from k2_assets.silver.tables import DLQ_TABLE_SPEC, silver_table_spec
from k2_assets.silver.transform import SCHEMA_NOT_FOUND, RegistryUnusable, WriterSchemas, transform_batches
from k2_resources.engine import (
    ENGINE_METADATA,
    SPARK,
    CommittedWrite,
    EngineResource,
    read_snapshot,
    replace_scope,
    scope_condition,
    spark_failures,
)
from k2_resources.exchanges import ExchangeConfig
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.io_manager import RowScope, read_scope, write_metadata

SILVER_PREFIX, DLQ_PREFIX, KIND = "s__", "d__", "k2_kind"  # columns of the routed frame
# Bronze bytes per read task: about 40K records of ~200 bytes, so an hour's decoding spreads over the
# executors' cores instead of landing in the one task Iceberg's 128 MB splits would make.
BRONZE_SPLIT_BYTES = 8 * 1024 * 1024


# --- Writer schemas for the tasks ---------------------------------------------------------------------


class RegistrySnapshot:
    """The registry's answers for a fixed set of schema ids, as a read-only `SchemaRegistryClient`
    stand-in that pickles: what `WriterSchemas` asks on an executor, answered from the driver's fetch."""

    def __init__(self, schemas: dict[int, tuple[str, str, list] | None]):
        self.schemas = schemas

    @classmethod
    def fetch(cls, client: SchemaRegistryClient, schema_ids: list[int]) -> RegistrySnapshot:
        schemas: dict[int, tuple[str, str, list] | None] = {}
        for schema_id in schema_ids:
            try:
                found = client.get_schema(schema_id)
            except SchemaRegistryError as err:
                if err.http_status_code == 404 and err.error_code == SCHEMA_NOT_FOUND:
                    schemas[schema_id] = None
                    continue
                raise RegistryUnusable(schema_id, err) from err
            schemas[schema_id] = (found.schema_str, found.schema_type or "AVRO", list(found.references or []))
        return cls(schemas)

    def get_schema(self, schema_id: int) -> Schema:
        found = self.schemas.get(schema_id)
        if found is None:
            raise SchemaRegistryError(404, SCHEMA_NOT_FOUND, f"Schema {schema_id} not found")
        schema_str, schema_type, references = found
        return Schema(schema_str, schema_type, references)


def bronze_schema_ids(bronze: Any) -> list[int]:
    """Distinct schema ids in the Confluent headers of the Bronze rows (values without one are skipped:
    they go to the DLQ before any schema is looked up)."""
    from pyspark.sql import functions as F

    raw = F.col("raw_bytes")
    framed = (F.length(raw) >= 5) & (F.hex(F.substring(raw, 1, 1)) == "00")
    unsigned = F.conv(F.hex(F.substring(raw, 2, 4)), 16, 10).cast("long")
    signed = F.when(unsigned >= 2**31, unsigned - 2**32).otherwise(unsigned)
    rows = bronze.where(framed).select(signed.alias("id")).distinct().collect()
    return sorted(int(row.id) for row in rows)


# --- The routed frame ---------------------------------------------------------------------------------


def routed_schema(silver: Any, dlq: Any) -> Any:
    """One row per Bronze row: its kind, then the Silver columns or the DLQ columns (the other null)."""
    from pyspark.sql.types import StringType, StructField, StructType

    fields = [StructField(KIND, StringType(), False)]
    fields += [StructField(SILVER_PREFIX + f.name, f.dataType, True) for f in silver.fields]
    fields += [StructField(DLQ_PREFIX + f.name, f.dataType, True) for f in dlq.fields]
    return StructType(fields)


def routed_batch(silver: pa.RecordBatch, dlq: pa.RecordBatch, target: pa.Schema) -> pa.RecordBatch:
    """Silver rows then DLQ rows of one Bronze batch in the routed layout, typed as Spark expects."""
    columns: dict[str, pa.Array] = {KIND: pa.array(["silver"] * silver.num_rows + ["dlq"] * dlq.num_rows)}
    for prefix, own, other in ((SILVER_PREFIX, silver, dlq), (DLQ_PREFIX, dlq, silver)):
        for name in own.schema.names:
            spark_type = target.field(prefix + name).type
            values = own.column(name).cast(spark_type)
            if prefix == SILVER_PREFIX:
                columns[prefix + name] = pa.concat_arrays([values, pa.nulls(other.num_rows, spark_type)])
            else:
                columns[prefix + name] = pa.concat_arrays([pa.nulls(other.num_rows, spark_type), values])
    return pa.RecordBatch.from_arrays([columns[f.name] for f in target], schema=target)


def with_hour_keys(dlq: pa.RecordBatch) -> pa.RecordBatch:
    """The DLQ rows' silver_partition = the hour of their Bronze ingestion (as the embedded pass spills
    them), whatever range the run covered."""
    if dlq.num_rows == 0:
        return dlq
    keys = pc.strftime(dlq.column("bronze_ingestion_timestamp"), format=HOUR_KEY_FORMAT)
    return dlq.set_column(dlq.schema.get_field_index("silver_partition"), "silver_partition", keys)


def as_read_by_pyiceberg(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A Bronze batch from Spark with raw_bytes as large_binary, the type PyIceberg reads it as: Spark
    hands 32-bit-offset binary, on which pyarrow 26's binary_slice fails ("Negative buffer resize")."""
    index = batch.schema.get_field_index("raw_bytes")
    if pa.types.is_large_binary(batch.schema.field(index).type):
        return batch
    return batch.set_column(index, "raw_bytes", batch.column(index).cast(pa.large_binary()))


class RouteTask:
    """The function each Spark task applies to its Bronze batches (pickled to the executors)."""

    def __init__(
        self,
        exchange: ExchangeConfig,
        registry: RegistrySnapshot,
        rules: ValidationRules,
        partition_key: str,
        now: datetime,
        target: pa.Schema,
    ):
        self.exchange, self.registry, self.rules = exchange, registry, rules
        self.partition_key, self.now, self.target = partition_key, now, target

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        schemas = WriterSchemas(self.registry)  # type: ignore[arg-type]  # answers get_schema like a client
        bronze = (as_read_by_pyiceberg(batch) for batch in batches)
        for silver, dlq in transform_batches(
            bronze, self.exchange, schemas, self.rules, self.partition_key, self.now
        ):
            yield routed_batch(silver, with_hour_keys(dlq), self.target)


def part(routed: Any, kind: str, prefix: str, names: list[str]) -> Any:
    from pyspark.sql import functions as F

    return routed.where(F.col(KIND) == kind).select([F.col(prefix + n).alias(n) for n in names])


class PassCounts:
    """What the embedded SilverPass counts, from one aggregation over the routed rows."""

    def __init__(self, routed: Any):
        from pyspark.sql import functions as F

        hour = F.when(F.col(KIND) == "silver", F.expr(f"{SILVER_PREFIX}timestamp div {MICROS_PER_HOUR}"))
        rows = routed.groupBy(KIND, F.col(DLQ_PREFIX + "error_category").alias("c"), hour.alias("h")).count()
        self.silver_rows = self.dlq_rows = 0
        self.categories: Counter[str] = Counter()
        self.event_hours: Counter[int] = Counter()
        for row in rows.collect():
            if row[KIND] == "silver":
                self.silver_rows += row["count"]
                self.event_hours[int(row.h)] += row["count"]
            else:
                self.dlq_rows += row["count"]
                self.categories[row.c] += row["count"]


# --- The asset body -----------------------------------------------------------------------------------


def silver_on_spark(
    context: dg.AssetExecutionContext,
    engine: EngineResource,
    exchange: ExchangeConfig,
    rules: ValidationRules,
    registry_client: SchemaRegistryClient,
    iceberg: IcebergCatalogResource,
) -> Iterator[Any]:
    """The Silver multi-asset's events (outputs, materialisations, checks) with the pass run on Spark."""
    from pyspark import StorageLevel
    from pyspark.sql.pandas.types import to_arrow_schema

    window = context.partition_time_window
    bronze_spec, silver_spec = bronze_table_spec(exchange), silver_table_spec(exchange)
    silver_scope = RowScope(window.start, window.end)
    dlq_scope = RowScope(window.start, window.end, exchange.name)
    bronze = read_scope(iceberg.ensure_table(bronze_spec), bronze_spec, silver_scope)
    refuse_if_bronze_expired(iceberg, exchange, bronze, window.start, window.end)
    silver_table, dlq_table = iceberg.ensure_table(silver_spec), iceberg.ensure_table(DLQ_TABLE_SPEC)
    label = partition_label(context)
    with spark_failures(f"Silver of {exchange.name} {label}"):
        spark, catalog = engine.session, engine.catalog_name  # a Spark that cannot start fails here
        source = read_snapshot(spark, catalog, bronze_spec, bronze.snapshot_id, BRONZE_SPLIT_BYTES)
        if source is None:  # no Bronze yet: an empty frame with Bronze's columns
            source = spark.table(f"{catalog}.{bronze_spec.identifier}")
        source = source.where(scope_condition(bronze_spec, silver_scope))
        registry = RegistrySnapshot.fetch(registry_client, bronze_schema_ids(source))
        silver_columns = spark.table(f"{catalog}.{silver_spec.identifier}").schema
        dlq_columns = spark.table(f"{catalog}.{DLQ_TABLE_SPEC.identifier}").schema
        schema = routed_schema(silver_columns, dlq_columns)
        task = RouteTask(exchange, registry, rules, label, datetime.now(UTC), to_arrow_schema(schema))
        routed = source.mapInArrow(task, schema).persist(StorageLevel.DISK_ONLY)
        try:
            counts = PassCounts(routed)
            properties = {"dagster.run-id": context.run_id, "dagster.partition-key": label}
            silver_frame = part(routed, "silver", SILVER_PREFIX, silver_columns.names)
            silver_props = {**properties, "dagster.asset-key": silver_asset_key(exchange).to_user_string()}
            silver_report = replace_scope(
                silver_frame, catalog, silver_spec, silver_scope, silver_props, iceberg
            )
            dlq_frame = part(routed, "dlq", DLQ_PREFIX, dlq_columns.names)
            dlq_props = {**properties, "dagster.asset-key": dlq_asset_key(exchange).to_user_string()}
            dlq_report = replace_scope(dlq_frame, catalog, DLQ_TABLE_SPEC, dlq_scope, dlq_props, iceberg)
        finally:
            routed.unpersist()
    engine_meta = {ENGINE_METADATA: SPARK, "spark_master": spark_where(engine)}
    silver_meta = {
        **write_metadata(silver_report, silver_spec, silver_scope, None),
        EVENT_HOURS: dg.MetadataValue.json(event_hour_keys(counts.event_hours)),
        PASS_PARTITIONS: len(context.partition_keys),
        "dlq_rows": counts.dlq_rows,
        **engine_meta,
    }
    dlq_meta = {
        **write_metadata(dlq_report, DLQ_TABLE_SPEC, dlq_scope, None),
        **{f"dlq_{k.lower()}": v for k, v in sorted(counts.categories.items())},
        **engine_meta,
    }
    yield from recorded(context, "silver", silver_meta)
    yield from recorded(context, "dlq", dlq_meta)
    silver_key = silver_asset_key(exchange)
    silver_rows = read_scope(silver_table.refresh(), silver_spec, silver_scope).count()
    dlq_rows = read_scope(dlq_table.refresh(), DLQ_TABLE_SPEC, dlq_scope).count()
    bronze_rows = bronze.count()
    results = [
        conservation_result(silver_key, bronze_rows, silver_rows, dlq_rows, bronze.snapshot_id),
        dlq_rate_result(silver_key, exchange, bronze_rows, dlq_rows, counts.categories),
    ]
    selected = context.selected_asset_check_keys
    yield from (r for r in results if dg.AssetCheckKey(silver_key, r.check_name) in selected)


def partition_label(context: dg.AssetExecutionContext) -> str:
    """The partition key of a one-hour run, else the JSON list of the range's keys (as embedded)."""
    keys = context.partition_keys
    return keys[0] if len(keys) == 1 else json.dumps(keys)


def spark_where(engine: EngineResource) -> str:
    return engine.spark.remote or engine.spark.master


def recorded(context: dg.AssetExecutionContext, output_name: str, metadata: dict) -> Iterator[Any]:
    """A committed output: through the IO manager (which only records it) when selected, otherwise as
    a materialisation of each partition, as the embedded engine records an unselected output."""
    if output_name in context.selected_output_names:
        yield dg.Output(CommittedWrite(metadata), output_name=output_name)
        return
    key = context.asset_key_for_output(output_name)
    for partition in context.partition_keys:
        context.log_event(dg.AssetMaterialization(asset_key=key, partition=partition, metadata=metadata))
