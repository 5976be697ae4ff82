"""Exactly-once ingestion of one Kafka topic into its Bronze table.

The pattern every Kafka-to-Iceberg system converged on (../shared/notes/peers.md): the next offset to
read per partition is stored *in the Iceberg commit that wrote the records* (snapshot summary property
`k2.kafka.offsets`), and a tag follows that snapshot so expiry can never remove it. A run starts from
those offsets, never from the consumer group. Every commit is fenced: PyIceberg's own retry is off for
Bronze tables, and when a commit meets a concurrent one K2 reloads the table and compares the stored
offsets with the ones this run last wrote. Unchanged (e.g. retention committed) -> retry; changed ->
another run owns the stream, and this one stops with `FencedError`. The consumer group is committed
after each Iceberg commit (asynchronously) only so that ordinary lag tools see progress.

Offsets are not dense: transaction markers, aborted records and compaction leave offsets that are
never delivered. So the next offset is what the consumer has reached (the last record + 1, or the end
of the partition it reported), and records are only ever called lost when Kafka says so: a low
watermark above the stored offset, an out-of-range fetch, or a topic whose id changed.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyiceberg.catalog
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from pydantic import Field
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.io import FileIO
from pyiceberg.io.pyarrow import (
    _dataframe_to_data_files,
    _get_field_from_arrow_table,
    bin_pack_arrow_table,
    pyarrow_to_schema,
    write_file,
)
from pyiceberg.manifest import DataFile
from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
from pyiceberg.table import (
    DOWNCAST_NS_TIMESTAMP_TO_US_ON_WRITE,
    Table,
    TableProperties,
    Transaction,
    WriteTask,
)
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import ancestors_of
from pyiceberg.table.update import (
    TableUpdate,
    _apply_table_update,
    _TableMetadataUpdateContext,
    _update_table_metadata_log,
    update_table_metadata,
)
from pyiceberg.table.update.snapshot import ManageSnapshots
from pyiceberg.utils.config import Config
from pyiceberg.utils.datetime import datetime_to_millis
from pyiceberg.utils.properties import property_as_int

from k2_assets.bronze.tables import OFFSETS_PROPERTY, OFFSETS_TAG, TOPIC_ID_PROPERTY
from k2_assets.tunables import Tunables
from k2_resources.crashpoints import crash_point
from k2_resources.exchanges import ExchangeConfig
from k2_resources.iceberg_maintenance import backoff

log = logging.getLogger(__name__)

# Consumer errors that mean "the broker is not there right now": retried until broker_timeout.
TRANSIENT_ERRORS = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT}
GAP_ERRORS = {KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET}
# The broker answers a fetch once this many bytes are there, or after fetch.wait.max.ms (500): a live
# topic at 150 records/s was fetched record by record, and librdkafka's broker threads took as much CPU
# as all of ingestion's Python (bench/README.md, Bronze live cost). A backlog fills it at once.
LIVE_FETCH_MIN_BYTES = 64 * 1024


class FencedError(RuntimeError):
    """Another ingestion run committed offsets for this table since this run read them."""


class KafkaGapError(RuntimeError):
    """Records this table never ingested are no longer in Kafka (retention, or a recreated topic)."""


class BronzeIngestionConfig(Tunables):
    """How long an ingestion run lives and how it batches. Defaults suit a sensor-kept live run.

    The one declaration of Bronze ingestion's tunables: `IngestionSettings`, `k2 ingest`'s flags and
    the benchmark derive theirs from these fields.
    """

    setting_prefix: ClassVar[str] = "ingestion config "

    drain: bool = Field(
        False, description="Stop at the high watermarks read at start (CI, tests, backfills)."
    )
    # Four hours: each new run costs a process start, a consumer and a catalog load (~8 CPU-s at the
    # live load, estimated from a 9- and a 17-minute live window), and each relaunch leaves a gap of up to
    # a minute (the sensor's interval).
    max_runtime_seconds: float = Field(
        4 * 3600.0, gt=0, description="Stop after this long (seconds); the sensor starts the next run."
    )
    max_batch_records: int = Field(100_000, gt=0, description="Commit once this many records are read.")
    # 0 used to mean "the exchange's default" without saying so: now unset means that, 0 is refused.
    commit_interval_seconds: float | None = Field(
        None, gt=0, description="Commit at least this often (seconds). Unset: the exchange's commit interval."
    )
    accept_gaps: bool = Field(False, description="Record a Kafka gap in metadata instead of failing.")
    broker_timeout_seconds: float = Field(
        60.0, gt=0, description="Fail after the broker is unreachable this long (seconds)."
    )
    poll_timeout_seconds: float = Field(
        0.5, gt=0, description="How long one poll of an idle topic waits for records (seconds)."
    )
    max_fence_retries: int = Field(
        10,
        ge=0,
        description="Commit retries after a concurrent commit that left the stored offsets unchanged.",
    )
    partition_refresh_seconds: float = Field(
        30.0,
        gt=0,
        description="How often a running ingestion looks for partitions added to its topic (seconds).",
    )

    def settings(self, exchange: ExchangeConfig) -> IngestionSettings:
        """This run's settings: the fields as given, an unset commit interval the exchange's."""
        values = self.model_dump()
        if values["commit_interval_seconds"] is None:
            values["commit_interval_seconds"] = exchange.commit_interval_seconds
        return IngestionSettings(**values)


def _default(name: str) -> Any:
    return BronzeIngestionConfig.default_of(name)


@dataclass(frozen=True)
class IngestionSettings:
    """One run's settings as `TopicIngestion` reads them: `BronzeIngestionConfig`'s fields with the
    commit interval resolved. Its defaults are the config's (tests build it directly), never restated."""

    commit_interval_seconds: float
    max_batch_records: int = _default("max_batch_records")
    max_runtime_seconds: float = _default("max_runtime_seconds")
    drain: bool = _default("drain")
    accept_gaps: bool = _default("accept_gaps")
    poll_timeout_seconds: float = _default("poll_timeout_seconds")
    broker_timeout_seconds: float = _default("broker_timeout_seconds")
    max_fence_retries: int = _default("max_fence_retries")
    partition_refresh_seconds: float = _default("partition_refresh_seconds")


