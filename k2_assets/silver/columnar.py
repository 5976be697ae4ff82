"""Silver's columnar path: decode, validate and shape whole runs of Bronze values with Arrow.

Most Bronze values are well-framed, valid trades of one writer schema. For those, this module decodes
all bodies of a schema id at once (`avro_block`), validates them with vectorised comparisons, and
builds the Silver columns without a Python object per record. It is deliberately one-sided: a value
goes this way only when every check proves it valid (`valid_rows`); anything else (no Confluent
header, unknown or unusable schema id, a body the walk or the block decoder refuses, a value that
fails or cannot be proven to pass a check) is left to the per-record path in `transform`, which
decides exactly as before and writes the DLQ row with its category and message. So the two paths
cannot disagree about a rejected record, only the share of records each handles changes.

The checks mirror `rules.RecordChecker` one for one: the label checks call the checker's own methods,
once per distinct value; decimals are compared as exact unscaled integers (64-bit here: a body whose
price needs more than 8 bytes cannot fit decimal(18,8) at scale <= 8 and goes the per-record way);
timestamp windows are integer µs differences, taken only where they cannot overflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from k2_assets.silver.avro_block import (
    BlockSchema,
    body_fits,
    byte_words,
    decode_bodies,
    padded,
    value_offsets,
)
from k2_assets.silver.rules import MAX_UNITS, SILVER_PRECISION, SILVER_SCALE, UUID_PATTERN, RecordChecker
from k2_resources.trade_schema import V2_FIELD_NAMES, V2_NULLABLE_FIELDS

__all__ = ["BlockPlan", "FastRun", "block_plan", "decimal_array", "split_batch", "vendor_data_json"]

HEADER_BYTES = 5
SAFE_MICROS = 2**61  # differences of values below this cannot overflow int64


@dataclass(frozen=True)
class BlockPlan:
    """How the records of one writer schema decode as a block and become V2 columns.

    `columns` are the V2 fields the writer has, with the same type as in V2 (a writer may make one
    nullable: its nulls then go the per-record way); `defaults` are the V2 fields it lacks.
    """

    schema: BlockSchema
    columns: tuple[str, ...]
    defaults: dict[str, Any]


@dataclass
class FastRun:
    """Valid records decoded together: their Bronze row indices (ascending) and V2 columns in Silver
    types, plus `schema_id`."""

    index: np.ndarray
    columns: dict[str, pa.Array]


def _plain(avro_type: Any) -> Any:
    """A field type reduced to what decides its binary encoding and its values."""
    if isinstance(avro_type, list):
        return [_plain(t) for t in avro_type]
    if isinstance(avro_type, str):
        return avro_type
    kind = avro_type.get("type")
    if isinstance(kind, (dict, list)):
        return _plain(kind)
    if kind == "enum":
        return ("enum", tuple(avro_type["symbols"]))
    if kind == "array":
        return ("array", _plain(avro_type["items"]))
    if kind == "map":
        return ("map", _plain(avro_type["values"]))
    if kind in ("record", "error", "fixed"):
        return ("unsupported",)  # no V2 field is one; such a writer goes the per-record way
    return kind


def _same_type(writer_type: Any, v2_type: Any) -> bool:
    writer, v2 = _plain(writer_type), _plain(v2_type)
    if writer == v2:
        return True
    if isinstance(writer, list) and not isinstance(v2, list) and len(writer) == 2 and "null" in writer:
        return [t for t in writer if t != "null"] == [v2]
    return False


def block_plan(writer: dict[str, Any], v2: dict[str, Any]) -> BlockPlan | None:
    """The block plan of a (logical-type-free) writer schema already known to resolve to V2, or None
    when a V2 field's writer type differs (promotions, other unions, named references): such
    records keep fastavro's schema resolution, one at a time."""
    writer_types = {f["name"]: f["type"] for f in writer["fields"]}
    columns, defaults = [], {}
    for v2_field in v2["fields"]:
        name = v2_field["name"]
        if name not in writer_types:
            defaults[name] = v2_field["default"]
        elif _same_type(writer_types[name], v2_field["type"]):
            columns.append(name)
        else:
            return None
    return BlockPlan(BlockSchema(writer), tuple(columns), defaults)


# --- Output helpers shared with the per-record path ---------------------------------------------------


