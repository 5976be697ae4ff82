"""Silver assets: per exchange, one hourly partition = the Bronze rows ingested in that hour.

One pass over Bronze decodes and validates each record and sends it either to
`silver_<exchange>_trades` or to the exchange's slice of `silver_dlq_trades` (asset key
`silver_dlq_trades/<exchange>`). Silver batches stream straight into the Iceberg IO manager; DLQ
batches are spilled to a local Parquet file during the pass and written next, so memory stays
bounded whatever the partition's size. Conservation is then checked against the tables themselves.
"""

# No `from __future__ import annotations`: Dagster reads op parameter annotations at definition time.

import gc
import json
import queue
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.conversions import from_bytes
from pyiceberg.expressions.visitors import _StrictMetricsEvaluator
from pyiceberg.io.pyarrow import ArrowScan
from pyiceberg.table import FileScanTask

from k2_assets.bronze.assets import bronze_asset_key
from k2_assets.bronze.tables import bronze_table_spec
from k2_assets.partitions import HOUR_KEY_FORMAT, MICROS_PER_HOUR, hourly_automation, hourly_partitions
from k2_assets.silver.checks import conservation_result, dlq_rate_result, silver_check_specs
from k2_assets.silver.rules import TimestampBounds
from k2_assets.silver.tables import DLQ_TABLE_SPEC, silver_table_spec
from k2_assets.silver.transform import WriterSchemas, transform_batches
from k2_resources.engine import EngineResource
from k2_resources.exchanges import EXCHANGES, ExchangeConfig
from k2_resources.iceberg import IcebergCatalogResource, TableSpec
from k2_resources.io_manager import IcebergStream, RowScope, read_scope, replace_rows, write_metadata
from k2_resources.kafka import SchemaRegistryResource

IO_MANAGER_KEY = "iceberg_io_manager"
# Silver output metadata the Gold late-data sensor reads: event hour -> trades of a full pass, the
# same for the rows a DLQ replay added, and how many partitions the pass covered (a range run records
# the range's totals on each of them).
EVENT_HOURS = "event_hours"
EVENT_HOURS_ADDED = "event_hours_added"
PASS_PARTITIONS = "pass_partitions"
Item = TypeVar("Item")
# Bronze batches transformed at once, each in a thread: the transform is the pass's slowest stage, and
# most of it releases the GIL. On two idle cores +7-8 % wall for +0.2-0.3 CPU-s per 1M records; nothing
# when the other core is busy (bench/README.md, "Silver end to end on branch s8-silver").
TRANSFORM_WORKERS = 2
# The Bronze columns the pass reads: what the transform and the DLQ rows take (not ingestion_date).
BRONZE_COLUMNS_READ = (
    "raw_bytes",
    "message_key",
    "topic",
    "partition",
    "offset",
    "kafka_timestamp",
    "ingestion_timestamp",
)


class SilverConfig(TimestampBounds):
    """Silver's run config: the timestamp bounds of validation, declared in rules.py."""


def silver_asset_key(exchange: ExchangeConfig) -> dg.AssetKey:
    return dg.AssetKey(silver_table_spec(exchange).name)


def dlq_asset_key(exchange: ExchangeConfig) -> dg.AssetKey:
    return dg.AssetKey([DLQ_TABLE_SPEC.name, exchange.name])


