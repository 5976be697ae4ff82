"""The Silver transformation core: Bronze record batches in, (Silver batch, DLQ batch) pairs out.

Every Bronze row comes out exactly once, either as a Silver row or as a DLQ row that says why
(`k2_assets.silver.rules` holds the categories and the validation order); each batch is checked for
that before it is yielded. Batches are processed one at a time and nothing outlives its batch except
the per-schema-id cache of `WriterSchemas`.

Two paths, one outcome: `transform_batch` first hands the batch to `columnar.split_batch`, which
decodes the well-framed bodies of each schema id many at a time with arrow-avro and keeps the records
it can prove valid as Arrow columns; every other record goes through `route` below, one at a time,
which decides its category and message exactly as before the columnar path existed (the per-record
path is the reference; tests/test_silver_columnar.py compares the two on mixed batches).

Per-record decoding, and why it looks like this (numbers in bench/bench_silver_decode.py):
- Each writer schema is prepared once per schema id: checked against V2 (record name, fields without
  defaults, the logical types of the annotated fields), then stripped of its logical types. fastavro
  then returns timestamps as int µs and decimals as their unscaled bytes instead of building datetime
  and Decimal objects, which decodes about 1.5x faster. It also keeps decimals exact: fastavro's own
  decimal reader rounds to the declared precision (1234567890123.45678901 comes back as
  1234567890123.45679), so an overflowing price would be altered before it could be rejected.
- Each body is read from its own small buffer that runs one byte past the record (the next record's
  first byte, or a pad byte). fastavro neither checks the length of bytes it skips nor, in that case,
  fails on a short read, so a body truncated inside a trailing field a V3 writer added would otherwise
  decode; with the extra byte any read past the end moves the position past the body and is caught by
  the same position check that catches trailing garbage. A per-record buffer (instead of one buffer for
  the whole batch) bounds what a corrupt length can make fastavro read to one record.
- The cyclic garbage collector is paused while a batch is transformed (see `gc_paused`).
- One process; with `workers` > 1, that many batches at a time in threads, yielded in Bronze order
  (`ordered_map`). Most of a batch's work (arrow-avro, numpy, Arrow kernels) releases the GIL, so two
  threads overlap on the two cores; each thread has its own `RecordChecker`, the `WriterSchemas` cache
  is shared behind a lock. A 2-process pool over batches measured no better here (the writer schemas
  shipped to workers, every batch pickled twice).
"""

from __future__ import annotations

import gc
import io
import json
import operator
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import fastavro
import numpy as np
import pyarrow as pa
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro import schemaless_reader
from fastavro.read import SchemaResolutionError
from fastavro.schema import to_parsing_canonical_form

from k2_assets.silver.avro_block import avro_source_class
from k2_assets.silver.columnar import (
    BlockPlan,
    FastRun,
    block_plan,
    decimal_array,
    split_batch,
    vendor_data_json,
)
from k2_assets.silver.rules import (
    DECODE_STAGE,
    NULL_CHECKED_FIELDS,
    SILVER_SCALE,
    VALIDATE_STAGE,
    DlqCategory,
    RecordChecker,
    ValidationRules,
    to_silver_units,
)
from k2_assets.silver.tables import DLQ_SCHEMA, SILVER_SCHEMA
from k2_resources.exchanges import ExchangeConfig
from k2_resources.trade_schema import (
    V2_FIELD_NAMES,
    is_nullable,
    non_null_branches,
    trade_v2_schema,
    v2_arrow_schema,
    v2_fields_of_kind,
)

__all__ = [
    "DLQ_ARROW_SCHEMA",
    "SILVER_ARROW_SCHEMA",
    "ValidationRules",
    "WriterSchema",
    "WriterSchemas",
    "transform_batches",
    "vendor_data_json",
]