def vendor_data_json(vendor_data: dict[str, str] | None) -> str | None:
    """vendor_data as compact JSON with sorted keys: json.dumps(..., sort_keys=True,
    separators=(",", ":"), ensure_ascii=False) for a map of strings, at a third of its cost."""
    if vendor_data is None:
        return None
    return (
        "{"
        + ",".join(
            [encode_basestring(k) + ":" + encode_basestring(vendor_data[k]) for k in sorted(vendor_data)]
        )
        + "}"
    )


def decimal_array(units: Any) -> pa.Array:
    """decimal128(18,8) straight from exact integer counts of 1e-8 (no float, no Decimal objects)."""
    low = np.asarray(units, dtype=np.int64)
    words = np.empty((len(low), 2), dtype=np.int64)
    words[:, 0] = low
    words[:, 1] = low >> 63  # sign extension into the high 64 bits (little-endian two's complement)
    return pa.Array.from_buffers(
        pa.decimal128(SILVER_PRECISION, SILVER_SCALE), len(low), [None, pa.py_buffer(words)]
    )


# --- Splitting a batch --------------------------------------------------------------------------------


def split_batch(
    batch: pa.RecordBatch, schemas: Any, checker: RecordChecker, silver_types: pa.Schema
) -> tuple[list[FastRun], np.ndarray]:
    """The runs of valid records decoded here, and the ascending row indices left to the per-record path.

    `schemas` is the batch's `WriterSchemas`; each schema id's `block_plan` decides whether its
    records can come this way at all.
    """
    raw = batch.column("raw_bytes")
    if not pa.types.is_large_binary(raw.type):
        raw = raw.cast(pa.large_binary())
    offsets = value_offsets(raw)
    data = padded(raw.buffers()[2])
    start, end = offsets[:-1], offsets[1:]
    framed = (end - start >= HEADER_BYTES) & (data[start] == 0)
    if raw.null_count:
        framed &= raw.is_valid().to_numpy(zero_copy_only=False)
    header = data[start[:, None] + np.arange(1, HEADER_BYTES)].astype(np.uint32)
    schema_ids = ((header[:, 0] << 24) | (header[:, 1] << 16) | (header[:, 2] << 8) | header[:, 3]).view(
        np.int32
    )
    taken = np.zeros(len(start), dtype=bool)
    runs: list[FastRun] = []
    times = _bronze_micros(batch)
    for schema_id in np.unique(schema_ids[framed]).tolist():
        writer = schemas.get(schema_id)
        plan = None if writer is None or writer.problem else writer.block
        if plan is None:
            continue
        rows = np.flatnonzero(framed & (schema_ids == schema_id))
        rows = rows[body_fits(data, start[rows], end[rows], plan.schema)]
        if rows.size == 0:
            continue
        decoded, _failed = decode_bodies(plan.schema, raw, rows, list(plan.columns))
        for first, records in decoded:
            index = rows[first : first + records.num_rows]
            run = valid_run(records, index, plan, writer, checker, times, silver_types)
            taken[run.index] = True
            runs.append(run)
    return runs, np.flatnonzero(~taken)


def _bronze_micros(batch: pa.RecordBatch) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Bronze ingestion and Kafka times as (int64 µs, present) pairs."""
    out = {}
    for name in ("ingestion_timestamp", "kafka_timestamp"):
        column = batch.column(name).cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        out[name] = (
            column.fill_null(0).to_numpy(zero_copy_only=False),
            column.is_valid().to_numpy(zero_copy_only=False),
        )
    return out


# --- Validation ---------------------------------------------------------------------------------------


def _present(column: pa.Array) -> np.ndarray:
    if column.null_count == 0:
        return np.ones(len(column), dtype=bool)
    return column.is_valid().to_numpy(zero_copy_only=False)


def _per_value(column: pa.Array, passes: Any) -> np.ndarray:
    """passes(value) for each distinct value of a (dictionary) string column, spread over its rows."""
    encoded = column if pa.types.is_dictionary(column.type) else column.dictionary_encode()
    verdicts = np.array([passes(v) for v in encoded.dictionary.to_pylist()] + [False], dtype=bool)
    indices = encoded.indices.fill_null(len(encoded.dictionary)).to_numpy(zero_copy_only=False)
    return verdicts[indices]


def unscaled_int64(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Big-endian two's-complement bytes (Avro decimals) as int64, and which had 1 to 8 bytes.

    Each value is the 8 bytes that end where it ends, read as one big-endian word (the buffer has 8
    zero bytes in front, so the first value has them too), with the bytes before it shifted out and
    its sign extended back in.
    """
    column = column.cast(pa.large_binary())
    offsets = value_offsets(column)
    size = np.diff(offsets)
    fits = (size >= 1) & (size <= 8) & _present(column)
    data = np.concatenate([np.zeros(8, dtype=np.uint8), padded(column.buffers()[2])])
    raw = byte_words(data, ">")[offsets[1:]].astype(np.uint64)
    shift = (64 - 8 * np.clip(size, 1, 8)).astype(np.uint64)
    values = (raw << shift).view(np.int64) >> shift.astype(np.int64)
    return np.where(fits, values, 0), fits


