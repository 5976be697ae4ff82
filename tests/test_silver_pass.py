"""The Silver pass's two outputs: the DLQ stream is the rejects the Silver stream spilled while it was
written, so it refuses to be read first instead of silently yielding nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute
import pytest

from k2_assets.silver.assets import DlqStream, SilverPass, SilverStream, reusing_arrow_memory
from k2_resources.io_manager import ReportingStream

WHEN = datetime(2026, 12, 7, 6, 30, tzinfo=UTC)


def batches() -> list[tuple[pa.RecordBatch, pa.RecordBatch]]:
    silver = pa.record_batch({"timestamp": pa.array([int(WHEN.timestamp() * 1e6)], pa.int64())})
    dlq = pa.record_batch(
        {
            "bronze_ingestion_timestamp": pa.array([WHEN, WHEN], pa.timestamp("us", "UTC")),
            "silver_partition": pa.array([None, None], pa.string()),
            "error_category": ["BAD_MAGIC_BYTE", "NONPOSITIVE_PRICE"],
        }
    )
    return [(silver, dlq)]


def test_the_dlq_is_read_only_after_the_silver_stream_was_written(tmp_path: Path) -> None:
    silver_pass = SilverPass(tmp_path / "dlq.parquet")
    silver, dlq = SilverStream(silver_pass, iter(batches()), 1), DlqStream(silver_pass)
    assert isinstance(silver, ReportingStream) and isinstance(dlq, ReportingStream)

    with pytest.raises(RuntimeError, match="after the Silver stream was written"):
        list(dlq)
    assert sum(b.num_rows for b in silver) == 1

    rows = pa.Table.from_batches(list(dlq))
    assert rows.column("silver_partition").to_pylist() == ["2026-12-07-06:00"] * 2
    assert dlq.output_metadata() == {"dlq_bad_magic_byte": 1, "dlq_nonpositive_price": 1}
    assert silver.output_metadata()["dlq_rows"] == 2


def test_the_pass_allocates_arrow_memory_from_jemalloc_and_restores_the_pool_after() -> None:
    """Inside the pass Arrow allocates from jemalloc (mimalloc faulted every batch's memory in afresh);
    outside it the process's pool is what it was, and buffers made inside stay usable after."""
    before = pa.default_memory_pool()
    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this PyArrow build has no jemalloc")
    with reusing_arrow_memory():
        inside = pa.default_memory_pool().backend_name
        made_inside = pa.array(range(100_000), pa.int64())
        with pytest.raises(RuntimeError), reusing_arrow_memory():
            raise RuntimeError("a failing pass")
        nested_after_failure = pa.default_memory_pool().backend_name
    assert inside == "jemalloc"
    assert nested_after_failure == "jemalloc"
    assert pa.default_memory_pool().backend_name == before.backend_name
    assert pa.compute.sum(made_inside).as_py() == sum(range(100_000))