class SilverPass:
    """One pass over a window of Bronze: Silver batches out, DLQ batches spilled, everything counted.

    Both outputs come from this one pass (conservation needs them from the same Bronze snapshot): the
    Silver stream is written first and spills the rejects to `spill_path`, which must outlive both
    writes; the DLQ stream reads them back after, and refuses to before.
    """

    def __init__(self, spill_path: Path):
        self.spill_path = spill_path
        self.silver_rows = 0
        self.dlq_rows = 0
        self.categories: Counter[str] = Counter()
        self.event_hours: Counter[int] = Counter()
        self._writer: pq.ParquetWriter | None = None
        self.finished = False

    def run(self, transformed: Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]) -> Iterator[pa.RecordBatch]:
        for silver, dlq in transformed:
            self._spill(dlq)
            self.silver_rows += silver.num_rows
            if silver.num_rows:
                count_event_hours(self.event_hours, silver)
                yield silver
        if self._writer is not None:
            self._writer.close()
        self.finished = True

    def _spill(self, dlq: pa.RecordBatch) -> None:
        if dlq.num_rows == 0:
            return
        keys = pc.strftime(dlq.column("bronze_ingestion_timestamp"), format=HOUR_KEY_FORMAT)
        dlq = dlq.set_column(dlq.schema.get_field_index("silver_partition"), "silver_partition", keys)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.spill_path, dlq.schema)
        self._writer.write_batch(dlq)
        self.dlq_rows += dlq.num_rows
        self.categories.update(dlq.column("error_category").to_pylist())

    def dlq_batches(self) -> Iterator[pa.RecordBatch]:
        """The pass's rejects, read back from the spill: complete only once the Silver side was consumed."""
        if not self.finished:
            raise RuntimeError("the DLQ rows are known only after the Silver stream was written")
        if self.dlq_rows:
            yield from pq.ParquetFile(self.spill_path).iter_batches(batch_size=50_000)

    def event_hour_keys(self) -> dict[str, int]:
        return event_hour_keys(self.event_hours)


def prefetched(items: Iterable[Item], name: str, depth: int = 1) -> Iterator[Item]:
    """`items`, produced by a thread of their own at most `depth` ahead of the consumer.

    The pass is three stages in a row (Bronze read, transform, Silver write) whose heavy parts (Parquet
    decoding and encoding, arrow-avro, numpy) release the GIL: run as a pipeline they overlap on the
    two cores instead of taking turns. Order is kept, an exception in `items` is raised here, and a
    consumer that stops early stops the producer (memory: `depth` items more than without it).
    """
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not offer((True, item)):
                    return
            offer((False, None))
        except BaseException as err:  # handed to the consumer, raised there
            offer((False, err))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name=f"k2-silver-{name}", daemon=True)
    producer.start()
    try:
        while True:
            more, value = handoff.get()
            if not more:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        producer.join()


@contextmanager
def reusing_arrow_memory() -> Iterator[None]:
    """Arrow allocates from jemalloc inside the block (when PyArrow has it), then as before.

    The pass allocates and frees a few 16 MB buffers per Bronze batch (Parquet pages, raw values,
    filtered and cast columns). PyArrow's default pool here, mimalloc, hands such large blocks back to
    the kernel as they are freed, so every batch faulted its memory in again and the kernel zeroed it:
    about 0.5 CPU-s per 1M Bronze rows in page clearing (perf, bench/README.md, "Silver, session 9").
    jemalloc keeps freed pages for reuse and returns them after its decay time. Buffers remember the
    pool they came from, so switching back afterwards is safe.
    """
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a PyArrow build without jemalloc: nothing to switch to
        yield
        return
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


_long_lived_frozen = False


def freeze_long_lived_objects() -> None:
    """Leave the objects alive before this process's first Silver pass out of the cyclic collector.

    A run worker starts by importing Dagster, K2's definitions and the instance's storage: some 300K
    container objects that live as long as the process. The collector's next full pass, which that
    growth makes due during the run, walks all of them and finds nothing: 0.16-0.20 s of one thread,
    serial wherever it struck (PyIceberg's scan plan, the last Silver write; bench/README.md, "Silver,
    session 10"). `gc.freeze` moves them to the permanent generation, as Python's documentation
    suggests for objects made at start-up; later passes of the collector walk only newer objects.
    Once per process: garbage cycles already unreachable at that moment are never collected, so
    repeating it in a long-lived process (tests, a daemon) would keep each run's leftovers.
    """
    global _long_lived_frozen
    if not _long_lived_frozen:
        _long_lived_frozen = True
        gc.freeze()


def count_event_hours(counter: Counter[int], silver: pa.RecordBatch | pa.Table) -> None:
    """Add the trades of `silver` to `counter`, by event hour (hours since the epoch)."""
    for item in pc.divide(silver.column("timestamp"), MICROS_PER_HOUR).value_counts():
        counter[item["values"].as_py()] += item["counts"].as_py()


def event_hour_keys(counter: Counter[int]) -> dict[str, int]:
    """Hour partition key -> trades, for the `event_hours` metadata."""
    return {
        (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(hours=hour)).strftime(HOUR_KEY_FORMAT): count
        for hour, count in sorted(counter.items())
    }


