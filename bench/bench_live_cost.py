"""Live cost of K2: `k2 dev --no-simulator` with automation on, at the seeds' load, in a cgroup of its own.

The dev stack (broker, registry host) and the producers (`k2 produce --realtime`, Binance 150/s and
Kraken 3/s by default) run outside the measured cgroup; `k2 dev` and everything it starts (webserver,
daemon, code server(s), `dagster dev` where the checkout still runs it, every run worker and its step
processes) run inside it. CPU is
the kernel's own accounting of that cgroup (cgroup v2 `cpu.stat` usage_usec): exact, hierarchical,
and it includes every short-lived run after it exited. Memory comes from the cgroup v1 memory
controller (this machine binds it to v1): `memory.max_usage_in_bytes` is exact but includes page cache
the processes caused; anonymous + mapped-file memory (what the processes themselves hold) is sampled
from `memory.stat` every second.

Attribution: a watcher (in this process, outside the measured cgroup) looks at the tree every 0.2 s and
moves each process that starts a new component (webserver, daemon, code server, a run worker
`dagster api execute_run`) into a child cgroup of its own; processes a component forks (a run's step
processes) stay in their parent's child cgroup. Each child's cpu.stat is exact from the moment of the
move; what a process spent before it was moved (< 0.2 s, mostly exec) stays with its parent's cgroup.
Runs are then named from the instance (job, asset or check selection).

Gold lag: now minus the newest trade time in gold_crypto_trades, every --sample-seconds. Bronze lag:
Kafka's high watermarks minus the offsets Bronze's last commit stored, summed over partitions.

    .venv/bin/python bench/bench_live_cost.py --minutes 16
    .venv/bin/python bench/bench_live_cost.py --minutes 5 --code /work/ref-live   # another checkout
    .venv/bin/python bench/bench_live_cost.py --bronze-snapshots binance=2340,kraken=780  # long-lived tables

Two instances may run at once (a baseline checkout and the working tree, same window): each has its own
cgroups (named by pid), K2_HOME, dev stack, webserver port and code-server port.

`--code DIR` puts DIR first on every child's PYTHONPATH (the editable install's finder comes after
PathFinder, so DIR wins in every process K2 starts; the script prints where the children import from).
Prints figures; asserts nothing. Needs root (cgroups).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import MIB, ROOT, k2_child_env, private_stack  # noqa: E402

CGROUP2 = Path("/sys/fs/cgroup/unified")
MEMORY_V1 = Path("/sys/fs/cgroup/memory")
GIB = 1024 * MIB
GOLD_LAG_TARGET_SECONDS = 300  # issue 12: Gold at most 5 minutes behind, at every sample
# Command-line fragments that start a component of its own, most specific first.
COMPONENTS = (
    ("dagster-webserver", "webserver"),
    ("dagster_webserver", "webserver"),
    ("dagster-daemon", "daemon"),
    ("dagster._daemon", "daemon"),
    ("code-server", "code-server"),
    ("api grpc", "code-server-grpc"),
    ("dagster dev", "dagster-dev"),
    ("k2_assets.cli dev", "k2-dev"),
)


def own_memory_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return MEMORY_V1 / path.lstrip("/")
    raise RuntimeError("no cgroup v1 memory controller for this process")


def cpu_usec(cgroup: Path) -> int:
    for line in (cgroup / "cpu.stat").read_text().splitlines():
        name, value = line.split()
        if name == "usage_usec":
            return int(value)
    raise RuntimeError(f"{cgroup}/cpu.stat has no usage_usec")


def memory_stat(cgroup: Path) -> dict[str, int]:
    pairs = (line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
    return {name: int(value) for name, value in pairs}


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def process_memory(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed and shared) resident bytes of one process, from /proc/<pid>/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return fields["Anonymous"], fields["Rss"] - fields["Anonymous"]


def program_of(command: str) -> str:
    """`java` for a Spark driver, `python` for a K2 process: what a component's memory is made of."""
    return Path(command.split(" ", 1)[0]).name or "?"


def component_of(command: str) -> str | None:
    for fragment, kind in COMPONENTS:
        if fragment in command:
            return kind
    return None