@dataclass
class CommitReport:
    """What one Bronze commit wrote: logged as an AssetMaterialization."""

    snapshot_id: int
    rows: int
    bytes: int
    offsets: dict[int, tuple[int, int]]
    consumer_lag: int
    commit_seconds: float

    def metadata(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "bytes": self.bytes,
            "consumer_lag": self.consumer_lag,
            "commit_seconds": round(self.commit_seconds, 4),
            "snapshot_id": str(self.snapshot_id),
            "offsets": {str(p): {"first": f, "last": last} for p, (f, last) in sorted(self.offsets.items())},
        }


@dataclass
class RunSummary:
    rows: int = 0
    commits: int = 0
    stop_reason: str = ""
    start_offsets: dict[int, int] = field(default_factory=dict)
    end_offsets: dict[int, int] = field(default_factory=dict)
    gaps: list[dict[str, Any]] = field(default_factory=list)


def _offsets_summary(table: Table) -> dict[str, str]:
    """The summary of the snapshot that holds the stored offsets: the tagged one, or the newest ancestor."""
    ref = table.metadata.refs.get(OFFSETS_TAG)
    candidates = [table.snapshot_by_id(ref.snapshot_id)] if ref is not None else []
    current = table.current_snapshot()
    if current is not None and ref is None:
        candidates = list(ancestors_of(current, table.metadata))
    for snapshot in candidates:
        if snapshot is not None and OFFSETS_PROPERTY in snapshot.summary.additional_properties:
            return snapshot.summary.additional_properties
    return {}


def read_stored_offsets(table: Table) -> dict[int, int]:
    """Next offset to read per partition, as the last ingestion commit stored it."""
    raw = json.loads(_offsets_summary(table).get(OFFSETS_PROPERTY, "{}"))
    return {int(p): int(o) for p, o in raw.items()}


