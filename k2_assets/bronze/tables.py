"""Bronze tables: the raw Kafka records of one exchange, exactly as they arrived.

Columns are optional on purpose: the predecessor's NOT NULL columns broke writes, and Bronze must
accept every record Kafka hands it (an empty value is data too; Silver sends it to the DLQ).
Commits are never retried by PyIceberg (`commit.retry.num-retries` = 0): an ingestion commit that
meets a concurrent commit is re-checked by K2's own fencing instead of being silently rebased.
"""

from __future__ import annotations

from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import DayTransform
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
from k2_resources.iceberg_maintenance import (
    MILLIS_PER_HOUR,
    MIN_SNAPSHOT_AGE_HOURS,
    SNAPSHOT_MAX_AGE_PROPERTY,
)

BRONZE_SCHEMA = Schema(
    NestedField(
        1, "raw_bytes", BinaryType(), required=False, doc="Kafka value untouched: 5-byte header + Avro body"
    ),
    NestedField(2, "message_key", BinaryType(), required=False, doc="Kafka message key"),
    NestedField(3, "topic", StringType(), required=False),
    NestedField(4, "partition", IntegerType(), required=False),
    NestedField(5, "offset", LongType(), required=False),
    NestedField(
        6, "kafka_timestamp", TimestamptzType(), required=False, doc="Kafka record timestamp (trade time)"
    ),
    NestedField(7, "ingestion_timestamp", TimestamptzType(), required=False, doc="When K2 read the record"),
    NestedField(8, "ingestion_date", DateType(), required=False),
)

BRONZE_PARTITION_SPEC = PartitionSpec(
    PartitionField(source_id=8, field_id=1000, transform=DayTransform(), name="ingestion_date_day")
)

# Snapshot-summary keys that carry the next offset to read per Kafka partition and the id of the topic
# those offsets belong to (a topic deleted and recreated under the same name has a new id), and the tag
# that keeps the snapshot holding them safe from expiry.
OFFSETS_PROPERTY = "k2.kafka.offsets"
TOPIC_ID_PROPERTY = "k2.kafka.topic-id"
OFFSETS_TAG = "k2-kafka-offsets"
# Manifests a Bronze commit lets pile up before it merges them (Iceberg's Java appends merge at 100).
MANIFEST_MERGE_COUNT = 24


def bronze_table_name(exchange: ExchangeConfig) -> str:
    return f"bronze_{exchange.name}_trades"


def bronze_table_spec(exchange: ExchangeConfig) -> TableSpec:
    return TableSpec(
        name=bronze_table_name(exchange),
        schema=BRONZE_SCHEMA,
        partition_spec=BRONZE_PARTITION_SPEC,
        properties={
            "write.target-file-size-bytes": str(exchange.target_file_size_bytes),
            "commit.retry.num-retries": "0",
            "k2.retention-days": str(exchange.retention_days),
            # Snapshots expire once superseded for the floor's hour (other tables: 6 hours). Bronze commits
            # every 10-30 s and each commit rewrites the table's metadata, which grows with every snapshot
            # kept: ~0.05 ms of CPU per snapshot per commit (bench/README.md, Bronze live cost).
            SNAPSHOT_MAX_AGE_PROPERTY: str(int(MIN_SNAPSHOT_AGE_HOURS * MILLIS_PER_HOUR)),
            # Commits merge small manifests (Iceberg's standard properties; PyIceberg's merge append reads
            # them). A fast append adds one manifest per commit, and every scan plan opens each one (~1 ms
            # of CPU apiece): at 900 retained commits a plan of the running hour cost ~0.8 CPU-s (bench/
            # README.md, Live cost, session 9). Merged manifests stop at 256 KiB (~800 files' entries), so
            # a merge rewrites only the unfilled ones and its cost stays flat while a day's files pile up.
            "commit.manifest-merge.enabled": "true",
            "commit.manifest.min-count-to-merge": str(MANIFEST_MERGE_COUNT),
            "commit.manifest.target-size-bytes": str(256 * 1024),
            "k2.source-topic": exchange.topic,
        },
        time_column="ingestion_timestamp",
        description=f"Raw Kafka records of {exchange.topic}, exactly once per (topic, partition, offset).",
    )
