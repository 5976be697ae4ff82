"""Gold tables: every valid trade of every exchange once, by event hour, and the dedup audit trail."""

from __future__ import annotations

from collections.abc import Sequence

from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table.sorting import SortField, SortOrder
from pyiceberg.transforms import IdentityTransform
from pyiceberg.types import DateType, IntegerType, NestedField, StringType, TimestamptzType

from k2_resources.iceberg import TableSpec
from k2_resources.trade_schema import Column, v2_iceberg_field, v2_iceberg_fields, v2_table_schema

# Gold's own columns, after the V2 fields (ids 16-18 while V2 has 15 fields: k2_resources.trade_schema).
GOLD_COLUMNS = (
    Column("gold_ingestion_timestamp", TimestamptzType(), "When the Gold row was written"),
    Column("exchange_date", DateType(), "UTC date of the trade timestamp"),
    Column("exchange_hour", IntegerType(), "UTC hour (0-23) of the trade timestamp"),
)


def gold_schema(v2_fields: Sequence[NestedField]) -> Schema:
    """A Gold row: the V2 record as Silver stores it, then when it was written and its event day and hour."""
    return v2_table_schema(v2_fields, GOLD_COLUMNS)


GOLD_SCHEMA = gold_schema(v2_iceberg_fields())


def _gold_id(name: str) -> int:
    return GOLD_SCHEMA.find_field(name).field_id


GOLD_PARTITION_SPEC = PartitionSpec(
    PartitionField(
        source_id=_gold_id("exchange_date"),
        field_id=1000,
        transform=IdentityTransform(),
        name="exchange_date",
    ),
    PartitionField(
        source_id=_gold_id("exchange_hour"),
        field_id=1001,
        transform=IdentityTransform(),
        name="exchange_hour",
    ),
)

GOLD_TABLE_SPEC = TableSpec(
    name="gold_crypto_trades",
    schema=GOLD_SCHEMA,
    partition_spec=GOLD_PARTITION_SPEC,
    sort_order=SortOrder(SortField(source_id=_gold_id("timestamp"), transform=IdentityTransform())),
    properties={"write.target-file-size-bytes": str(128 * 1024 * 1024), "write.distribution-mode": "hash"},
    time_column="timestamp",
    description="All valid trades of all exchanges, deduplicated, one Dagster partition per event hour.",
)


def _v2_copy(field_id: int, name: str, doc: str | None = None) -> NestedField:
    """An audit column that holds a Gold row's V2 value: V2's type under the audit table's own id."""
    return NestedField(field_id, name, v2_iceberg_field(name).field_type, required=False, doc=doc)


DEDUP_AUDIT_SCHEMA = Schema(
    _v2_copy(1, "message_id", doc="message_id of the removed Gold row"),
    _v2_copy(2, "exchange"),
    _v2_copy(3, "symbol"),
    _v2_copy(4, "trade_id"),
    _v2_copy(5, "timestamp"),
    NestedField(6, "exchange_date", DateType(), required=False),
    NestedField(7, "exchange_hour", IntegerType(), required=False),
    NestedField(8, "reason", StringType(), required=False, doc="DUPLICATE_MESSAGE_ID or DUPLICATE_TRADE_KEY"),
    NestedField(9, "kept_message_id", StringType(), required=False, doc="The copy that stays in Gold"),
    NestedField(10, "dedup_run_id", StringType(), required=False),
    NestedField(11, "detected_at", TimestamptzType(), required=False),
)

DEDUP_AUDIT_TABLE_SPEC = TableSpec(
    name="gold_dedup_audit",
    schema=DEDUP_AUDIT_SCHEMA,
    partition_spec=PartitionSpec(
        PartitionField(source_id=6, field_id=1000, transform=IdentityTransform(), name="exchange_date")
    ),
    description="Every Gold row the dedup job removed, why, and which copy it kept.",
)
