"""`gold_crypto_trades`: every valid trade of every exchange, once, by event hour.

Gold partition H is computed from scratch from the Silver rows of all exchanges whose trade time falls
in H, wherever those rows sit in Silver (a trade that arrived days late is in an old event hour but a
new Silver partition). Exact duplicates (same message_id) are dropped, keeping the first ingested
copy; rows the dedup job removed (listed in `gold_dedup_audit`) stay removed on every re-run.
PyIceberg plans Silver's files and DuckDB reads them itself (matching columns by Iceberg field id,
`dedup.register_scans`), drops the removed rows and the duplicates (spilling by itself beyond its memory
limit) and sorts by trade time, and the IO manager writes DuckDB's Arrow result as rolling data files in
one commit: memory is bounded whatever the hour's size.
"""

# No `from __future__ import annotations`: Dagster reads op parameter annotations at definition time.

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan, LessThanOrEqual
from pyiceberg.io.pyarrow import schema_to_pyarrow
from pyiceberg.table import Table

from k2_assets.gold.checks import gold_check_specs, matches_silver_result, no_duplicates_result
from k2_assets.gold.dedup import (
    DedupPlan,
    DuckDBConfig,
    connect,
    first_copies_sql,
    first_orders_sql,
    register_scans,
    results,
    without_removed_sql,
)
from k2_assets.gold.tables import DEDUP_AUDIT_TABLE_SPEC, GOLD_TABLE_SPEC
from k2_assets.partitions import (
    MICROS_PER_HOUR,
    accepting_beta,
    hourly_automation,
    hourly_partitions,
    to_micros,
)
from k2_assets.silver.assets import IO_MANAGER_KEY, silver_asset_key
from k2_assets.silver.tables import silver_table_spec
from k2_resources.engine import EngineResource
from k2_resources.exchanges import EXCHANGES
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.io_manager import RowScope, read_scope, stream_scan
from k2_resources.trade_schema import V2_FIELD_NAMES

if TYPE_CHECKING:
    import duckdb

GOLD_KEY = dg.AssetKey(GOLD_TABLE_SPEC.name)
LINEAGE_COLUMNS = ("bronze_ingestion_timestamp", "topic", "partition", "offset")
FIRST_INGESTED = DedupPlan(key=["message_id"], order=list(LINEAGE_COLUMNS), output_order=["timestamp"])
# Gold output metadata: when the Silver snapshots this materialisation was computed from were pinned.
SILVER_READ_AT = "silver_read_at"


def event_time_filter(start: datetime, end: datetime):
    """Trades with start <= timestamp < end; the exchange_date bounds let Iceberg prune Silver's day partitions."""
    last_day = (end - timedelta(microseconds=1)).date()
    return And(
        GreaterThanOrEqual("exchange_date", start.date().isoformat()),
        LessThanOrEqual("exchange_date", last_day.isoformat()),
        GreaterThanOrEqual("timestamp", to_micros(start)),
        LessThan("timestamp", to_micros(end)),
    )


class SilverTrades:
    """The Silver rows of every exchange whose trade time falls in a window, pinned to snapshots.

    `read_at` is taken before the snapshots are pinned: every Silver commit older than it is in what
    this reads, which is how the late-data sensor tells whether a Gold hour has seen a Silver change.
    """

    def __init__(self, iceberg: IcebergCatalogResource, start: datetime, end: datetime):
        self.start, self.end = start, end
        self.read_at = datetime.now(UTC)
        self.tables: list[Table] = [iceberg.ensure_table(silver_table_spec(e)) for e in EXCHANGES]
        self.snapshots = {
            t.name()[-1]: (t.current_snapshot().snapshot_id if t.current_snapshot() else None)
            for t in self.tables
        }

    def _scans(self, columns: tuple[str, ...]):
        for table in self.tables:
            snapshot_id = self.snapshots[table.name()[-1]]
            if snapshot_id is not None:
                yield table.scan(
                    row_filter=event_time_filter(self.start, self.end),
                    snapshot_id=snapshot_id,
                    selected_fields=columns,
                )

    def batches(
        self, columns: tuple[str, ...] = V2_FIELD_NAMES + LINEAGE_COLUMNS
    ) -> Iterator[pa.RecordBatch]:
        for scan in self._scans(columns):
            yield from stream_scan(scan)

    def schema(self, columns: tuple[str, ...]) -> pa.Schema:
        return schema_to_pyarrow(self.tables[0].schema().select(*columns))

    def register(
        self,
        con: "duckdb.DuckDBPyConnection",
        name: str,
        columns: tuple[str, ...] = V2_FIELD_NAMES + LINEAGE_COLUMNS,
    ) -> None:
        """The rows as DuckDB relation `name`, read by DuckDB from Silver's files (see `register_scans`)."""
        where = f'"timestamp" >= {to_micros(self.start)} AND "timestamp" < {to_micros(self.end)}'
        register_scans(con, name, list(self._scans(columns)), where, self.schema(columns))


