"""Benchmark: what one scheduled maintenance run costs (CPU, wall, memory), per Spark setting variant.

Issue 12's live cost counts every process K2 runs, and the hourly Bronze maintenance run is its
largest scheduled part: a Dagster run whose step starts Spark's JVM for a few Iceberg procedures on a
small table. This measures that run as the schedule launches it: `dagster job execute` of
`maintain_bronze_binance_trades` from K2's code location (K2's in-process executor, so the run worker
is the step process), on a fresh copy of one Bronze table, in a child of its own.

Each run's whole process tree (Python, the JVM, whatever it forks) is in cgroups of its own, made for
that run alone: CPU is the kernel's hierarchical count (cgroup v2 `cpu.stat` usage_usec, exact incl.
processes that exited), memory comes from the cgroup v1 memory controller (this machine binds it to
v1): `max_usage_in_bytes` (exact, includes the page cache the run caused) and anonymous + mapped-file
memory (what the processes hold, issue 12's measure) sampled every 0.1 s, and each process's own peak
(Spark's driver JVM and the run's Python worker, RssAnon and VmRSS from /proc/<pid>/status). `--nmt`
adds the driver's Native Memory Tracking summary at its peak (where the JVM's memory is).

The table is built once (`--build`): `--commits` ingestion commits of `--rows` records each through
K2's own BronzeCommitter (offsets in every commit, the offsets tag moved each time), as one hour of
Binance ingestion writes them (360 commits of ~1,500 rows at its 10 s interval). Each run maintains a
copy restored at the same path (files hard-linked, the SQLite catalog copied), and afterwards the
copy must hold every row with its offsets unchanged, or the run counts as failed.

Variants are Spark settings given to the run as run config (`resources.spark.config.spark_config`,
which overrides what IcebergSparkResource derives): `current` is the code's own settings (K2's
maintenance resource), `before` the settings maintenance ran with until 2026-12-07 (2g driver, the
JVM's default G1 collector and C2 compiler), the others one change each. The first variant listed is
the same-run baseline of the summary's ratio. Variants alternate, run after run (ABCABC...), so load drifts hit them alike.

    .venv/bin/python bench/bench_maintenance_run.py --runs 3 [--variants current,serial-gc,...]
        [--keep DIR | --reuse DIR] [--commits 360] [--rows 1500] [--age-hours 24]
        [--job maintain_all_tables] [--nmt]

Needs root (cgroups). Prints figures; asserts nothing about them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import MIB, ROOT  # noqa: E402
from bench.bench_live_cost import cmdline, cpu_usec, make_cgroups, memory_stat, remove_cgroups  # noqa: E402
from bench.bench_maintenance import link_or_copy  # noqa: E402

JOB = "maintain_bronze_binance_trades"
GIB = 1024 * MIB
# Spark settings per variant, on top of what IcebergSparkResource derives (run config overrides).
C1_ONLY = "-XX:TieredStopAtLevel=1"
SERIAL_GC = "-XX:+UseSerialGC"
# The JVM's own defaults on this machine (G1, C1 + C2), explicitly: what maintenance ran with until 2026-12-07.
JVM_DEFAULTS = "-XX:+UseG1GC -XX:TieredStopAtLevel=4"
# What Ivy resolved for K2's packages on this machine (runtime, both JDBC drivers, postgresql's checker-qual).
IVY_JARS = ",".join(
    str(Path.home() / ".ivy2.5.2" / "jars" / name)
    for name in (
        "org.apache.iceberg_iceberg-spark-runtime-4.1_2.13-1.12.0.jar",
        "org.xerial_sqlite-jdbc-3.50.3.0.jar",
        "org.postgresql_postgresql-42.7.8.jar",
        "org.checkerframework_checker-qual-3.49.5.jar",
    )
)
# A dynamic class-data-sharing archive of the driver (JDK 17): `cds-dump` writes it, `cds` maps it.
CDS_ARCHIVE = Path(tempfile.gettempdir()) / "k2-bench-spark-driver.jsa"
VARIANTS: dict[str, dict[str, str]] = {
    "current": {},
    "before": {"spark.driver.memory": "2g", "spark.driver.extraJavaOptions": JVM_DEFAULTS},
    "c1": {"spark.driver.memory": "2g", "spark.driver.extraJavaOptions": C1_ONLY},
    "serial-gc": {"spark.driver.memory": "2g", "spark.driver.extraJavaOptions": SERIAL_GC},
    "mem-1g": {"spark.driver.memory": "1g"},
    "mem-512m": {"spark.driver.memory": "512m"},
    "jars-local": {"spark.jars.packages": "", "spark.jars": IVY_JARS},
    "cds-dump": {
        "spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC} -XX:ArchiveClassesAtExit={CDS_ARCHIVE}"
    },
    "cds": {"spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC} -XX:SharedArchiveFile={CDS_ARCHIVE}"},
    # The heap starts at 1/64 of the machine's memory (384 MiB here), a third of it young generation that
    # fills before the first collection; a small start grows the heap only as far as the live data needs.
    "small-start": {"spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC} -Xms32m"},
    # ... and give memory back after collections (the serial collector shrinks to these free ratios).
    "small-shrink": {
        "spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC} -Xms32m -XX:MinHeapFreeRatio=10 "
        "-XX:MaxHeapFreeRatio=30"
    },
    # Session 9's settings, explicitly: the same-run baseline of session 10's cuts.
    "s9": {"spark.driver.memory": "2g", "spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC}"},
    # The young generation is a third of the starting heap (128 MiB here), all of it touched before the
    # first collection; a small one is collected more often and holds less.
    "young-16m": {"spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC} -Xmn16m"},
    "young-32m": {"spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC} -Xmn32m"},
    "young-16m-xms64": {"spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC} -Xmn16m -Xms64m"},
    # Small native items: thread stacks, direct buffers (Netty's pools), the perf-data file.
    "native-trim": {
        "spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC} -Xss512k -XX:MaxDirectMemorySize=64m "
        "-XX:-UsePerfData",
        "spark.rpc.io.preferDirectBufs": "false",
        "spark.shuffle.io.preferDirectBufs": "false",
    },
    # Whole-stage code generation compiles Java (Janino) for every query: seconds of work for a few rows.
    "no-wscg": {
        "spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC}",
        "spark.sql.codegen.wholeStage": "false",
    },
    "arena2": {"spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC}"},
    # A heap kept near the live data (~70-150 MiB on this table): small start, small young generation,
    # grown by full collections only as far as 10-30 % free. The 2g ceiling stays for large passes.
    "tight": {
        "spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC} -Xms64m -Xmn24m -XX:MinHeapFreeRatio=10 "
        "-XX:MaxHeapFreeRatio=30"
    },
    "tight-y16": {
        "spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC} -Xms48m -Xmn16m -XX:MinHeapFreeRatio=10 "
        "-XX:MaxHeapFreeRatio=30"
    },
    # The same, with a young generation that stays a third of the (small, growing) heap.
    "tight-ratio": {
        "spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC} -Xms64m -XX:MinHeapFreeRatio=10 "
        "-XX:MaxHeapFreeRatio=30"
    },
    # A ceiling sized to this table's pass. Fails: Spark refuses a driver under 450 MiB (INVALID_DRIVER_MEMORY).
    "cap-384m": {
        "spark.driver.memory": "384m",
        "spark.driver.extraJavaOptions": f"{C1_ONLY} {SERIAL_GC} -Xmn32m",
    },
}
# Environment of a variant's run (the driver JVM inherits the run worker's environment on a local master).
VARIANT_ENV: dict[str, dict[str, str]] = {
    # glibc makes up to 8 malloc arenas per core for a many-threaded process; each holds its own free memory.
    "arena2": {"MALLOC_ARENA_MAX": "2"},
}


def restore(built: Path, home: Path) -> None:
    """A fresh copy of the built table at the path its metadata names: files linked, catalog copied."""
    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree(built, home, copy_function=link_or_copy)


def build(home: Path, commits: int, rows: int, age_hours: float = 0.0) -> dict[str, Any]:
    """One hour of Bronze commits through K2's BronzeCommitter, ingestion times spread over the hour that
    ended `age_hours` ago (24: a closed day, which a pass compacts)."""
    from tests.maintenance_helpers import OffsetCommitter, sqlite_catalog

    started = time.monotonic()
    committer, end = OffsetCommitter(sqlite_catalog(home)), datetime.now(UTC) - timedelta(hours=age_hours)
    for i in range(commits):
        committer.commit(rows, end - timedelta(hours=1) + timedelta(hours=1) * i / commits)
    return {"commits": commits, "rows": rows, "build_s": round(time.monotonic() - started, 1)}


def table_fingerprint(home: Path) -> tuple[int, dict[int, int]]:
    """(rows, stored offsets) of the copy: a run must change neither."""
    from k2_assets.bronze.ingestion import read_stored_offsets
    from tests.maintenance_helpers import BRONZE_SPEC, sqlite_catalog

    table = sqlite_catalog(home).load_table(BRONZE_SPEC)
    return table.scan(selected_fields=("offset",)).count(), read_stored_offsets(table)


@dataclass
class RunFigures:
    variant: str
    cpu_s: float
    wall_s: float
    held_peak_gib: float  # anon + mapped file, sampled
    usage_peak_gib: float  # memory.max_usage_in_bytes (incl. page cache)
    driver_anon_mib: float  # Spark's driver JVM, peak RssAnon
    driver_rss_mib: float  # ... peak VmRSS (anon + file-backed + shared)
    worker_anon_mib: float  # the run's Python process, peak RssAnon
    uptime: str


def process_status(pid: int) -> dict[str, int]:
    """RssAnon, RssFile and VmRSS (bytes) of one process, from /proc/<pid>/status (cheap to read often)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("RssAnon", "RssFile", "VmRSS"):
            values[name] = int(rest.split()[0]) * 1024
    return values