class SilverStream:
    """The Silver output: iterated by the IO manager, then asked for its metadata."""

    def __init__(
        self,
        silver_pass: SilverPass,
        transformed: Iterator[tuple[pa.RecordBatch, pa.RecordBatch]],
        partitions: int,
    ):
        self.silver_pass = silver_pass
        self.transformed = transformed
        self.partitions = partitions

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return self.silver_pass.run(self.transformed)

    def output_metadata(self) -> dict:
        return {
            EVENT_HOURS: dg.MetadataValue.json(self.silver_pass.event_hour_keys()),
            PASS_PARTITIONS: self.partitions,
            "dlq_rows": self.silver_pass.dlq_rows,
        }


class DlqStream:
    """The DLQ output of the same pass: the rejects the Silver stream spilled while it was written."""

    def __init__(self, silver_pass: SilverPass):
        self.silver_pass = silver_pass

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return self.silver_pass.dlq_batches()

    def output_metadata(self) -> dict:
        return {f"dlq_{k.lower()}": v for k, v in sorted(self.silver_pass.categories.items())}


def _proven_files(stream: IcebergStream) -> tuple[list[tuple[FileScanTask, int | None]], list[FileScanTask]]:
    """The stream's data files split by what their manifest entries prove.

    First: (task, hour) for each file whose column statistics prove every row inside the stream's
    scope (Iceberg's strict metrics evaluation, the test PyIceberg's own delete uses to drop whole
    files) with no delete file against it; `hour` is the one hour (since the epoch) of the time column
    all its rows fall in, or None when its bounds span more. Second: the files that prove nothing.
    """
    if stream.snapshot_id is None:
        return [], []
    row_filter = stream.scope.expression(stream.spec, stream.table)
    must_match = _StrictMetricsEvaluator(stream.table.schema(), row_filter).eval
    field = stream.table.schema().find_field(stream.spec.time_column)
    proven, unproven = [], []
    for task in stream.scan().plan_files():
        if task.delete_files or task.file.record_count < 0 or not must_match(task.file):
            unproven.append(task)
            continue
        lower = (task.file.lower_bounds or {}).get(field.field_id)
        upper = (task.file.upper_bounds or {}).get(field.field_id)
        hour = None
        if lower is not None and upper is not None:
            low, high = (from_bytes(field.field_type, bound) for bound in (lower, upper))
            # Non-negative only: the column path's integer division truncates towards zero.
            if low >= 0 and low // MICROS_PER_HOUR == high // MICROS_PER_HOUR:
                hour = low // MICROS_PER_HOUR
        proven.append((task, hour))
    return proven, unproven


def _read_time_column(stream: IcebergStream, tasks: list[FileScanTask]) -> Iterator[pa.Array]:
    """The time column of the scope's rows in `tasks` (the scope's filter applied), as int64 µs."""
    if not tasks:
        return
    column = stream.spec.time_column
    projection = stream.table.schema().select(column)
    row_filter = stream.scope.expression(stream.spec, stream.table)
    reader = ArrowScan(stream.table.metadata, stream.table.io, projection, row_filter)
    for batch in reader.to_record_batches(tasks):
        yield batch.column(column).cast(pa.int64())


def count_rows(stream: IcebergStream) -> int:
    """Rows of the stream's scope in its snapshot, exact, from manifest record counts wherever the
    files' statistics prove all their rows in scope; only the other files are read, one column.

    PyIceberg's `count()` reads every column of every file whose partition does not decide the filter,
    which for Silver's window on bronze_ingestion_timestamp (partitioned by trade day) is every file.
    """
    proven, unproven = _proven_files(stream)
    return sum(task.file.record_count for task, _ in proven) + sum(
        len(micros) for micros in _read_time_column(stream, unproven)
    )


