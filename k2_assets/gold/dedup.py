"""Deduplication in bounded memory, whatever the hour's size.

The predecessor's streaming `dropDuplicates` kept every key of the watermark window in memory and
died three times before it was switched off. Here rows are spilled to local Parquet files by a hash
of the dedup key, so each bucket holds about `bucket_rows` rows and every copy of a key lands in the
same bucket; each bucket is then deduplicated on its own by DuckDB. Memory is bounded by one bucket
(plus DuckDB's `memory_limit`); disk holds the spill while the hour is processed.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_BUCKET_ROWS = 1_000_000
DUCKDB_MEMORY_LIMIT = "1GB"


@dataclass(frozen=True)
class DedupPlan:
    """Keep, for each `key`, the row that sorts first by `order`; emit survivors sorted by `output_order`."""

    key: Sequence[str]
    order: Sequence[str]
    output_order: Sequence[str] = ()
    bucket_rows: int = DEFAULT_BUCKET_ROWS


def connect(scratch: Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection capped in memory and spilling to `scratch`."""
    return duckdb.connect(
        config={
            "memory_limit": DUCKDB_MEMORY_LIMIT,
            "temp_directory": str(scratch / "duckdb"),
            "preserve_insertion_order": False,
            "threads": 2,
        }
    )


def _quoted(columns: Sequence[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


class BucketSpill:
    """Streams batches into `count` Parquet files by hash of the key columns."""

    def __init__(self, scratch: Path, key: Sequence[str], count: int, con: duckdb.DuckDBPyConnection):
        self.scratch, self.key, self.count, self.con = scratch, key, count, con
        self.writers: dict[int, pq.ParquetWriter] = {}
        self.rows = 0

    def path(self, bucket: int) -> Path:
        return self.scratch / f"bucket-{bucket:05d}.parquet"

    def add(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        self.rows += batch.num_rows
        if self.count == 1:
            self._write(0, pa.Table.from_batches([batch]))
            return
        view = pa.Table.from_batches([batch])
        buckets = self.con.execute(
            f"SELECT (hash({_quoted(self.key)}) % {self.count})::INTEGER AS b FROM view"
        ).to_arrow_table()["b"]
        table = view.append_column("__bucket", buckets)
        for bucket in set(buckets.to_pylist()):
            part = table.filter(pa.compute.equal(table["__bucket"], bucket)).drop_columns(["__bucket"])
            self._write(bucket, part)

    def _write(self, bucket: int, table: pa.Table) -> None:
        writer = self.writers.get(bucket)
        if writer is None:
            writer = self.writers[bucket] = pq.ParquetWriter(self.path(bucket), table.schema)
        writer.write_table(table)

    def close(self) -> list[Path]:
        for writer in self.writers.values():
            writer.close()
        return [self.path(b) for b in sorted(self.writers)]


def _per_bucket(
    batches: Iterator[pa.RecordBatch],
    plan: DedupPlan,
    rows_hint: int,
    query: Callable[[Path], str],
    batch_rows: int,
) -> Iterator[pa.RecordBatch]:
    """Spill `batches` to hash buckets of the key, then yield `query(bucket file)` over each bucket."""
    with tempfile.TemporaryDirectory(prefix="k2-dedup-") as tmp:
        scratch = Path(tmp)
        con = connect(scratch)
        spill = BucketSpill(scratch, plan.key, max(1, math.ceil(rows_hint / plan.bucket_rows)), con)
        for batch in batches:
            spill.add(batch)
        for path in spill.close():
            yield from con.execute(query(path)).to_arrow_reader(batch_rows)
            path.unlink()
        con.close()


def deduplicate(
    batches: Iterator[pa.RecordBatch], plan: DedupPlan, rows_hint: int, batch_rows: int = 100_000
) -> Iterator[pa.RecordBatch]:
    """The first row of every key, in bounded memory; `rows_hint` (an upper bound) sizes the buckets."""
    order_by = f"ORDER BY {_quoted(plan.output_order)}" if plan.output_order else ""
    first = f"row_number() OVER (PARTITION BY {_quoted(plan.key)} ORDER BY {_quoted(plan.order)}) = 1"
    return _per_bucket(
        batches,
        plan,
        rows_hint,
        lambda path: f"SELECT * FROM read_parquet('{path}') QUALIFY {first} {order_by}",
        batch_rows,
    )


def find_duplicates(
    batches: Iterator[pa.RecordBatch], plan: DedupPlan, rows_hint: int, batch_rows: int = 100_000
) -> Iterator[pa.RecordBatch]:
    """Every row a dedup by `plan` would remove, with `kept_message_id`: the message_id of the survivor."""
    window = f"PARTITION BY {_quoted(plan.key)} ORDER BY {_quoted(plan.order)}"

    def losers(path: Path) -> str:
        return (
            "SELECT * EXCLUDE (rn) FROM ("
            "  SELECT *, row_number() OVER w AS rn, first_value(message_id) OVER w AS kept_message_id"
            f"  FROM read_parquet('{path}') WINDOW w AS ({window})"
            ") WHERE rn > 1"
        )

    return _per_bucket(batches, plan, rows_hint, losers, batch_rows)
