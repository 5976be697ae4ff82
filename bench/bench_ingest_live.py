"""Benchmark: Bronze ingestion's CPU at the live load (issue 12 item 1), branch against a baseline, same run.

On one private dev stack (a real Apache Kafka broker + Schema Registry), a producer thread in this
process writes real V2 trades at the seeds' rates (Binance `--rate` 150/s, Kraken `--kraken-rate` 3/s),
round-robin over the topic's partitions. For every code tree given (`--code`, this worktree first, then
e.g. main's), one `k2 ingest --exchange <e>` per exchange runs as a child with the exchange's own commit
interval and batch size (BronzeIngestionConfig's defaults), `PYTHONPATH` set to that tree, and its own
K2_HOME (catalog, warehouse, Dagster instance), so every tree reads the same records from the same
broker at the same time. Each child sits in a cgroup v2 of its own (and a cgroup v1 memory group), moved
there right after it is started; the producer, the broker and this process are outside all of them.

`--snapshots N` first gives every Bronze table N retained snapshots, each a real `BronzeCommitter`
commit of one row (its own topic name, so the check below ignores it), as a table has between two
maintenance runs (Binance commits every 10 s: 360 an hour).

Printed per child, over the steady window from its first Iceberg commit to its last (start-up out):
CPU-s per minute and % of a core, CPU ms per commit and us per message (cgroup `cpu.stat` usage_usec,
sampled every second), the same per thread (`/proc/<pid>/task/*/stat`: the Python main thread vs
librdkafka's rdk:* threads), peak memory (`memory.max_usage_in_bytes` of its cgroup, and the process's
VmHWM). Also CPU per commit in the window against the table's snapshot count.

Before a figure is printed every child's Bronze table is checked: each partition's rows are exactly the
offsets 0..stored-1, once each (the stored offsets are those of its last commit).

`--profile FILE` runs the first tree's Binance child under cProfile (written at its stop); its CPU
figures are then not comparable, so use it in a run of its own.

    /work/bin/heavy --exclusive .venv/bin/python bench/bench_ingest_live.py --minutes 4 \
        --code . --code /work/wt/ingest8-base [--snapshots 1080]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Producer  # noqa: E402

from bench._common import (  # noqa: E402
    MIB,
    Child,
    FramedTrade,
    framed_trades,
    k2_child_env,
    private_stack,
    thread_cpu_seconds,
)
from bench.bench_live_cost import cpu_usec, make_cgroups, remove_cgroups  # noqa: E402

SAMPLE_SECONDS = 1.0
POOL_RECORDS = 5_000
SEED_TOPIC = "k2-bench-seed"
ROOT = Path(__file__).resolve().parents[1]
# A --growth child (`python -P -c`, PYTHONPATH = the tree measured): K2 is imported from the tree before
# this module, whose sys.path change then cannot reach it. Prints where K2 came from, then the median
# CPU seconds of its commits.
GROWTH_CHILD = """
import statistics, sys
from pathlib import Path
import k2_assets.bronze.ingestion, k2_assets.bronze.tables, k2_resources.exchanges, k2_resources.iceberg
sys.path.append(sys.argv[1])
from bench.bench_ingest_live import seed_snapshots
print(k2_assets.bronze.ingestion.__file__)
print(statistics.median(seed_snapshots(Path(sys.argv[2]), "binance", int(sys.argv[3]), rows=1_500)))
"""


class RateProducer(threading.Thread):
    """Produces `rate` records a second to `topic`, round-robin over its partitions, paced every 20 ms."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, rate: float, pool: list[FramedTrade]):
        super().__init__(name=f"producer-{topic}", daemon=True)
        config = {"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True}
        self.producer = Producer(config)
        self.topic, self.partitions, self.rate, self.pool = topic, partitions, rate, pool
        self.sent = 0
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        started = time.monotonic()
        try:
            while not self.stopping.wait(0.02):
                due = int((time.monotonic() - started) * self.rate)
                while self.sent < due:
                    record = self.pool[self.sent % len(self.pool)]
                    self.producer.produce(
                        self.topic,
                        record.value,
                        key=record.key,
                        partition=self.sent % self.partitions,
                        timestamp=record.timestamp_ms,
                    )
                    self.sent += 1
                self.producer.poll(0)
            self.producer.flush(30)
        except BaseException as err:  # reported by the main thread
            self.error = err


@dataclass
class Measured:
    """One ingestion child: its cgroup, and CPU samples (monotonic s, wall s, cgroup usec, per-thread s)."""

    code: Path
    exchange: str
    home: Path
    cgroup: Path
    memory: Path
    child: Child
    samples: list[tuple[float, float, int, dict[str, float]]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.code.name}/{self.exchange}"

    def sample(self) -> None:
        with contextlib.suppress(OSError):
            self.samples.append(
                (time.monotonic(), time.time(), cpu_usec(self.cgroup), thread_cpu(self.child.pid))
            )


def thread_cpu(pid: int) -> dict[str, float]:
    """User + system CPU seconds per thread name of a live process (threads of one name summed)."""
    per_name: dict[str, float] = {}
    for tid, (name, seconds) in thread_cpu_seconds(pid).items():
        kind = "main" if tid == pid else name.split(":")[0] + ":" + name.split(":")[-1][:6]
        per_name[kind] = per_name.get(kind, 0.0) + seconds
    return per_name


def catalog_of(home: Path):
    from k2_resources.iceberg import IcebergCatalogResource

    return IcebergCatalogResource(
        properties={
            "type": "sql",
            "uri": f"sqlite:///{home}/catalog.db",
            "warehouse": f"file://{home}/warehouse",
        }
    )


def seed_rows(schema, count: int, at: datetime | None = None):
    """`count` Bronze rows of the seed topic (160-byte values), ingested `at` (default: now)."""
    import pyarrow as pa

    now = at or datetime.now(UTC)
    values = {
        "raw_bytes": b"s" * 160,
        "message_key": b"BTCUSDT",
        "topic": SEED_TOPIC,
        "partition": 0,
        "offset": 0,
        "kafka_timestamp": now,
        "ingestion_timestamp": now,
        "ingestion_date": now.date(),
    }
    return pa.table({f.name: pa.array([values[f.name]] * count, f.type) for f in schema}, schema=schema)


def seed_snapshots(
    home: Path, exchange_name: str, count: int, rows: int = 1, at: datetime | None = None
) -> list[float]:
    """`count` Bronze commits of `rows` rows ingested `at` (offsets at 0 for every partition): a table
    with a history.

    Returns each commit's CPU seconds (this process).
    """
    from k2_assets.bronze.ingestion import BronzeCommitter
    from k2_assets.bronze.tables import bronze_table_spec
    from k2_resources.exchanges import exchange

    config = exchange(exchange_name)
    (home / "warehouse").mkdir(parents=True, exist_ok=True)
    table = catalog_of(home).ensure_table(bronze_table_spec(config))
    batch = seed_rows(table.schema().as_arrow(), rows, at)
    committer = BronzeCommitter(table, {}, "k2-bench-seed")
    cpu = []
    for _ in range(count):
        started = time.process_time()
        committer.commit(batch, {p: 0 for p in range(config.kafka_partitions)})
        cpu.append(time.process_time() - started)
    return cpu


def commit_growth(args: argparse.Namespace, tmp: Path) -> None:
    """CPU per Bronze commit (1,500 rows: 10 s at 150/s) against the snapshots the table retains.

    The table is grown by this process; at each count every tree commits `--commits` times in a child
    of its own (PYTHONPATH = the tree), trees alternating, so all measure the same table.
    """
    home, built = tmp / "growth", 0
    print(f"CPU per commit of 1,500 rows (ms, median of {args.commits}) against the table's snapshots:")
    for target in args.growth:
        seed_snapshots(home, "binance", max(0, target - built))
        built = max(built, target)
        figures = []
        for code in args.code:
            env = {**os.environ, "PYTHONPATH": str(code)}
            command = [sys.executable, "-P", "-c", GROWTH_CHILD, str(ROOT), str(home), str(args.commits)]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.split()
            if not out[0].startswith(str(code)):
                raise RuntimeError(f"the child for {code} imported {out[0]}")
            figures.append(f"{code.name} {float(out[-1]) * 1000:.1f}")
            built += args.commits
        print(f"  {target:>5} snapshots: " + ", ".join(figures) + f"; {uptime()}")


def verify_exactly_once(m: Measured) -> tuple[int, int]:
    """Bronze's rows of the topic are each partition's offsets 0..stored-1 once; returns (rows, snapshots)."""
    import pyarrow.compute as pc

    from k2_assets.bronze.ingestion import read_stored_offsets
    from k2_assets.bronze.tables import bronze_table_spec
    from k2_resources.exchanges import exchange

    config = exchange(m.exchange)
    table = catalog_of(m.home).load_table(bronze_table_spec(config))
    rows = table.scan(selected_fields=("topic", "partition", "offset")).to_arrow()
    rows = rows.filter(pc.equal(rows["topic"], config.topic))
    stored = read_stored_offsets(table)
    problems = []
    for p, next_offset in stored.items():
        offsets = rows.filter(pc.equal(rows["partition"], p))["offset"]
        distinct = pc.count_distinct(offsets).as_py() if len(offsets) else 0
        bounds = pc.min_max(offsets).as_py() if len(offsets) else {"min": None, "max": None}
        expected = {"min": 0, "max": next_offset - 1} if next_offset else {"min": None, "max": None}
        if not (len(offsets) == distinct == next_offset and bounds == expected):
            problems.append(
                f"partition {p}: {len(offsets)} rows, {distinct} distinct, {bounds}, stored {next_offset}"
            )
    if rows.num_rows != sum(stored.values()):
        problems.append(f"{rows.num_rows} rows, stored offsets sum to {sum(stored.values())}")
    if problems:
        raise RuntimeError(f"{m.label}: Bronze is not exactly once: " + "; ".join(problems))
    return rows.num_rows, len(table.metadata.snapshots)


def commits_of(m: Measured) -> list[tuple[float, int]]:
    """(commit time s since the epoch, records added) of every ingestion commit, oldest first."""
    from k2_assets.bronze.tables import bronze_table_spec
    from k2_resources.exchanges import exchange

    table = catalog_of(m.home).load_table(bronze_table_spec(exchange(m.exchange)))
    found = []
    for snapshot in table.metadata.snapshots:
        props = snapshot.summary.additional_properties if snapshot.summary else {}
        if props.get("k2.dagster.run-id", "k2-bench-seed") != "k2-bench-seed":
            found.append((snapshot.timestamp_ms / 1000, int(props.get("added-records", 0))))
    return sorted(found)


def at(m: Measured, wall: float) -> tuple[float, int, dict[str, float]]:
    """The first CPU sample taken at or after wall time `wall` (monotonic s, usec, per thread)."""
    for mono, when, usec, threads in m.samples:
        if when >= wall:
            return mono, usec, threads
    mono, _, usec, threads = m.samples[-1]
    return mono, usec, threads


def report(m: Measured, peak_cgroup_mib: float, peak_rss_mib: float) -> None:
    rows, snapshots = verify_exactly_once(m)
    commits = commits_of(m)
    if len(commits) < 3:
        print(f"  {m.label}: only {len(commits)} commits: no steady window")
        return
    (t0, usec0, threads0), (t1, usec1, threads1) = at(m, commits[0][0]), at(m, commits[-1][0])
    seconds, cpu = t1 - t0, (usec1 - usec0) / 1e6
    n_commits, messages = len(commits) - 1, sum(added for _, added in commits[1:])
    total = m.samples[-1][2] / 1e6
    threads = {k: threads1.get(k, 0.0) - threads0.get(k, 0.0) for k in threads1}
    by_thread = ", ".join(
        f"{k} {v:.2f}" for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v >= 0.01
    )
    print(
        f"  {m.label}: steady {seconds / 60:.1f} min, {n_commits} commits, {messages:,} records: "
        f"{cpu / seconds * 60:.2f} CPU-s/min = {cpu / seconds * 100:.2f} % of a core; "
        f"{cpu / n_commits * 1000:.0f} ms per commit; {cpu / max(messages, 1) * 1e6:.0f} us per record\n"
        f"    CPU by thread in the window (s): {by_thread}\n"
        f"    whole run incl. start {total:.1f} CPU-s; peak memory: cgroup {peak_cgroup_mib:.0f} MiB, "
        f"VmHWM {peak_rss_mib:.0f} MiB; Bronze {rows:,} rows exactly once, {snapshots} snapshots at the end"
    )


def start_child(code: Path, exchange_name: str, home: Path, tag: str, profile: Path | None) -> Measured:
    env = k2_child_env(home, PYTHONPATH=str(code))
    # -P: no working directory (this tree) ahead of PYTHONPATH, so `-m` imports K2 from `code`.
    python = [sys.executable, "-P", *(["-m", "cProfile", "-o", str(profile)] if profile else [])]
    child = Child([*python, "-m", "k2_assets.cli", "ingest", "--exchange", exchange_name], env)
    cgroup, memory = make_cgroups(tag)
    for group in (cgroup, memory):
        (group / "cgroup.procs").write_text(str(child.pid))
    return Measured(code, exchange_name, home, cgroup, memory, child)


def run(args: argparse.Namespace, tmp: Path) -> None:
    from k2_resources.exchanges import exchange

    rates = {"binance": args.rate, "kraken": args.kraken_rate}
    stack_home = tmp / "stack"
    with private_stack(stack_home) as info:
        homes = {}
        for i, code in enumerate(args.code):
            home = tmp / f"k2-{i}"
            home.mkdir()
            shutil.copy(stack_home / "devstack.env", home / "devstack.env")
            if i == 0:
                for name in rates:
                    seed_snapshots(home, name, args.snapshots)
            else:  # the same history: its catalog names the first home's files, which nobody rewrites
                shutil.copy(homes[args.code[0]] / "catalog.db", home / "catalog.db")
            homes[code] = home
        producers = []
        for name, rate in rates.items():
            config = exchange(name)
            schema_id = info.schema_ids[f"{config.topic}-value"]
            pool = framed_trades(
                POOL_RECORDS, schema_id, datetime.now(UTC) - timedelta(hours=1), timedelta(milliseconds=100)
            )
            producers.append(
                RateProducer(info.bootstrap_servers, config.topic, config.kafka_partitions, rate, pool)
            )
        tag = f"k2-ingest-live-{os.getpid()}"
        measured = [
            start_child(
                code,
                name,
                homes[code],
                f"{tag}-{i}-{name}",
                args.profile if (i, name) == (0, "binance") else None,
            )
            for i, code in enumerate(args.code)
            for name in rates
        ]
        try:
            for producer in producers:
                producer.start()
            deadline = time.monotonic() + args.minutes * 60
            while time.monotonic() < deadline:
                for m in measured:
                    if (ended := m.child.poll()) is not None:
                        raise RuntimeError(f"{m.label} exited ({ended.returncode}):\n{ended.stderr[-3000:]}")
                    m.sample()
                if errors := [p.error for p in producers if p.error]:
                    raise RuntimeError(f"producer failed: {errors[0]}")
                time.sleep(SAMPLE_SECONDS)
            for m in measured:
                m.sample()
            peaks = [int((m.memory / "memory.max_usage_in_bytes").read_text()) / MIB for m in measured]
        finally:
            for producer in producers:
                producer.stopping.set()
            results = [m.child.stop(grace=20.0) for m in measured]
            for producer in producers:
                producer.join(timeout=40)
            for m in measured:
                remove_cgroups(m.cgroup, m.memory)
        sent = ", ".join(f"{p.topic} {p.sent:,}" for p in producers)
        print(f"produced {sent} in {args.minutes:.1f} min; uptime: {uptime()}")
        for m, peak, result in zip(measured, peaks, results, strict=True):
            report(m, peak, result.peak_rss_mb)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--rate", type=float, default=150.0, help="Binance records per second")
    parser.add_argument("--kraken-rate", type=float, default=3.0, help="Kraken records per second")
    parser.add_argument("--snapshots", type=int, default=0, help="snapshots each Bronze table has before")
    parser.add_argument("--code", type=Path, action="append", help="a code tree (repeat: same run)")
    parser.add_argument("--profile", type=Path, help="cProfile output of the first tree's Binance child")
    parser.add_argument(
        "--growth",
        type=lambda text: [int(n) for n in text.split(",")],
        help="instead of the live run: CPU per commit at these snapshot counts, e.g. 50,360,1080",
    )
    parser.add_argument("--commits", type=int, default=10, help="commits measured per count (--growth)")
    args = parser.parse_args()
    args.code = [c.resolve() for c in (args.code or [Path(__file__).resolve().parents[1]])]
    return args


def main() -> None:
    args = parse_args()
    print(
        f"bench_ingest_live, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {args.snapshots} snapshots first; {uptime()}"
    )
    for code in args.code:
        head = subprocess.run(
            ["git", "-C", str(code), "log", "--oneline", "-1"], capture_output=True, text=True
        )
        print(f"  code {code}: {head.stdout.strip()}")
    with tempfile.TemporaryDirectory(prefix="k2-bench-live-ingest-") as tmp:
        (commit_growth if args.growth else run)(args, Path(tmp))


if __name__ == "__main__":
    main()
