"""Benchmark: one maintenance pass against history length (1k, 5k, 20k commits), with a same-run baseline.

For each N, a Bronze table gets N retained snapshots, each a micro-batch commit carrying its Kafka
offsets (the offsets tag on the last), then one pass of K2's maintenance runs over it
(k2_assets/maintenance/actions.py: retention, compaction, manifests, expiry of every superseded
snapshot, orphans). Printed per N: metadata.json and manifest-list bytes before and after, the pass's
CPU (kernel totals of this process and Spark's JVM) and time per step, the JVM's GC time in the pass,
the Spark SQL parse of the expiry statement alone, and, as the baseline measured on the same table in
the same run, the PyIceberg walk over every snapshot's files (`referenced_files`, what Bronze
retention does before deleting orphans). Time per 1k commits shows how each grows: constant means
linear in history.

How the history is built matters: N commits that each *append* a file while every snapshot is kept
store N(N+1)/2 manifest-list entries in any Iceberg writer (each snapshot lists every manifest; 20k
commits would be ~20 GB), which is the growth hourly maintenance exists to prevent. So each commit
here replaces the previous micro-batch file (an overwrite, like a Silver or Gold refresh of the
running hour): live data stays one file, and history alone grows. The N commits are made through
Iceberg's Java API, many per transaction (one metadata.json write each; PyIceberg rewrites the whole
metadata per commit, quadratic to build), fewer per transaction as history grows so that the driver's
heap stays bounded (`build_chunk`; the live heap is sampled and printed), with the data file
hard-linked from one real Parquet file.

Every build and every pass runs in a child process of its own, so each pass has a JVM of its own, and
that JVM is warmed first by a whole pass over a small table in a second catalog (`--warmup-commits`),
so class loading and JIT compilation stay out of the measured pass. A built history is kept as
`DIR/history-N.built` (`--keep DIR`; building 20k commits takes ~20 minutes) and each pass runs on a
copy restored at the history's own path (Iceberg metadata holds absolute paths): files hard-linked,
the SQLite catalog copied, so `--reuse DIR` repeats only the passes.

    .venv/bin/python bench/bench_maintenance.py [--commits 1000,5000,20000] [--keep DIR | --reuse DIR]
        [--build-only] [--passes K] [--warmup-commits 300] [--driver-java-options '-XX:...']
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k2_assets.bronze.tables import OFFSETS_PROPERTY, OFFSETS_TAG  # noqa: E402
from k2_assets.maintenance.actions import maintain_table  # noqa: E402
from k2_assets.maintenance.definitions import maintenance_spark  # noqa: E402
from k2_assets.maintenance.jobs import TARGETS  # noqa: E402
from k2_resources.iceberg import IcebergCatalogResource  # noqa: E402
from k2_resources.iceberg_maintenance import (  # noqa: E402
    MaintenancePolicy,
    expirable_snapshots,
    referenced_files,
)
from k2_resources.spark import IcebergSparkResource, iceberg_spark_config  # noqa: E402
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
# The second Spark catalog, where each pass's JVM is warmed on a small history of its own.
WARMUP_CATALOG = "warmup"


def build_chunk(snapshots: int) -> int:
    """Commits in the next build transaction when the table already has `snapshots`."""
    return max(1, min(BUILD_CHUNK_MAX, BUILD_REFERENCES // (snapshots + BUILD_CHUNK_MAX)))


def live_heap_mib(spark) -> float:
    """The driver's live heap: used heap right after a full collection."""
    jvm = spark._jvm
    jvm.java.lang.System.gc()
    return jvm.java.lang.management.ManagementFactory.getMemoryMXBean().getHeapMemoryUsage().getUsed() / 2**20


