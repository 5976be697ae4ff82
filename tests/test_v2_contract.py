"""The V2 contract is declared once, in trade_v2.avsc, and Silver, Gold and Arrow follow it.

Three promises: the derived tables are today's tables column for column (existing tables carry these
field ids); every derived Iceberg type is what the Avro type says; and a field added to the .avsc
reaches Silver's and Gold's schemas, the Arrow schema and the rows Silver and Gold write, with no
other file changed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.schema import Schema
from pyiceberg.types import (
    BinaryType,
    BooleanType,
    DateType,
    DecimalType,
    DoubleType,
    FloatType,
    IcebergType,
    IntegerType,
    ListType,
    LongType,
    NestedField,
    StringType,
    TimestamptzType,
)

from k2_assets.gold.tables import DEDUP_AUDIT_SCHEMA, GOLD_SCHEMA, GOLD_TABLE_SPEC, gold_schema
from k2_assets.silver.tables import SILVER_PARTITION_SPEC, SILVER_SCHEMA, silver_schema
from k2_assets.silver.transform import SILVER_ARROW_SCHEMA
from k2_resources.trade_schema import (
    ICEBERG_DOCS,
    V2_FIELD_NAMES,
    V2_NULLABLE_FIELDS,
    arrow_schema,
    iceberg_fields,
    trade_v2_schema,
    v2_arrow_schema,
    v2_decimal,
    v2_iceberg_fields,
)
from tests.test_new_exchange import copy_tree, run_python

SOURCE_ROOT = Path(__file__).resolve().parents[1]
AVSC = "k2_resources/schemas/trade_v2.avsc"


def optional(field_id: int, name: str, field_type: IcebergType, doc: str | None = None) -> NestedField:
    return NestedField(field_id, name, field_type, required=False, doc=doc)


# The tables as they were declared by hand before the derivation, and as existing tables carry them.
RELEASED_V2 = (
    optional(1, "message_id", StringType()),
    optional(2, "trade_id", StringType()),
    optional(3, "symbol", StringType()),
    optional(4, "exchange", StringType()),
    optional(5, "asset_class", StringType()),
    optional(6, "timestamp", LongType(), "Trade time, microseconds since epoch UTC"),
    optional(7, "price", DecimalType(18, 8)),
    optional(8, "quantity", DecimalType(18, 8)),
    optional(9, "currency", StringType()),
    optional(10, "side", StringType()),
    optional(11, "trade_conditions", ListType(101, StringType(), element_required=False)),
    optional(12, "source_sequence", LongType()),
    optional(13, "ingestion_timestamp", LongType(), "Producer receive time, µs"),
    optional(14, "platform_sequence", LongType()),
    optional(15, "vendor_data", StringType(), "Exchange extras as a JSON object"),
)
RELEASED_SILVER = (
    *RELEASED_V2,
    optional(16, "exchange_date", DateType(), "UTC date of the trade timestamp"),
    optional(17, "validation_timestamp", TimestamptzType()),
    optional(18, "bronze_ingestion_timestamp", TimestamptzType()),
    optional(19, "schema_id", IntegerType(), "Writer schema id from the record header"),
    optional(20, "topic", StringType()),
    optional(21, "partition", IntegerType()),
    optional(22, "offset", LongType()),
)
RELEASED_GOLD = (
    *RELEASED_V2,
    optional(16, "gold_ingestion_timestamp", TimestamptzType(), "When the Gold row was written"),
    optional(17, "exchange_date", DateType(), "UTC date of the trade timestamp"),
    optional(18, "exchange_hour", IntegerType(), "UTC hour (0-23) of the trade timestamp"),
)
RELEASED_AUDIT_V2_COPIES = (
    optional(1, "message_id", StringType(), "message_id of the removed Gold row"),
    optional(2, "exchange", StringType()),
    optional(3, "symbol", StringType()),
    optional(4, "trade_id", StringType()),
    optional(5, "timestamp", LongType()),
)


def described(field: NestedField) -> tuple[Any, ...]:
    """Everything a table carries of a column, the list element's id and nullability included."""
    kind = field.field_type
    element = (
        (kind.element_id, kind.element_type, kind.element_required) if isinstance(kind, ListType) else None
    )
    return field.field_id, field.name, kind, field.required, field.doc, element


