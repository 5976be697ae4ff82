"""Benchmark: one maintenance pass against history length (1k, 5k, 20k commits), with a same-run baseline.

For each N, a Bronze table gets N retained snapshots, each a micro-batch commit carrying its Kafka
offsets (the offsets tag on the last), then one pass of K2's maintenance runs over it
(k2_assets/maintenance/actions.py: retention, compaction, manifests, expiry of every superseded
snapshot, orphans). Printed per N: metadata.json and manifest-list bytes before and after, the pass's
time per step, and, as the baseline measured on the same table in the same run, the PyIceberg walk
over every snapshot's files (`referenced_files`, what Bronze retention does before deleting orphans).
Time per 1k commits shows how each grows: constant means linear in history.

How the history is built matters: N commits that each *append* a file while every snapshot is kept
store N(N+1)/2 manifest-list entries in any Iceberg writer (each snapshot lists every manifest; 20k
commits would be ~20 GB), which is the growth hourly maintenance exists to prevent. So each commit
here replaces the previous micro-batch file (an overwrite, like a Silver or Gold refresh of the
running hour): live data stays one file, and history alone grows. The N commits are made through
Iceberg's Java API, many per transaction (one metadata.json write each; PyIceberg rewrites the whole
metadata per commit, quadratic to build), fewer per transaction as history grows so that the driver's
heap stays bounded (`build_chunk`; the live heap is sampled and printed), with the data file
hard-linked from one real Parquet file.

    .venv/bin/python bench/bench_maintenance.py [--commits 1000,5000,20000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k2_assets.bronze.tables import OFFSETS_PROPERTY, OFFSETS_TAG  # noqa: E402
from k2_assets.maintenance.actions import maintain_table  # noqa: E402
from k2_assets.maintenance.jobs import TARGETS  # noqa: E402
from k2_resources.iceberg_maintenance import MaintenancePolicy, referenced_files  # noqa: E402
from k2_resources.spark import IcebergSparkResource  # noqa: E402
from tests.maintenance_helpers import (  # noqa: E402
    BRONZE_SPEC,
    bronze_rows,
    java_bronze_table,
    java_data_file,
    sqlite_catalog,
)

ROWS_PER_COMMIT = 50
# Snapshot references one build transaction may hold in the driver. A Java transaction keeps every
# update it made, and each update keeps the table metadata it started from (all snapshots so far,
# with their id index): K commits over N snapshots hold ~K*N of them, ~80 bytes each (driver class
# histograms: 3,322 updates over 0-3,322 snapshots, 5.6M Long + 5.7M ImmutableMapEntry, 509 MB
# live). Fixed 2,500-commit transactions would need 4 GB at 20,000 snapshots, one 20,000-commit
# transaction ~16 GB; shrinking K as N grows bounds one transaction to ~0.35 GB.
BUILD_REFERENCES = 4_000_000
BUILD_CHUNK_MAX = 2_500
# The builder samples the driver's live heap (after a full GC) at this period, in commits.
HEAP_SAMPLE_COMMITS = 2_000
# Every superseded snapshot expires (time compressed below the configurable floor); Iceberg's grace.
POLICY = MaintenancePolicy(retention_days=7, snapshot_max_age_hours=0, orphan_min_age_minutes=24 * 60)


def build_chunk(snapshots: int) -> int:
    """Commits in the next build transaction when the table already has `snapshots`."""
    return max(1, min(BUILD_CHUNK_MAX, BUILD_REFERENCES // (snapshots + BUILD_CHUNK_MAX)))


def live_heap_mib(spark) -> float:
    """The driver's live heap: used heap right after a full collection."""
    jvm = spark._jvm
    jvm.java.lang.System.gc()
    return jvm.java.lang.management.ManagementFactory.getMemoryMXBean().getHeapMemoryUsage().getUsed() / 2**20


def build_history(spark, home: Path, commits: int) -> list[float]:
    """`commits` overwrite commits of one micro-batch file each; returns the driver's sampled live heap (MiB).

    Commits go in transactions of `build_chunk` each, so the driver holds at most BUILD_REFERENCES
    snapshot references in one transaction's updates, and only one transaction at a time.
    """
    catalog = sqlite_catalog(home)
    table = catalog.ensure_table(BRONZE_SPEC)
    data_dir = Path(table.location().removeprefix("file://")) / "data" / "ingestion_date_day=today"
    data_dir.mkdir(parents=True)
    now = datetime.now(UTC)
    template = data_dir / "template.parquet"
    pq.write_table(bronze_rows(0, ROWS_PER_COMMIT, now), template)
    size = template.stat().st_size
    java_table = java_bronze_table(spark, catalog)
    done, previous, heap = 0, None, [live_heap_mib(spark)]
    while done < commits:
        txn, chunk_start = java_table.newTransaction(), done
        for i in range(chunk_start, min(commits, chunk_start + build_chunk(chunk_start))):
            path = data_dir / f"batch-{i:06d}.parquet"
            os.link(template, path)
            data_file = java_data_file(spark, java_table, f"file://{path}", size, ROWS_PER_COMMIT, now)
            update = txn.newOverwrite().addFile(data_file)
            if previous is not None:
                update = update.deleteFile(previous)
            update.set(OFFSETS_PROPERTY, json.dumps({"0": (i + 1) * ROWS_PER_COMMIT})).commit()
            previous, done = data_file, i + 1
        txn.commitTransaction()
        # Every Py4J JavaObject a method was called on sits in a reference cycle (JavaObject <->
        # JavaMember) that only Python's cycle collector frees, and until then the JVM keeps its Java
        # object: each update, hence its transaction and every update of that transaction with the
        # metadata it started from. Without this the driver kept every update of the build (3,322 of
        # 3,322 at 3,300 commits, 509 MB live), O(N^2) in history.
        del txn, update
        gc.collect()
        if done // HEAP_SAMPLE_COMMITS > chunk_start // HEAP_SAMPLE_COMMITS or done == commits:
            heap.append(live_heap_mib(spark))
            print(f"  {done} commits built, driver live heap {heap[-1]:.0f} MiB", file=sys.stderr, flush=True)
    java_table.refresh()
    java_table.manageSnapshots().createTag(OFFSETS_TAG, java_table.currentSnapshot().snapshotId()).commit()
    os.unlink(template)
    return heap


