"""`k2 dev`: the whole pipeline live on one machine, as a developer (or `make dev`) runs it.

It brings the embedded dev stack up, streams simulated trades of every exchange into it in real time
(with a trickle of faults, so the DLQ and its checks have something to show), prepares the Dagster
instance in $K2_HOME/dagster_home and runs `dagster dev` with automation on: the ingestion sensors keep
Bronze running and the automation sensor refreshes Silver and Gold. Ctrl-C (or SIGTERM) stops Dagster
and the simulators; the dev stack stays up (`k2 devstack down` stops it).

Every `k2` command imports this module to build its parser, so Dagster is imported only inside
functions that need it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

DEFAULT_PORT = 3000
DEFAULT_HOST = "127.0.0.1"
DEFAULT_RATE = 20.0
DEFAULT_FAULTS = "all=0.002"
# Records per simulator: at 20 trades/s this streams for well over a year, i.e. until stopped.
SIMULATOR_COUNT = 1_000_000_000
STOP_TIMEOUT_SECONDS = 30.0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `dev` to the `k2` command."""
    parser = subparsers.add_parser(
        "dev",
        help="dev stack + live simulated trades + `dagster dev` with automation on",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"webserver host (default {DEFAULT_HOST})")
    parser.add_argument(
        "-p", "--port", type=int, default=DEFAULT_PORT, help=f"webserver port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--rate", type=float, default=DEFAULT_RATE, help="simulated trades per second per exchange"
    )
    parser.add_argument(
        "--faults", default=DEFAULT_FAULTS, help=f"simulator faults (default {DEFAULT_FAULTS})"
    )
    parser.add_argument("--no-simulator", action="store_true", help="do not stream simulated trades")
    parser.set_defaults(func=cmd_dev)


def cmd_dev(args: argparse.Namespace) -> int:
    """Run until Dagster exits or the user interrupts; always stop what this command started."""
    from k2_resources.dev.devstack import DevstackError
    from k2_resources.settings import k2_home

    home = k2_home()
    require_free_port(args.host, args.port)
    try:
        env = dev_environment(home)
    except DevstackError as err:
        print(f"k2 dev: the dev stack did not start: {err}", file=sys.stderr)
        return 1
    logs = home / "dev"
    logs.mkdir(exist_ok=True)
    simulators: list[subprocess.Popen] = []
    try:
        if not args.no_simulator:
            simulators = start_simulators(env, args.rate, args.faults, logs)
        return run_dagster_dev(env, args.host, args.port)
    finally:
        stop_processes(simulators)
        if simulators:
            print(f"k2 dev: simulators stopped (logs in {logs}); the dev stack is still up.")


def dev_environment(home: Path) -> dict[str, str]:
    """The dev stack up and the instance prepared: the environment every child process gets."""
    from k2_assets.cli.instance import prepare_dagster_home
    from k2_resources.dev.devstack import start_devstack
    from k2_resources.settings import AUTOMATION, HOME, KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL

    info = start_devstack(home)
    print(f"k2 dev: dev stack up: Kafka {info.bootstrap_servers}, Schema Registry {info.registry_url}")
    dagster_home = prepare_dagster_home(home)
    print(f"k2 dev: DAGSTER_HOME={dagster_home} (instance storage under K2_HOME={home})")
    # The stack just started may listen elsewhere than a stale devstack.env loaded at start-up said.
    return {
        **os.environ,
        KAFKA_BOOTSTRAP_SERVERS: info.bootstrap_servers,
        SCHEMA_REGISTRY_URL: info.registry_url,
        HOME.name: str(home),
        "DAGSTER_HOME": str(dagster_home),
        AUTOMATION.name: "on",
    }


