"""Bronze tables written the way ingestion writes them (BronzeCommitter), without Kafka.

Maintenance only cares about commits, files and offsets, so these helpers commit synthetic records
through the real committer into a real SQL catalog: every commit carries its offsets and moves the
offsets tag exactly as a live ingestion run does. `python -m tests.maintenance_helpers <k2-home>
<seconds> [rows] [pause]` keeps committing from a second process until the time is up.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.io.pyarrow import _dataframe_to_data_files

from k2_assets.bronze.ingestion import BronzeCommitter, read_stored_offsets
from k2_assets.bronze.tables import OFFSETS_PROPERTY, OFFSETS_TAG, bronze_table_spec
from k2_resources.exchanges import exchange
from k2_resources.iceberg import IcebergCatalogResource, TableSpec

BINANCE = exchange("binance")
JAVA_COMMITS_PER_TRANSACTION = 100
BRONZE_SPEC = bronze_table_spec(BINANCE)


def sqlite_catalog(home: Path) -> IcebergCatalogResource:
    """A fresh catalog resource (own connection) on the SQLite catalog under `home`."""
    (home / "warehouse").mkdir(parents=True, exist_ok=True)
    return IcebergCatalogResource(
        properties={
            "type": "sql",
            "uri": f"sqlite:///{home}/catalog.db",
            "warehouse": f"file://{home}/warehouse",
        }
    )


def bronze_rows(first_offset: int, count: int, when: datetime, partition: int = 0) -> pa.Table:
    """`count` Bronze records of one Kafka partition with consecutive offsets, ingested at `when`."""
    offsets = list(range(first_offset, first_offset + count))
    columns = {
        "raw_bytes": pa.array([b"\x00\x00\x00\x00\x01" + o.to_bytes(8, "big") * 8 for o in offsets]),
        "message_key": pa.array([f"SYM{o % 13}".encode() for o in offsets]),
        "topic": pa.array([BINANCE.topic] * count),
        "partition": pa.array([partition] * count, pa.int32()),
        "offset": pa.array(offsets, pa.int64()),
        "kafka_timestamp": pa.array([when] * count, pa.timestamp("us", tz="UTC")),
        "ingestion_timestamp": pa.array([when] * count, pa.timestamp("us", tz="UTC")),
        "ingestion_date": pa.array([when.date()] * count, pa.date32()),
    }
    schema = BRONZE_SPEC.arrow_schema
    return pa.table([columns[f.name] for f in schema], schema=schema)


class OffsetCommitter:
    """Commits synthetic batches to partition 0 through one BronzeCommitter, continuing from the stored offsets."""

    def __init__(
        self, catalog: IcebergCatalogResource, run_id: str | None = None, spec: TableSpec = BRONZE_SPEC
    ):
        table = catalog.ensure_table(spec)
        self.committer = BronzeCommitter(table, read_stored_offsets(table), run_id or f"helper-{os.getpid()}")

    @property
    def next_offset(self) -> int:
        return self.committer.expected.get(0, 0)

    def commit(self, rows: int, when: datetime | None = None) -> int:
        start = self.next_offset
        return self.committer.commit(bronze_rows(start, rows, when or datetime.now(UTC)), {0: start + rows})


def commit_batches(
    catalog: IcebergCatalogResource, batches: int, rows: int, when: datetime | None = None
) -> int:
    """Commit `batches` micro-batches of `rows` records; returns the next offset."""
    committer = OffsetCommitter(catalog)
    for _ in range(batches):
        committer.commit(rows, when)
    return committer.next_offset


def java_bronze_table(spark: Any, catalog: IcebergCatalogResource) -> Any:
    """The Bronze table as Iceberg's Java API sees it, through the Spark session's catalog."""
    spark_util = spark._jvm.org.apache.iceberg.spark.Spark3Util
    return spark_util.loadIcebergTable(
        spark._jsparkSession, f"{catalog.catalog_name}.{BRONZE_SPEC.identifier}"
    )


def java_data_file(spark: Any, java_table: Any, path: str, size: int, records: int, when: datetime) -> Any:
    """A Java DataFile for a Parquet file of Bronze rows ingested on `when`'s date."""
    iceberg = spark._jvm.org.apache.iceberg
    return (
        iceberg.DataFiles.builder(java_table.spec())
        .withPath(path)
        .withFormat(iceberg.FileFormat.PARQUET)
        .withFileSizeInBytes(size)
        .withRecordCount(records)
        .withPartitionPath(f"ingestion_date_day={when.date().isoformat()}")
        .build()
    )


