"""Iceberg IO manager: one Dagster partition written atomically, read and written as streams.

Writing a partition is one Iceberg commit that deletes exactly the rows of the partition's window
(and slice) and appends the new rows: re-materialising a partition or re-running a backfill leaves
the table as one run would. Data arrives as a stream of Arrow record batches, each written straight
into its partition's open data file (`RollingDataFiles`; files rolled at `chunk_rows` rows), so memory
is bounded by a batch whatever the partition's size; pandas DataFrames and Arrow tables are accepted
for small outputs. Every row written must fall inside the window and slice
being replaced (otherwise a re-run could not replace it), and the table's schema always comes from
its declared `TableSpec`, never from the data.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, EqualTo, GreaterThanOrEqual, LessThan
from pyiceberg.expressions.visitors import _StrictMetricsEvaluator
from pyiceberg.io import OutputFile
from pyiceberg.io.fileformat import FileFormatFactory, FileFormatWriter
from pyiceberg.io.pyarrow import (
    ArrowScan,
    MetricModeTypes,
    MetricsMode,
    ParquetFormatWriter,
    _determine_partitions,
    _get_field_from_arrow_table,
    compute_statistics_plan,
    parquet_path_to_id_mapping,
    schema_to_pyarrow,
)
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
from pyiceberg.partitioning import PartitionFieldValue, PartitionKey, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import DataScan, Table, TableProperties
from pyiceberg.table.locations import load_location_provider
from pyiceberg.typedef import Record
from pyiceberg.types import LongType, TimestampType, TimestamptzType

from k2_resources.iceberg import IcebergCatalogResource, TableSpec

DEFAULT_CHUNK_ROWS = 250_000
# A write that meets a concurrent commit of the same rows: recompute, never re-commit stale data.
WRITE_CONFLICTS = (CommitFailedException, ValidationException)
MAX_RECOMPUTES = 3
# Table property (K2's own): the only columns written with Parquet dictionary encoding, comma-separated.
# Unset, every column is (PyArrow's default). Dictionary-encoding unique values (ids, prices, times) costs
# about as much as the rest of the write together and makes the file larger.
DICTIONARY_COLUMNS = "k2.parquet.dictionary-columns"


@dataclass(frozen=True)
class RowScope:
    """The rows one write replaces: a time window on the spec's time column and/or a slice value."""

    start: datetime | None = None
    end: datetime | None = None
    slice_value: str | None = None

    def expression(self, spec: TableSpec, table: Table) -> BooleanExpression:
        """The Iceberg predicate for the scope (aligned with file stats, so the delete is metadata-only)."""
        parts: list[BooleanExpression] = []
        if self.start is not None and self.end is not None:
            assert spec.time_column, f"{spec.name} has no time_column to window on"
            field_type = table.schema().find_field(spec.time_column).field_type
            lo, hi = _literal(field_type, self.start), _literal(field_type, self.end)
            parts += [GreaterThanOrEqual(spec.time_column, lo), LessThan(spec.time_column, hi)]
        if self.slice_value is not None:
            assert spec.slice_column, f"{spec.name} has no slice_column"
            parts.append(EqualTo(spec.slice_column, self.slice_value))
        if not parts:
            return AlwaysTrue()
        return parts[0] if len(parts) == 1 else And(*parts)

    def outside(self, spec: TableSpec, batch: pa.RecordBatch | pa.Table) -> int:
        """How many rows of `batch` lie outside the scope (they must be zero before writing)."""
        # Built by Arrow, not from a Python list of n booleans: that list cost 5 ms per 100K-row batch,
        # as much as the checks themselves (bench/README.md, "Silver, session 9").
        inside = pa.repeat(pa.scalar(True), batch.num_rows)
        if self.start is not None and self.end is not None:
            column = batch.column(spec.time_column)
            lo, hi = _arrow_scalar(column.type, self.start), _arrow_scalar(column.type, self.end)
            inside = pc.and_kleene(inside, pc.and_kleene(pc.greater_equal(column, lo), pc.less(column, hi)))
        if self.slice_value is not None:
            inside = pc.and_kleene(inside, pc.equal(batch.column(spec.slice_column), self.slice_value))
        return batch.num_rows - pc.sum(pc.fill_null(inside, False).cast(pa.int64())).as_py()

    def sql(self, spec: TableSpec, table: Table) -> str:
        """The scope as a SQL predicate (DuckDB), for engines reading the table's files themselves."""
        parts = ["true"]
        if self.start is not None and self.end is not None:
            assert spec.time_column, f"{spec.name} has no time_column to window on"
            field_type = table.schema().find_field(spec.time_column).field_type
            lo, hi = (_sql_literal(field_type, moment) for moment in (self.start, self.end))
            parts.append(f'"{spec.time_column}" >= {lo} AND "{spec.time_column}" < {hi}')
        if self.slice_value is not None:
            assert spec.slice_column, f"{spec.name} has no slice_column"
            value = self.slice_value.replace("'", "''")
            parts.append(f"\"{spec.slice_column}\" = '{value}'")
        return " AND ".join(parts)

    def describe(self) -> str:
        window = (
            f"[{self.start.isoformat()}, {self.end.isoformat()})" if self.start and self.end else "all time"
        )
        return window + (f" where slice = {self.slice_value}" if self.slice_value else "")