@dataclass
class Watcher:
    """Moves each new component's process into a child cgroup of `top`; counts processes per cgroup."""

    top: Path
    memory: Path
    stop: threading.Event = field(default_factory=threading.Event)
    seen: dict[tuple[int, str], str] = field(default_factory=dict)  # (pid, start tick) -> command
    processes: Counter = field(default_factory=Counter)
    peak_held: int = 0  # anon + mapped file, sampled
    commands: dict[str, str] = field(default_factory=dict)
    # Every 1 s sample: (seconds since start, anon + mapped of the cgroup, per process (anon, file) bytes).
    memory_samples: list[tuple[float, int, dict[str, tuple[int, int]]]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def sample_memory(self) -> None:
        stat = memory_stat(self.memory)
        held = stat["total_rss"] + stat["total_mapped_file"]
        self.peak_held = max(self.peak_held, held)
        self.memory_samples.append((time.monotonic() - self.started, held, self.memory_by_process()))

    def memory_by_process(self) -> dict[str, tuple[int, int]]:
        """Resident memory per process of the tree, named `<cgroup>:<program>:<pid>`."""
        out = {}
        for cgroup in self.cgroups():
            with contextlib.suppress(OSError):
                for pid in map(int, (cgroup / "cgroup.procs").read_text().split()):
                    with contextlib.suppress(OSError, KeyError):
                        out[f"{cgroup.name}:{program_of(cmdline(pid))}:{pid}"] = process_memory(pid)
        return out

    def cgroups(self) -> list[Path]:
        return [self.top, *sorted(p for p in self.top.iterdir() if p.is_dir())]

    def scan(self) -> None:
        for cgroup in self.cgroups():
            with contextlib.suppress(OSError):
                for pid in map(int, (cgroup / "cgroup.procs").read_text().split()):
                    self._place(pid, cgroup)

    def _place(self, pid: int, cgroup: Path) -> None:
        with contextlib.suppress(OSError):
            started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
            command = cmdline(pid)
            known = self.seen.get((pid, started))
            if not command or known == command:
                return  # gone, or placed already
            # A forked child shows its parent's command line until it execs: placed again after exec.
            self.seen[(pid, started)] = command
            kind = component_of(command)
            if kind is None and "multiprocessing.spawn" in command and cgroup.name.startswith("code-server"):
                kind = f"worker-{pid}"  # the code server spawns each run's worker (DefaultRunLauncher)
            target = cgroup if kind is None else self.top / kind
            if kind is not None and target != cgroup:
                target.mkdir(exist_ok=True)
                (target / "cgroup.procs").write_text(str(pid))
            if known is None or target != cgroup:
                self.processes[target.name] += 1
                if known is not None:
                    self.processes[cgroup.name] -= 1
            self.commands.setdefault(target.name, command[:300])

    def run(self) -> None:
        last_memory = 0.0
        while not self.stop.is_set():
            self.scan()
            if time.monotonic() - last_memory >= 1.0:
                with contextlib.suppress(OSError, KeyError):
                    self.sample_memory()
                last_memory = time.monotonic()
            time.sleep(0.2)


def make_cgroups(tag: str) -> tuple[Path, Path]:
    top, memory = CGROUP2 / tag, own_memory_cgroup() / tag
    top.mkdir()
    memory.mkdir()
    return top, memory


def remove_cgroups(top: Path, memory: Path) -> None:
    for cgroup in [*(p for p in top.iterdir() if p.is_dir()), top, memory]:
        with contextlib.suppress(OSError):
            cgroup.rmdir()


def join_cgroups(top: Path, memory: Path):
    """A preexec_fn: the child (and so all it starts) joins both cgroups before it execs."""

    def join() -> None:
        os.setsid()
        for cgroup in (top, memory):
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return join


def end_leftovers(watcher: Watcher) -> None:
    """SIGTERM, then SIGKILL, whatever k2 dev left in the cgroups (processes this benchmark started)."""
    for sig in (15, 9):
        pids = [int(p) for c in watcher.cgroups() for p in (c / "cgroup.procs").read_text().split()]
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        if pids:
            time.sleep(5)


def gold_lag_seconds(catalog) -> float | None:
    """Now minus the newest trade time in Gold (None while Gold holds nothing recent).

    Gold's `timestamp` is V2's long of microseconds: the bound and the maximum are micros (an ISO string
    bound raised on every sample once Gold existed, so the 2026-12-07 run recorded no Gold lag)."""
    import pyarrow.compute as pc
    from pyiceberg.expressions import GreaterThanOrEqual

    from k2_assets.gold.tables import GOLD_TABLE_SPEC
    from k2_assets.partitions import to_micros

    identifier = GOLD_TABLE_SPEC.identifier
    if not catalog.table_exists(identifier):
        return None
    since = to_micros(datetime.now(UTC) - timedelta(hours=3))
    table = catalog.load_table(identifier)
    times = table.scan(row_filter=GreaterThanOrEqual("timestamp", since), selected_fields=("timestamp",))
    newest = pc.max(times.to_arrow()["timestamp"]).as_py()
    return None if newest is None else time.time() - newest / 1e6


def bronze_lag_records(kafka, consumer, catalog) -> dict[str, int]:
    """Records in Kafka that Bronze's last commit has not stored, per exchange."""
    from k2_assets.bronze.ingestion import read_stored_offsets
    from k2_assets.bronze.tables import bronze_table_spec
    from k2_resources.exchanges import EXCHANGES

    lags = {}
    for exchange in EXCHANGES:
        identifier = bronze_table_spec(exchange).identifier
        stored = (
            read_stored_offsets(catalog.load_table(identifier)) if catalog.table_exists(identifier) else {}
        )
        marks = kafka.watermarks(consumer, exchange.topic, kafka.partitions(consumer, exchange.topic))
        lags[exchange.name] = sum(
            max(0, high - max(low, stored.get(p, low))) for p, (low, high) in marks.items()
        )
    return lags


def start_producers(env: dict[str, str], rates: dict[str, float], logs: Path) -> list[subprocess.Popen]:
    processes = []
    for exchange, rate in rates.items():
        command = [sys.executable, "-m", "k2_assets.cli", "produce", "--exchange", exchange]
        command += ["--count", "1000000000", "--rate", str(rate), "--start", "now", "--realtime"]
        with (logs / f"produce-{exchange}.log").open("wb") as log:
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


def run_names(dagster_home: Path) -> dict[str, dict]:
    """Run id -> job, what it selected (assets or checks), partition, status, worker pid, from the instance."""
    import dagster as dg

    names = {}
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for record in instance.get_run_records():
            run = record.dagster_run
            starts = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_START).records
            pid = starts[0].event_log_entry.dagster_event.pid if starts else None
            if run.asset_check_selection and not run.asset_selection:
                what = "checks:" + ",".join(sorted(c.name for c in run.asset_check_selection))
            elif run.asset_selection:
                what = "assets:" + ",".join(sorted(k.to_user_string() for k in run.asset_selection))
            else:
                what = "job"
            names[run.run_id] = {
                "job": run.job_name,
                "what": what,
                "partition": run.tags.get("dagster/partition"),
                "status": run.status.value,
                "worker_pid": pid,
                "seconds": (record.end_time or time.time())
                - (record.start_time or record.create_timestamp.timestamp()),
            }
    return names