def assert_columns(schema: Schema, expected: tuple[NestedField, ...]) -> None:
    assert [described(f) for f in schema.fields] == [described(f) for f in expected]


# --- The derived tables are today's tables ------------------------------------------------------------


def test_silver_and_gold_keep_todays_columns_ids_and_docs() -> None:
    assert_columns(SILVER_SCHEMA, RELEASED_SILVER)
    assert_columns(GOLD_SCHEMA, RELEASED_GOLD)
    assert_columns(Schema(*DEDUP_AUDIT_SCHEMA.fields[:5]), RELEASED_AUDIT_V2_COPIES)
    assert SILVER_SCHEMA.highest_field_id == 101 and GOLD_SCHEMA.highest_field_id == 101


def test_partition_specs_and_sort_order_point_at_the_same_columns() -> None:
    assert [(f.source_id, f.field_id, f.name) for f in SILVER_PARTITION_SPEC.fields] == [
        (16, 1000, "exchange_date_day")
    ]
    assert [(f.source_id, f.name) for f in GOLD_TABLE_SPEC.partition_spec.fields] == [
        (17, "exchange_date"),
        (18, "exchange_hour"),
    ]
    assert [f.source_id for f in GOLD_TABLE_SPEC.sort_order.fields] == [6]


def test_arrow_schema_keeps_todays_arrow_types_and_field_ids() -> None:
    released = Schema(*RELEASED_V2).as_arrow()
    assert v2_arrow_schema().equals(released, check_metadata=True)
    assert pa.schema(list(SILVER_ARROW_SCHEMA)[: len(V2_FIELD_NAMES)]).equals(released, check_metadata=True)
    types = {f.name: f.type for f in v2_arrow_schema()}
    assert types["message_id"] == pa.large_string()
    assert types["timestamp"] == pa.int64()
    assert types["price"] == types["quantity"] == pa.decimal128(18, 8)
    assert types["trade_conditions"] == pa.large_list(pa.large_string())
    assert v2_arrow_schema().field("trade_conditions").type.value_field.metadata == {
        b"PARQUET:field_id": b"101"
    }


def test_names_nullability_and_decimal_come_from_the_avsc() -> None:
    avsc = json.loads((SOURCE_ROOT / AVSC).read_text())
    assert tuple(f["name"] for f in avsc["fields"]) == V2_FIELD_NAMES
    assert {f["name"] for f in avsc["fields"] if isinstance(f["type"], list)} == V2_NULLABLE_FIELDS
    assert v2_decimal() == (18, 8)
    assert set(ICEBERG_DOCS) <= set(V2_FIELD_NAMES), "a doc for a column V2 does not have"


# --- Every derived type is what the Avro type says ----------------------------------------------------


def avro_value(avro_type: Any) -> Any:
    """The non-null branch of a nullable union, else the type itself."""
    if isinstance(avro_type, list):
        [value] = [t for t in avro_type if t != "null"]
        return value
    return avro_type


def expected_iceberg_type(avro_type: Any) -> type[IcebergType] | DecimalType:
    value = avro_value(avro_type)
    if isinstance(value, str):
        primitives = {"string": StringType, "long": LongType, "int": IntegerType, "boolean": BooleanType}
        return {**primitives, "float": FloatType, "double": DoubleType, "bytes": BinaryType}[value]
    if value.get("logicalType") == "decimal":
        return DecimalType(value["precision"], value["scale"])
    if value.get("logicalType") == "timestamp-micros":
        assert value["type"] == "long"
        return LongType
    return {"enum": StringType, "map": StringType, "array": ListType}[value["type"]]