SILVER_ARROW_SCHEMA: pa.Schema = SILVER_SCHEMA.as_arrow()
DLQ_ARROW_SCHEMA: pa.Schema = DLQ_SCHEMA.as_arrow()
V2_ARROW_SCHEMA: pa.Schema = v2_arrow_schema()
# A decoded record's V2 values in V2 order, and where silver_values converts them to Silver's types.
V2_VALUES = operator.itemgetter(*V2_FIELD_NAMES)
PRICE, QUANTITY = V2_FIELD_NAMES.index("price"), V2_FIELD_NAMES.index("quantity")
LIST_POSITIONS = tuple(V2_FIELD_NAMES.index(name) for name in v2_fields_of_kind("array"))
MAP_POSITIONS = tuple(V2_FIELD_NAMES.index(name) for name in v2_fields_of_kind("map"))

HEADER_BYTES = 5  # Confluent wire format: magic byte 0, then the schema id as a big-endian int32
MAGIC_BYTE = 0
MAX_DECIMAL_SCALE = 38  # Iceberg's largest decimal precision; larger scales are no price
MAX_ERROR_DETAIL = 300  # fastavro puts whole schemas in some messages; a DLQ row needs the gist


# --- Writer schemas -----------------------------------------------------------------------------------

_MISSING = object()  # a cache miss, told apart from a cached None


@dataclass(frozen=True)
class WriterSchema:
    """A registered writer schema and how its records decode into V2, worked out once per schema id.

    `problem` says why no record written with it can resolve to V2 (then there is nothing to decode
    with). Otherwise `decoder` and `reader` are the logical-type-free writer and reader schemas handed
    to fastavro (`reader` is None when it equals the writer), and the scales are the writer's decimal
    scales of price and quantity.
    """

    schema_id: int
    schema_type: str
    parsed: Any | None
    problem: str | None = None
    decoder: Any | None = None
    reader: Any | None = None
    price_scale: int = SILVER_SCALE
    quantity_scale: int = SILVER_SCALE
    block: BlockPlan | None = None  # how its records decode many at a time (columnar), if they can


# The Schema Registry's error code for "schema not found" (HTTP 404 carries many other meanings).
SCHEMA_NOT_FOUND = 40403


class RegistryUnusable(RuntimeError):
    """The registry answered something other than a schema or "schema not found" (40403)."""

    def __init__(self, schema_id: int, err: SchemaRegistryError) -> None:
        super().__init__(
            f"The Schema Registry (K2_SCHEMA_REGISTRY_URL) answered HTTP {err.http_status_code}, error code "
            f"{err.error_code} ({err.error_message}) when asked for schema id {schema_id}. Only error code "
            f"{SCHEMA_NOT_FOUND} means the id is unknown; anything else (a wrong base path, a proxy, another "
            "service) would send every record to the DLQ, so the run stops instead."
        )


class WriterSchemas:
    """Schema id -> writer schema through the Schema Registry, cached for the life of this object.

    Unknown ids (the registry answers 404 with error code 40403, "schema not found") are cached as
    None too, so a topic full of records with a bad id costs one registry call. Any other registry
    answer fails the run (RegistryUnusable), a 404 without that code included: an unreachable or
    misaddressed registry must not send every record to the DLQ.
    """

    def __init__(self, client: SchemaRegistryClient | Future[SchemaRegistryClient]) -> None:
        self._client = client  # or its construction under way (`connecting`), awaited at the first call
        self._cache: dict[int, WriterSchema | None] = {}
        self._lock = threading.Lock()  # transform threads share the cache: one registry call per id

    @classmethod
    def connecting(cls, connect: Callable[[], SchemaRegistryClient]) -> WriterSchemas:
        """A cache whose client `connect` makes in a thread of its own, started now.

        Making a registry client costs ~0.05 s of a fresh process (its HTTP stack's imports, a TLS
        context), which the Silver step paid before reading Bronze; begun here, it overlaps the scan
        plan and the first Bronze read (bench/README.md, "Silver, session 10"). An error in `connect`
        is raised by the first `get` that needs the registry.
        """
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2-registry-connect")
        try:
            return cls(pool.submit(connect))
        finally:
            pool.shutdown(wait=False)  # the thread ends once `connect` returns

    def get(self, schema_id: int) -> WriterSchema | None:
        """The prepared writer schema of `schema_id`, or None when the registry does not know the id."""
        cached = self._cache.get(schema_id, _MISSING)
        if cached is not _MISSING:
            return cached
        with self._lock:
            if schema_id not in self._cache:
                self._cache[schema_id] = self._fetch(schema_id)
            return self._cache[schema_id]

    def _fetch(self, schema_id: int) -> WriterSchema | None:
        if isinstance(self._client, Future):
            self._client = self._client.result()  # under the lock: awaited once
        try:
            registered = self._client.get_schema(schema_id)
        except SchemaRegistryError as err:
            if err.http_status_code == 404 and err.error_code == SCHEMA_NOT_FOUND:
                return None
            raise RegistryUnusable(schema_id, err) from err
        return prepare_writer_schema(
            schema_id, registered.schema_str, registered.schema_type or "AVRO", registered.references
        )


