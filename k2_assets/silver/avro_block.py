"""Decode many Avro bodies of one writer schema at once, with arrow-avro (PyPI `polars-avro`).

The bodies of one schema id are framed as one Avro object-container block (header with the writer
schema, record count, byte size, the bodies back to back, sync marker) and read by arrow-avro's
`Reader` into one Arrow record batch, about 20x faster than fastavro one record at a time.

Why every body is walked first (`body_fits`): a block gives the decoder no record boundaries, only a
count. A body with trailing bytes leaves bytes after the N-th record, and arrow-avro 59.3's `Reader`
then loops forever (it only decodes while the count is above zero, and only asks for the next block
once every byte is consumed; seen here with polars-avro 0.13.0). A truncated or padded body shifts
every later record, which fails the block at best and silently misparses it at worst. So each body is
skip-parsed first against the writer schema, all bodies at once with numpy, and only the bodies whose
walk ends exactly at their last byte go into a block; the walk follows the same grammar as the
decoder, so the block's records end exactly where the block does. What the walk cannot vouch for
(over-long varints, negative lengths or block counts, enum or union indices out of range, a boolean
byte other than 0 or 1) is left to the per-record path, which names the exact reason.

A block can still fail to decode (invalid UTF-8 in a string); it is then split in halves until the
failing bodies are isolated, and those go the per-record way too.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import importlib.util
import io
import json
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["BlockSchema", "body_fits", "byte_words", "decode_bodies"]

SYNC_MARKER = b"K2-silver-block!"  # any 16 bytes: the block is read back only by ourselves
MAX_VARINT_BYTES = 10  # a 64-bit zigzag varint
PAD_BYTES = MAX_VARINT_BYTES + 8  # reads past a body never leave the padded buffer
SMALLEST_BISECTED = 8  # a failing block this small goes the per-record way whole
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
PRIMITIVE_SIZES = {"null": 0, "float": 4, "double": 8}
HIGH_BITS = np.uint64(0x8080808080808080)
# The value of each one-byte varint (below 0x80), looked up: one gather instead of five whole-array steps.
ZIGZAG_BYTES = np.array([(b >> 1) ^ -(b & 1) for b in range(256)], dtype=np.int64)
WORD_MASKS = np.array([0] + [(1 << (8 * n)) - 1 for n in range(1, 9)], dtype=np.uint64)


def zigzag_varint(value: int) -> bytes:
    """Avro's encoding of a long (zigzag, then base-128 little-endian groups)."""
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


HEADER_FIELD = "k2_confluent_header"


class BlockSchema:
    """A writer schema (logical types already stripped) as the block decoder and the body walk need it.

    The block holds whole Kafka values, Confluent header included: the schema read from it is the
    writer's record with the 5 header bytes as a leading `fixed` field, so the values go into the
    block as Bronze holds them (no copy to cut the headers off) and the projection drops the field.
    """

    def __init__(self, writer: dict[str, Any], header_bytes: int = 5) -> None:
        if any(f["name"] == HEADER_FIELD for f in writer["fields"]):
            raise ValueError(f"the writer schema has a field named {HEADER_FIELD}")
        header = {
            "name": HEADER_FIELD,
            "type": {"type": "fixed", "name": "K2ConfluentHeader", "size": header_bytes},
        }
        self.writer = {**writer, "fields": [header, *writer["fields"]]}
        self.json = json.dumps(self.writer)
        self.header = _container_header(self.json)
        self.names: dict[str, Any] = {}
        _collect_names(writer, None, self.names)


def _container_header(schema_json: str) -> bytes:
    meta = {b"avro.schema": schema_json.encode(), b"avro.codec": b"null"}
    out = bytearray(b"Obj\x01")
    out += zigzag_varint(len(meta))
    for key, value in meta.items():
        out += zigzag_varint(len(key)) + key + zigzag_varint(len(value)) + value
    out += zigzag_varint(0) + SYNC_MARKER
    return bytes(out)