def cpu_seconds() -> float:
    """User + system CPU of this process and its live children (Spark's JVM), from the kernel's totals."""
    me = psutil.Process()
    times = [me.cpu_times()] + [child.cpu_times() for child in me.children(recursive=True)]
    return sum(t.user + t.system for t in times)


def manifest_list_bytes(table) -> int:
    return sum(os.path.getsize(s.manifest_list.removeprefix("file:")) for s in table.metadata.snapshots)


def measure(commits: int) -> dict[str, float]:
    """Build a history of `commits`, walk it (baseline), then maintain it, in a Spark session of its own."""
    with tempfile.TemporaryDirectory(prefix="k2-bench-maintenance-") as scratch:
        home = Path(scratch)
        resource = IcebergSparkResource(iceberg=sqlite_catalog(home))
        spark = resource.spark_session
        spark.sparkContext.setLogLevel("ERROR")
        started, cpu_before = time.monotonic(), cpu_seconds()
        heap = build_history(spark, home, commits)
        built, build_cpu = time.monotonic() - started, cpu_seconds() - cpu_before
        table = sqlite_catalog(home).load_table(BRONZE_SPEC)
        assert len(table.metadata.snapshots) == commits
        lists_before = manifest_list_bytes(table)
        started = time.monotonic()
        referenced_files(table)
        walk = time.monotonic() - started
        target = next(t for t in TARGETS if t.spec.name == BRONZE_SPEC.name)
        cpu_before = cpu_seconds()
        report = maintain_table(spark, "k2", table, target, POLICY, datetime.now(UTC))
        pass_cpu = cpu_seconds() - cpu_before
        spark.stop()
        table = sqlite_catalog(home).load_table(BRONZE_SPEC)
        assert report.snapshots_expired == commits - 1 and OFFSETS_TAG in table.metadata.refs
        return {
            "commits": commits,
            "build_s": built,
            "build_cpu_s": build_cpu,
            "build_heap_mib_max": max(heap),
            "metadata_kib_before": report.before.metadata_bytes / 1024,
            "metadata_kib_after": report.after.metadata_bytes / 1024,
            "lists_kib_before": lists_before / 1024,
            "lists_kib_after": manifest_list_bytes(table) / 1024,
            "files_before": report.before.storage_files,
            "files_after": report.after.storage_files,
            "pass_s": report.duration_seconds,
            "pass_cpu_s": pass_cpu,
            **{f"{step}_s": seconds for step, seconds in report.steps.items()},
            "walk_s": walk,
            "load_1m": os.getloadavg()[0],
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commits", default="1000,5000,20000", help="history lengths, comma separated")
    args = parser.parse_args()
    results = []
    for commits in (int(n) for n in args.commits.split(",")):
        results.append(measure(commits))
        print(json.dumps({k: round(v, 3) for k, v in results[-1].items()}), flush=True)
    print()
    print(
        f"{'commits':>8} {'metadata KiB':>16} {'lists KiB':>18} {'files on disk':>15} {'pass s':>8} "
        f"{'expiry s':>9} {'per 1k':>7} {'CPU s':>7} {'per 1k':>7} {'walk s':>7} {'per 1k':>7} "
        f"{'build heap MiB':>14} {'load':>5}"
    )
    for r in results:
        per_k = 1000 / r["commits"]
        print(
            f"{r['commits']:>8} {r['metadata_kib_before']:>8.0f} -> {r['metadata_kib_after']:<5.0f} "
            f"{r['lists_kib_before']:>9.0f} -> {r['lists_kib_after']:<5.0f} "
            f"{r['files_before']:>6} -> {r['files_after']:<5} {r['pass_s']:>8.1f} {r['expiry_s']:>9.1f} "
            f"{r['pass_s'] * per_k:>7.2f} {r['pass_cpu_s']:>7.1f} {r['pass_cpu_s'] * per_k:>7.2f} "
            f"{r['walk_s']:>7.2f} {r['walk_s'] * per_k:>7.3f} {r['build_heap_mib_max']:>14.0f} {r['load_1m']:>5.1f}"
        )


if __name__ == "__main__":
    main()