REMOVED_SCHEMA = pa.schema([("message_id", pa.string()), ("event_hour", pa.int64())])


def audited_removals(iceberg: IcebergCatalogResource, start: datetime, end: datetime) -> pa.Table:
    """(message_id, event hour index) of every Gold row the dedup job removed in the window, once each."""
    audit = iceberg.ensure_table(DEDUP_AUDIT_TABLE_SPEC)
    if audit.current_snapshot() is None:
        return REMOVED_SCHEMA.empty_table()
    rows = audit.scan(
        row_filter=event_time_filter(start, end), selected_fields=("message_id", "timestamp")
    ).to_arrow()
    return removal_keys(rows)


def removal_keys(audit_rows: pa.Table) -> pa.Table:
    """(message_id, event hour index) of audit rows, once each."""
    keys = pa.table(
        [audit_rows["message_id"], pc.divide(audit_rows["timestamp"], MICROS_PER_HOUR)], schema=REMOVED_SCHEMA
    )
    return keys.group_by(["message_id", "event_hour"]).aggregate([])


def row_keys(rows: pa.Table | pa.RecordBatch) -> pa.Array:
    """`message_id|event hour index`: identifies one Gold row (message_ids are unique within an hour)."""
    hour = pc.divide(rows.column("timestamp"), MICROS_PER_HOUR).cast(pa.string())
    return pc.binary_join_element_wise(rows.column("message_id").cast(pa.string()), hour, "|")


def to_gold(batch: pa.RecordBatch, now: datetime) -> pa.RecordBatch:
    """Silver columns -> the Gold columns (GOLD_SCHEMA)."""
    hours = pc.divide(batch.column("timestamp"), MICROS_PER_HOUR)
    days = pc.divide(hours, 24)
    columns = {name: batch.column(name) for name in V2_FIELD_NAMES}
    columns["gold_ingestion_timestamp"] = pa.array([now] * batch.num_rows, pa.timestamp("us", tz="UTC"))
    columns["exchange_date"] = days.cast(pa.int32()).cast(pa.date32())
    columns["exchange_hour"] = pc.subtract(hours, pc.multiply(days, 24)).cast(pa.int32())
    return pa.RecordBatch.from_pydict(columns)


@dataclass(frozen=True)
class SilverCounts:
    rows: int  # Silver rows in the window
    removed: int  # of which the dedup job removed
    distinct_trades: int  # distinct message_ids among the others


def count_silver(silver: SilverTrades, removed: pa.Table, engine: DuckDBConfig) -> SilverCounts:
    """Silver rows of the window, those the dedup job removed, and distinct message_ids of the rest."""
    with connect(engine) as con:
        silver.register(con, "silver", ("message_id", "timestamp"))
        con.register("removed", removed)
        rows, gone, distinct = con.execute(
            "SELECT count(*), count(r.message_id), count(DISTINCT s.message_id) FILTER (r.message_id IS NULL) "
            "FROM silver s LEFT JOIN removed r "
            f"ON s.message_id = r.message_id AND s.timestamp // {MICROS_PER_HOUR} = r.event_hour"
        ).fetchone()
    return SilverCounts(rows, gone, distinct)