def run_kind(name: dict) -> str:
    if name["job"] == "__ASSET_JOB":
        what = name["what"]
        if what.startswith("checks:"):
            return "freshness checks" if "freshness" in what else what
        return what
    return name["job"]


def summarise(watcher: Watcher, used: dict[str, float], runs: dict[str, dict], wall: float) -> dict:
    """CPU per component and per run kind, as seconds and % of one core over the window."""
    components: dict[str, float] = defaultdict(float)
    kinds: dict[str, dict] = defaultdict(lambda: {"runs": 0, "cpu_seconds": 0.0, "processes": 0})
    by_pid = {run["worker_pid"]: run for run in runs.values() if run["worker_pid"]}
    for name, seconds in used.items():
        if name.startswith("worker-"):
            run = by_pid.get(int(name[7:]), {"job": "? (no RUN_START)", "what": "?"})
            kind = kinds[run_kind(run)]
            kind["runs"] += 1
            kind["cpu_seconds"] += seconds
            kind["processes"] += watcher.processes[name]
            components["run workers and their step processes"] += seconds
        elif name != "top":
            components[name] += seconds
    return {"components": dict(components), "run_kinds": dict(kinds), "wall": wall}


def child_cpu(top: Path) -> dict[str, float]:
    used = {"top": cpu_usec(top) / 1e6}
    for cgroup in (p for p in top.iterdir() if p.is_dir()):
        used[cgroup.name] = cpu_usec(cgroup) / 1e6
    used["(before a move, in k2 dev's cgroup)"] = used["top"] - sum(v for k, v in used.items() if k != "top")
    return used