def rows_per_hour(stream: IcebergStream) -> Counter[int]:
    """Rows of `stream` per hour (since the epoch) of its table's time column: from manifest record
    counts for files whose statistics put all their rows in scope and in one hour, otherwise by reading
    only that column of the other files."""
    proven, unproven = _proven_files(stream)
    counts: Counter[int] = Counter()
    for task, hour in proven:
        if hour is None:
            unproven.append(task)
        else:
            counts[hour] += task.file.record_count
    for micros in _read_time_column(stream, unproven):
        for item in pc.divide(micros, MICROS_PER_HOUR).value_counts():
            counts[item["values"].as_py()] += item["counts"].as_py()
    return counts


def existing_rows(
    iceberg: IcebergCatalogResource, exchange: ExchangeConfig, start: datetime, end: datetime
) -> Counter[int]:
    """Silver + DLQ rows already stored for the window, per Bronze ingestion hour."""
    silver_spec = silver_table_spec(exchange)
    silver = rows_per_hour(read_scope(iceberg.ensure_table(silver_spec), silver_spec, RowScope(start, end)))
    dlq_scope = RowScope(start, end, exchange.name)
    return silver + rows_per_hour(read_scope(iceberg.ensure_table(DLQ_TABLE_SPEC), DLQ_TABLE_SPEC, dlq_scope))


def refuse_if_bronze_expired(
    iceberg: IcebergCatalogResource,
    exchange: ExchangeConfig,
    bronze: IcebergStream,
    start: datetime,
    end: datetime,
) -> None:
    """Bronze only ever gains rows in a past hour, unless retention deleted them: then re-deriving
    Silver from what is left would erase Silver rows that can no longer be rebuilt. Compared hour by
    hour: over a backfill range, hours Bronze still has in full must not hide hours it lost (review #7)."""
    stored = existing_rows(iceberg, exchange, start, end)
    if not stored:  # nothing derived yet: nothing re-deriving could erase
        return
    available = rows_per_hour(bronze)
    lost = {
        hour: (count, available[hour]) for hour, count in sorted(stored.items()) if available[hour] < count
    }
    if lost:
        hours = ", ".join(
            f"{(datetime(1970, 1, 1, tzinfo=UTC) + timedelta(hours=hour)).strftime(HOUR_KEY_FORMAT)} "
            f"(Silver+DLQ {count}, Bronze {left})"
            for hour, (count, left) in list(lost.items())[:5]
        )
        raise dg.Failure(
            f"Bronze of {exchange.name} holds fewer rows than Silver and the DLQ for {len(lost)} hour(s) of "
            f"[{start}, {end}): {hours}. Bronze retention ({exchange.retention_days} days) removed them, and "
            "re-materialising would erase Silver rows. Leave those hours out of the range; use the "
            "silver_dlq_replay job to reprocess DLQ rows."
        )


def write_output(
    context: dg.AssetExecutionContext,
    iceberg: IcebergCatalogResource,
    output_name: str,
    spec: TableSpec,
    stream: SilverStream | DlqStream,
    scope: RowScope,
) -> Iterator[dg.Output]:
    """The output through the IO manager when it is selected; otherwise written here, in the same way
    (one commit replacing the window), and recorded as a materialisation of its asset all the same."""
    if output_name in context.selected_output_names:
        yield dg.Output(stream, output_name=output_name)
        return
    key = context.asset_key_for_output(output_name)
    label = (
        context.partition_keys[0] if len(context.partition_keys) == 1 else json.dumps(context.partition_keys)
    )
    properties = {
        "dagster.run-id": context.run_id,
        "dagster.asset-key": key.to_user_string(),
        "dagster.partition-key": label,
    }
    report = replace_rows(iceberg.ensure_table(spec), spec, stream, scope, properties)
    metadata = write_metadata(report, spec, scope, stream)
    for partition in context.partition_keys:
        context.log_event(dg.AssetMaterialization(asset_key=key, partition=partition, metadata=metadata))