def read_stored_topic_id(table: Table) -> str | None:
    """The id of the Kafka topic the stored offsets belong to (None for commits before ids were kept)."""
    return _offsets_summary(table).get(TOPIC_ID_PROPERTY)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects alive now out of the cyclic garbage collector's passes while the block runs.

    Every `consume()` creates thousands of GC-tracked `Message` objects, so the collector runs often,
    and each full pass walked every object Dagster, PyIceberg and pydantic had loaded at start. Frozen,
    those are skipped (`gc.freeze`); objects created inside the block are collected as usual.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def arrow_pages_returned() -> Iterator[None]:
    """Arrow allocates from jemalloc, freed pages going back to the OS at once, while the block runs.

    Each commit turns a batch into a few short-lived copies (the combined table, PyIceberg's partition
    filter, Parquet encoding): 63-89 MB of Arrow memory at its peak per 100K records, for which Arrow's
    default pool (mimalloc) kept 142-190 MB resident. With jemalloc at a decay of 0 a 1M-record drain
    peaked at 505-532 MB instead of 569 (bench/README.md, Bronze memory). Only allocations made through
    pyarrow's default pool move: Arrow's C++ default (Acero's, hence `write_data_files`) stays mimalloc,
    fixed when pyarrow is loaded. The previous pool is restored afterwards; buffers keep their own pool.
    """
    if "jemalloc" not in pa.supported_memory_backends():
        yield
        return
    previous = pa.default_memory_pool()
    pa.jemalloc_set_decay_ms(0)
    pa.set_memory_pool(pa.jemalloc_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def single_partition_key(metadata: TableMetadata, rows: pa.Table) -> PartitionKey | None:
    """The partition every row falls in, computed as PyIceberg does; None when the rows span several."""
    spec, schema = metadata.spec(), metadata.schema()
    values = []
    for partition_field in spec.fields:
        source = schema.find_field(partition_field.source_id)
        column = _get_field_from_arrow_table(rows, schema.find_column_name(partition_field.source_id))
        distinct = pc.unique(partition_field.transform.pyarrow_transform(source.field_type)(column))
        if len(distinct) != 1:
            return None
        values.append(PartitionFieldValue(field=partition_field, value=distinct[0].as_py()))
    return PartitionKey(field_values=values, partition_spec=spec, schema=schema)


def write_data_files(metadata: TableMetadata, rows: pa.Table, io: FileIO) -> list[DataFile]:
    """Bronze rows as data files, not yet committed: PyIceberg's write, minus its partition filter.

    All rows of a commit share `ingestion_date` (one partition), but `_dataframe_to_data_files` filters
    the table by partition value anyway (through Acero, into a full copy from Arrow's C++ default pool):
    ~45 MB of the ingestion's peak (bench/README.md, Bronze memory). Here a batch that is one partition
    is written as it is, with the same partition key, tasks and file sizes; any other goes the usual way.
    """
    key = None if metadata.spec().is_unpartitioned() else single_partition_key(metadata, rows)
    if key is None:
        return list(_dataframe_to_data_files(metadata, rows, io))
    task_schema = pyarrow_to_schema(
        rows.schema,
        name_mapping=metadata.schema().name_mapping,
        downcast_ns_timestamp_to_us=Config().get_bool(DOWNCAST_NS_TIMESTAMP_TO_US_ON_WRITE) or False,
        format_version=metadata.format_version,
    )
    target_file_size = property_as_int(
        metadata.properties,
        TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
        TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT,
    )
    write_uuid, task_ids = uuid.uuid4(), itertools.count(0)
    tasks = (
        WriteTask(
            write_uuid=write_uuid,
            task_id=next(task_ids),
            record_batches=batches,
            partition_key=key,
            schema=task_schema,
        )
        for batches in bin_pack_arrow_table(rows, target_file_size)
    )
    return list(write_file(io=io, table_metadata=metadata, tasks=tasks))


def staged_metadata(
    base: TableMetadata, updates: tuple[TableUpdate, ...], metadata_location: str | None = None
) -> TableMetadata:
    """`base` with a transaction's staged `updates` applied: PyIceberg's `update_table_metadata` without
    its closing deep copy.

    That copy walks every snapshot of the table, so a Bronze commit's CPU grew with the snapshots the
    table retains (~0.2 ms per snapshot per commit: 240 ms at 1,090, bench/README.md, Bronze live
    cost). It guards against in-place changes that never happen: TableMetadata is a frozen model, and
    every update builds new lists and dicts (`model_copy(update=...)`), so sharing the unchanged ones
    with `base` is safe. The catalog's staging of a Bronze commit uses it too (`_catalog_staged_metadata`).
    """
    context, metadata = _TableMetadataUpdateContext(), base
    for update in updates:
        metadata = _apply_table_update(update, metadata, context)
    if context.has_changes() and metadata_location:
        metadata = _update_table_metadata_log(metadata, metadata_location, base.last_updated_ms)
    if context.has_changes() and metadata.last_updated_ms == base.last_updated_ms:
        now_ms = datetime_to_millis(datetime.now().astimezone())
        metadata = metadata.model_copy(update={"last_updated_ms": now_ms})
    metadata.spec().check_compatible(metadata.schema())
    metadata.sort_order().check_compatible(metadata.schema())
    return metadata


_SHALLOW_CATALOG_STAGING: ContextVar[bool] = ContextVar("k2_bronze_shallow_staging", default=False)


def _catalog_staged_metadata(
    base_metadata: TableMetadata,
    updates: tuple[TableUpdate, ...],
    enforce_validation: bool = False,
    metadata_location: str | None = None,
) -> TableMetadata:
    """The catalog's `update_table_metadata`, without the deep copy while a Bronze commit stages it.

    A catalog that writes metadata.json itself (SQL, Hive, Glue) stages every commit through
    `update_table_metadata`, whose closing deep copy of the freshly loaded metadata was half of what was
    left of a Bronze commit's CPU at 1,090 snapshots. Only a Bronze commit in this context (thread or
    task) skips it; every other caller, in this process or not, gets PyIceberg's own function unchanged.
    """
    if not _SHALLOW_CATALOG_STAGING.get() or enforce_validation:
        return update_table_metadata(base_metadata, updates, enforce_validation, metadata_location)
    return staged_metadata(base_metadata, updates, metadata_location)


pyiceberg.catalog.update_table_metadata = _catalog_staged_metadata


@contextmanager
def shallow_catalog_staging() -> Iterator[None]:
    """Within the block, this context's catalog commits stage metadata without a deep copy."""
    token = _SHALLOW_CATALOG_STAGING.set(True)
    try:
        yield
    finally:
        _SHALLOW_CATALOG_STAGING.reset(token)


class _StagedMetadataTransaction(Transaction):
    """A PyIceberg transaction whose staged metadata is built once per staged change, without a deep copy.

    PyIceberg 0.12's `Transaction.table_metadata` applies the staged updates to a deep copy of the
    whole table metadata on every read, and an append plus a tag reads it ~19 times. The metadata
    grows by a snapshot per commit, so commits grew slower the longer a table lived (14 -> 80 ms CPU
    over 100 commits). Its models are frozen, so reads of the same staged state share one result, and
    that result shares the unchanged parts of the table's metadata (`staged_metadata`).
    """

    _staged: tuple[TableMetadata, tuple, TableMetadata] | None = None

    @property
    def table_metadata(self) -> TableMetadata:
        base, updates = self._table.metadata, self._updates
        if self._staged is None or self._staged[0] is not base or self._staged[1] is not updates:
            self._staged = (base, updates, staged_metadata(base, updates))
        return self._staged[2]


class BronzeCommitter:
    """Appends record batches to a Bronze table, each commit carrying the offsets it advances to."""

    def __init__(
        self,
        table: Table,
        expected_offsets: dict[int, int],
        run_id: str,
        max_retries: int = _default("max_fence_retries"),
        topic_id: str | None = None,
    ):
        self.table = table
        self.expected = dict(expected_offsets)
        self.run_id = run_id
        self.max_retries = max_retries
        self.topic_id = topic_id

    def commit(self, rows: pa.Table, next_offsets: dict[int, int]) -> int:
        """Commit rows and the new offsets atomically; returns the snapshot id. Raises FencedError."""
        offsets = {**self.expected, **next_offsets}
        properties = {
            OFFSETS_PROPERTY: json.dumps({str(p): o for p, o in sorted(offsets.items())}),
            "k2.dagster.run-id": self.run_id,
            **({TOPIC_ID_PROPERTY: self.topic_id} if self.topic_id else {}),
        }
        crash_point("bronze.before_data_files")
        files = write_data_files(self.table.metadata, rows, self.table.io)
        crash_point("bronze.after_data_files")
        for attempt in range(self.max_retries + 1):
            try:
                snapshot_id = self._commit_once(files, properties)
                self.expected = offsets
                return snapshot_id
            except CommitFailedException as err:
                self.table = self.table.refresh()
                stored = read_stored_offsets(self.table)
                if stored != self.expected:
                    raise FencedError(
                        f"Bronze table {self.table.name()} was written by another ingestion run: stored offsets "
                        f"{stored} differ from the {self.expected} this run last committed. This run stops "
                        "without committing; the other run owns the stream."
                    ) from err
                if attempt == self.max_retries:
                    raise
                log.info("Commit met a concurrent non-ingestion commit; retrying (%s)", attempt + 1)
                # Jittered: retried at once, a commit kept losing to maintenance committing in a loop.
                backoff(attempt)
        raise AssertionError("unreachable")

    def _commit_once(self, files: list, properties: dict[str, str]) -> int:
        """One append + tag commit; the transaction leaves `self.table` at the metadata it committed."""
        with shallow_catalog_staging(), _StagedMetadataTransaction(self.table) as tx:
            # A merge append: it merges small manifests as the table's `commit.manifest-merge.*`
            # properties say (bronze/tables.py); a fast append left one manifest per commit.
            with tx.update_snapshot(snapshot_properties=properties).merge_append() as append:
                for data_file in files:
                    append.append_data_file(data_file)
            snapshot = tx.table_metadata.current_snapshot()
            assert snapshot is not None
            ManageSnapshots(tx).create_tag(snapshot.snapshot_id, OFFSETS_TAG).commit()
        crash_point("bronze.after_iceberg_commit")
        return snapshot.snapshot_id


@dataclass
class _Fresh:
    """The records of one `consume()` result that Bronze has not got yet, in the order they came."""

    messages: list[Message] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)