def _literal(field_type: Any, moment: datetime) -> Any:
    if isinstance(field_type, LongType):
        return int(moment.timestamp() * 1_000_000)
    if isinstance(field_type, TimestamptzType | TimestampType):
        return moment.isoformat()
    raise TypeError(f"Cannot window on a column of type {field_type}")


def _sql_literal(field_type: Any, moment: datetime) -> str:
    if isinstance(field_type, LongType):
        return str(int(moment.timestamp() * 1_000_000))
    if isinstance(field_type, TimestamptzType):
        return f"TIMESTAMPTZ '{moment.isoformat()}'"
    if isinstance(field_type, TimestampType):
        return f"TIMESTAMP '{moment.replace(tzinfo=None).isoformat()}'"
    raise TypeError(f"Cannot window on a column of type {field_type}")


def _arrow_scalar(arrow_type: pa.DataType, moment: datetime) -> pa.Scalar:
    if pa.types.is_integer(arrow_type):
        return pa.scalar(int(moment.timestamp() * 1_000_000), arrow_type)
    return pa.scalar(moment, arrow_type)


@dataclass
class WriteReport:
    rows: int = 0
    data_files: int = 0
    snapshot_id: int | None = None

    def metadata(self) -> dict[str, Any]:
        return {"rows": self.rows, "data_files": self.data_files, "snapshot_id": str(self.snapshot_id)}


def as_batches(data: Any) -> Iterator[pa.RecordBatch]:
    """Any supported output value as a stream of record batches."""
    if data is None:
        return iter(())
    if isinstance(data, pd.DataFrame):
        return iter(pa.Table.from_pandas(data, preserve_index=False).to_batches())
    if isinstance(data, pa.Table):
        return iter(data.to_batches())
    if isinstance(data, pa.RecordBatch):
        return iter([data])
    if isinstance(data, pa.RecordBatchReader):
        return iter(data)
    if isinstance(data, Iterable):
        return iter(data)
    raise TypeError(f"Cannot write {type(data).__name__}: expected Arrow batches, a table, or a DataFrame")