def _collect_names(schema: Any, namespace: str | None, names: dict[str, Any]) -> None:
    """Full name -> definition of every named type (record, enum, fixed), for references by name."""
    if isinstance(schema, list):
        for branch in schema:
            _collect_names(branch, namespace, names)
        return
    if not isinstance(schema, dict):
        return
    kind = schema.get("type")
    if kind in ("record", "error", "enum", "fixed"):
        name = schema["name"]
        namespace = schema.get("namespace", namespace) if "." not in name else name.rsplit(".", 1)[0]
        names[name if "." in name else f"{namespace}.{name}" if namespace else name] = schema
        names.setdefault(name.rsplit(".", 1)[-1], schema)
        for f in schema.get("fields", []):
            _collect_names(f["type"], namespace, names)
    elif kind == "array":
        _collect_names(schema["items"], namespace, names)
    elif kind == "map":
        _collect_names(schema["values"], namespace, names)
    elif isinstance(kind, (dict, list)):
        _collect_names(kind, namespace, names)


# --- The body walk ------------------------------------------------------------------------------------


class BodyWalk:
    """Skip-parse many Avro bodies in lockstep: one numpy operation per schema node, not per record.

    Each step works on `rows` (indices of the bodies it concerns; None = all of them, the common case,
    which saves a gather per operation), their positions `pos` and their ends `end`. A body that breaks
    the grammar is marked in `bad` and kept inside its own bytes; its walk goes on harmlessly.
    """

    def __init__(self, data: np.ndarray, start: np.ndarray, end: np.ndarray, schema: BlockSchema) -> None:
        self.data = data
        self.words = byte_words(data)
        self.bad = np.zeros(len(start), dtype=bool)
        self.names = schema.names
        self.walked = self.walk(schema.writer, None, start.astype(np.int64), end.astype(np.int64))

    def reject(self, rows: np.ndarray | None, bad: np.ndarray) -> None:
        if bad.any():
            if rows is None:
                self.bad |= bad
            else:
                self.bad[rows[bad]] = True

    def bounded(self, rows: np.ndarray | None, pos: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Reject the bodies whose walk ran past their end; keep every position inside the buffer."""
        over = pos > end
        if over.any():
            self.reject(rows, over)
            pos = np.minimum(pos, end)
        return pos

    def varint(
        self,
        rows: np.ndarray | None,
        pos: np.ndarray,
        end: np.ndarray,
        max_bytes: int = 10,
        value: bool = True,
    ):
        """(zigzag-decoded value, position after it) of the varint at `pos` of each body.

        Mostly one byte (lengths, indices, counts); otherwise the next 8 bytes are loaded as one
        little-endian word and the first byte without its continuation bit is found by bit tricks,
        which covers every value below 2**55 (timestamps in µs included) without a loop over bytes.
        """
        byte = self.data[pos]
        if byte.max(initial=0) < 0x80:
            return ZIGZAG_BYTES[byte], self.bounded(rows, pos + 1, end)
        word = self.words[pos]
        stops = ~word & HIGH_BITS
        lowest = stops & (~stops + np.uint64(1))
        # lowest has one bit, at 8k+7 for a varint of k+1 bytes: k+1 = (bits below it + 1) / 8. Without
        # a stop bit (9 or 10 bytes) lowest is 0 and the size comes out 8, made right in long_varints.
        size = ((np.bitwise_count(lowest - np.uint64(1)) + 1) >> 3).astype(np.int64)
        raw = np.zeros(len(pos), dtype=np.uint64)
        if value:  # lengths, counts and indices; a long field only needs its size
            kept = word & WORD_MASKS[np.minimum(size, 8)]
            for k in range(8):
                raw |= ((kept >> np.uint64(8 * k)) & np.uint64(0x7F)) << np.uint64(7 * k)
        long_ones = np.flatnonzero(stops == 0)  # 9 or 10 bytes: values of 2**56 and more
        if long_ones.size:
            raw[long_ones], size[long_ones], too_long = self.long_varints(pos[long_ones], raw[long_ones])
            self.reject(rows, _at(len(pos), long_ones[too_long]))
        self.reject(rows, size > max_bytes)
        decoded = (raw >> np.uint64(1)).astype(np.int64) ^ -(raw & np.uint64(1)).astype(np.int64)
        return decoded, self.bounded(rows, pos + size, end)

    def long_varints(self, pos: np.ndarray, raw: np.ndarray):
        """Bytes 9 and 10 of the varints that run past 8 bytes: (value, size, broken)."""
        raw = raw.copy()
        ninth = self.data[pos + 8].astype(np.uint64)
        tenth = self.data[pos + 9].astype(np.uint64)
        raw |= (ninth & np.uint64(0x7F)) << np.uint64(56)
        nine = ninth < 0x80
        raw |= np.where(nine, np.uint64(0), (tenth & np.uint64(1)) << np.uint64(63))
        broken = ~nine & (tenth > 1)  # more than 10 bytes, or bits beyond the 64th
        return raw, np.where(nine, 9, 10), broken

    def length_prefixed(self, rows: np.ndarray | None, pos: np.ndarray, end: np.ndarray) -> np.ndarray:
        length, pos = self.varint(rows, pos, end)
        bad = (length < 0) | (length > end - pos)
        if bad.any():
            self.reject(rows, bad)
            length = np.where(bad, 0, length)
        return pos + length

    def walk(self, schema: Any, rows: np.ndarray | None, pos: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Positions after one value of `schema` in each body of `rows`."""
        if len(pos) == 0:
            return pos
        if isinstance(schema, list):
            return self.union(schema, rows, pos, end)
        if isinstance(schema, str):
            return self.named_or_primitive(schema, rows, pos, end)
        kind = schema["type"]
        if isinstance(kind, (dict, list)):
            return self.walk(kind, rows, pos, end)
        if kind in ("record", "error"):
            for f in schema["fields"]:
                pos = self.walk(f["type"], rows, pos, end)
            return pos
        if kind == "enum":
            index, pos = self.varint(rows, pos, end)
            self.reject(rows, (index < 0) | (index >= len(schema["symbols"])))
            return pos
        if kind == "fixed":
            return self.bounded(rows, pos + int(schema["size"]), end)
        if kind == "array":
            return self.blocks(rows, pos, end, lambda r, p, e: self.walk(schema["items"], r, p, e))
        if kind == "map":
            values = schema["values"]
            return self.blocks(
                rows, pos, end, lambda r, p, e: self.walk(values, r, self.length_prefixed(r, p, e), e)
            )
        return self.named_or_primitive(kind, rows, pos, end)

    def named_or_primitive(
        self, name: str, rows: np.ndarray | None, pos: np.ndarray, end: np.ndarray
    ) -> np.ndarray:
        if name in ("string", "bytes"):
            return self.length_prefixed(rows, pos, end)
        if name == "long":
            return self.varint(rows, pos, end, value=False)[1]
        if name == "int":
            value, pos = self.varint(rows, pos, end, max_bytes=5)
            self.reject(rows, (value < INT32_MIN) | (value > INT32_MAX))
            return pos
        if name == "boolean":
            self.reject(rows, self.data[pos] > 1)
            return self.bounded(rows, pos + 1, end)
        if name in PRIMITIVE_SIZES:
            return self.bounded(rows, pos + PRIMITIVE_SIZES[name], end)
        return self.walk(self.names[name], rows, pos, end)

    def union(self, branches: list[Any], rows: np.ndarray | None, pos: np.ndarray, end: np.ndarray):
        index, pos = self.varint(rows, pos, end)
        self.reject(rows, (index < 0) | (index >= len(branches)))
        first = int(index[0])
        if 0 <= first < len(branches) and (index == first).all():  # the usual case: no subsets
            return self.walk(branches[first], rows, pos, end)
        out = pos.copy()
        for i, branch in enumerate(branches):
            chosen = np.flatnonzero(index == i)
            if chosen.size:
                members = chosen if rows is None else rows[chosen]
                out[chosen] = self.walk(branch, members, pos[chosen], end[chosen])
        return out

    def blocks(
        self,
        rows: np.ndarray | None,
        pos: np.ndarray,
        end: np.ndarray,
        item: Callable[[np.ndarray | None, np.ndarray, np.ndarray], np.ndarray],
    ) -> np.ndarray:
        """An array's or map's blocks: a count, that many items, ... until a count of 0.

        Negative counts (a count followed by the block's byte size) are legal Avro that no writer here
        produces; they go the per-record way. A count above the bytes left cannot be honest, and
        rejecting it bounds the item loop by the body's size.

        The bodies still in the array are `Lockstep`: while every body is (the usual case: each map
        has the same number of entries), items are walked on the arrays as they are, with no gather.
        """
        step = Lockstep(rows, pos.copy(), end)
        while step.size:
            count, at = self.varint(*step.arguments())
            bad = (count < 0) | (count > step.ends() - at)
            if bad.any():
                self.reject(step.rows(), bad)
                count = np.where(bad, 0, count)
            step.advance(at)
            step.keep(count > 0)
            left = count[count > 0]
            items = step.copy()
            while items.size:
                items.advance(item(*items.arguments()))
                left -= 1
                keeps = left > 0
                items.keep(keeps)
                left = left[keeps]
            step.out = items.out
        return step.out


class Lockstep:
    """Which of a walk's bodies are still inside an array or map, and where each one is (`out`).

    `members` indexes the bodies still in it, None while that is every one of them: then the walk
    works on `out`, `end` and `rows` as they are (no gather, no scatter), which is the usual case.
    """

    def __init__(self, rows: np.ndarray | None, out: np.ndarray, end: np.ndarray) -> None:
        self.all_rows, self.out, self.end = rows, out, end
        self.members: np.ndarray | None = None
        self.size = len(out)

    def copy(self) -> Lockstep:
        other = Lockstep(self.all_rows, self.out, self.end)
        other.members, other.size = self.members, self.size
        return other

    def rows(self) -> np.ndarray | None:
        """The members as indices of the walk's bodies (None: all of them)."""
        if self.members is None:
            return self.all_rows
        return self.members if self.all_rows is None else self.all_rows[self.members]

    def ends(self) -> np.ndarray:
        return self.end if self.members is None else self.end[self.members]

    def arguments(self) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """(rows, positions, ends) of the members, as a walk step takes them."""
        if self.members is None:
            return self.all_rows, self.out, self.end
        return self.rows(), self.out[self.members], self.end[self.members]

    def advance(self, positions: np.ndarray) -> None:
        """The members' new positions."""
        if self.members is None:
            self.out = positions
        else:
            self.out[self.members] = positions

    def keep(self, still: np.ndarray) -> None:
        """Keep only the members for which `still` holds."""
        if still.all():
            return
        chosen = np.flatnonzero(still)
        self.members = chosen if self.members is None else self.members[chosen]
        self.size = len(self.members)


def byte_words(data: np.ndarray, byte_order: str = "<") -> np.ndarray:
    """The 8 bytes from each position of `data` (uint8) on, as one unsigned 64-bit word: a view with a
    stride of one byte, so a gather of words is one fancy index (half the time of gathering rows of
    an (n, 8) byte view)."""
    return np.ndarray(shape=(len(data) - 7,), dtype=f"{byte_order}u8", buffer=data, strides=(1,))


def _at(n: int, where: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[where] = True
    return mask


def body_fits(data: np.ndarray, start: np.ndarray, end: np.ndarray, schema: BlockSchema) -> np.ndarray:
    """For each value data[start:end], whether it is a header and exactly one well-formed record of
    the writer schema.

    `data` must hold PAD_BYTES readable bytes after the last end (see `padded`).
    """
    walk = BodyWalk(data, start, end, schema)
    return ~walk.bad & (walk.walked == end)


def padded(values: pa.Buffer | None) -> np.ndarray:
    """The values buffer of a binary column as uint8, with PAD_BYTES zero bytes after it."""
    out = np.zeros((0 if values is None else values.size) + PAD_BYTES, dtype=np.uint8)
    if values is not None:
        out[: values.size] = np.frombuffer(values, dtype=np.uint8)
    return out


# --- Decoding a block ---------------------------------------------------------------------------------


def value_offsets(binary: pa.Array) -> np.ndarray:
    """The int64 value offsets of a large_binary array (slice-aware, no copy)."""
    return np.frombuffer(binary.buffers()[1], dtype=np.int64)[binary.offset : binary.offset + len(binary) + 1]


def block_pieces(values: pa.Array, rows: np.ndarray) -> tuple[list[pa.Buffer], int]:
    """The chosen values of a large_binary array as slices of its values buffer, one per contiguous
    run, and their total size: joined into the block once, with no copy made before.

    Taking the rows into a new array first (`Array.take`) copies every byte too and builds offsets
    nobody reads; most chosen rows are neighbours, so this is a few slices of the values buffer.
    """
    if rows.size == 0:
        return [], 0
    offsets = value_offsets(values)
    first, stop = offsets[rows], offsets[rows + 1]
    breaks = np.flatnonzero(first[1:] != stop[:-1]) + 1
    starts = first[np.concatenate([[0], breaks])].tolist()
    ends = stop[np.concatenate([breaks - 1, [rows.size - 1]])].tolist()
    buffer = values.buffers()[2]
    return [buffer[a:b] for a, b in zip(starts, ends, strict=True)], int((stop - first).sum())


ARROW_AVRO_MODULE = "polars_avro._avro_rs"  # arrow-avro's native module inside the polars-avro wheel
_arrow_avro_lock = threading.Lock()


@functools.cache
def avro_source_class() -> type:
    """arrow-avro's reader class, loaded on first use without importing polars.

    The class lives in polars-avro's native module, whose package `__init__` imports polars for its
    scan and sink helpers, which Silver does not use: that import cost 0.14 CPU-s and 0.17 s of wall
    time at the start of every Silver run (each run is a fresh process) and ~35 MB resident. The
    native module needs no polars (its batches go to PyArrow through the Arrow C data interface), so
    it is loaded by itself and registered under its own name, where a later `import polars_avro`
    finds it instead of loading it twice (PyO3 refuses a second load). Loaded under a lock and
    cached: two threads loading it at the same moment could each see a half-made module.
    """
    with _arrow_avro_lock:
        module = sys.modules.get(ARROW_AVRO_MODULE)
        if module is None:
            module = _load_native_module(ARROW_AVRO_MODULE)
        return module.AvroSource


def _load_native_module(name: str) -> ModuleType:
    """The extension module `name` (package.module) loaded from its package's directory, the package's
    `__init__` not run (importlib's recipe for importing a file directly)."""
    package = name.rpartition(".")[0]
    found = importlib.util.find_spec(package)  # a top-level package: located, not imported
    spec = found and importlib.machinery.PathFinder.find_spec(name, found.submodule_search_locations)
    if spec is None:
        raise ImportError(f"no module {name} installed", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def decode_block(
    schema: BlockSchema, values: pa.Array, rows: np.ndarray, columns: list[str]
) -> pa.RecordBatch:
    """Decode values[rows] (a large_binary array whose chosen values are each exactly one record) with
    arrow-avro."""
    pieces, size = block_pieces(values, rows)
    count = len(rows)
    # One join, one copy of the bodies (a 16 MB batch was copied twice: payload, then block).
    block = b"".join([schema.header, zigzag_varint(count), zigzag_varint(size), *pieces, SYNC_MARKER])
    source = io.BytesIO(block)
    reader = avro_source_class()([lambda: contextlib.nullcontext(source)], False, False)
    batches = [pa.record_batch(b) for b in reader.batch_iter(count, columns)]
    decoded = pa.concat_batches(batches) if len(batches) != 1 else batches[0]
    if decoded.num_rows != count:
        raise ValueError(f"arrow-avro returned {decoded.num_rows} rows for a block of {count}")
    return decoded


def decode_bodies(
    schema: BlockSchema, values: pa.Array, rows: np.ndarray, columns: list[str]
) -> tuple[list[tuple[int, pa.RecordBatch]], list[int]]:
    """Decode every chosen value it can: ([(position in `rows` of the first, its decoded run)], [failed
    positions in `rows`]). `values` is a large_binary array, `rows` the ascending indices of the values
    to decode, each exactly one record.

    A failing block is halved until each failing run is SMALLEST_BISECTED bodies or fewer; those are
    handed back whole for the per-record path, which finds the actually bad ones and says why.
    """
    decoded: list[tuple[int, pa.RecordBatch]] = []
    failed: list[int] = []
    pending = [(0, len(rows))]
    while pending:
        first, stop = pending.pop()
        if stop == first:
            continue
        try:
            decoded.append((first, decode_block(schema, values, rows[first:stop], columns)))
        except Exception:  # arrow-avro and polars-avro signal bad input with several exception types
            if stop - first <= SMALLEST_BISECTED:
                failed.extend(range(first, stop))
            else:
                middle = (first + stop) // 2
                pending += [(middle, stop), (first, middle)]
    decoded.sort(key=lambda run: run[0])
    return decoded, sorted(failed)