def build_history(spark, catalog: IcebergCatalogResource, commits: int) -> list[float]:
    """`commits` overwrite commits of one micro-batch file each; returns the driver's sampled live heap (MiB).

    Commits go in transactions of `build_chunk` each, so the driver holds at most BUILD_REFERENCES
    snapshot references in one transaction's updates, and only one transaction at a time.
    """
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
            print(
                f"  {catalog.catalog_name}: {done} commits built, driver live heap {heap[-1]:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
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


def history_home(store: Path, commits: int) -> Path:
    """Where the history of `commits` lives while built or maintained (its metadata names this path)."""
    return store / f"history-{commits}"


def built_copy(store: Path, commits: int) -> Path:
    """The history as built, kept untouched for every later pass."""
    return store / f"history-{commits}.built"


def link_or_copy(source: str, destination: str) -> None:
    """Iceberg never rewrites a file in place, so files are hard-linked; SQLite's catalog is, so it is copied."""
    if Path(source).name.startswith("catalog.db"):
        shutil.copy2(source, destination)
    else:
        os.link(source, destination)


def restore(store: Path, commits: int) -> Path:
    """A fresh working copy of the built history, at the path its metadata names."""
    home = history_home(store, commits)
    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree(built_copy(store, commits), home, copy_function=link_or_copy)
    return home


def build(store: Path, commits: int) -> dict[str, float]:
    """Build the history of `commits` in a Spark session of its own and keep it as `built_copy`."""
    home = history_home(store, commits)
    for stale in (home, built_copy(store, commits)):
        shutil.rmtree(stale, ignore_errors=True)
    catalog = sqlite_catalog(home)
    spark = IcebergSparkResource(iceberg=catalog).spark_session
    spark.sparkContext.setLogLevel("ERROR")
    started, cpu_before = time.monotonic(), cpu_seconds()
    heap = build_history(spark, catalog, commits)
    built, build_cpu = time.monotonic() - started, cpu_seconds() - cpu_before
    spark.stop()
    assert len(sqlite_catalog(home).load_table(BRONZE_SPEC).metadata.snapshots) == commits
    home.rename(built_copy(store, commits))
    return {"commits": commits, "build_s": built, "build_cpu_s": build_cpu, "build_heap_mib_max": max(heap)}


def jvm_counters(spark) -> tuple[float, float]:
    """The driver JVM's total GC time and JIT compilation time so far, in seconds."""
    management = spark._jvm.java.lang.management.ManagementFactory
    gc_ms = sum(bean.getCollectionTime() for bean in management.getGarbageCollectorMXBeans())
    return gc_ms / 1000, management.getCompilationMXBean().getTotalCompilationTime() / 1000


def expiry_statement(catalog_name: str, ids: list[int]) -> str:
    """The statement K2's expiry sends for `ids` (TableMaintenance.expire_snapshots), to time its parse."""
    return (
        f"CALL {catalog_name}.system.expire_snapshots(table => '{catalog_name}.{BRONZE_SPEC.identifier}', "
        f"older_than => TIMESTAMP '1970-01-01 00:00:01', snapshot_ids => array({','.join(map(str, ids))}))"
    )


def warm_up(spark, catalog: IcebergCatalogResource, commits: int) -> float:
    """A whole maintenance pass over a small history in the second catalog; returns its wall seconds."""
    build_history(spark, catalog, commits)
    target = next(t for t in TARGETS if t.spec.name == BRONZE_SPEC.name)
    table = catalog.load_table(BRONZE_SPEC)
    report = maintain_table(spark, catalog.catalog_name, table, target, POLICY, datetime.now(UTC))
    assert report.snapshots_expired == commits - 1
    return report.duration_seconds


def jvm_pid() -> int:
    """The process id of Spark's driver JVM (this process's Java child)."""
    (jvm,) = [c for c in psutil.Process().children(recursive=True) if c.name() == "java"]
    return jvm.pid


def flight_recorder(command: str, recording: Path) -> None:
    """Start or stop a JDK Flight Recorder recording (method samples every 10 ms) of the driver JVM."""
    arguments = {
        "start": ["JFR.start", "name=pass", "settings=profile", f"filename={recording}"],
        "stop": ["JFR.stop", "name=pass"],
    }[command]
    subprocess.run(["jcmd", str(jvm_pid()), *arguments], check=True, stdout=subprocess.DEVNULL)


def run_pass(
    store: Path, commits: int, warmup_commits: int, java_options: str, profile: Path | None
) -> dict[str, float]:
    """Maintain a fresh copy of the built history in a Spark session of its own, warmed first.

    With `profile`, the pass alone (not the warm-up) is recorded by JFR into `profile`/pass-N.jfr.
    """
    home = restore(store, commits)
    catalog = sqlite_catalog(home)
    table = catalog.load_table(BRONZE_SPEC)
    assert len(table.metadata.snapshots) == commits
    lists_before = manifest_list_bytes(table)
    started = time.monotonic()
    referenced_files(table)
    walk = time.monotonic() - started
    with tempfile.TemporaryDirectory(prefix="k2-bench-maintenance-warmup-") as scratch:
        (Path(scratch) / "warehouse").mkdir()
        warm_catalog = IcebergCatalogResource(
            catalog_name=WARMUP_CATALOG,
            properties={
                "type": "sql",
                "uri": f"sqlite:///{scratch}/catalog.db",
                "warehouse": f"file://{scratch}/warehouse",
            },
        )
        extra = iceberg_spark_config(WARMUP_CATALOG, warm_catalog.resolved_properties())
        if java_options:
            extra["spark.driver.extraJavaOptions"] = java_options
        # The settings scheduled runs use (driver memory, JVM options), plus the warm-up catalog.
        spark = maintenance_spark(catalog, spark_config=extra).spark_session
        spark.sparkContext.setLogLevel("ERROR")
        warmup_s = warm_up(spark, warm_catalog, warmup_commits) if warmup_commits > 1 else 0.0
    ids = expirable_snapshots(table.metadata, POLICY.snapshots_expire_before(datetime.now(UTC)))
    parser = spark._jsparkSession.sessionState().sqlParser()
    parse_started = time.monotonic()
    parser.parsePlan(expiry_statement(catalog.catalog_name, ids))
    parse_s = time.monotonic() - parse_started
    target = next(t for t in TARGETS if t.spec.name == BRONZE_SPEC.name)
    if profile is not None:
        flight_recorder("start", profile / f"pass-{commits}.jfr")
    gc_before, jit_before = jvm_counters(spark)
    cpu_before = cpu_seconds()
    report = maintain_table(spark, catalog.catalog_name, table, target, POLICY, datetime.now(UTC))
    pass_cpu = cpu_seconds() - cpu_before
    gc_after, jit_after = jvm_counters(spark)
    if profile is not None:
        flight_recorder("stop", profile / f"pass-{commits}.jfr")
    spark.stop()
    table = sqlite_catalog(home).load_table(BRONZE_SPEC)
    assert report.snapshots_expired == commits - 1 and OFFSETS_TAG in table.metadata.refs
    return {
        "commits": commits,
        "metadata_kib_before": report.before.metadata_bytes / 1024,
        "metadata_kib_after": report.after.metadata_bytes / 1024,
        "lists_kib_before": lists_before / 1024,
        "lists_kib_after": manifest_list_bytes(table) / 1024,
        "files_before": report.before.storage_files,
        "files_after": report.after.storage_files,
        "warmup_s": warmup_s,
        "pass_s": report.duration_seconds,
        "pass_cpu_s": pass_cpu,
        "pass_gc_s": gc_after - gc_before,
        "pass_jit_s": jit_after - jit_before,
        "parse_s": parse_s,
        **{f"{step}_s": seconds for step, seconds in report.steps.items()},
        "walk_s": walk,
        "load_1m": os.getloadavg()[0],
    }


def child(*arguments: str) -> dict[str, Any]:
    """Run one build or pass in a fresh Python process (so a fresh JVM); its last stdout line is JSON."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *arguments], stdout=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"child {' '.join(arguments)} failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def uptime() -> str:
    return subprocess.run(["uptime"], stdout=subprocess.PIPE, text=True).stdout.strip()


def print_table(passes: list[dict[str, Any]]) -> None:
    print(
        f"{'commits':>8} {'metadata KiB':>15} {'lists KiB':>16} {'files on disk':>16} {'CPU s':>7} "
        f"{'per 1k':>6} {'pass s':>7} {'per 1k':>6} {'expiry s':>8} {'per 1k':>6} {'GC s':>5} "
        f"{'parse s':>7} {'walk s':>6} {'per 1k':>6}  uptime after the pass"
    )
    for r in passes:
        per_k = 1000 / r["commits"]
        print(
            f"{r['commits']:>8} {r['metadata_kib_before']:>7.0f} -> {r['metadata_kib_after']:<4.0f} "
            f"{r['lists_kib_before']:>7.0f} -> {r['lists_kib_after']:<4.0f} "
            f"{r['files_before']:>7} -> {r['files_after']:<4} {r['pass_cpu_s']:>7.1f} "
            f"{r['pass_cpu_s'] * per_k:>6.2f} {r['pass_s']:>7.1f} {r['pass_s'] * per_k:>6.2f} "
            f"{r['expiry_s']:>8.1f} {r['expiry_s'] * per_k:>6.2f} {r['pass_gc_s']:>5.1f} {r['parse_s']:>7.2f} "
            f"{r['walk_s']:>6.1f} {r['walk_s'] * per_k:>6.2f}  {r['uptime']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commits", default="1000,5000,20000", help="history lengths, comma separated")
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--keep", metavar="DIR", help="build into DIR and keep the built histories there")
    store.add_argument("--reuse", metavar="DIR", help="skip building: maintain copies of DIR's histories")
    parser.add_argument("--build-only", action="store_true", help="build (and keep) only, no pass")
    parser.add_argument("--passes", type=int, default=1, help="passes per history, each in its own JVM")
    parser.add_argument(
        "--warmup-commits", type=int, default=300, help="history of the warm-up pass (0: none)"
    )
    parser.add_argument(
        "--driver-java-options", default="", help="spark.driver.extraJavaOptions of each pass"
    )
    parser.add_argument("--profile", metavar="DIR", help="record each pass with JFR into DIR/pass-N.jfr")
    parser.add_argument("--child", choices=("build", "pass"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    commits = [int(n) for n in args.commits.split(",")]
    if args.child:
        store_dir = Path(args.reuse or args.keep)
        if args.child == "build":
            result = build(store_dir, commits[0])
        else:
            profile = Path(args.profile).resolve() if args.profile else None
            result = run_pass(store_dir, commits[0], args.warmup_commits, args.driver_java_options, profile)
        print(json.dumps(result), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="k2-bench-maintenance-") as scratch:
        store_dir = Path(args.reuse or args.keep or scratch).resolve()
        store_dir.mkdir(parents=True, exist_ok=True)
        pass_options = ["--warmup-commits", str(args.warmup_commits)]
        if args.driver_java_options:
            pass_options.append(f"--driver-java-options={args.driver_java_options}")
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            pass_options += ["--profile", str(Path(args.profile).resolve())]
        builds, passes = [], []
        for n in commits:
            if not args.reuse:
                builds.append(child("--child", "build", "--keep", str(store_dir), "--commits", str(n)))
                print(json.dumps({**builds[-1], "uptime": uptime()}), flush=True)
            for _ in range(0 if args.build_only else args.passes):
                passes.append(
                    {
                        **child(
                            "--child", "pass", "--reuse", str(store_dir), "--commits", str(n), *pass_options
                        ),
                        "uptime": uptime(),
                    }
                )
                print(
                    json.dumps(
                        {k: round(v, 3) if isinstance(v, float) else v for k, v in passes[-1].items()}
                    ),
                    flush=True,
                )
                shutil.rmtree(history_home(store_dir, n), ignore_errors=True)
        print()
        for b in builds:
            print(
                f"built {b['commits']} commits: {b['build_s']:.0f} s wall, {b['build_cpu_s']:.0f} CPU s, "
                f"driver live heap up to {b['build_heap_mib_max']:.0f} MiB"
            )
        if passes:
            print_table(passes)


if __name__ == "__main__":
    main()