def prepare_writer_schema(
    schema_id: int, schema_str: str, schema_type: str = "AVRO", references: list | None = None
) -> WriterSchema:
    """Parse a registered schema and decide once how (or whether) its records decode into V2."""
    schema_type = schema_type.upper()
    if schema_type != "AVRO":
        return WriterSchema(schema_id, schema_type, None, f"schema id {schema_id} is {schema_type}, not AVRO")
    if references:
        problem = f"schema id {schema_id} uses schema references, which Silver does not resolve"
        return WriterSchema(schema_id, schema_type, None, problem)
    try:
        raw = json.loads(schema_str)
        parsed = fastavro.parse_schema(raw)
    except Exception as err:  # any parse failure makes the schema unusable, whatever its kind
        return WriterSchema(
            schema_id, schema_type, None, f"schema id {schema_id} does not parse: {_detail(err)}"
        )
    problem, scales = resolution_problem(raw, trade_v2_schema())
    if problem:
        message = f"writer schema {schema_id} cannot be resolved to V2: {problem}"
        return WriterSchema(schema_id, schema_type, parsed, message)
    decoder = fastavro.parse_schema(strip_logical_types(raw))
    reader = fastavro.parse_schema(decode_reader(raw, trade_v2_schema()))
    block = block_plan(strip_logical_types(raw), strip_logical_types(trade_v2_schema()))
    same = to_parsing_canonical_form(decoder) == to_parsing_canonical_form(reader)
    return WriterSchema(
        schema_id,
        schema_type,
        parsed,
        decoder=decoder,
        reader=None if same else reader,
        price_scale=scales.get("price", SILVER_SCALE),
        quantity_scale=scales.get("quantity", SILVER_SCALE),
        block=block,
    )


def _full_name(schema: dict[str, Any]) -> str:
    name = schema.get("name", "")
    namespace = schema.get("namespace")
    return name if "." in name or not namespace else f"{namespace}.{name}"


def resolution_problem(writer: Any, v2: dict[str, Any]) -> tuple[str | None, dict[str, int]]:
    """Why `writer` can never resolve to V2 (None if it can), and its decimal scales per field.

    The checks fastavro would otherwise make per record (record name, fields without defaults) are made
    once here, plus one it cannot make once the logical types are stripped: every V2 field that carries
    a logical type must carry the same one in the writer, because stripping them means the raw long or
    bytes is interpreted as V2 says. Decimal scales may differ; values are rescaled exactly.
    """
    if not isinstance(writer, dict) or writer.get("type") != "record":
        return "it is not an Avro record", {}
    if _full_name(writer) != _full_name(v2):
        return f"its record is named {_full_name(writer)}, not {_full_name(v2)}", {}
    writer_fields = {f["name"]: f["type"] for f in writer["fields"]}
    scales: dict[str, int] = {}
    for v2_field in v2["fields"]:
        name, v2_type = v2_field["name"], v2_field["type"]
        if name not in writer_fields:
            if "default" not in v2_field:
                return f"it has no field {name!r}, which V2 requires (no default)", {}
            continue
        if isinstance(v2_type, dict) and "logicalType" in v2_type:
            problem = _annotation_problem(name, writer_fields[name], v2_type, scales)
            if problem:
                return problem, {}
    return None, scales


