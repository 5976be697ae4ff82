"""Silver tables: validated V2 trades per exchange, and the dead-letter queue shared by all exchanges.

A Silver row is the V2 record (vendor_data as JSON), its exchange_date, and where it came from. The
Dagster partition of a row is the hour of its Bronze ingestion_timestamp, so every Bronze row belongs
to exactly one Silver partition, whether it lands in Silver or in the DLQ.
"""

from __future__ import annotations

from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.types import (
    BinaryType,
    DateType,
    DecimalType,
    IntegerType,
    ListType,
    LongType,
    NestedField,
    StringType,
    TimestamptzType,
)

from k2_resources.exchanges import ExchangeConfig
from k2_resources.iceberg import TableSpec
from k2_resources.io_manager import DICTIONARY_COLUMNS


def v2_fields(first_id: int = 1) -> list[NestedField]:
    """The 15 V2 trade fields as Iceberg columns (shared by Silver and Gold)."""
    i = first_id
    return [
        NestedField(i, "message_id", StringType(), required=False),
        NestedField(i + 1, "trade_id", StringType(), required=False),
        NestedField(i + 2, "symbol", StringType(), required=False),
        NestedField(i + 3, "exchange", StringType(), required=False),
        NestedField(i + 4, "asset_class", StringType(), required=False),
        NestedField(
            i + 5, "timestamp", LongType(), required=False, doc="Trade time, microseconds since epoch UTC"
        ),
        NestedField(i + 6, "price", DecimalType(18, 8), required=False),
        NestedField(i + 7, "quantity", DecimalType(18, 8), required=False),
        NestedField(i + 8, "currency", StringType(), required=False),
        NestedField(i + 9, "side", StringType(), required=False),
        NestedField(
            i + 10,
            "trade_conditions",
            ListType(i + 100, StringType(), element_required=False),
            required=False,
        ),
        NestedField(i + 11, "source_sequence", LongType(), required=False),
        NestedField(
            i + 12, "ingestion_timestamp", LongType(), required=False, doc="Producer receive time, µs"
        ),
        NestedField(i + 13, "platform_sequence", LongType(), required=False),
        NestedField(
            i + 14, "vendor_data", StringType(), required=False, doc="Exchange extras as a JSON object"
        ),
    ]


SILVER_SCHEMA = Schema(
    *v2_fields(1),
    NestedField(16, "exchange_date", DateType(), required=False, doc="UTC date of the trade timestamp"),
    NestedField(17, "validation_timestamp", TimestamptzType(), required=False),
    NestedField(18, "bronze_ingestion_timestamp", TimestamptzType(), required=False),
    NestedField(
        19, "schema_id", IntegerType(), required=False, doc="Writer schema id from the record header"
    ),
    NestedField(20, "topic", StringType(), required=False),
    NestedField(21, "partition", IntegerType(), required=False),
    NestedField(22, "offset", LongType(), required=False),
)

SILVER_PARTITION_SPEC = PartitionSpec(
    PartitionField(source_id=16, field_id=1000, transform=DayTransform(), name="exchange_date_day")
)

SILVER_RETENTION_DAYS = 30
# Parquet dictionary encoding only where values repeat: on ids, prices and times it cost about half of
# Silver's Parquet write and made files larger (bench/README.md, "Silver on a columnar decoder").
SILVER_DICTIONARY_COLUMNS = (
    "symbol",
    "exchange",
    "asset_class",
    "currency",
    "side",
    "vendor_data",
    "exchange_date",
    "validation_timestamp",
    "bronze_ingestion_timestamp",
    "schema_id",
    "topic",
    "partition",
)


def silver_table_name(exchange: ExchangeConfig) -> str:
    return f"silver_{exchange.name}_trades"


def silver_table_spec(exchange: ExchangeConfig) -> TableSpec:
    return TableSpec(
        name=silver_table_name(exchange),
        schema=SILVER_SCHEMA,
        partition_spec=SILVER_PARTITION_SPEC,
        properties={
            "write.target-file-size-bytes": str(exchange.target_file_size_bytes),
            "k2.retention-days": str(SILVER_RETENTION_DAYS),
            DICTIONARY_COLUMNS: ",".join(SILVER_DICTIONARY_COLUMNS),
        },
        time_column="bronze_ingestion_timestamp",
        description=f"Validated V2 trades of {exchange.code}, one Dagster partition per Bronze ingestion hour.",
    )


DLQ_SCHEMA = Schema(
    NestedField(1, "raw_bytes", BinaryType(), required=False, doc="The Kafka value exactly as in Bronze"),
    NestedField(2, "message_key", BinaryType(), required=False),
    NestedField(3, "topic", StringType(), required=False),
    NestedField(4, "partition", IntegerType(), required=False),
    NestedField(5, "offset", LongType(), required=False),
    NestedField(6, "kafka_timestamp", TimestamptzType(), required=False),
    NestedField(
        7, "exchange", StringType(), required=False, doc="Exchange of the topic (lower case config name)"
    ),
    NestedField(8, "error_category", StringType(), required=False),
    NestedField(9, "error_message", StringType(), required=False),
    NestedField(10, "error_stage", StringType(), required=False, doc="decode or validate"),
    NestedField(
        11, "schema_id", IntegerType(), required=False, doc="Writer schema id when the header was readable"
    ),
    NestedField(12, "message_id", StringType(), required=False, doc="When the body decoded"),
    NestedField(
        13, "silver_partition", StringType(), required=False, doc="Dagster partition key of the Silver run"
    ),
    NestedField(14, "bronze_ingestion_timestamp", TimestamptzType(), required=False),
    NestedField(15, "dlq_timestamp", TimestamptzType(), required=False, doc="When the record was rejected"),
    NestedField(16, "dlq_date", DateType(), required=False, doc="UTC date of bronze_ingestion_timestamp"),
)

DLQ_PARTITION_SPEC = PartitionSpec(
    PartitionField(source_id=7, field_id=1000, transform=IdentityTransform(), name="exchange"),
    PartitionField(source_id=16, field_id=1001, transform=DayTransform(), name="dlq_date_day"),
)

DLQ_TABLE_SPEC = TableSpec(
    name="silver_dlq_trades",
    schema=DLQ_SCHEMA,
    partition_spec=DLQ_PARTITION_SPEC,
    properties={
        "write.target-file-size-bytes": str(64 * 1024 * 1024),
        "k2.retention-days": str(SILVER_RETENTION_DAYS),
    },
    time_column="bronze_ingestion_timestamp",
    slice_column="exchange",
    description="Every Bronze record Silver rejected, with its category, raw bytes and Kafka coordinates.",
)