def memory_of(sample: dict[str, list[int]], runs: dict[str, dict]) -> dict[str, list[int]]:
    """One sample's per-process (anon, file) bytes, each process named by its component or run kind."""
    by_pid = {run["worker_pid"]: run for run in runs.values() if run["worker_pid"]}
    named: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, (anon, file) in sample.items():
        cgroup, program, _ = key.split(":")
        if cgroup.startswith("worker-"):
            cgroup = run_kind(by_pid.get(int(cgroup[7:]), {"job": "? (no RUN_START)", "what": "?"}))
        named[f"{cgroup} ({program})"][0] += anon
        named[f"{cgroup} ({program})"][1] += file
    return dict(named)


def memory_moments(watcher: Watcher, runs: dict[str, dict], skip: float) -> dict[str, dict]:
    """The tree's memory by process at its peak, and at its highest sample at rest (after `skip` s, no run
    worker alive but the Bronze ingestion runs'), from the 1 s samples."""
    ingestion = {f"worker-{run['worker_pid']}" for run in runs.values() if run["job"].endswith("_ingestion")}
    at_rest = [
        (t, held, sample)
        for t, held, sample in watcher.memory_samples
        if t >= skip and {k.split(":")[0] for k in sample if k.startswith("worker-")} <= ingestion
    ]
    moments = {"peak": max(watcher.memory_samples, key=lambda s: s[1], default=None)}
    moments["rest"] = max(at_rest, key=lambda s: s[1], default=None)
    return {
        name: {"seconds": m[0], "held": m[1], "processes": memory_of(m[2], runs)}
        for name, m in moments.items()
        if m is not None
    }


def print_memory(moments: dict[str, dict]) -> None:
    for name, moment in moments.items():
        print(
            f"Memory by process at the {name} ({moment['seconds']:.0f} s; cgroup anon+mapped "
            f"{moment['held'] / GIB:.2f} GiB; smaps_rollup anon / file-backed+shared MiB):"
        )
        for process, (anon, file) in sorted(moment["processes"].items(), key=lambda kv: -sum(kv[1])):
            print(f"  {process[:60]:60s} {anon / MIB:7.0f} {file / MIB:7.0f}")