def java_history(
    spark: Any, catalog: IcebergCatalogResource, days: float, commits: int, rows: int
) -> dict[str, int]:
    """`commits` ingestion-like commits whose rows were ingested evenly over the last `days`; rows per date.

    Each commit appends one real data file (written by PyIceberg) and carries its offsets, like
    BronzeCommitter's; the offsets tag ends on the last. They are made with Iceberg's Java API, many
    per transaction (one metadata.json write each): PyIceberg rewrites the whole metadata on every
    commit, which makes thousands of commits take many minutes to build.
    """
    table = catalog.ensure_table(BRONZE_SPEC)
    java_table, now, per_day = java_bronze_table(spark, catalog), datetime.now(UTC), {}
    txn = java_table.newTransaction()
    for i in range(commits):
        if i and i % JAVA_COMMITS_PER_TRANSACTION == 0:  # a transaction keeps every manifest it read
            txn.commitTransaction()
            java_table.refresh()
            txn = java_table.newTransaction()
        when = now - timedelta(days=days) + timedelta(days=days) * i / commits
        (written,) = _dataframe_to_data_files(table.metadata, bronze_rows(i * rows, rows, when), table.io)
        data_file = java_data_file(
            spark, java_table, written.file_path, written.file_size_in_bytes, written.record_count, when
        )
        offsets = json.dumps({"0": (i + 1) * rows})
        txn.newFastAppend().appendFile(data_file).set(OFFSETS_PROPERTY, offsets).commit()
        per_day[when.date().isoformat()] = per_day.get(when.date().isoformat(), 0) + rows
    txn.commitTransaction()
    java_table.refresh()
    java_table.manageSnapshots().createTag(OFFSETS_TAG, java_table.currentSnapshot().snapshotId()).commit()
    return per_day


class CommitterThread(threading.Thread):
    """Keeps committing small batches through its own catalog connection until stopped."""

    def __init__(self, home: Path, rows: int = 10, pause_seconds: float = 0.05):
        super().__init__(daemon=True)
        self.home, self.rows, self.pause = home, rows, pause_seconds
        self.stop_event = threading.Event()
        self.commits = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            committer = OffsetCommitter(sqlite_catalog(self.home), run_id="committer-thread")
            while not self.stop_event.is_set():
                committer.commit(self.rows)
                self.commits += 1
                time.sleep(self.pause)
        except BaseException as err:  # reported by the test, which asserts none happened
            self.error = err

    def stop(self) -> None:
        self.stop_event.set()
        self.join(60)


def assert_bronze_complete(catalog: IcebergCatalogResource) -> int:
    """Bronze scans completely and holds exactly offsets 0..stored-1 of partition 0, once each."""
    table = catalog.load_table(BRONZE_SPEC)
    rows = table.scan(selected_fields=("partition", "offset")).to_arrow()
    stored = read_stored_offsets(table)
    assert rows.num_rows == sum(stored.values())
    offsets = rows.filter(pc.equal(rows["partition"], 0))["offset"]
    assert pc.count_distinct(offsets).as_py() == rows.num_rows == stored.get(0, 0)
    return rows.num_rows


def main(home: str, seconds: str, rows: str = "10", pause: str = "0") -> None:
    """Commit as a second process for `seconds`, `pause` apart, then print how many commits it made."""
    committer = OffsetCommitter(sqlite_catalog(Path(home)), run_id=f"process-{os.getpid()}")
    deadline, commits = time.monotonic() + float(seconds), 0
    while time.monotonic() < deadline:
        committer.commit(int(rows))
        commits += 1
        time.sleep(float(pause))
    print(commits)


if __name__ == "__main__":
    main(*sys.argv[1:])