def _annotation_problem(
    name: str, writer_type: Any, v2_type: dict[str, Any], scales: dict[str, int]
) -> str | None:
    """Check one logical-type field of the writer against V2; record its decimal scale in `scales`."""
    wanted = f"{v2_type['type']} with logicalType {v2_type['logicalType']}"
    branches = non_null_branches(writer_type)
    for branch in branches:
        if not isinstance(branch, dict) or branch.get("type") != v2_type["type"]:
            return f"field {name!r} is {branch!r}; V2 reads {wanted}"
        if branch.get("logicalType") != v2_type["logicalType"]:
            return f"field {name!r} has logicalType {branch.get('logicalType')!r}; V2 reads {wanted}"
        if v2_type["logicalType"] == "decimal":
            scale = branch.get("scale", 0)
            if not isinstance(scale, int) or not 0 <= scale <= MAX_DECIMAL_SCALE:
                return f"field {name!r} has decimal scale {scale!r}; Silver reads scales 0 to {MAX_DECIMAL_SCALE}"
            scales[name] = scale
    return None if branches else f"field {name!r} is always null; V2 reads {wanted}"


def strip_logical_types(schema: Any) -> Any:
    """A copy of an Avro schema without logicalType annotations (default values are left untouched)."""
    if isinstance(schema, list):
        return [strip_logical_types(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: value if key == "default" else strip_logical_types(value)
        for key, value in schema.items()
        if key != "logicalType"
    }


def decode_reader(writer: dict[str, Any], v2: dict[str, Any]) -> dict[str, Any]:
    """V2 without logical types, with each null-checked field the writer made nullable made nullable too.

    A null in such a field then reaches its validation check and gets that check's category; without
    the widening fastavro would refuse the record with a generic resolution error.
    """
    nullable = {f["name"] for f in writer["fields"] if is_nullable(f["type"])} & NULL_CHECKED_FIELDS
    reader = strip_logical_types(v2)
    reader["fields"] = [
        {"name": f["name"], "type": ["null", f["type"]]} if f["name"] in nullable else f
        for f in reader["fields"]
    ]
    return reader


# --- Decoding one record ------------------------------------------------------------------------------


class Rejected(Exception):
    """A record that goes to the DLQ at the decode stage (raised only on the rare bad record)."""

    def __init__(self, category: DlqCategory, message: str) -> None:
        super().__init__(message)
        self.category = category
        self.message = message


def _detail(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= MAX_ERROR_DETAIL else text[:MAX_ERROR_DETAIL] + "…"


def read_header(data: bytes, start: int, end: int) -> int:
    """The schema id of the value data[start:end], or Rejected when it has no Confluent header."""
    if end == start:
        raise Rejected(DlqCategory.EMPTY_VALUE, "value is empty")
    if data[start] != MAGIC_BYTE:
        raise Rejected(
            DlqCategory.BAD_MAGIC_BYTE, f"first byte is 0x{data[start]:02x}, not the magic byte 0x00"
        )
    if end - start < HEADER_BYTES:
        message = f"value has {end - start} bytes; the Confluent header alone needs {HEADER_BYTES}"
        raise Rejected(DlqCategory.TRUNCATED_HEADER, message)
    return int.from_bytes(data[start + 1 : start + HEADER_BYTES], "big", signed=True)


def decode_body(data: bytes, start: int, end: int, schema: WriterSchema) -> dict[str, Any]:
    """Decode the Avro body of data[start:end] (header included) into a V2 record, all bytes consumed.

    `data` must hold at least one byte after `end` (see the module docstring for why).
    """
    schema_id = schema.schema_id
    if schema.problem:
        raise Rejected(DlqCategory.AVRO_DECODE_ERROR, schema.problem)
    size = end - start - HEADER_BYTES
    body = io.BytesIO(data[start + HEADER_BYTES : end + 1])
    try:
        record = schemaless_reader(body, schema.decoder, schema.reader)
    except SchemaResolutionError as err:
        message = f"writer schema {schema_id} cannot be resolved to V2 for this record: {_detail(err)}"
        raise Rejected(DlqCategory.AVRO_DECODE_ERROR, message) from None
    except Exception as err:  # fastavro signals corrupt input with many exception types
        message = f"Avro body ({size} bytes) does not decode: {_detail(err)}"
        raise Rejected(DlqCategory.AVRO_DECODE_ERROR, message) from None
    consumed = body.tell()
    if consumed < size:
        message = f"{size - consumed} trailing bytes after the Avro body"
        raise Rejected(DlqCategory.AVRO_DECODE_ERROR, message)
    if consumed > size:
        message = f"Avro body is truncated: decoding ran past its {size} bytes"
        raise Rejected(DlqCategory.AVRO_DECODE_ERROR, message)
    price, quantity = record["price"], record["quantity"]
    if price is not None:
        record["price"] = int.from_bytes(price, "big", signed=True)
    if quantity is not None:
        record["quantity"] = int.from_bytes(quantity, "big", signed=True)
    return record


# --- One batch ----------------------------------------------------------------------------------------


@dataclass
class Routed:
    """One batch split in two: Silver values and the DLQ details, each with Bronze row indices."""

    silver_rows: list[tuple[Any, ...]] = field(default_factory=list)
    json_memo: dict[Any, str] = field(default_factory=dict)  # vendor_data items -> JSON, for this batch
    silver_index: list[int] = field(default_factory=list)
    dlq_index: list[int] = field(default_factory=list)
    dlq_category: list[str] = field(default_factory=list)
    dlq_message: list[str] = field(default_factory=list)
    dlq_stage: list[str] = field(default_factory=list)
    dlq_schema_id: list[int | None] = field(default_factory=list)
    dlq_message_id: list[str | None] = field(default_factory=list)

    def renumber(self, rows: np.ndarray) -> None:
        """Turn indices into the batch this was routed from into indices of `rows`' batch."""
        self.silver_index = rows[np.asarray(self.silver_index, dtype=np.int64)].tolist()
        self.dlq_index = rows[np.asarray(self.dlq_index, dtype=np.int64)].tolist()

    def reject(
        self, i: int, category: str, message: str, stage: str, schema_id: int | None, message_id: str | None
    ) -> None:
        self.dlq_index.append(i)
        self.dlq_category.append(str(category))
        self.dlq_message.append(message)
        self.dlq_stage.append(stage)
        self.dlq_schema_id.append(schema_id)
        self.dlq_message_id.append(message_id)


@dataclass
class BronzeBatch:
    """The columns of one Bronze batch that routing reads, as plain Python values, for chosen rows.

    Each chosen value is followed in `data` by the byte that follows it in the whole batch (the next
    value's first, or the pad byte after the last), so decode_body's outcome and message cannot depend
    on which rows were chosen. Only those bytes are copied: the chosen rows are the few the columnar
    path left (about 1 % of a batch), and copying the whole value buffer twice for them cost a fifth
    of the transform threads' memory copies and page faults (bench/README.md, "Silver, session 10").
    """

    data: bytes  # the chosen values, each run of consecutive rows back to back with its next byte
    starts: list[int]  # chosen value j is data[starts[j]:ends[j]]
    ends: list[int]
    present: list[bool] | None  # None when no value is null
    ingestion_us: list[int | None]
    kafka_us: list[int | None]

    @classmethod
    def of(cls, batch: pa.RecordBatch, rows: np.ndarray | None = None) -> BronzeBatch:
        """The rows `rows` of `batch` (all of them by default)."""
        raw = batch.column("raw_bytes")
        if not pa.types.is_large_binary(raw.type):
            raw = raw.cast(pa.large_binary())
        offsets = np.frombuffer(raw.buffers()[1], dtype=np.int64)[raw.offset : raw.offset + len(raw) + 1]
        values, base = raw.buffers()[2], int(offsets[0])
        whole = b"" if values is None else memoryview(values)[base : int(offsets[-1])]
        offsets = offsets - base
        rows = np.arange(len(raw)) if rows is None else np.asarray(rows, dtype=np.int64)
        data, starts, ends = value_windows(whole, offsets[rows], offsets[rows + 1], rows)
        chosen = pa.array(rows, type=pa.int64())
        return cls(
            data=data,
            starts=starts.tolist(),
            ends=ends.tolist(),
            present=raw.is_valid().take(chosen).to_pylist() if raw.null_count else None,
            ingestion_us=_micros(batch.column("ingestion_timestamp").take(chosen)),
            kafka_us=_micros(batch.column("kafka_timestamp").take(chosen)),
        )


def value_windows(
    whole: bytes | memoryview, starts: np.ndarray, ends: np.ndarray, rows: np.ndarray
) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The values whole[starts[j]:ends[j]] of rows `rows` (ascending), each with its next byte.

    A run of consecutive rows is copied as one piece, from its first value's start to one byte past
    its last value's end (a zero pad byte past the end of `whole`), so a value is followed by the same
    byte as in `whole` + pad. Returns the pieces joined and each value's start and end in them.
    """
    if not len(rows):
        return b"\x00", starts, ends
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks - 1, [len(rows) - 1]))
    low, high = starts[first], ends[last] + 1
    total = len(whole)
    pieces = [
        whole[lo:hi] if hi <= total else bytes(whole[lo:total]) + b"\x00"
        for lo, hi in zip(low.tolist(), high.tolist(), strict=True)
    ]
    placed = np.concatenate(([0], np.cumsum(high - low)[:-1]))
    shift = np.repeat(placed - low, last - first + 1)
    return b"".join(pieces), starts + shift, ends + shift


def _micros(column: pa.Array) -> list[int | None]:
    return column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()


def silver_values(record: dict[str, Any], schema: WriterSchema, json_memo: dict[Any, str]) -> tuple[Any, ...]:
    """A valid record's V2 values in V2 order (decimals as 1e-8 units), then its schema id.

    Only atomic values and tuples go in, so the garbage collector stops tracking the row as soon as it
    first sees it instead of rescanning a whole batch of rows on every collection. vendor_data maps
    repeat (Binance sends two distinct ones), so their JSON is memoised in `json_memo`.
    """
    values = list(V2_VALUES(record))
    values[PRICE] = to_silver_units(values[PRICE], schema.price_scale)
    values[QUANTITY] = to_silver_units(values[QUANTITY], schema.quantity_scale)
    for i in LIST_POSITIONS:
        values[i] = tuple(values[i]) if values[i] else ()
    for i in MAP_POSITIONS:
        values[i] = _map_json(values[i], json_memo)
    values.append(schema.schema_id)
    return tuple(values)


def _map_json(value: dict[str, str] | None, json_memo: dict[Any, str]) -> str | None:
    if value is None:
        return None
    key = tuple(value.items())
    text = json_memo.get(key)
    if text is None:
        text = json_memo[key] = vendor_data_json(value)
    return text


def route(bronze: BronzeBatch, schemas: WriterSchemas, checker: RecordChecker) -> Routed:
    """Decode and validate every value of a batch, sending each to Silver or to the DLQ (never both)."""
    routed = Routed()
    data, present = bronze.data, bronze.present
    for i, (start, end) in enumerate(zip(bronze.starts, bronze.ends, strict=True)):
        schema_id = None
        try:
            if present is not None and not present[i]:
                raise Rejected(DlqCategory.EMPTY_VALUE, "value is null")
            schema_id = read_header(data, start, end)
            schema = schemas.get(schema_id)
            if schema is None:
                message = f"schema id {schema_id} not in registry"
                raise Rejected(DlqCategory.UNKNOWN_SCHEMA_ID, message)
            record = decode_body(data, start, end, schema)
        except Rejected as rejected:
            routed.reject(i, rejected.category, rejected.message, DECODE_STAGE, schema_id, None)
            continue
        failure = checker.first_failure(
            record, schema.price_scale, schema.quantity_scale, bronze.ingestion_us[i], bronze.kafka_us[i]
        )
        if failure is None:
            routed.silver_rows.append(silver_values(record, schema, routed.json_memo))
            routed.silver_index.append(i)
        else:
            routed.reject(i, failure[0], failure[1], VALIDATE_STAGE, schema_id, record["message_id"])
    return routed


# --- Arrow output -------------------------------------------------------------------------------------


def _column(name: str, schema: pa.Schema, values: Any) -> pa.Array:
    return pa.array(values, type=schema.field(name).type)


def _constant(name: str, schema: pa.Schema, value: Any, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, type=schema.field(name).type), n)


def _taken(batch: pa.RecordBatch, source: str, name: str, schema: pa.Schema, index: pa.Array) -> pa.Array:
    return batch.column(source).take(index).cast(schema.field(name).type)


def _dates(micros: pa.Array) -> pa.Array:
    """UTC dates of epoch-µs values (floor division, so pre-1970 instants get the right day too)."""
    return micros.cast(pa.int64()).cast(pa.timestamp("us", tz="UTC")).cast(pa.date32())


def per_record_columns(routed: Routed) -> dict[str, pa.Array]:
    """The V2 columns and schema_id of the Silver rows the per-record path produced."""
    n = len(routed.silver_rows)
    columns = list(zip(*routed.silver_rows, strict=True)) if n else [()] * (len(V2_FIELD_NAMES) + 1)
    arrays = {
        f.name: decimal_array(values) if pa.types.is_decimal(f.type) else pa.array(values, type=f.type)
        for f, values in zip(V2_ARROW_SCHEMA, columns, strict=False)
    }
    arrays["schema_id"] = _column("schema_id", SILVER_ARROW_SCHEMA, columns[len(V2_FIELD_NAMES)])
    return arrays


def silver_batch(batch: pa.RecordBatch, runs: list[FastRun], routed: Routed, now: datetime) -> pa.RecordBatch:
    """The Silver rows of one routed batch (columnar runs and per-record rows), in Bronze order, with
    exactly SILVER_ARROW_SCHEMA."""
    schema = SILVER_ARROW_SCHEMA
    pieces = [FastRun(np.asarray(routed.silver_index, dtype=np.int64), per_record_columns(routed)), *runs]
    pieces = [p for p in pieces if len(p.index)] or pieces[:1]
    if len(pieces) == 1:
        arrays, order = dict(pieces[0].columns), pieces[0].index
    else:
        index = np.concatenate([p.index for p in pieces])
        sort = pa.array(np.argsort(index, kind="stable"))
        names = [*V2_FIELD_NAMES, "schema_id"]
        arrays = {name: pa.concat_arrays([p.columns[name] for p in pieces]).take(sort) for name in names}
        order = index[sort.to_numpy()]
    n, index = len(order), pa.array(order, type=pa.int64())
    arrays["exchange_date"] = _dates(arrays["timestamp"])
    arrays["validation_timestamp"] = _constant("validation_timestamp", schema, now, n)
    arrays["bronze_ingestion_timestamp"] = _taken(
        batch, "ingestion_timestamp", "bronze_ingestion_timestamp", schema, index
    )
    for name in ("topic", "partition", "offset"):
        arrays[name] = _taken(batch, name, name, schema, index)
    return pa.RecordBatch.from_arrays([arrays[f.name] for f in schema], schema=schema)


def dlq_batch(
    batch: pa.RecordBatch, routed: Routed, exchange: ExchangeConfig, partition_key: str, now: datetime
) -> pa.RecordBatch:
    """The DLQ rows of one routed batch, in Bronze order, raw bytes untouched, with exactly DLQ_ARROW_SCHEMA."""
    schema, n = DLQ_ARROW_SCHEMA, len(routed.dlq_index)
    index = pa.array(routed.dlq_index, type=pa.int64())
    arrays = {
        name: _taken(batch, name, name, schema, index) for name in ("raw_bytes", "message_key", "topic")
    }
    for name in ("partition", "offset", "kafka_timestamp"):
        arrays[name] = _taken(batch, name, name, schema, index)
    arrays["exchange"] = _constant("exchange", schema, exchange.name, n)
    arrays["error_category"] = _column("error_category", schema, routed.dlq_category)
    arrays["error_message"] = _column("error_message", schema, routed.dlq_message)
    arrays["error_stage"] = _column("error_stage", schema, routed.dlq_stage)
    arrays["schema_id"] = _column("schema_id", schema, routed.dlq_schema_id)
    arrays["message_id"] = _column("message_id", schema, routed.dlq_message_id)
    arrays["silver_partition"] = _constant("silver_partition", schema, partition_key, n)
    ingestion = _taken(batch, "ingestion_timestamp", "bronze_ingestion_timestamp", schema, index)
    arrays["bronze_ingestion_timestamp"] = ingestion
    arrays["dlq_timestamp"] = _constant("dlq_timestamp", schema, now, n)
    arrays["dlq_date"] = _dates(ingestion)
    return pa.RecordBatch.from_arrays([arrays[f.name] for f in schema], schema=schema)


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = True


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while one batch is transformed.

    Routing allocates a few container objects per record and keeps a batch of rows alive until they
    become Arrow columns, so the collector's passes over the growing heap cost about a third of the
    batch's time (measured with 100K-row batches) while finding nothing: decoded records hold no
    reference cycles. Reference counting still frees everything; the pause ends with the batch, before
    it is yielded, and restores the previous state.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:  # transform threads overlap: the first pause disables, the last one restores
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


# --- The stream ---------------------------------------------------------------------------------------


def transform_batches(
    batches: Iterable[pa.RecordBatch],
    exchange: ExchangeConfig,
    schemas: WriterSchemas,
    rules: ValidationRules,
    partition_key: str,
    now: datetime,
    workers: int = 1,
) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    """For each Bronze batch, in order, (Silver batch, DLQ batch) that together hold each of its rows
    exactly once.

    `now` (timezone-aware) becomes validation_timestamp and dlq_timestamp; `partition_key` is the
    Dagster partition of the run, written to every DLQ row. Raises RuntimeError if a batch would not
    conserve its rows, rather than let a record disappear. `workers` batches are transformed at once,
    each in a thread with its own checker (memory: `workers` batches in flight instead of one).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware: it is stored as a UTC timestamp")
    checkers = threading.local()

    def transform_one(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, pa.RecordBatch]:
        checker = getattr(checkers, "checker", None)
        if checker is None:
            checker = checkers.checker = RecordChecker(exchange, rules)
        checker.reset_cache()
        with gc_paused():
            return transform_batch(batch, exchange, schemas, checker, partition_key, now)

    if workers <= 1:
        yield from map(transform_one, batches)
        return
    avro_source_class()  # imported here, once, not by two workers at the same moment
    yield from ordered_map(transform_one, batches, workers, "k2-silver-transform")


Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(
    work: Callable[[Item], Result], items: Iterable[Item], workers: int, name: str
) -> Iterator[Result]:
    """work(item) for each of `items`, `workers` at a time in threads, yielded in the items' order.

    At most `workers` items are taken ahead of the consumer. An exception of work(item) is raised
    here after the results of the items before it; the items after it are cancelled or awaited,
    never yielded. A consumer that stops early stops the rest the same way.
    """
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        try:
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) >= workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def transform_batch(
    batch: pa.RecordBatch,
    exchange: ExchangeConfig,
    schemas: WriterSchemas,
    checker: RecordChecker,
    partition_key: str,
    now: datetime,
) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    """One Bronze batch as (Silver batch, DLQ batch), after checking that no row was lost or doubled."""
    runs, rest = split_batch(batch, schemas, checker, SILVER_ARROW_SCHEMA)
    routed = route(BronzeBatch.of(batch, rest), schemas, checker)
    routed.renumber(rest)
    silver, dlq = (
        silver_batch(batch, runs, routed, now),
        dlq_batch(batch, routed, exchange, partition_key, now),
    )
    placed = np.concatenate([*(run.index for run in runs), routed.silver_index, routed.dlq_index])
    if silver.num_rows + dlq.num_rows != batch.num_rows or not np.array_equal(
        np.sort(placed), np.arange(batch.num_rows)
    ):
        raise RuntimeError(
            f"Silver lost or doubled rows: {batch.num_rows} Bronze rows became "
            f"{silver.num_rows} Silver + {dlq.num_rows} DLQ"
        )
    return silver, dlq