def print_report(report: dict) -> None:
    wall, cpu = report["window_seconds"], report["cpu_seconds"]
    print(f"\n== K2 live cost, {wall / 60:.1f} min, code {report['code']} ==")
    if report.get("bronze_snapshots_seeded"):
        print(f"Bronze seeded with snapshots first: {report['bronze_snapshots_seeded']}")
    print(f"CPU: {cpu:.1f} s = {100 * cpu / wall:.1f} % of one core (cgroup cpu.stat, whole tree)")
    steady = report["steady"]
    if steady:
        print(
            f"     after the first {steady['skip_seconds']:.0f} s: {100 * steady['cpu_seconds'] / steady['wall']:.1f} %"
        )
    print(
        f"Memory: max_usage_in_bytes {report['memory_max_usage'] / GIB:.2f} GiB (incl. page cache), "
        f"anon+mapped peak {report['memory_held_peak'] / GIB:.2f} GiB (sampled 1 s)"
    )
    print("CPU per component (s, % of one core):")
    for name, seconds in sorted(report["summary"]["components"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:40s} {seconds:8.1f} s {100 * seconds / wall:6.1f} %")
    print("Runs by kind (runs, processes, CPU s, CPU s per run, % of one core):")
    for name, kind in sorted(report["summary"]["run_kinds"].items(), key=lambda kv: -kv[1]["cpu_seconds"]):
        per = kind["cpu_seconds"] / max(1, kind["runs"])
        print(
            f"  {name[:60]:60s} {kind['runs']:4d} {kind['processes']:4d} {kind['cpu_seconds']:8.1f} s "
            f"{per:6.1f} s {100 * kind['cpu_seconds'] / wall:5.1f} %"
        )
    print_memory(report.get("memory_moments", {}))
    print(f"Runs launched: {report['runs_launched']}, statuses {report['run_statuses']}")
    gold = [g for _, g in report["gold_lag"] if g is not None]
    if gold:
        over = sum(g > GOLD_LAG_TARGET_SECONDS for g in gold)
        print(
            f"Gold lag: last {gold[-1]:.0f} s, max {max(gold):.0f} s, mean {sum(gold) / len(gold):.0f} s "
            f"({len(gold)} samples, {over} over {GOLD_LAG_TARGET_SECONDS} s)"
        )
    bronze = [sum(b.values()) for _, b in report["bronze_lag"] if b]
    if bronze:
        print(
            f"Bronze lag (records): last {bronze[-1]}, max {max(bronze)}, mean {sum(bronze) / len(bronze):.0f}"
        )


def seed_history(home: Path, snapshots: dict[str, int], code: Path, env: dict[str, str]) -> None:
    """Bronze tables that already keep `snapshots` snapshots per exchange, as a long-running deployment's
    do (each Bronze commit's cost grows with them; a fresh dev stack starts at none). One-row commits
    ingested a day ago: the running hour's Silver and Gold never read them. Committed by `code`'s own
    BronzeCommitter, in a child: how a checkout commits (one manifest per commit, or merged) is part of
    the history it lives with."""
    for name, count in snapshots.items():
        started = time.monotonic()
        child = SEED_CHILD.format(home=str(home), name=name, count=count)
        subprocess.run([sys.executable, "-c", child], env=env, cwd=code, check=True)
        print(f"seeded {count} Bronze {name} snapshots in {time.monotonic() - started:.0f} s", flush=True)


SEED_CHILD = """
from datetime import UTC, datetime, timedelta
from pathlib import Path
from bench.bench_ingest_live import seed_snapshots
seed_snapshots(Path({home!r}), {name!r}, {count}, at=datetime.now(UTC) - timedelta(days=1))
"""


def launch_job(home: Path, code: Path, env: dict[str, str], job: str) -> int:
    """Submit `job` with its run config to the running instance, as its schedule would (`dagster job
    launch`, outside the measured cgroup: the daemon dequeues it and the code server starts its worker
    inside). Returns the launcher's exit code."""
    dagster_home = home / "dagster_home"
    command = [sys.executable, "-m", "dagster", "job", "launch", "-w", str(dagster_home / "workspace.yaml")]
    command += ["-j", job, "-c", str(code / "run_config" / f"{job}.yaml")]
    launch_env = {**env, "DAGSTER_HOME": str(dagster_home)}
    done = subprocess.run(command, env=launch_env, cwd=code, capture_output=True, text=True, timeout=300)
    print(
        f"launched {job}: exit {done.returncode} {done.stderr[-300:] if done.returncode else ''}", flush=True
    )
    return done.returncode


def named_values(text: str, separator: str, value: type) -> list[tuple[str, Any]]:
    """`a<separator>1,b<separator>2` -> [("a", value("1")), ("b", value("2"))]."""
    return [(name, value(v)) for name, v in (part.split(separator) for part in text.split(",") if part)]


def job_launches(text: str) -> list[tuple[str, float]]:
    """`maintain_all_tables@420` -> [("maintain_all_tables", 420.0)]: jobs to launch, seconds into the window."""
    return named_values(text, "@", float)


def snapshot_counts(text: str) -> dict[str, int]:
    """`binance=2340,kraken=780` -> {"binance": 2340, "kraken": 780}."""
    return dict(named_values(text, "=", int))


def measure(args: argparse.Namespace) -> dict:
    from k2_resources.dev.devstack.kafka import free_ports
    from k2_resources.iceberg import IcebergCatalogResource
    from k2_resources.kafka import KafkaResource
    from k2_resources.settings import KAFKA_BOOTSTRAP_SERVERS, KAFKA_CLIENT_PREFIX, client_properties

    home = Path(tempfile.mkdtemp(prefix="k2-live-"))
    code = Path(args.code).resolve()
    logs = home / "bench"
    logs.mkdir()
    tag = f"k2-live-{os.getpid()}"
    with private_stack(home):
        env = k2_child_env(home, PYTHONPATH=str(code))
        where = subprocess.run(
            [sys.executable, "-c", "import k2_assets; print(k2_assets.__file__)"],
            env=env,
            capture_output=True,
            text=True,
            cwd=code,
        ).stdout.strip()
        print(f"children import k2_assets from {where}")
        seed_history(home, args.bronze_snapshots, code, env)
        if args.start_at:  # two instances seeding different histories still measure the same window
            time.sleep(max(0.0, args.start_at - time.time()))
        producers = start_producers(env, {"binance": args.binance_rate, "kraken": args.kraken_rate}, logs)
        top, memory = make_cgroups(tag)
        watcher = Watcher(top, memory)
        thread = threading.Thread(target=watcher.run, daemon=True)
        port = args.port or free_ports(1)[0]  # two instances at once (baseline and branch) never share one
        command = [sys.executable, "-m", "k2_assets.cli", "dev", "--no-simulator", "-p", str(port)]
        log = (logs / "k2-dev.log").open("wb")
        started = time.monotonic()
        dev = subprocess.Popen(
            command,
            env=env,
            cwd=code,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=join_cgroups(top, memory),
        )
        thread.start()
        catalog = IcebergCatalogResource().catalog()
        kafka = KafkaResource(
            bootstrap_servers=os.environ[KAFKA_BOOTSTRAP_SERVERS],
            client_config=client_properties(KAFKA_CLIENT_PREFIX),
        )
        consumer = kafka.consumer("k2-bench-live")
        gold_lag, bronze_lag, usage = [], [], []
        deadline = started + args.minutes * 60
        launches, launched = dict(args.launch), {}
        try:
            while (now := time.monotonic()) < deadline and dev.poll() is None:
                usage.append((now - started, cpu_usec(top) / 1e6))
                for job in [j for j, at in launches.items() if now - started >= at]:
                    launched[job] = (now - started, launch_job(home, code, env, job))
                    del launches[job]
                with contextlib.suppress(Exception):
                    gold_lag.append((now - started, gold_lag_seconds(catalog)))
                with contextlib.suppress(Exception):
                    bronze_lag.append((now - started, bronze_lag_records(kafka, consumer, catalog)))
                time.sleep(max(0.0, min(args.sample_seconds, deadline - time.monotonic())))
            wall = time.monotonic() - started
            cpu = cpu_usec(top) / 1e6
            used = child_cpu(top)
            max_usage = int((memory / "memory.max_usage_in_bytes").read_text())
        finally:
            consumer.close()
            dev.send_signal(2)
            try:
                dev.wait(timeout=120)
            except subprocess.TimeoutExpired:
                dev.kill()
            watcher.stop.set()
            thread.join()
            for process in producers:
                process.terminate()
                process.wait()
            end_leftovers(watcher)
            remove_cgroups(top, memory)
        runs = run_names(home / "dagster_home")
    skip = min(args.steady_after, wall / 2)
    before = next(((t, c) for t, c in usage if t >= skip), None)
    steady = (
        {"skip_seconds": before[0], "cpu_seconds": cpu - before[1], "wall": wall - before[0]}
        if before
        else None
    )
    return {
        "code": str(code),
        "window_seconds": wall,
        "cpu_seconds": cpu,
        "steady": steady,
        "memory_max_usage": max_usage,
        "memory_held_peak": watcher.peak_held,
        "summary": summarise(watcher, used, runs, wall),
        "processes_per_cgroup": dict(watcher.processes),
        "commands": watcher.commands,
        "runs_launched": len(runs),
        "run_statuses": dict(Counter(r["status"] for r in runs.values())),
        "runs": runs,
        "gold_lag": gold_lag,
        "bronze_lag": bronze_lag,
        "k2_home": str(home),
        "bronze_snapshots_seeded": args.bronze_snapshots,
        "memory_moments": memory_moments(watcher, runs, skip),
        "launched": launched,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=16.0)
    parser.add_argument("--binance-rate", type=float, default=150.0)
    parser.add_argument("--kraken-rate", type=float, default=3.0)
    parser.add_argument("--code", default=str(ROOT), help="checkout the children import K2 from")
    parser.add_argument("--port", type=int, default=0, help="webserver port (default: a free one)")
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    parser.add_argument("--steady-after", type=float, default=180.0, help="also report CPU after this many s")
    parser.add_argument("--output", type=Path, help="write the whole report as JSON here")
    parser.add_argument(
        "--bronze-snapshots",
        type=snapshot_counts,
        default={},
        help="seed Bronze with this many snapshots first, e.g. binance=2340,kraken=780 (a long-lived table)",
    )
    parser.add_argument("--start-at", type=float, default=0.0, help="start k2 dev at this Unix time")
    parser.add_argument(
        "--launch",
        type=job_launches,
        default=[],
        help="launch jobs this many seconds after k2 dev started, e.g. maintain_all_tables@420 (a scheduled "
        "pass in the window on both sides of a pair)",
    )
    args = parser.parse_args()
    report = measure(args)
    print_report(report)
    if args.output:
        args.output.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