def require_free_port(host: str, port: int) -> None:
    """Fail before starting anything when the webserver's port is taken (another `k2 dev`?)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise SystemExit(f"k2 dev: {host}:{port} is not free ({err}); pick another with --port") from err


def start_simulators(env: dict[str, str], rate: float, faults: str, logs: Path) -> list[subprocess.Popen]:
    """One `k2 produce --realtime` per exchange, each in a session of its own: a terminal's Ctrl-C reaches
    only this command, which stops them after Dagster."""
    from k2_resources.exchanges import EXCHANGES

    processes = []
    for exchange in EXCHANGES:
        command = [
            sys.executable,
            "-m",
            "k2_assets.cli",
            "produce",
            "--exchange",
            exchange.name,
            "--count",
            str(SIMULATOR_COUNT),
            "--rate",
            str(rate),
            "--realtime",
            "--faults",
            faults,
        ]
        log = (logs / f"simulator-{exchange.name}.log").open("ab")
        processes.append(
            subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
        log.close()
        print(f"k2 dev: simulating {exchange.name} at {rate:g} trades/s with faults {faults}")
    return processes


def run_dagster_dev(env: dict[str, str], host: str, port: int) -> int:
    """Run `dagster dev` on the repository's workspace until it exits or this command is stopped.

    Dagster runs in a session of its own, so this command alone decides how it stops: Ctrl-C or
    SIGTERM here becomes one SIGINT there. Afterwards the runs it left are cancelled and whatever
    it spawned (code servers, run workers) is waited for, so nothing outlives `k2 dev`.
    """
    from k2_assets.cli.instance import REPO_ROOT, WORKSPACE_FILE
    from k2_resources.dev.processes import stop_process_group

    command = [sys.executable, "-m", "dagster", "dev", "-h", host, "-p", str(port), "-w", str(WORKSPACE_FILE)]
    print(f"k2 dev: starting Dagster on http://{host}:{port} (Ctrl-C stops it)")
    print(
        "k2 dev: (its warning about ./dagster.yaml is expected: that file is the template of DAGSTER_HOME's)"
    )
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, start_new_session=True, preexec_fn=default_sigint
    )
    try:
        with forward_sigterm(process):
            try:
                return process.wait()
            except KeyboardInterrupt:
                process.send_signal(signal.SIGINT)
                return wait_or_kill(process, STOP_TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            wait_or_kill(process, STOP_TIMEOUT_SECONDS)
        cancel_active_runs()
        left = stop_process_group(process.pid, STOP_TIMEOUT_SECONDS, wait_first=True)
        if left:
            print(
                f"k2 dev: processes {[p.pid for p in left]} of Dagster's group would not stop",
                file=sys.stderr,
            )


def default_sigint() -> None:
    """In the child: let SIGINT interrupt again. A shell starts background jobs with SIGINT ignored, and
    Python then never installs its handler, so `dagster dev` would ignore Ctrl-C and SIGTERM alike."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def forward_sigterm(process: subprocess.Popen) -> Iterator[None]:
    """While `process` runs, SIGTERM to this process asks it to stop as Ctrl-C would."""

    def forward(signum: int, frame: FrameType | None) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_or_kill(process: subprocess.Popen, timeout: float) -> int:
    """Wait for `process` to exit, then kill it; its exit code either way."""
    with contextlib.suppress(KeyboardInterrupt):
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    process.kill()
    return process.wait()


def cancel_active_runs(timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """Cancel the runs Dagster left behind and wait for them to end.

    `dagster dev` exits without stopping runs in progress: their code server stays up for them, and
    the long-lived ingestion runs would go on consuming for up to an hour after `k2 dev` returned.
    Cancelling is safe for Bronze (an uncommitted batch is read again by the next run) and leaves no
    run STARTED in the instance, which would keep the ingestion sensor from launching the next one.
    """
    import dagster as dg

    statuses = [
        dg.DagsterRunStatus.QUEUED,
        dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED,
        dg.DagsterRunStatus.CANCELING,
    ]
    with dg.DagsterInstance.get() as instance:
        active = instance.get_run_records(filters=dg.RunsFilter(statuses=statuses))
        for record in active:
            instance.run_coordinator.cancel_run(record.dagster_run.run_id)
        deadline = time.monotonic() + timeout
        while active and time.monotonic() < deadline:
            time.sleep(1.0)
            active = instance.get_run_records(filters=dg.RunsFilter(statuses=statuses))
    if active:
        names = ", ".join(f"{r.dagster_run.job_name} {r.dagster_run.run_id}" for r in active)
        print(f"k2 dev: runs still in progress after {timeout:.0f} s: {names}", file=sys.stderr)


def stop_processes(processes: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM each process, then SIGKILL whatever still runs after `timeout`."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