@dataclass
class _Batch:
    """The records read since the last commit: one Arrow record batch per `consume()` result.

    Columns are built per `consume()` result (a list comprehension per Kafka field, `pa.array` in C)
    rather than record by record: six list appends, two dict updates and a call per message were most
    of ingestion's CPU (bench/README.md, Bronze ingestion).
    """

    chunks: list[pa.RecordBatch] = field(default_factory=list)
    rows: int = 0
    size: int = 0

    def add(self, messages: list[Message], partitions: list[int], offsets: list[int]) -> None:
        """Append good messages whose partitions and offsets the caller has already read."""
        values = pa.array([m.value() for m in messages], pa.binary())
        # map(): each (type, timestamp) tuple is freed at once, so it does not count towards a GC pass.
        stamps = map(Message.timestamp, messages)
        kafka_ts = [ts if kind != TIMESTAMP_NOT_AVAILABLE and ts >= 0 else None for kind, ts in stamps]
        self.chunks.append(
            pa.record_batch(
                {
                    "raw_bytes": values,
                    "message_key": pa.array([m.key() for m in messages], pa.binary()),
                    "partition": pa.array(partitions, pa.int32()),
                    "offset": pa.array(offsets, pa.int64()),
                    "kafka_timestamp": pa.array(kafka_ts, pa.int64()),
                }
            )
        )
        self.rows += len(messages)
        self.size += pc.sum(pc.binary_length(values)).as_py() or 0

    def __len__(self) -> int:
        return self.rows

    def offset_ranges(self) -> dict[int, tuple[int, int]]:
        """(first, last) offset taken per partition, in the order the records were read."""
        records = pa.Table.from_batches(self.chunks).select(["partition", "offset"])
        ranges = records.group_by("partition", use_threads=False).aggregate(
            [("offset", "first"), ("offset", "last")]
        )
        columns = (ranges[name].to_pylist() for name in ("partition", "offset_first", "offset_last"))
        return {p: (first, last) for p, first, last in zip(*columns, strict=True)}

    def take_arrow(self, schema: pa.Schema, topic: str, now: datetime) -> pa.Table:
        """The batch as one Bronze table; the batch gives up its chunks, so only that copy is held.

        Keeping the chunks beside the table while the data file write encodes it held one more batch
        (~17 MB per 100K records) at the peak.
        """
        records = pa.Table.from_batches(self.chunks).combine_chunks()
        self.chunks = []
        n = records.num_rows
        kafka_ts = (
            records["kafka_timestamp"].cast(pa.timestamp("ms", tz="UTC")).cast(pa.timestamp("us", tz="UTC"))
        )
        columns = {
            "raw_bytes": records["raw_bytes"],
            "message_key": records["message_key"],
            "topic": pa.repeat(pa.scalar(topic, pa.string()), n),
            "partition": records["partition"],
            "offset": records["offset"],
            "kafka_timestamp": kafka_ts,
            "ingestion_timestamp": pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")), n),
            "ingestion_date": pa.repeat(pa.scalar(now.date(), pa.date32()), n),
        }
        return pa.table([columns[f.name] for f in schema], schema=schema)


