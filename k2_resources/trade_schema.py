"""The V2 trade record: the contract on every market.crypto.trades.<exchange> topic.

`schemas/trade_v2.avsc` is the one declaration of V2: it is registered in the Schema Registry, so its
text is what producers write and Silver reads. Everything else K2 knows about the V2 fields is derived
from it here: their names and order (`V2_FIELD_NAMES`), which may be null (`V2_NULLABLE_FIELDS`), the
exact decimal type of prices and quantities (`v2_decimal`), and the V2 columns of Silver and Gold as
Iceberg fields (`v2_iceberg_fields`) and as Arrow (`v2_arrow_schema`).

How an Avro type becomes an Iceberg column (`iceberg_type`), as Silver has always stored it:
- string and enum -> string; long, int, boolean, float, double, bytes -> the same primitive;
- timestamp-micros -> long: µs since the epoch, the Avro value itself (no timezone conversion);
- decimal(p, s) -> decimal(p, s), from the logical type's precision and scale;
- array of a primitive -> list (elements may be null);
- map of strings -> string: Silver writes a map as one JSON object with sorted keys;
- a union of null and one type -> that type. Every column is optional, whatever the Avro nullability:
  Silver and Gold never declare NOT NULL (a required column broke the predecessor's writes), and a V2
  field Silver rejects when null is checked by `silver.rules`, not by the table.
Anything else (records, fixed, other unions, nested containers) raises: a field the tables cannot
carry fails the import, not a write.

Iceberg field ids (fixed, because existing tables carry them): a V2 field's id is its 1-based position
in the .avsc (message_id 1 ... vendor_data 15), and list elements are numbered from 101 in field order
(trade_conditions' element: 101). Avro schemas evolve by appending fields with defaults, so released
ids never move; tests/test_v2_contract.py pins the 15 released ones. A table's own columns follow the
V2 fields, numbered on from the last V2 id (`v2_table_schema`), which is also how Iceberg numbers a new
table's columns; an existing table keeps its ids when a V2 field is added (K2 adds the column by name).

Column docs: the .avsc's `doc` attributes describe the Avro record and stay in the .avsc. Its text is
registered: the dev registry (like Confluent's) gives a schema with any other doc or attribute a new
id, so the .avsc is not edited to carry Iceberg docs or ids. The Iceberg columns' docs are the one
mapping `ICEBERG_DOCS`, on the three columns whose stored form needs saying (µs since the epoch, JSON),
exactly as existing tables have them; the other V2 columns have none there either, so a table created
today documents its columns as the tables created before it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import fastavro

if TYPE_CHECKING:  # producers import this module; pyiceberg and pyarrow load only where tables are built
    import pyarrow as pa
    from pyiceberg.schema import Schema
    from pyiceberg.types import IcebergType, NestedField, PrimitiveType

V2_SCHEMA_FILE = "trade_v2.avsc"
FIRST_ELEMENT_ID = 101  # list elements are numbered from here, in field order

# The Iceberg columns' docs, by V2 field: how Silver and Gold store the value. Fields not listed have none.
ICEBERG_DOCS: dict[str, str] = {
    "timestamp": "Trade time, microseconds since epoch UTC",
    "ingestion_timestamp": "Producer receive time, µs",
    "vendor_data": "Exchange extras as a JSON object",
}


@cache
def trade_v2_schema_str() -> str:
    """The V2 schema as registered in the Schema Registry (the .avsc text)."""
    return resources.files("k2_resources.schemas").joinpath(V2_SCHEMA_FILE).read_text()


@cache
def trade_v2_schema() -> dict[str, Any]:
    return json.loads(trade_v2_schema_str())


@cache
def trade_v2_parsed() -> Any:
    """fastavro's parsed V2 schema: the reader schema for every writer schema on the topics."""
    return fastavro.parse_schema(trade_v2_schema())


# --- Derived from the .avsc ---------------------------------------------------------------------------


def non_null_branches(avro_type: Any) -> list[Any]:
    """The alternatives of a field type other than null (a union's branches, or the type itself)."""
    types = avro_type if isinstance(avro_type, list) else [avro_type]
    return [t for t in types if t != "null" and not (isinstance(t, dict) and t.get("type") == "null")]


def is_nullable(avro_type: Any) -> bool:
    """Whether a field type is a union with null."""
    return isinstance(avro_type, list) and len(non_null_branches(avro_type)) < len(avro_type)


def field_names(avro: dict[str, Any]) -> tuple[str, ...]:
    return tuple(f["name"] for f in avro["fields"])


def nullable_fields(avro: dict[str, Any]) -> frozenset[str]:
    return frozenset(f["name"] for f in avro["fields"] if is_nullable(f["type"]))


V2_FIELD_NAMES: tuple[str, ...] = field_names(trade_v2_schema())
V2_NULLABLE_FIELDS: frozenset[str] = nullable_fields(trade_v2_schema())


@dataclass(frozen=True)
class Column:
    """One of a table's own columns (not a V2 field): numbered when the table's schema is built."""

    name: str
    type: PrimitiveType
    doc: str | None = None


def _value_type(avro_type: Any) -> Any:
    """The one non-null type of a field, with a named-type wrapper ({"type": {...}}) unwrapped."""
    branches = non_null_branches(avro_type)
    if len(branches) != 1:
        raise ValueError(f"union {avro_type!r} has {len(branches)} non-null types; Iceberg columns need one")
    value = branches[0]
    while isinstance(value, dict) and isinstance(value.get("type"), (dict, list)):
        value = _value_type(value["type"])
    return value