def test_each_iceberg_type_matches_its_avro_type() -> None:
    derived = {f.name: f for f in v2_iceberg_fields()}
    for avro_field in trade_v2_schema()["fields"]:
        field = derived[avro_field["name"]]
        expected = expected_iceberg_type(avro_field["type"])
        if isinstance(expected, DecimalType):
            assert field.field_type == expected, avro_field["name"]
        else:
            assert type(field.field_type) is expected, avro_field["name"]
        assert not field.required, "Silver and Gold columns are optional, nullable in Avro or not"
    assert derived["trade_conditions"].field_type.element_type == StringType()
    assert not derived["trade_conditions"].field_type.element_required


def test_decimal_precision_and_scale_follow_the_logical_type() -> None:
    schema = copy.deepcopy(trade_v2_schema())
    for field in schema["fields"]:
        if field["name"] == "price":
            field["type"] = {**field["type"], "precision": 20, "scale": 4}
    derived = {f.name: f.field_type for f in iceberg_fields(schema)}
    assert derived["price"] == DecimalType(20, 4)
    assert derived["quantity"] == DecimalType(18, 8)


@pytest.mark.parametrize(
    "avro_type",
    [
        {"type": "record", "name": "Venue", "fields": [{"name": "mic", "type": "string"}]},
        {"type": "fixed", "name": "Hash", "size": 16},
        ["null", "string", "long"],
        {"type": "array", "items": {"type": "array", "items": "string"}},
        {"type": "map", "values": "long"},
        {"type": "long", "logicalType": "timestamp-millis"},
    ],
    ids=["record", "fixed", "wide union", "nested array", "map of longs", "timestamp-millis"],
)
def test_a_field_the_tables_cannot_carry_fails_the_derivation(avro_type: Any) -> None:
    schema = copy.deepcopy(trade_v2_schema())
    schema["fields"].append({"name": "venue", "type": avro_type})
    with pytest.raises(ValueError):
        iceberg_fields(schema)


# --- A field added to the .avsc reaches Silver, Gold and Arrow ---------------------------------------

