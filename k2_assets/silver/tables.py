"""Silver tables: validated V2 trades per exchange, and the dead-letter queue shared by all exchanges.

A Silver row is the V2 record (vendor_data as JSON), its exchange_date, and where it came from. The
Dagster partition of a row is the hour of its Bronze ingestion_timestamp, so every Bronze row belongs
to exactly one Silver partition, whether it lands in Silver or in the DLQ.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.types import (
    BinaryType,
    DateType,
    IntegerType,
    LongType,
    NestedField,
    StringType,
    TimestamptzType,
)

from k2_resources.exchanges import ExchangeConfig
from k2_resources.iceberg import TableSpec
from k2_resources.io_manager import DICTIONARY_COLUMNS
from k2_resources.trade_schema import Column, v2_iceberg_fields, v2_table_schema

# Silver's own columns, after the V2 fields (ids 16-22 while V2 has 15 fields: k2_resources.trade_schema).
SILVER_COLUMNS = (
    Column("exchange_date", DateType(), "UTC date of the trade timestamp"),
    Column("validation_timestamp", TimestamptzType()),
    Column("bronze_ingestion_timestamp", TimestamptzType()),
    Column("schema_id", IntegerType(), "Writer schema id from the record header"),
    Column("topic", StringType()),
    Column("partition", IntegerType()),
    Column("offset", LongType()),
)


def silver_schema(v2_fields: Sequence[NestedField]) -> Schema:
    """A Silver row: the V2 record (vendor_data as JSON), then its exchange_date and lineage."""
    return v2_table_schema(v2_fields, SILVER_COLUMNS)


SILVER_SCHEMA = silver_schema(v2_iceberg_fields())

SILVER_PARTITION_SPEC = PartitionSpec(
    PartitionField(
        source_id=SILVER_SCHEMA.find_field("exchange_date").field_id,
        field_id=1000,
        transform=DayTransform(),
        name="exchange_date_day",
    )
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

# Columns without Iceberg metrics (no manifest bounds or counts, so no Parquet statistics either): no K2
# read filters or prunes on them (Gold reads by exchange_date and timestamp, Silver's window and counts by
# bronze_ingestion_timestamp), and the statistics of these unique strings and decimals cost about a sixth
# of Silver's Parquet write (bench/README.md, "Silver on a columnar decoder").
SILVER_UNMEASURED_COLUMNS = (
    "message_id",
    "trade_id",
    "price",
    "quantity",
    "vendor_data",
    "side",
    "source_sequence",
    "platform_sequence",
    "currency",
    "asset_class",
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
            **{f"write.metadata.metrics.column.{name}": "none" for name in SILVER_UNMEASURED_COLUMNS},
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