def avro_kind(avro_type: Any) -> str:
    """What a field holds: "decimal", "timestamp-micros" or another logical type, else the Avro type
    name ("string", "enum", "array", "map", ...) of its one non-null type."""
    value = _value_type(avro_type)
    if not isinstance(value, dict):
        return value
    return value.get("logicalType") or value["type"]


def v2_fields_of_kind(kind: str) -> tuple[str, ...]:
    """The V2 fields that hold `kind` (see `avro_kind`), in V2 order."""
    return tuple(f["name"] for f in trade_v2_schema()["fields"] if avro_kind(f["type"]) == kind)


def _primitive(avro_type: Any) -> PrimitiveType:
    from pyiceberg.types import (
        BinaryType,
        BooleanType,
        DecimalType,
        DoubleType,
        FloatType,
        IntegerType,
        LongType,
        StringType,
    )

    value = _value_type(avro_type)
    kind = value.get("type") if isinstance(value, dict) else value
    logical = value.get("logicalType") if isinstance(value, dict) else None
    if logical == "decimal":
        return DecimalType(value["precision"], value.get("scale", 0))
    if logical == "timestamp-micros" and kind == "long":
        return LongType()
    if logical is not None:
        raise ValueError(f"logical type {logical!r} has no Iceberg column in Silver")
    primitives = {
        "string": StringType,
        "enum": StringType,
        "map": StringType,  # written as a JSON object (silver.columnar.vendor_data_json)
        "long": LongType,
        "int": IntegerType,
        "boolean": BooleanType,
        "float": FloatType,
        "double": DoubleType,
        "bytes": BinaryType,
    }
    if kind == "map" and _value_type(value["values"]) != "string":
        raise ValueError(f"map {value!r} is not a map of strings; Silver writes maps as JSON text")
    if kind not in primitives:
        raise ValueError(f"Avro type {value!r} has no Iceberg column in Silver")
    return primitives[kind]()


def _is_array(avro_type: Any) -> bool:
    value = _value_type(avro_type)
    return isinstance(value, dict) and value.get("type") == "array"


def iceberg_type(avro_type: Any, element_id: int) -> IcebergType:
    """The Iceberg type of a V2 field's Avro type (the module docstring has the rules); `element_id`
    is used if it is a list."""
    from pyiceberg.types import ListType

    if _is_array(avro_type):
        element = _primitive(_value_type(avro_type)["items"])
        return ListType(element_id, element, element_required=False)
    return _primitive(avro_type)


def iceberg_fields(avro: dict[str, Any], docs: dict[str, str] = ICEBERG_DOCS) -> tuple[NestedField, ...]:
    """The fields of an Avro record as optional Iceberg columns with ids 1, 2, ... in field order
    (list elements 101, 102, ...)."""
    from pyiceberg.types import NestedField

    element_ids = itertools.count(FIRST_ELEMENT_ID)
    fields = []
    for field_id, f in enumerate(avro["fields"], start=1):
        element_id = next(element_ids) if _is_array(f["type"]) else 0
        field_type = iceberg_type(f["type"], element_id)
        fields.append(NestedField(field_id, f["name"], field_type, required=False, doc=docs.get(f["name"])))
    return tuple(fields)


def v2_table_schema(v2_fields: Sequence[NestedField], own_columns: Sequence[Column]) -> Schema:
    """A table of the V2 columns, then its own columns numbered on from the last V2 id."""
    from pyiceberg.schema import Schema
    from pyiceberg.types import NestedField

    first = len(v2_fields) + 1
    own = [
        NestedField(first + i, c.name, c.type, required=False, doc=c.doc) for i, c in enumerate(own_columns)
    ]
    return Schema(*v2_fields, *own)


@cache
def v2_iceberg_fields() -> tuple[NestedField, ...]:
    """The V2 fields as the Iceberg columns that Silver and Gold start with."""
    return iceberg_fields(trade_v2_schema())


def v2_iceberg_field(name: str) -> NestedField:
    """One V2 column, for a table that copies a V2 value under its own field id."""
    return {f.name: f for f in v2_iceberg_fields()}[name]


def arrow_schema(v2_fields: Sequence[NestedField]) -> pa.Schema:
    """Iceberg columns as Arrow, by PyIceberg's own conversion (field ids as metadata)."""
    from pyiceberg.schema import Schema

    return Schema(*v2_fields).as_arrow()


@cache
def v2_arrow_schema() -> pa.Schema:
    """The V2 columns as Arrow, exactly as Silver writes and Gold reads them."""
    return arrow_schema(v2_iceberg_fields())


def v2_decimal() -> tuple[int, int]:
    """(precision, scale) of V2's decimal fields: Silver's exact units assume they all share one."""
    types = [_value_type(f["type"]) for f in trade_v2_schema()["fields"]]
    kinds = {(t["precision"], t.get("scale", 0)) for t in types if _is_decimal(t)}
    if len(kinds) != 1:
        raise ValueError(f"V2's decimal fields must share one precision and scale, not {sorted(kinds)}")
    return kinds.pop()


def _is_decimal(value: Any) -> bool:
    return isinstance(value, dict) and value.get("logicalType") == "decimal"