ADDED = (
    {"name": "venue", "type": ["null", "string"], "default": None},
    {
        "name": "fee",
        "type": ["null", {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 6}],
        "default": None,
    },
    {
        "name": "settled_at",
        "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}],
        "default": None,
    },
    {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
    {"name": "extras", "type": ["null", {"type": "map", "values": "string"}], "default": None},
)
ADDED_V2 = (
    optional(16, "venue", StringType()),
    optional(17, "fee", DecimalType(12, 6)),
    optional(18, "settled_at", LongType()),
    optional(19, "tags", ListType(102, StringType(), element_required=False)),
    optional(20, "extras", StringType()),
)


def with_added_fields() -> dict[str, Any]:
    schema = copy.deepcopy(trade_v2_schema())
    schema["fields"].extend(copy.deepcopy(ADDED))
    return schema


def renumbered(fields: tuple[NestedField, ...], first_id: int) -> tuple[NestedField, ...]:
    return tuple(optional(first_id + i, f.name, f.field_type, f.doc) for i, f in enumerate(fields))


def test_added_fields_follow_the_released_ones_in_silver_gold_and_arrow() -> None:
    v2 = iceberg_fields(with_added_fields())
    expected_v2 = (*RELEASED_V2, *ADDED_V2)
    silver_own, gold_own = RELEASED_SILVER[len(RELEASED_V2) :], RELEASED_GOLD[len(RELEASED_V2) :]
    assert_columns(silver_schema(v2), (*expected_v2, *renumbered(silver_own, 21)))
    assert_columns(gold_schema(v2), (*expected_v2, *renumbered(gold_own, 21)))
    arrow = arrow_schema(v2)
    assert arrow.names == [f.name for f in expected_v2]
    assert arrow.equals(Schema(*expected_v2).as_arrow(), check_metadata=True)
    assert pa.schema(list(arrow)[: len(RELEASED_V2)]).equals(v2_arrow_schema(), check_metadata=True)


# The package copy: V2 with two more fields, then every module that knows V2 fields, and real rows.
FOLLOW = """
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from k2_assets.gold.assets import to_gold
from k2_assets.gold.tables import GOLD_SCHEMA
from k2_assets.silver.rules import RecordChecker, ValidationRules
from k2_assets.silver.spark_engine import RegistrySnapshot
from k2_assets.silver.tables import SILVER_SCHEMA
from k2_assets.silver.transform import (
    SILVER_ARROW_SCHEMA, BronzeBatch, WriterSchemas, route, silver_batch, transform_batch
)
from k2_resources.trade_schema import V2_FIELD_NAMES, trade_v2_schema, trade_v2_schema_str
from tests.test_silver_transform import BINANCE, NOW, PARTITION_KEY, bronze, framed, trade

registry = RegistrySnapshot({1: (trade_v2_schema_str(), "AVRO", [])})
records = [trade(platform_sequence=i, venue=f"XBIN-{i}", tags=["odd_lot"] * (i % 2)) for i in range(40)]
batch = bronze([framed(1, r, trade_v2_schema()) for r in records])
checker = RecordChecker(BINANCE, ValidationRules())
silver, dlq = transform_batch(batch, BINANCE, WriterSchemas(registry), checker, PARTITION_KEY, NOW)
routed = route(BronzeBatch.of(batch), WriterSchemas(registry), checker)
one_by_one = silver_batch(batch, [], routed, NOW)
gold = to_gold(silver, NOW)
print(json.dumps({
    "v2": list(V2_FIELD_NAMES),
    "silver": [f.name for f in SILVER_SCHEMA.fields],
    "gold": [f.name for f in GOLD_SCHEMA.fields],
    "arrow": SILVER_ARROW_SCHEMA.names,
    "dlq_rows": dlq.num_rows + len(routed.dlq_index),
    "columnar": {n: silver.column(n).to_pylist() for n in ("venue", "tags")},
    "one_by_one": {n: one_by_one.column(n).to_pylist() for n in ("venue", "tags")},
    "gold_rows": {n: gold.column(n).to_pylist() for n in ("venue", "tags")},
}))
"""


@pytest.fixture(scope="module")
def followed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What a copy of the package makes of V2 with `venue` and `tags` appended to its .avsc alone."""
    root = tmp_path_factory.mktemp("v2-plus")
    copy_tree(root)
    avsc = json.loads((root / AVSC).read_text())
    avsc["fields"] += [ADDED[0], ADDED[3]]
    (root / AVSC).write_text(json.dumps(avsc, indent=2))
    return json.loads(run_python(root, FOLLOW, extra_path=SOURCE_ROOT))


def test_a_field_added_to_the_avsc_alone_reaches_every_schema(followed: dict[str, Any]) -> None:
    v2 = [*V2_FIELD_NAMES, "venue", "tags"]
    assert followed["v2"] == v2
    assert followed["silver"] == v2 + [f.name for f in RELEASED_SILVER[len(RELEASED_V2) :]]
    assert followed["gold"] == v2 + [f.name for f in RELEASED_GOLD[len(RELEASED_V2) :]]
    assert followed["arrow"] == followed["silver"]


def test_a_field_added_to_the_avsc_alone_reaches_silver_and_gold_rows(followed: dict[str, Any]) -> None:
    expected = {"venue": [f"XBIN-{i}" for i in range(40)], "tags": [["odd_lot"] * (i % 2) for i in range(40)]}
    assert followed["dlq_rows"] == 0
    assert followed["columnar"] == expected
    assert followed["one_by_one"] == expected
    assert followed["gold_rows"] == expected
