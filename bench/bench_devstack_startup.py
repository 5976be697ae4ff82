"""Benchmark: how long `k2 devstack up` takes, i.e. what a test fixture pays for a real Kafka broker.

For `--rounds` fresh K2_HOMEs it times, as a user runs them (`k2` subprocesses):
- cold: `up` on an empty home (format the KRaft log dirs, start the JVM, create the topics, register V2);
- warm: `down` then `up` again (the same data, a clean shutdown before);
- after SIGKILL: the broker killed, then `up` (log recovery, the dead broker's session expiring);
and, as the same-run baseline, `up` with `K2_DEVSTACK_KAFKA=mock` (librdkafka's in-memory mock cluster).
It prints the median and range of each, and the broker's resident memory after start-up.

    .venv/bin/python bench/bench_devstack_startup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k2_resources.dev.devstack import kafka as dev_kafka  # noqa: E402


def k2(home: Path, *args: str, **env: str) -> float:
    """Run `k2 ...` with K2_HOME=home; the wall time in seconds."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("K2_")}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "k2_assets.cli", *args],
        env={**environment, "K2_HOME": str(home), **env},
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def one_round(root: Path) -> dict[str, float]:
    home = root / "apache"
    times = {"cold": k2(home, "devstack", "up")}
    rss = psutil.Process(dev_kafka.live_broker(home)).memory_info().rss / 2**20
    k2(home, "devstack", "down")
    times["warm"] = k2(home, "devstack", "up")
    os.kill(dev_kafka.live_broker(home), signal.SIGKILL)
    time.sleep(0.2)
    times["after SIGKILL"] = k2(home, "devstack", "up")
    k2(home, "devstack", "down")
    mock = root / "mock"
    times["mock (baseline)"] = k2(mock, "devstack", "up", K2_DEVSTACK_KAFKA="mock")
    k2(mock, "devstack", "down")
    times["broker RSS MiB"] = rss
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dev_kafka.install_jars()
    rounds = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            rounds.append(one_round(Path(tmp)))
    print(f"k2 devstack up, {dev_kafka.describe()}, {args.rounds} rounds (seconds, median [min-max]):")
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        print(f"  {key:18s} {statistics.median(values):7.2f}  [{min(values):.2f}-{max(values):.2f}]")
    ratio = statistics.median(r["cold"] for r in rounds) / statistics.median(
        r["mock (baseline)"] for r in rounds
    )
    print(f"  cold start / mock start: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
