"""Gold tables: every valid trade of every exchange once, by event hour, and the dedup audit trail."""

from __future__ import annotations

from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table.sorting import SortField, SortOrder
from pyiceberg.transforms import IdentityTransform
from pyiceberg.types import DateType, IntegerType, LongType, NestedField, StringType, TimestamptzType

from k2_assets.silver.tables import v2_fields
from k2_resources.iceberg import TableSpec

GOLD_SCHEMA = Schema(
    *v2_fields(1),
    NestedField(
        16, "gold_ingestion_timestamp", TimestamptzType(), required=False, doc="When the Gold row was written"
    ),
    NestedField(17, "exchange_date", DateType(), required=False, doc="UTC date of the trade timestamp"),
    NestedField(
        18, "exchange_hour", IntegerType(), required=False, doc="UTC hour (0-23) of the trade timestamp"
    ),
)

GOLD_PARTITION_SPEC = PartitionSpec(
    PartitionField(source_id=17, field_id=1000, transform=IdentityTransform(), name="exchange_date"),
    PartitionField(source_id=18, field_id=1001, transform=IdentityTransform(), name="exchange_hour"),
)

GOLD_TABLE_SPEC = TableSpec(
    name="gold_crypto_trades",
    schema=GOLD_SCHEMA,
    partition_spec=GOLD_PARTITION_SPEC,
    sort_order=SortOrder(SortField(source_id=6, transform=IdentityTransform())),
    properties={"write.target-file-size-bytes": str(128 * 1024 * 1024), "write.distribution-mode": "hash"},
    time_column="timestamp",
    description="All valid trades of all exchanges, deduplicated, one Dagster partition per event hour.",
)

DEDUP_AUDIT_SCHEMA = Schema(
    NestedField(1, "message_id", StringType(), required=False, doc="message_id of the removed Gold row"),
    NestedField(2, "exchange", StringType(), required=False),
    NestedField(3, "symbol", StringType(), required=False),
    NestedField(4, "trade_id", StringType(), required=False),
    NestedField(5, "timestamp", LongType(), required=False),
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