class TopicIngestion:
    """One run: read a topic from the stored offsets and commit micro-batches until told to stop.

    `watermarks(partitions, cached)` and `partitions()` ask Kafka (the latter is polled for partitions
    added while the run is alive); `topic_id` is the topic's id now, or None where the broker has none.
    """

    def __init__(
        self,
        table: Table,
        consumer: Consumer,
        topic: str,
        settings: IngestionSettings,
        run_id: str,
        watermarks: Callable[[list[int], bool], dict[int, tuple[int, int]]],
        partitions: Callable[[], list[int]],
        topic_id: str | None = None,
        on_commit: Callable[[CommitReport], None] = lambda report: None,
        should_stop: Callable[[], bool] = lambda: False,
    ):
        self.table, self.consumer, self.topic, self.settings = table, consumer, topic, settings
        self.watermarks, self.list_partitions, self.topic_id = watermarks, partitions, topic_id
        self.on_commit, self.should_stop = on_commit, should_stop
        self.partitions = sorted(partitions())
        self.stored_topic_id = read_stored_topic_id(table)
        stored = read_stored_offsets(table)
        # Where Kafka gives no id this time, keep the stored one, so a later run can still compare.
        self.committer = BronzeCommitter(
            table, stored, run_id, settings.max_fence_retries, topic_id or self.stored_topic_id
        )
        self.summary = RunSummary()
        self.next_offsets: dict[int, int] = {}
        self.drain_targets: dict[int, int] = {}

    def start_positions(self) -> dict[int, int]:
        """Where each partition resumes, after checking Kafka still holds every record not yet in Bronze."""
        stored = self.committer.expected
        if self.stored_topic_id and self.topic_id and self.stored_topic_id != self.topic_id:
            self._gap(
                f"the topic was deleted and recreated (topic id {self.stored_topic_id} -> {self.topic_id}): "
                f"records of the old topic from the stored offsets {stored} on were never read, and the new "
                "topic is read from its start",
                None,
                0,
                -1,
            )
            stored = {}
        vanished = sorted(set(stored) - set(self.partitions))
        if vanished:
            self._gap(f"partitions {vanished} hold stored offsets but no longer exist", vanished[0], 0, 0)
        marks = self.watermarks(self.partitions, False)
        positions = {
            p: self._resume_at(p, stored.get(p), marks[p], tracked=bool(stored)) for p in self.partitions
        }
        self.drain_targets = {p: marks[p][1] for p in self.partitions}
        return positions

    def _resume_at(self, p: int, start: int | None, marks: tuple[int, int], tracked: bool) -> int:
        """The offset to read partition `p` from, given its stored offset (None: never read).

        `tracked`: Bronze already reads this topic, so a partition it never read was added since, and
        records it no longer holds were lost rather than older than K2.
        """
        low, high = marks
        if start is None:
            if tracked and low > 0:
                self._gap(
                    f"records 0..{low - 1} of a new partition were deleted before Bronze read them",
                    p,
                    0,
                    low - 1,
                )
            return low
        if start < low:
            self._gap(f"records {start}..{low - 1} were deleted before Bronze read them", p, start, low - 1)
            return low
        if start > high:
            self._gap(
                f"stored offset {start} is beyond the high watermark {high}: the topic was recreated "
                f"or truncated, records {high}..{start - 1} can never be read",
                p,
                high,
                start - 1,
            )
            return low
        return start

    def _gap(self, message: str, partition: int | None, first_missing: int, last_missing: int) -> None:
        where = f"partition {partition}" if partition is not None else "all partitions"
        text = f"Kafka gap on {self.topic} {where}: {message}"
        gap = {
            "topic": self.topic,
            "partition": partition,
            "first_missing": first_missing,
            "last_missing": last_missing,
        }
        if not self.settings.accept_gaps:
            raise KafkaGapError(text + ". Set accept_gaps: true to accept the loss and continue.")
        log.warning("%s (accepted by configuration)", text)
        self.summary.gaps.append({**gap, "message": message})

    def run(self) -> RunSummary:
        positions = self.start_positions()
        self.next_offsets = dict(positions)
        self.summary.start_offsets = dict(positions)
        self.consumer.assign([TopicPartition(self.topic, p, o) for p, o in positions.items()])
        try:
            with frozen_heap(), arrow_pages_returned():
                self._loop()
        finally:
            self.summary.end_offsets = dict(self.next_offsets)
        return self.summary

    def _drained(self) -> bool:
        return all(self.next_offsets[p] >= target for p, target in self.drain_targets.items())

    def _pick_up_new_partitions(self) -> None:
        """Partitions added to the topic while this run is alive are read from their start."""
        try:
            added = sorted(set(self.list_partitions()) - set(self.partitions))
        except KafkaException as err:
            log.warning("Could not refresh the partitions of %s: %s", self.topic, err)
            return
        if not added:
            return
        marks = self.watermarks(added, False)
        starts = {p: self._resume_at(p, None, marks[p], tracked=True) for p in added}
        self.consumer.incremental_assign([TopicPartition(self.topic, p, o) for p, o in starts.items()])
        self.partitions = sorted(self.partitions + added)
        self.next_offsets.update(starts)
        self.drain_targets.update({p: marks[p][1] for p in added})
        log.info("Partitions %s were added to %s; reading them from offsets %s", added, self.topic, starts)

    def _loop(self) -> None:
        settings, started = self.settings, time.monotonic()
        batch, batch_started, broker_down_since = _Batch(), time.monotonic(), None
        partitions_checked = time.monotonic()
        while True:
            if settings.drain and self._drained():
                self.summary.stop_reason = "drained"
            elif time.monotonic() - started >= settings.max_runtime_seconds:
                self.summary.stop_reason = "max_runtime"
            elif self.should_stop():
                self.summary.stop_reason = "stop requested"
            if self.summary.stop_reason:
                if len(batch):
                    self._commit(batch)
                return
            if time.monotonic() - partitions_checked >= settings.partition_refresh_seconds:
                self._pick_up_new_partitions()
                partitions_checked = time.monotonic()
            wanted = max(1, min(10_000, settings.max_batch_records - len(batch)))
            commit_due_in = settings.commit_interval_seconds - (time.monotonic() - batch_started)
            timeout = min(settings.poll_timeout_seconds, max(0.0, commit_due_in))
            messages = self.consumer.consume(num_messages=wanted, timeout=timeout)
            broker_down_since = self._absorb(messages, batch, broker_down_since)
            full = len(batch) >= settings.max_batch_records
            due = time.monotonic() - batch_started >= settings.commit_interval_seconds
            if len(batch) and (full or due or (settings.drain and self._drained())):
                self._commit(batch)
                batch, batch_started = _Batch(), time.monotonic()

    def _absorb(self, messages: list[Message], batch: _Batch, down_since: float | None) -> float | None:
        """Add good messages to the batch; classify errors. Returns when the broker was first seen down.

        Messages are taken in order: each run of good ones between two errors goes to `_accept` at once,
        and what they leave to keep goes to the batch as one chunk. A live topic ends nearly every run
        with a partition-EOF event, and a chunk per run cost ~240 us of Arrow calls each, three times per
        `consume()` (bench/README.md, Bronze live cost).
        """
        errors = [m.error() for m in messages]
        failed = [i for i, err in enumerate(errors) if err is not None]
        start, fresh = 0, _Fresh()
        for i in [*failed, len(messages)]:
            if i > start:
                self._accept(messages[start:i], fresh)
                down_since = None
            if i < len(messages):
                down_since = self._on_error(messages[i], errors[i], down_since)
            start = i + 1
        if fresh.messages:
            batch.add(fresh.messages, fresh.partitions, fresh.offsets)
        if (
            not messages
            and down_since is not None
            and time.monotonic() - down_since > self.settings.broker_timeout_seconds
        ):
            raise KafkaException(
                f"Kafka unreachable for {self.settings.broker_timeout_seconds:.0f}s reading {self.topic}"
            )
        return down_since

    def _on_error(self, msg: Message, err: KafkaError, down_since: float | None) -> float | None:
        """Act on one error the consumer delivered in place of a record."""
        if err.code() == KafkaError._PARTITION_EOF:
            # The consumer reached the end: any offsets before it that were never delivered are
            # transaction markers, aborted or compacted records, so this is where to resume.
            p = msg.partition()
            self.next_offsets[p] = max(self.next_offsets[p], msg.offset())
            return None
        if err.code() in GAP_ERRORS:
            p = msg.partition()
            low, _ = self.watermarks([p], False)[p]
            self._gap(
                f"offset {self.next_offsets.get(p)} is out of range ({err.str()})",
                p,
                self.next_offsets[p],
                low - 1,
            )
            self.next_offsets[p] = low
            self.consumer.assign([TopicPartition(self.topic, q, o) for q, o in self.next_offsets.items()])
            return down_since
        if err.code() in TRANSIENT_ERRORS or err.retriable():
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > self.settings.broker_timeout_seconds:
                raise KafkaException(
                    f"Kafka unreachable for {self.settings.broker_timeout_seconds:.0f}s while reading {self.topic}: "
                    f"{err.str()}"
                )
            log.warning("Kafka transient error on %s, retrying: %s", self.topic, err.str())
            return down_since
        raise KafkaException(err)

    def _accept(self, messages: list[Message], taken: _Fresh) -> None:
        """Take the records Bronze has not got yet; an offset jump is a marker or compaction, not loss."""
        partitions = [m.partition() for m in messages]
        offsets = [m.offset() for m in messages]
        next_offsets = self.next_offsets
        stale = []
        for i, (p, offset) in enumerate(zip(partitions, offsets, strict=True)):
            if offset < next_offsets[p]:
                stale.append(i)  # already in Bronze (a re-fetch after reassignment): never write it twice
            else:
                next_offsets[p] = offset + 1
        if stale:
            fresh = sorted(set(range(len(messages))) - set(stale))
            messages = [messages[i] for i in fresh]
            partitions = [partitions[i] for i in fresh]
            offsets = [offsets[i] for i in fresh]
        taken.messages += messages
        taken.partitions += partitions
        taken.offsets += offsets

    def _commit(self, batch: _Batch) -> None:
        started = time.monotonic()
        now = datetime.now(UTC)
        row_count, size, offsets = len(batch), batch.size, batch.offset_ranges()
        rows = batch.take_arrow(self.committer.table.schema().as_arrow(), self.topic, now)
        advanced = {p: o for p, o in self.next_offsets.items() if o != self.committer.expected.get(p)}
        snapshot_id = self.committer.commit(rows, advanced)
        del rows
        commit_seconds = time.monotonic() - started
        self._commit_consumer_group()
        crash_point("bronze.after_group_commit")
        report = CommitReport(
            snapshot_id=snapshot_id,
            rows=row_count,
            bytes=size,
            offsets=offsets,
            consumer_lag=self._lag(),
            commit_seconds=commit_seconds,
        )
        self.summary.rows += row_count
        self.summary.commits += 1
        self.on_commit(report)

    def _lag(self) -> int:
        """Records behind the high watermarks (as last seen in fetch responses); -1 if Kafka can't say."""
        try:
            marks = self.watermarks(self.partitions, True)
        except KafkaException as err:
            log.warning("Could not read the watermarks of %s for the lag: %s", self.topic, err)
            return -1
        return sum(max(0, marks[p][1] - self.next_offsets[p]) for p in self.partitions)

    def _commit_consumer_group(self) -> None:
        """Mirror the committed offsets to the consumer group for lag tools; Bronze does not read them.

        Asynchronous: with the broker gone a synchronous commit blocks for ~45 s after every Iceberg
        commit, and nothing depends on it landing.
        """
        offsets = [TopicPartition(self.topic, p, o) for p, o in self.next_offsets.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as err:
            log.warning("Could not mirror offsets to the consumer group: %s", err)