def process_kind(pid: int) -> str | None:
    """Which of the run's processes `pid` is: Spark's driver JVM, the run's Python worker, or neither."""
    command = cmdline(pid)
    if "org.apache.spark.deploy.SparkSubmit" in command:
        return "driver"
    return "worker" if "dagster job execute" in command else None


def thread_groups(pid: int) -> str:
    """The JVM's threads counted by name with digits folded (`jcmd Thread.print`): who starts them."""
    dump = subprocess.run(
        ["jcmd", str(pid), "Thread.print"], capture_output=True, text=True, timeout=60
    ).stdout
    names = [line.split('"')[1] for line in dump.splitlines() if line.startswith('"')]
    counts = Counter(re.sub(r"\d+", "N", name) for name in names)
    return f"threads: {len(names)}\n" + "\n".join(f"{n:>5} {name}" for name, n in counts.most_common(40))


class MemorySampler(threading.Thread):
    """Samples the run's anon + mapped-file memory until stopped, and each process's own peak.

    With `nmt_dir`, the driver runs with Native Memory Tracking (see `--nmt`) and the sampler keeps the
    driver's `jcmd VM.native_memory summary` taken at its highest anonymous memory (every ~2 s: jcmd
    is a JVM of its own, so not more often).
    """

    def __init__(self, memory: Path, nmt_dir: Path | None = None):
        super().__init__(daemon=True)
        self.memory, self.peak, self.done = memory, 0, threading.Event()
        self.process_peaks: dict[str, dict[str, int]] = {}
        self.nmt_dir, self.nmt_anon, self.nmt_at = nmt_dir, 0, 0.0

    def run(self) -> None:
        while not self.done.is_set():
            with contextlib.suppress(OSError, KeyError):
                stat = memory_stat(self.memory)
                self.peak = max(self.peak, stat["total_rss"] + stat["total_mapped_file"])
            with contextlib.suppress(OSError, ValueError):
                self.sample_processes()
            time.sleep(0.1)

    def sample_processes(self) -> None:
        for pid in map(int, (self.memory / "cgroup.procs").read_text().split()):
            kind = process_kind(pid)
            if kind is None:
                continue
            status = process_status(pid)
            peaks = self.process_peaks.setdefault(kind, {})
            for name, value in status.items():
                peaks[name] = max(peaks.get(name, 0), value)
            if kind == "driver" and self.nmt_dir is not None:
                self.native_memory(pid, status["RssAnon"])

    def native_memory(self, pid: int, anon: int) -> None:
        """The driver's NMT summary, kept when its anonymous memory is the highest seen so far."""
        if anon <= self.nmt_anon or time.monotonic() - self.nmt_at < 2.0:
            return
        self.nmt_at = time.monotonic()
        summary = "".join(
            subprocess.run(["jcmd", str(pid), *command], capture_output=True, text=True, timeout=30).stdout
            for command in (["GC.heap_info"], ["VM.native_memory", "summary"])
        )
        histogram = subprocess.run(
            ["jcmd", str(pid), "GC.class_histogram"], capture_output=True, text=True, timeout=60
        ).stdout
        summary += "\n".join(histogram.splitlines()[:60]) + "\n" + thread_groups(pid)
        if "Total: reserved" in summary:
            self.nmt_anon = anon
            header = f"driver RssAnon {anon / MIB:.0f} MiB, status {process_status(pid)}\n"
            (self.nmt_dir / "nmt.txt").write_text(header + summary)