def conform(batch: pa.RecordBatch | pa.Table, schema: pa.Schema) -> pa.Table:
    """The batch with exactly the table's columns, order and types (missing optional columns as null)."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    columns = []
    for target in schema:
        if target.name in table.column_names:
            columns.append(table.column(target.name).cast(target.type))
        else:
            columns.append(pa.nulls(table.num_rows, target.type))
    return pa.Table.from_arrays(columns, schema=schema)


def replace_rows(
    table: Table,
    spec: TableSpec,
    data: Any,
    scope: RowScope,
    snapshot_properties: Mapping[str, str],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> WriteReport:
    """Replace exactly the rows in `scope` with `data`, in one commit; data is streamed in chunks.

    A commit that meets a concurrent write of the same scope (PyIceberg's serializable validation
    raises ValidationException; CommitFailedException once its own retries are spent) is never
    re-committed as it was: the data was computed from what that other write replaced. When `data`
    can `refresh()` (recompute itself from the tables' current state), the write is redone with the
    fresh computation, at most MAX_RECOMPUTES times; otherwise the conflict fails the write.
    """
    for attempt in itertools.count(1):
        try:
            return _replace_once(table, spec, data, scope, snapshot_properties, chunk_rows)
        except WRITE_CONFLICTS as err:
            if not callable(getattr(data, "refresh", None)) or attempt > MAX_RECOMPUTES:
                raise
            dg.get_dagster_logger().warning(
                f"Write of {spec.identifier} {scope.describe()} met a concurrent write "
                f"({type(err).__name__}: {err}); recomputing (attempt {attempt + 1})"
            )
            table.refresh()
            data.refresh()
    raise AssertionError("unreachable")


def _replace_once(
    table: Table,
    spec: TableSpec,
    data: Any,
    scope: RowScope,
    snapshot_properties: Mapping[str, str],
    chunk_rows: int,
) -> WriteReport:
    return write_files(table, spec, data, scope, chunk_rows).commit(snapshot_properties)


@dataclass
class PreparedWrite:
    """Data files written for one scope, not yet committed (`commit` makes them the scope's rows)."""

    table: Table
    spec: TableSpec
    scope: RowScope
    files: RollingDataFiles
    data_files: list[DataFile]
    rows: int

    def commit(self, snapshot_properties: Mapping[str, str]) -> WriteReport:
        """One snapshot replacing the scope's rows with the files; on a conflict, the files are deleted."""
        try:
            _commit(self.table, self.spec, self.scope, snapshot_properties, self.data_files)
        except WRITE_CONFLICTS:
            self.files.discard()  # written for a commit that did not happen: nothing references them
            raise
        self.table.refresh()
        snapshot = self.table.current_snapshot()
        return WriteReport(self.rows, len(self.data_files), snapshot.snapshot_id if snapshot else None)


def write_files(
    table: Table, spec: TableSpec, data: Any, scope: RowScope, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> PreparedWrite:
    """`data` written as data files of `table` (batch by batch, files rolled at `chunk_rows` rows),
    uncommitted; every row must lie inside `scope`, otherwise nothing is kept."""
    schema = table.schema().as_arrow()
    files, rows_written = RollingDataFiles(table, chunk_rows), 0
    try:
        for batch in as_batches(data):
            for offset in range(0, batch.num_rows, chunk_rows):
                rows = conform(batch.slice(offset, chunk_rows), schema)
                stray = scope.outside(spec, rows)
                if stray:
                    raise ValueError(
                        f"{stray} rows for {spec.identifier} fall outside the scope being replaced "
                        f"({scope.describe()}): a re-run could not replace them, so nothing was written."
                    )
                files.write(rows)
                rows_written += rows.num_rows
        return PreparedWrite(table, spec, scope, files, files.close(), rows_written)
    except BaseException:
        files.discard()  # nothing will reference them
        raise


def _commit(
    table: Table,
    spec: TableSpec,
    scope: RowScope,
    snapshot_properties: Mapping[str, str],
    files: list[DataFile],
) -> None:
    """One snapshot: delete the scope's rows, append `files`."""
    properties = dict(snapshot_properties)
    with table.transaction() as tx, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Delete operation did not match any records")
        tx.delete(scope.expression(spec, table), snapshot_properties=properties)
        if files:
            with tx.update_snapshot(snapshot_properties=properties).fast_append() as append:
                for data_file in files:
                    append.append_data_file(data_file)


@dataclass
class _OpenFile:
    path: str
    output: OutputFile
    writer: FileFormatWriter
    partition_key: PartitionKey | None
    rows: int = 0


class RollingDataFiles:
    """The data files of one write, filled batch by batch: one open file per table partition, each
    rolled at `file_rows` rows.

    PyIceberg's `_dataframe_to_data_files` needs a whole Arrow table per file (it streams a
    RecordBatchReader only into unpartitioned tables), so a file's worth of rows had to be in memory
    at once, plus copies. Here each batch goes straight into its open file through PyIceberg's own
    Parquet writer (`FileFormatWriter.write` may be called repeatedly; it keeps the field ids and the
    table's write properties, and computes the file's statistics on close), so memory is bounded by a
    batch whatever the size of the partition or of a file.
    """

    def __init__(self, table: Table, file_rows: int) -> None:
        self.metadata, self.io, self.file_rows = table.metadata, table.io, file_rows
        self.format = FileFormat(
            self.metadata.properties.get(
                TableProperties.WRITE_FILE_FORMAT, TableProperties.WRITE_FILE_FORMAT_DEFAULT
            )
        )
        self.model = FileFormatFactory.get(self.format)
        self.locations = load_location_provider(self.metadata.location, self.metadata.properties)
        self.write_uuid, self.counter = uuid.uuid4(), itertools.count(0)
        self.statistics = statistics_paths(self.metadata.schema(), self.metadata.properties)
        self.open: dict[Any, _OpenFile] = {}
        self.closed: list[DataFile] = []
        self.paths: list[str] = []

    def write(self, rows: pa.Table) -> None:
        """Append conformed rows (the table's Arrow schema, field ids included) to their partitions' files."""
        spec = self.metadata.spec()
        if spec.is_unpartitioned():
            self._append(None, rows)
            return
        single = single_partition(spec, self.metadata.schema(), rows)
        if single is not None:
            self._append(single, rows)
            return
        for part in _determine_partitions(spec=spec, schema=self.metadata.schema(), arrow_table=rows):
            self._append(part.partition_key, part.arrow_table_partition)

    def _append(self, key: PartitionKey | None, rows: pa.Table) -> None:
        slot = key.partition if key else None
        offset = 0
        while offset < rows.num_rows:
            current = self.open.get(slot) or self._start(key)
            piece = rows.slice(offset, self.file_rows - current.rows)
            current.writer.write(piece)
            current.rows += piece.num_rows
            offset += piece.num_rows
            if current.rows >= self.file_rows:
                self._finish(slot)

    def _start(self, key: PartitionKey | None) -> _OpenFile:
        name = f"00000-{next(self.counter)}-{self.write_uuid}.{self.model.file_extension()}"
        path = self.locations.new_data_location(data_file_name=name, partition_key=key)
        output = self.io.new_output(path)
        self.paths.append(path)
        writer = self.model.create_writer(output, self.metadata.schema(), self.metadata.properties)
        dictionary_columns = self.metadata.properties.get(DICTIONARY_COLUMNS)
        if dictionary_columns is not None and isinstance(writer, ParquetFormatWriter):
            # PyIceberg 0.12 (pinned) has no property for it; its writer passes these kwargs to PyArrow.
            writer._parquet_writer_kwargs["use_dictionary"] = [c for c in dictionary_columns.split(",") if c]
        if self.statistics is not None and isinstance(writer, ParquetFormatWriter):
            writer._parquet_writer_kwargs["write_statistics"] = self.statistics
        current = _OpenFile(path, output, writer, key)
        self.open[key.partition if key else None] = current
        return current

    def _finish(self, slot: Any) -> None:
        current = self.open.pop(slot)
        statistics = current.writer.close()
        self.closed.append(
            DataFile.from_args(
                content=DataFileContent.DATA,
                file_path=current.path,
                file_format=self.format,
                partition=current.partition_key.partition if current.partition_key else Record(),
                file_size_in_bytes=len(current.output),
                sort_order_id=None,
                spec_id=self.metadata.default_spec_id,
                equality_ids=None,
                key_metadata=None,
                **statistics.to_serialized_dict(),
            )
        )

    def close(self) -> list[DataFile]:
        """Close every open file: the data files written, ready to commit."""
        for slot in list(self.open):
            self._finish(slot)
        return self.closed

    def discard(self) -> None:
        """Close and delete every file this write created (none of them is committed)."""
        for current in self.open.values():
            with contextlib.suppress(Exception):
                current.writer.close()
        self.open.clear()
        for path in self.paths:
            with contextlib.suppress(OSError):
                self.io.delete(path)


def statistics_paths(schema: Schema, properties: Mapping[str, str]) -> list[str] | None:
    """The Parquet columns whose statistics Iceberg keeps, or None when it keeps every column's.

    A column whose metrics mode is `none` (`write.metadata.metrics.column.<name>` or the default)
    gets no bounds or counts in the manifest, yet PyArrow would still compute its Parquet statistics:
    on unique strings and decimals that is a sixth of the write (bench/README.md, Silver). Tables
    that set no such mode are written as before.
    """
    plan = compute_statistics_plan(schema, properties)
    paths = parquet_path_to_id_mapping(schema)
    none = MetricsMode(MetricModeTypes.NONE)
    kept = [path for path, field_id in paths.items() if plan[field_id].mode != none]
    return None if len(kept) == len(paths) else kept


def single_partition(spec: PartitionSpec, schema: Schema, rows: pa.Table) -> PartitionKey | None:
    """The partition key of `rows` when they all share one (None otherwise).

    PyIceberg's `_determine_partitions` groups by the partition values and filters and copies the rows
    once per group, a third of the cost of writing a batch; a batch of one hour is nearly always one
    partition, which this finds from the transformed values' min and max alone.
    """
    values = []
    for partition_field in spec.fields:
        source = schema.find_field(partition_field.source_id)
        column = _get_field_from_arrow_table(rows, schema.find_column_name(partition_field.source_id))
        transformed = partition_field.transform.pyarrow_transform(source.field_type)(column)
        if transformed.null_count == len(transformed):
            values.append(PartitionFieldValue(partition_field, None))
            continue
        if transformed.null_count:
            return None
        bounds = pc.min_max(transformed)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if low != high:
            return None
        values.append(PartitionFieldValue(partition_field, low))
    return PartitionKey(field_values=values, partition_spec=spec, schema=schema)


def stream_scan(scan: DataScan) -> Iterator[pa.RecordBatch]:
    """The scan's rows, one data file at a time.

    PyIceberg 0.12's `to_arrow_batch_reader` submits every planned file to a thread pool at once and
    keeps each file's batches until the consumer reaches them, so a slow consumer ends up holding the
    whole scan (measured: Silver +230 MB per extra 900K Bronze rows). Reading file by file bounds
    memory by one data file, which K2's writers keep to a chunk.

    A file whose column statistics prove that every row matches the scan's filter (Iceberg's strict
    metrics evaluation, as PyIceberg's own delete uses to drop whole files) is read without it:
    PyArrow would evaluate the filter on every batch and copy every column through it, raw Kafka
    values included (0.1-0.14 of Silver's 0.5 CPU-s per 1M Bronze rows, bench/README.md, "Silver,
    session 9"). Its rows are the same either way; deletes are applied as before.
    """
    projection = scan.projection()
    filtered = ArrowScan(scan.table_metadata, scan.io, projection, scan.row_filter, scan.case_sensitive)
    unfiltered = ArrowScan(scan.table_metadata, scan.io, projection, AlwaysTrue(), scan.case_sensitive)
    all_rows_match = _StrictMetricsEvaluator(
        scan.table_metadata.schema(), scan.row_filter, scan.case_sensitive
    ).eval
    target = schema_to_pyarrow(projection)
    for task in scan.plan_files():
        reader = unfiltered if all_rows_match(task.file) else filtered
        for batch in reader.to_record_batches([task]):
            yield batch if batch.schema == target else batch.cast(target)


@dataclass
class IcebergStream:
    """Rows of one table within a scope, pinned to one snapshot, read batch by batch."""

    table: Table
    spec: TableSpec
    scope: RowScope
    snapshot_id: int | None
    batch_rows: int = 100_000
    # Small files' rows are joined up to this many: enough to spread a batch's fixed cost, far below
    # batch_rows (joining Bronze to 100K-row batches raised Silver's peak RSS for 1M rows 449 -> 721 MB).
    join_rows: int = 10_000
    columns: tuple[str, ...] = ("*",)
    rows_read: int = field(default=0, init=False)

    def scan(self) -> DataScan:
        """PyIceberg's scan of the stream's rows (its snapshot must exist)."""
        return self.table.scan(
            row_filter=self.scope.expression(self.spec, self.table),
            snapshot_id=self.snapshot_id,
            selected_fields=self.columns,
        )

    def arrow_schema(self) -> pa.Schema:
        schema = self.table.schema()
        return schema_to_pyarrow(schema if self.columns == ("*",) else schema.select(*self.columns))

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The rows in batches of at most `batch_rows`, small data files' rows joined up to `join_rows`.

        A running hour of Bronze is one small file per commit (every 10-30 s), and each batch pays a
        fixed cost downstream (Silver's transform, counts and its own Parquet write): a refresh of 327
        files cost ~9 ms of CPU per file whatever its rows (bench/README.md, "Refresh run profile").
        """
        if self.snapshot_id is None:
            return
        pending: list[pa.RecordBatch] = []
        held = 0
        for batch in stream_scan(self.scan()):
            for offset in range(0, batch.num_rows, self.batch_rows):
                piece = batch.slice(offset, self.batch_rows)
                if pending and held + piece.num_rows > self.join_rows:
                    yield self._joined(pending)
                    pending, held = [], 0
                pending.append(piece)
                held += piece.num_rows
        if pending:
            yield self._joined(pending)

    def _joined(self, pieces: list[pa.RecordBatch]) -> pa.RecordBatch:
        joined = pieces[0] if len(pieces) == 1 else pa.concat_batches(pieces)
        self.rows_read += joined.num_rows
        return joined

    def count(self) -> int:
        if self.snapshot_id is None:
            return 0
        row_filter = self.scope.expression(self.spec, self.table)
        return self.table.scan(row_filter=row_filter, snapshot_id=self.snapshot_id).count()


def read_scope(
    table: Table, spec: TableSpec, scope: RowScope, columns: tuple[str, ...] = ("*",)
) -> IcebergStream:
    """A stream over the table's current snapshot: later commits do not change what it yields."""
    snapshot = table.current_snapshot()
    return IcebergStream(table, spec, scope, snapshot.snapshot_id if snapshot else None, columns=columns)


@runtime_checkable
class ReportingStream(Protocol):
    """Record batches for the IO manager that also describe what went through them (DLQ categories,
    event hours): `output_metadata()` is asked after the write, once the stream was consumed."""

    def __iter__(self) -> Iterator[pa.RecordBatch]: ...

    def output_metadata(self) -> dict[str, Any]: ...


def write_metadata(report: WriteReport, spec: TableSpec, scope: RowScope, data: Any) -> dict[str, Any]:
    """A write's materialisation metadata: its report, and a `ReportingStream`'s own."""
    extra = data.output_metadata() if isinstance(data, ReportingStream) else {}
    return {**report.metadata(), "table": spec.identifier, "scope": scope.describe(), **extra}


class IcebergIOManager(dg.IOManager):
    """Stores each asset in the Iceberg table its metadata names (`table`, optional `table_slice`)."""

    def __init__(self, catalog: IcebergCatalogResource, specs: Mapping[str, TableSpec], chunk_rows: int):
        self.catalog, self.specs, self.chunk_rows = catalog, specs, chunk_rows

    def _spec(self, metadata: Mapping[str, Any], asset_key: dg.AssetKey) -> TableSpec:
        name = metadata.get("table")
        name = name.value if hasattr(name, "value") else name
        if not name or str(name).split(".")[-1] not in self.specs:
            raise dg.DagsterInvariantViolationError(
                f"Asset {asset_key.to_user_string()} has no declared table: set metadata 'table' to one of "
                f"{sorted(self.specs)}"
            )
        return self.specs[str(name).split(".")[-1]]

    @staticmethod
    def _slice(metadata: Mapping[str, Any]) -> str | None:
        value = metadata.get("table_slice")
        return value.value if hasattr(value, "value") else value

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        spec = self._spec(context.definition_metadata, context.asset_key)
        window = context.step_context.partition_time_window if context.has_asset_partitions else None
        scope = RowScope(
            start=window.start if window else None,
            end=window.end if window else None,
            slice_value=self._slice(context.definition_metadata),
        )
        properties = {
            "dagster.run-id": context.run_id,
            "dagster.asset-key": context.asset_key.to_user_string(),
            "dagster.partition-key": _partition_label(context),
        }
        table = self.catalog.ensure_table(spec)
        report = replace_rows(table, spec, obj, scope, properties, self.chunk_rows)
        context.add_output_metadata(write_metadata(report, spec, scope, obj))

    def load_input(self, context: dg.InputContext) -> IcebergStream:
        upstream = context.upstream_output
        assert upstream is not None
        spec = self._spec(upstream.definition_metadata, context.asset_key)
        window = None
        if context.has_asset_partitions:
            window = context.asset_partitions_time_window
        elif context.step_context.has_partitions:
            window = context.step_context.partition_time_window
        scope = RowScope(
            start=window.start if window else None,
            end=window.end if window else None,
            slice_value=self._slice(upstream.definition_metadata),
        )
        return read_scope(self.catalog.load_table(spec), spec, scope)


def _partition_label(context: dg.OutputContext) -> str:
    if not context.has_asset_partitions:
        return ""
    key_range = context.asset_partition_key_range
    return (
        key_range.start if key_range.start == key_range.end else json.dumps([key_range.start, key_range.end])
    )