def build_silver_asset(exchange: ExchangeConfig) -> dg.AssetsDefinition:
    """`silver_<exchange>_trades` and `silver_dlq_trades/<exchange>`, written by one pass over Bronze."""
    silver_key, dlq_key = silver_asset_key(exchange), dlq_asset_key(exchange)
    bronze_spec, silver_spec = bronze_table_spec(exchange), silver_table_spec(exchange)

    @dg.multi_asset(
        name=f"silver_{exchange.name}",
        partitions_def=hourly_partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        deps=[bronze_asset_key(exchange)],
        outs={
            "silver": dg.AssetOut(
                key=silver_key,
                io_manager_key=IO_MANAGER_KEY,
                group_name="silver",
                kinds={"iceberg"},
                description=silver_spec.description,
                metadata={"table": silver_spec.name},
                automation_condition=hourly_automation(complete_at_minute=5),
                is_required=False,  # subsettable; write_output writes an unselected one all the same
            ),
            "dlq": dg.AssetOut(
                key=dlq_key,
                io_manager_key=IO_MANAGER_KEY,
                group_name="silver",
                kinds={"iceberg"},
                description=f"{exchange.code} records rejected by Silver: {DLQ_TABLE_SPEC.description}",
                metadata={"table": DLQ_TABLE_SPEC.name, "table_slice": exchange.name},
                automation_condition=hourly_automation(complete_at_minute=5),
                is_required=False,  # subsettable; write_output writes an unselected one all the same
            ),
        },
        check_specs=silver_check_specs(silver_key),
        # `dagster asset materialize --select silver_<exchange>_trades` works as typed; the pass still
        # writes both tables (write_output).
        can_subset=True,
    )
    def silver_asset(
        context: dg.AssetExecutionContext,
        config: SilverConfig,
        schema_registry: SchemaRegistryResource,
        iceberg: IcebergCatalogResource,
        engine: EngineResource,
    ):
        # --- engine dispatch: K2_ENGINE=spark runs this pass as Spark jobs (k2_assets/silver/spark_engine.py)
        if engine.on_spark:
            from k2_assets.silver.spark_engine import silver_on_spark

            yield from silver_on_spark(
                context, engine, exchange, config.rules(), schema_registry.client(), iceberg
            )
            return
        # --- end engine dispatch
        freeze_long_lived_objects()
        window = context.partition_time_window
        bronze = read_scope(
            iceberg.ensure_table(bronze_spec),
            bronze_spec,
            RowScope(window.start, window.end),
            columns=BRONZE_COLUMNS_READ,
        )
        refuse_if_bronze_expired(iceberg, exchange, bronze, window.start, window.end)
        label = (
            context.partition_key_range.start
            if len(context.partition_keys) == 1
            else json.dumps(context.partition_keys)
        )
        with tempfile.TemporaryDirectory(prefix="k2-silver-dlq-") as scratch, reusing_arrow_memory():
            silver_pass = SilverPass(Path(scratch) / "dlq.parquet")
            transformed = prefetched(
                transform_batches(
                    prefetched(bronze.batches(), "bronze-read"),
                    exchange=exchange,
                    schemas=WriterSchemas.connecting(schema_registry.client),
                    rules=config.rules(),
                    partition_key=label,
                    now=datetime.now(UTC),
                    workers=TRANSFORM_WORKERS,
                ),
                "transform",
            )
            silver_stream = SilverStream(silver_pass, transformed, len(context.partition_keys))
            # Both tables are written from this one pass whatever was selected, Silver first (it fills
            # the DLQ spill): conservation needs both, and they must come from the same Bronze snapshot.
            yield from write_output(
                context, iceberg, "silver", silver_spec, silver_stream, RowScope(window.start, window.end)
            )
            dlq_scope = RowScope(window.start, window.end, exchange.name)
            yield from write_output(
                context, iceberg, "dlq", DLQ_TABLE_SPEC, DlqStream(silver_pass), dlq_scope
            )
        silver_rows = count_rows(
            read_scope(iceberg.load_table(silver_spec), silver_spec, RowScope(window.start, window.end))
        )
        dlq_rows = count_rows(read_scope(iceberg.load_table(DLQ_TABLE_SPEC), DLQ_TABLE_SPEC, dlq_scope))
        results = [
            conservation_result(silver_key, bronze.rows_read, silver_rows, dlq_rows, bronze.snapshot_id),
            dlq_rate_result(silver_key, exchange, bronze.rows_read, dlq_rows, silver_pass.categories),
        ]
        selected = context.selected_asset_check_keys
        yield from (r for r in results if dg.AssetCheckKey(silver_key, r.check_name) in selected)

    return silver_asset


silver_assets = [build_silver_asset(e) for e in EXCHANGES]