def wait_until_empty(cgroup: Path, timeout_s: float = 120.0) -> None:
    """Until no process is left in `cgroup` (a JVM exits on its own once its Python parent has gone)."""
    deadline = time.monotonic() + timeout_s
    while (cgroup / "cgroup.procs").read_text().strip():
        if time.monotonic() > deadline:
            raise SystemExit(f"processes still running in {cgroup} after {timeout_s} s")
        time.sleep(0.05)


def run_config(variant: str, scratch: Path) -> Path:
    config = (
        {"resources": {"spark": {"config": {"spark_config": VARIANTS[variant]}}}} if VARIANTS[variant] else {}
    )
    path = scratch / f"{variant}.json"
    path.write_text(json.dumps(config))
    return path


def run_once(
    variant: str, built: Path, home: Path, scratch: Path, index: int, nmt: bool = False, job: str = JOB
) -> RunFigures:
    """One maintenance run of `variant` on a fresh copy, in cgroups of its own; checks the table after."""
    restore(built, home)
    before = table_fingerprint(home)
    dagster_home = scratch / f"dagster-{index}"
    dagster_home.mkdir()
    env = {
        **os.environ,
        **VARIANT_ENV.get(variant, {}),
        "K2_HOME": str(home),
        "DAGSTER_HOME": str(dagster_home),
    }
    if nmt:  # every JVM of the run (Spark's launcher too) tracks its native memory; costs a little
        logs = scratch.parent / "logs" / f"{index}-{variant}"
        env["JAVA_TOOL_OPTIONS"] = (
            f"-XX:NativeMemoryTracking=summary -Xlog:gc*:file={logs}/gc-%p.log "
            f"-Xlog:class+load:file={logs}/classes-%p.log"
        )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    command = [str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "k2_assets.definitions"]
    command += ["-j", job, "-c", str(run_config(variant, scratch))]
    top, memory = make_cgroups(f"k2-maint-run-{os.getpid()}-{index}")
    sampler = MemorySampler(memory, scratch.parent / "logs" / f"{index}-{variant}" if nmt else None)
    if sampler.nmt_dir is not None:
        sampler.nmt_dir.mkdir(parents=True, exist_ok=True)
    try:

        def join() -> None:
            for cgroup in (top, memory):
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        sampler.start()
        started = time.monotonic()
        done = subprocess.run(command, env=env, cwd=ROOT, preexec_fn=join, capture_output=True, text=True)
        wait_until_empty(top)  # the JVM outlives the Python process that started it by a moment
        wall = time.monotonic() - started
        sampler.done.set()
        sampler.join()
        cpu = cpu_usec(top) / 1e6
        usage_peak = int((memory / "memory.max_usage_in_bytes").read_text())
    finally:
        for _ in range(50):  # the kernel refuses rmdir (EBUSY) for a moment after the last process exits
            remove_cgroups(top, memory)
            if not top.exists() and not memory.exists():
                break
            time.sleep(0.1)
    (scratch.parent / "logs").mkdir(exist_ok=True)
    (scratch.parent / "logs" / f"{index}-{variant}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or "RUN_SUCCESS" not in done.stdout + done.stderr:
        raise SystemExit(f"{variant} run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    after = table_fingerprint(home)
    if after != before:
        raise SystemExit(f"{variant} run changed the table: {before} -> {after}")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    driver, worker = (sampler.process_peaks.get(kind, {}) for kind in ("driver", "worker"))
    return RunFigures(
        variant,
        cpu,
        wall,
        sampler.peak / GIB,
        usage_peak / GIB,
        driver.get("RssAnon", 0) / MIB,
        driver.get("VmRSS", 0) / MIB,
        worker.get("RssAnon", 0) / MIB,
        uptime,
    )


def print_summary(results: list[RunFigures], variants: list[str]) -> None:
    base = statistics.median(r.cpu_s for r in results if r.variant == variants[0])
    print(
        f"\n{'variant':<14} {'runs':>4} {'CPU s (median)':>15} {'vs ' + variants[0]:>12} {'min-max':>13} "
        f"{'wall s':>7} {'held GiB max':>13} {'usage GiB max':>14} {'driver anon/RSS MiB max':>24} "
        f"{'worker anon MiB max':>20}"
    )
    for variant in variants:
        mine = [r for r in results if r.variant == variant]
        cpu = statistics.median(r.cpu_s for r in mine)
        print(
            f"{variant:<14} {len(mine):>4} {cpu:>15.1f} {cpu / base:>12.2f} "
            f"{min(r.cpu_s for r in mine):>6.1f}-{max(r.cpu_s for r in mine):<6.1f} "
            f"{statistics.median(r.wall_s for r in mine):>7.1f} {max(r.held_peak_gib for r in mine):>13.2f} "
            f"{max(r.usage_peak_gib for r in mine):>14.2f} "
            f"{max(r.driver_anon_mib for r in mine):>12.0f}/{max(r.driver_rss_mib for r in mine):<11.0f} "
            f"{max(r.worker_anon_mib for r in mine):>20.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default="before,current", help=f"comma separated, of {','.join(VARIANTS)}"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per variant, alternated")
    parser.add_argument("--commits", type=int, default=360)
    parser.add_argument("--rows", type=int, default=1500)
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--keep", metavar="DIR", help="build the table into DIR and keep it there")
    store.add_argument("--reuse", metavar="DIR", help="use the table kept in DIR")
    parser.add_argument(
        "--age-hours",
        type=float,
        default=0.0,
        help="build the hour that ended this long ago (24: a closed day)",
    )
    parser.add_argument(
        "--job",
        default=JOB,
        help="maintain_all_tables: the scheduled pass (the other tables are created empty)",
    )
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument(
        "--nmt",
        action="store_true",
        help="Native Memory Tracking, GC and class-load logs in the driver; jcmd's heap, NMT summary and class "
        "histogram at its peak go to logs/<run>/nmt.txt (diagnosis only: jcmd costs CPU and the histograms "
        "force full collections)",
    )
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="k2-bench-maint-run-") as temp:
        store_dir = Path(args.reuse or args.keep or temp).resolve()
        built, home = store_dir / "table.built", store_dir / "table"
        if not args.reuse:
            shutil.rmtree(built, ignore_errors=True)
            print(json.dumps(build(home, args.commits, args.rows, args.age_hours)), flush=True)
            home.rename(built)
        if args.build_only:
            return
        scratch = store_dir / "scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        results: list[RunFigures] = []
        for index in range(args.runs * len(variants)):
            variant = variants[index % len(variants)]
            figures = run_once(variant, built, home, scratch, index, args.nmt, args.job)
            results.append(figures)
            print(
                json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in vars(figures).items()}),
                flush=True,
            )
        shutil.rmtree(home, ignore_errors=True)
        print_summary(results, variants)


if __name__ == "__main__":
    main()
