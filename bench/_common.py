"""Shared by the K2 benchmarks and tests/test_memory.py: a private dev stack, real Confluent-framed V2
trades, and child processes whose peak RSS comes from the kernel rather than from sampling.

Peak RSS is the kernel's high-water mark of the child's own address space (VmHWM, which only grows,
read every ~50 ms until it exits), so a spike between two reads is never missed, and neither the caller
nor its other children mix in. Not wait4's ru_maxrss: at exec it takes in the RSS of the parent the
child was forked from (until 2026-12-07 it was used, and a child's peak was never below its parent's).

`python -m bench._common run ...` is the child side: one Dagster job or asset materialisation, run
in-process on an ephemeral instance (no executor subprocess, so its memory is this process's), with a
one-line JSON summary (success, check results, output and materialisation metadata) on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from k2_resources.dev.devstack.stack import DevstackInfo

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "K2-BENCH-RESULT "
KIB = 1024
MIB = 1024 * 1024

# Binance-like instruments and rough prices: enough variety for realistic Avro sizes (~160 bytes).
SYMBOLS = {"BTCUSDT": 67_000.0, "ETHUSDT": 3_500.0, "SOLUSDT": 150.0, "BNBUSDT": 600.0, "DOGEUSDT": 0.15}


# --- Child processes with exact peak RSS --------------------------------------------------------------


@dataclass(frozen=True)
class ChildResult:
    """How a child process ended, what it cost, and what it printed."""

    returncode: int
    wall_seconds: float
    peak_rss_mb: float  # the child's own high-water mark after exec (kernel's VmHWM, see Child.poll)
    peak_tree_rss_mb: float  # child + descendants summed, sampled every poll (~50 ms)
    cpu_seconds: float  # user + system, the child and its reaped descendants
    stdout: str
    stderr: str

    def step_seconds(self) -> dict[str, str]:
        """How long each Dagster step took, from the run's own log lines on stderr (e.g. {"op": "47.62s"})."""
        found = re.findall(r'Finished execution of step "([^"]+)" in (.+?)\.?$', self.stderr, re.M)
        return dict(found)

    def summary(self) -> dict[str, Any]:
        """The JSON summary a `bench._common run` child printed; raises with its stderr if there is none."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX) :])
        raise RuntimeError(f"child printed no result (exit {self.returncode}):\n{self.stderr[-4000:]}")


class Child:
    """A subprocess reaped with wait4 (its CPU time exactly), its peak RSS from VmHWM."""

    def __init__(self, args: list[str], env: Mapping[str, str]) -> None:
        # Files, not pipes: a chatty child can never block on a full pipe. They live as long as the child.
        self._out: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.started = time.perf_counter()
        self.process = subprocess.Popen(args, env=dict(env), cwd=ROOT, stdout=self._out, stderr=self._err)
        self._tree = psutil.Process(self.process.pid)
        self.peak_tree_rss_mb = 0.0
        self.high_water_kib = 0

    def read_high_water(self) -> None:
        """The child's VmHWM now: the peak RSS of its own address space since exec.

        wait4's ru_maxrss is not that: at exec Linux keeps the larger of it and the RSS of the address
        space being replaced, which after Popen's vfork is the parent's. A child started by a
        benchmark holding 800 MB reported 820 MB for `python -c pass`. VmHWM only grows, and is read
        every poll (~50 ms) until the child exits.
        """
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.high_water_kib = max(self.high_water_kib, int(line.split()[1]))

    def sample_tree_rss(self) -> float:
        """RSS of the child plus all its descendants now (MB), and the running peak of those samples.

        wait4's ru_maxrss is the largest single process of the tree, not the sum: when a run fans work
        out to worker processes, only this sampled sum shows what the machine had to hold.
        """
        try:
            processes = [self._tree, *self._tree.children(recursive=True)]
        except psutil.Error:
            return 0.0
        total = 0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        self.peak_tree_rss_mb = max(self.peak_tree_rss_mb, total / MIB)
        return total / MIB

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> ChildResult | None:
        """The result once the child has exited (reaping it), else None; samples the tree's RSS meanwhile."""
        self.sample_tree_rss()
        self.read_high_water()
        pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
        if pid == 0:
            return None
        wall = time.perf_counter() - self.started
        self.process.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
        # ru_maxrss (KiB) only when VmHWM was never read (a child gone within the first poll).
        peak_mb = (self.high_water_kib or usage.ru_maxrss) * KIB / MIB
        return ChildResult(
            returncode=self.process.returncode,
            wall_seconds=wall,
            peak_rss_mb=peak_mb,
            peak_tree_rss_mb=max(self.peak_tree_rss_mb, peak_mb),
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            stdout=self._read(self._out),
            stderr=self._read(self._err),
        )

    def wait(self, timeout: float) -> ChildResult:
        """Wait for the child to exit; kill it and raise TimeoutError (with its stderr) after `timeout`."""
        deadline = time.monotonic() + timeout
        while (result := self.poll()) is None:
            if time.monotonic() > deadline:
                result = self.stop(grace=5.0)
                raise TimeoutError(f"{self.process.args} ran over {timeout:.0f} s:\n{result.stderr[-4000:]}")
            time.sleep(0.05)
        return result

    def stop(self, grace: float = 30.0) -> ChildResult:
        """SIGINT (a clean KeyboardInterrupt in the child), then SIGKILL if it is still there after `grace`."""
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
            if self.process.returncode is None:
                self.process.send_signal(sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if (result := self.poll()) is not None:
                    return result
                time.sleep(0.05)
        raise RuntimeError(f"child {self.process.pid} survived SIGKILL")

    @staticmethod
    def _read(handle: IO[bytes]) -> str:
        handle.seek(0)
        text = handle.read().decode(errors="replace")
        handle.close()
        return text


def thread_cpu_seconds(pid: int | str = "self") -> dict[int, tuple[str, float]]:
    """User + system CPU seconds of each live thread of a process, by thread id: (thread name, seconds),
    from /proc/<pid>/task/*/stat. A thread that exits while it is read is left out."""
    ticks, threads = os.sysconf("SC_CLK_TCK"), {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            stat = (task / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            threads[int(task.name)] = (
                stat[stat.index("(") + 1 : stat.rindex(")")],
                (int(fields[11]) + int(fields[12])) / ticks,
            )
    return threads


def run_child(args: list[str], env: Mapping[str, str], timeout: float) -> ChildResult:
    return Child(args, env).wait(timeout)


def k2_child_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without inherited K2 or Dagster settings, plus K2_HOME and the dev stack's addresses.

    Without DAGSTER_HOME every run uses an ephemeral instance: a benchmark never writes into a real one.
    """
    from k2_resources.settings import read_env_file

    env = {k: v for k, v in os.environ.items() if not k.startswith("K2_") and k != "DAGSTER_HOME"}
    return {**env, **read_env_file(home / "devstack.env"), "K2_HOME": str(home), **extra}


def dagster_child_args(
    select: list[str] | None = None,
    partition: str | None = None,
    job: str | None = None,
    run_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """The command line of a child that materialises `select` for `partition`, or runs `job`."""
    args = [sys.executable, "-m", "bench._common", "run", "--run-config", json.dumps(run_config or {})]
    if job:
        args += ["--job", job]
    if select:
        args += ["--select", ",".join(select)]
    if partition:
        args += ["--partition", partition]
    return args


# --- A private dev stack --------------------------------------------------------------------------------


@contextmanager
def private_stack(home: Path) -> Iterator[DevstackInfo]:
    """A dev stack of its own at `home`, its settings exported into this process while it runs.

    A benchmark must not share a broker or catalog with whatever else runs on the machine: its topics
    start empty and its tables hold only what it wrote.
    """
    from k2_resources.dev.devstack import start_devstack, stop_devstack

    saved = {k: os.environ.get(k) for k in os.environ if k.startswith("K2_")}
    info = start_devstack(home)
    os.environ.update({**info.env(), "K2_HOME": str(home)})
    try:
        yield info
    finally:
        stop_devstack(home)
        for key in [k for k in os.environ if k.startswith("K2_")]:
            del os.environ[key]
        os.environ.update({k: v for k, v in saved.items() if v is not None})


# --- Real Confluent-framed V2 trades --------------------------------------------------------------------


def trade_record(rng: random.Random, sequence: int, at: datetime) -> dict[str, Any]:
    """One Binance-like V2 trade as a producer hands it to the AvroSerializer."""
    symbol = rng.choice(list(SYMBOLS))
    price = Decimal(str(SYMBOLS[symbol] * (1 + rng.uniform(-0.01, 0.01)))).quantize(Decimal("1E-8"))
    return {
        "message_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "trade_id": f"BINANCE-{4_000_000_000 + sequence}",
        "symbol": symbol,
        "exchange": "BINANCE",
        "asset_class": "crypto",
        "timestamp": at,
        "price": price,
        "quantity": Decimal(rng.randint(1, 50_000_000)).scaleb(-8),
        "currency": "USDT",
        "side": rng.choice(("BUY", "SELL")),
        "trade_conditions": [],
        "source_sequence": None,
        "ingestion_timestamp": at + timedelta(milliseconds=rng.randint(1, 50)),
        "platform_sequence": sequence,
        "vendor_data": {"event_type": "trade", "is_buyer_maker": rng.choice(("true", "false"))},
    }


@dataclass(frozen=True)
class FramedTrade:
    """A Kafka record as the producer sends it: key, Confluent-framed Avro value, timestamp."""

    key: bytes
    value: bytes
    timestamp_ms: int


def framed_trades(
    count: int, schema_id: int, first: datetime, spacing: timedelta, seed: int = 7
) -> list[FramedTrade]:
    """`count` distinct trades, `spacing` apart from `first`, framed exactly as AvroSerializer frames them.

    Magic byte 0, the registered schema id (big-endian int32), then the schemaless Avro body written with
    the V2 schema: byte for byte what confluent-kafka's AvroSerializer sends.
    """
    import fastavro

    from k2_resources.trade_schema import trade_v2_parsed

    schema, rng = trade_v2_parsed(), random.Random(seed)
    header = b"\x00" + schema_id.to_bytes(4, "big")
    out = []
    for i in range(count):
        at = first + spacing * i
        record = trade_record(rng, i, at)
        body = io.BytesIO()
        fastavro.schemaless_writer(body, schema, record)
        out.append(
            FramedTrade(record["symbol"].encode(), header + body.getvalue(), int(at.timestamp() * 1000))
        )
    return out


# --- The child side: one Dagster run, summarised ------------------------------------------------------


def _plain(value: Any) -> Any:
    """A metadata value as plain JSON-able data."""
    value = getattr(value, "value", value)
    return value if isinstance(value, str | int | float | bool | dict | list | type(None)) else str(value)


def summarise(result: Any) -> dict[str, Any]:
    """Success, check results, step outputs' and materialisations' metadata, and failures of one run."""
    import dagster as dg

    summary: dict[str, Any] = {"success": result.success, "checks": {}, "outputs": [], "materializations": []}
    summary["errors"] = [
        e.step_failure_data.error.to_string() for e in result.all_events if e.is_step_failure
    ]
    for event in result.all_events:
        data = event.event_specific_data
        if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            metadata = {k: _plain(v) for k, v in data.metadata.items()}
            summary["checks"][data.check_name] = {"passed": data.passed, "metadata": metadata}
        elif event.event_type == dg.DagsterEventType.STEP_OUTPUT:
            metadata = {k: _plain(v) for k, v in data.metadata.items()}
            summary["outputs"].append({"step": event.step_key, "metadata": metadata})
        elif event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
            materialization = data.materialization
            metadata = {k: _plain(v) for k, v in materialization.metadata.items()}
            summary["materializations"].append(
                {"asset": materialization.asset_key.to_user_string(), "metadata": metadata}
            )
    return summary


def run_dagster(args: argparse.Namespace) -> dict[str, Any]:
    """Run the requested job or materialisation in this process and summarise it."""
    import dagster as dg

    from k2_assets.definitions import defs

    config = json.loads(args.run_config)
    with dg.DagsterInstance.ephemeral() as instance:
        if args.job:
            job = defs.resolve_job_def(args.job)
            result = job.execute_in_process(run_config=config, instance=instance, raise_on_error=False)
        else:
            keys = [dg.AssetKey.from_user_string(k) for k in args.select.split(",")]
            job = defs.resolve_implicit_global_asset_job_def()
            result = job.execute_in_process(
                run_config=config,
                instance=instance,
                asset_selection=keys,
                partition_key=args.partition,
                raise_on_error=False,
            )
        return summarise(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench._common", description="Child side of the benchmarks."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one job or materialisation in-process, print a JSON summary")
    run.add_argument("--job")
    run.add_argument(
        "--select", help="asset keys, comma-separated (user strings, e.g. silver_dlq_trades/binance)"
    )
    run.add_argument("--partition")
    run.add_argument("--run-config", default="{}")
    args = parser.parse_args(argv)
    if not args.job and not (args.select and args.partition):
        parser.error("give --job, or --select and --partition")
    summary = run_dagster(args)
    print(RESULT_PREFIX + json.dumps(summary, default=str), flush=True)
    return 0 if summary["success"] else 1


if __name__ == "__main__":
    sys.exit(main())