def silver_units(unscaled: np.ndarray, known: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact counts of 1e-8 and where they are positive and fit decimal(18,8) (rules.check_* agree)."""
    ok = known & (unscaled > 0)
    if scale <= SILVER_SCALE:
        factor = 10 ** (SILVER_SCALE - scale)
        ok &= unscaled < MAX_UNITS // factor
        return np.where(ok, unscaled, 0) * factor, ok
    if scale - SILVER_SCALE > 18:
        return np.zeros_like(unscaled), np.zeros_like(ok)
    divisor = 10 ** (scale - SILVER_SCALE)
    ok &= unscaled % divisor == 0
    units = np.where(ok, unscaled // divisor, 0)
    ok &= units < MAX_UNITS
    return units, ok


def valid_run(
    records: pa.RecordBatch,
    index: np.ndarray,
    plan: BlockPlan,
    writer: Any,
    checker: RecordChecker,
    times: dict[str, tuple[np.ndarray, np.ndarray]],
    silver_types: pa.Schema,
) -> FastRun:
    """The records of `records` that pass every check, as Silver columns (the rest are left out)."""
    ok = np.ones(records.num_rows, dtype=bool)
    for name in plan.columns:
        if name not in V2_NULLABLE_FIELDS:
            ok &= _present(records.column(name))
    ok &= _labels_ok(records, plan, checker)
    price, price_ok = silver_units(*unscaled_int64(_column(records, plan, "price")), writer.price_scale)
    quantity, quantity_ok = silver_units(
        *unscaled_int64(_column(records, plan, "quantity")), writer.quantity_scale
    )
    ok &= price_ok & quantity_ok
    trade = _column(records, plan, "timestamp").fill_null(0).to_numpy(zero_copy_only=False)
    ok &= _in_window(trade, index, times, checker)
    kept = int(ok.sum())
    if kept < records.num_rows:
        records = records.filter(pa.array(ok))
    columns = {}
    for name in V2_FIELD_NAMES:
        columns[name] = _silver_column(records, plan, silver_types.field(name), kept)
    columns["price"], columns["quantity"] = decimal_array(price[ok]), decimal_array(quantity[ok])
    columns["schema_id"] = pa.repeat(pa.scalar(writer.schema_id, pa.int32()), int(ok.sum()))
    return FastRun(index[ok], columns)


def _column(records: pa.RecordBatch, plan: BlockPlan, name: str) -> pa.Array:
    if name in plan.columns:
        return records.column(name)
    return pa.nulls(records.num_rows)  # a V2 field without default is never missing (resolution_problem)


def _labels_ok(records: pa.RecordBatch, plan: BlockPlan, checker: RecordChecker) -> np.ndarray:
    matched = pc.match_substring_regex(records.column("message_id"), UUID_PATTERN)
    ok = pc.fill_null(matched, False).to_numpy(zero_copy_only=False)
    checks = {
        "exchange": checker.check_exchange,
        "asset_class": checker.check_asset_class,
        "symbol": checker.check_symbol,
        "currency": checker.check_currency,
        "side": checker.check_side,
    }
    for name, check in checks.items():
        ok &= _per_value(_column(records, plan, name), lambda v, check=check: check(v) is None)
    return ok


def _in_window(
    trade: np.ndarray,
    index: np.ndarray,
    times: dict[str, tuple[np.ndarray, np.ndarray]],
    checker: RecordChecker,
) -> np.ndarray:
    ingestion, has_ingestion = (a[index] for a in times["ingestion_timestamp"])
    kafka, has_kafka = (a[index] for a in times["kafka_timestamp"])
    ok = has_ingestion & has_kafka
    ok &= (np.abs(trade) < SAFE_MICROS) & (np.abs(ingestion) < SAFE_MICROS) & (np.abs(kafka) < SAFE_MICROS)
    trade, ingestion, kafka = (np.where(ok, a, 0) for a in (trade, ingestion, kafka))
    ok &= trade - ingestion <= checker.max_future_skew_us
    ok &= ingestion - trade <= checker.max_age_us
    ok &= np.abs(trade - kafka) <= checker.max_kafka_skew_us
    return ok


def _silver_column(records: pa.RecordBatch, plan: BlockPlan, f: pa.Field, n: int) -> pa.Array:
    if f.name in plan.defaults:
        default = plan.defaults[f.name]
        return pa.repeat(pa.scalar(default, type=f.type), n) if default is not None else pa.nulls(n, f.type)
    column = records.column(f.name)
    if pa.types.is_map(column.type):
        return _vendor_json(column, f.type)
    if pa.types.is_decimal(f.type):
        return pa.nulls(n, f.type)  # replaced by the exact units
    return column.cast(f.type)


def _vendor_json(column: pa.Array, silver_type: pa.DataType) -> pa.Array:
    """The map column as vendor_data_json strings, computed once per distinct map.

    Maps are told apart exactly: each entry becomes an integer (key code, value code) and each map the
    number whose digits (never 0), in base entries + 1, are its entries in order (empty: 0, null:
    -1); when that cannot fit 62 bits
    (many distinct entries, long maps) a length-prefixed text signature is used instead.
    """
    if len(column) == 0:
        return pa.array([], type=silver_type)
    groups = _map_groups(column)
    if groups is None:
        return _vendor_json_by_text(column, silver_type)
    first, inverse = groups
    texts = [
        None if m is None else vendor_data_json(dict(m)) for m in column.take(pa.array(first)).to_pylist()
    ]
    return pa.array(texts, type=silver_type).take(pa.array(inverse))


def _map_groups(column: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """(first row of each distinct map, each row's group), or None when the codes would not fit."""
    keys, items = column.keys.dictionary_encode(), column.items.dictionary_encode()
    n_items = len(items.dictionary) + 1
    entry = keys.indices.to_numpy(zero_copy_only=False).astype(np.int64) * n_items
    entry += items.indices.fill_null(n_items - 1).to_numpy(zero_copy_only=False) + 1
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[
        column.offset : column.offset + len(column) + 1
    ]
    offsets = offsets - offsets[0]
    sizes = np.diff(offsets)
    base = len(keys.dictionary) * n_items + 1
    longest = int(sizes.max()) if len(sizes) else 0
    if base**longest >= 2**62:
        return None
    code = np.zeros(len(column), dtype=np.int64)
    for k in range(longest):
        has = sizes > k
        code[has] = code[has] * base + entry[offsets[:-1][has] + k]
    code[~_present(column)] = -1
    _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
    return first, inverse


def _vendor_json_by_text(column: pa.Array, silver_type: pa.DataType) -> pa.Array:
    keys = pc.binary_join_element_wise(
        pc.cast(pc.utf8_length(column.keys), pa.string()), ":", column.keys, ""
    )
    items = pc.binary_join_element_wise(
        pc.cast(pc.utf8_length(column.items), pa.string()), ":", column.items, ""
    )
    tokens = pc.binary_join_element_wise(keys, items, "=")
    offsets = column.offsets
    signature = pc.binary_join(pa.ListArray.from_arrays(offsets, tokens), ";")
    # An empty map joins to null and so does a missing one; "N" is no signature (those start with a digit).
    signature = pc.if_else(column.is_valid(), pc.fill_null(signature, ""), "N")
    encoded = signature.dictionary_encode()
    first = np.unique(encoded.indices.to_numpy(zero_copy_only=False), return_index=True)[1]
    maps = column.take(pa.array(first)).to_pylist()
    texts = [None if m is None else vendor_data_json(dict(m)) for m in maps]
    order = np.unique(encoded.indices.to_numpy(zero_copy_only=False))
    lookup = [None] * len(encoded.dictionary)
    for position, text in zip(order.tolist(), texts, strict=True):
        lookup[position] = text
    result = pa.array(lookup, type=silver_type).take(encoded.indices)
    return pc.if_else(column.is_valid(), result, pa.nulls(len(column), silver_type))