class GoldStream:
    """The Gold rows of a window, streamed into the IO manager, with what was dropped on the way.

    `refresh()` re-reads Silver and the dedup audit: the IO manager calls it when its commit met a
    concurrent write of the same hour, so the retry writes a fresh computation, never the stale one.
    """

    def __init__(
        self,
        iceberg: IcebergCatalogResource,
        start: datetime,
        end: datetime,
        engine: DuckDBConfig | None = None,
    ):
        self.iceberg, self.start, self.end = iceberg, start, end
        self.engine = engine or DuckDBConfig()
        self.refresh()

    def refresh(self) -> None:
        self.silver = SilverTrades(self.iceberg, self.start, self.end)
        self.removed = audited_removals(self.iceberg, self.start, self.end)
        self.gold_rows = 0
        self._counts: SilverCounts | None = None
        self.now = datetime.now(UTC)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        with connect(self.engine) as con:
            self.silver.register(con, "silver")
            self.silver.register(con, "silver_keys", ("message_id", "timestamp", *LINEAGE_COLUMNS))
            con.register("removed", self.removed)
            # The few keys that repeat, with the lineage of their first copy: a small table, built
            # before the full rows stream (its hash tables then no longer hold memory).
            keys = without_removed_sql("silver_keys", "removed")
            con.execute(f"CREATE TEMP TABLE first_orders AS {first_orders_sql(keys, FIRST_INGESTED)}")
            query = first_copies_sql(without_removed_sql("silver", "removed"), "first_orders", FIRST_INGESTED)
            # The sorted result goes into a table first: DuckDB (1.5) runs out of memory returning an
            # ORDER BY result to the client when the rows nearly fit its memory limit (measured: 300K rows
            # at 256 MB), while a table spills. Insertion order is kept for these two statements only.
            con.execute("SET preserve_insertion_order = true")
            con.execute(f"CREATE TABLE gold AS {query}")
            for batch in results(con, "SELECT * FROM gold"):
                self.gold_rows += batch.num_rows
                yield to_gold(batch, self.now)

    def counts(self) -> SilverCounts:
        """The window's Silver rows counted again (not by the write): what Gold must hold."""
        if self._counts is None:
            self._counts = count_silver(self.silver, self.removed, self.engine)
        return self._counts

    def output_metadata(self) -> dict:
        counts = self.counts()
        return {
            "silver_rows_in_window": counts.rows,
            "exact_duplicates_dropped": counts.rows - counts.removed - self.gold_rows,
            "removed_by_dedup_job": counts.removed,
            "silver_snapshots": dg.MetadataValue.json({k: str(v) for k, v in self.silver.snapshots.items()}),
            SILVER_READ_AT: dg.MetadataValue.timestamp(self.silver.read_at),
        }


@accepting_beta(dg.asset)(
    key=GOLD_KEY,
    partitions_def=hourly_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[
        dg.AssetDep(
            silver_asset_key(e),
            partition_mapping=accepting_beta(dg.TimeWindowPartitionMapping)(
                start_offset=0, end_offset=1, allow_nonexistent_upstream_partitions=True
            ),
        )
        for e in EXCHANGES
    ],
    io_manager_key=IO_MANAGER_KEY,
    group_name="gold",
    kinds={"iceberg"},
    description=GOLD_TABLE_SPEC.description,
    metadata={"table": GOLD_TABLE_SPEC.name},
    check_specs=gold_check_specs(GOLD_KEY),
    automation_condition=hourly_automation(complete_at_minute=10),
)
def gold_crypto_trades(
    context: dg.AssetExecutionContext,
    config: DuckDBConfig,
    iceberg: IcebergCatalogResource,
    engine: EngineResource,
):
    # --- engine dispatch: K2_ENGINE=spark computes the window on Spark (k2_assets/gold/spark_engine.py)
    if engine.on_spark:
        from k2_assets.gold.spark_engine import gold_on_spark

        yield from gold_on_spark(context, config, engine, iceberg)
        return
    # --- end engine dispatch
    window = context.partition_time_window
    stream = GoldStream(iceberg, window.start, window.end, config)
    yield dg.Output(stream)
    # What the committed write was computed from (a recomputed write refreshed the stream).
    gold = read_scope(
        iceberg.load_table(GOLD_TABLE_SPEC), GOLD_TABLE_SPEC, RowScope(window.start, window.end)
    )
    yield no_duplicates_result(GOLD_KEY, gold, config)
    yield matches_silver_result(GOLD_KEY, gold.count(), stream.counts().distinct_trades)
