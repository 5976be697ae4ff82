"""`k2 dev`: the whole pipeline live on one machine, as a developer (or `make dev`) runs it.

It brings the embedded dev stack up, streams simulated trades of every exchange into it in real time
(with a trickle of faults, so the DLQ and its checks have something to show), prepares the Dagster
instance in $K2_HOME/dagster_home and runs Dagster (one code server, the webserver and the daemon, as
`dagster dev` would but without its proxy processes) with automation on: the ingestion sensors keep
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
from dataclasses import dataclass
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
        help="dev stack + live simulated trades + Dagster (webserver, daemon) with automation on",
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
        return run_dagster(env, args.host, args.port)
    finally:
        stop_processes(simulators)
        if simulators:
            print(f"k2 dev: simulators stopped (logs in {logs}); the dev stack is still up.")


def dev_environment(home: Path) -> dict[str, str]:
    """The dev stack up and the instance prepared: the environment every child process gets."""
    from k2_assets.cli.instance import prepare_dagster_home
    from k2_resources.settings import AUTOMATION, HOME, KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL

    stack = start_devstack_in_child(home)
    print(
        f"k2 dev: dev stack up: Kafka {stack[KAFKA_BOOTSTRAP_SERVERS]}, Schema Registry {stack[SCHEMA_REGISTRY_URL]}"
    )
    dagster_home = prepare_dagster_home(home)
    print(f"k2 dev: DAGSTER_HOME={dagster_home} (instance storage under K2_HOME={home})")
    # The stack just started may listen elsewhere than a stale devstack.env loaded at start-up said.
    return {
        **os.environ,
        KAFKA_BOOTSTRAP_SERVERS: stack[KAFKA_BOOTSTRAP_SERVERS],
        SCHEMA_REGISTRY_URL: stack[SCHEMA_REGISTRY_URL],
        HOME.name: str(home),
        "DAGSTER_HOME": str(dagster_home),
        AUTOMATION.name: "on",
    }


def start_devstack_in_child(home: Path) -> dict[str, str]:
    """`k2 devstack up` as a child process; the addresses it wrote to devstack.env.

    In this process, starting the stack (topics, V2's registration) imports pyarrow, pandas and PyIceberg:
    ~110 MB that `k2 dev` would hold for as long as it runs (bench/README.md, "Live cost").
    """
    from k2_resources.dev.devstack import DevstackError
    from k2_resources.settings import HOME, read_env_file

    command = [sys.executable, "-m", "k2_assets.cli", "devstack", "up"]
    done = subprocess.run(command, env={**os.environ, HOME.name: str(home)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise DevstackError((done.stderr or done.stdout).strip())
    return read_env_file(home / "devstack.env")


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


# The code server loads all of K2 before it listens: minutes on a loaded machine.
CODE_SERVER_START_TIMEOUT_SECONDS = 600.0
# How often `k2 dev` looks whether a Dagster process exited (as `dagster dev` did).
SUPERVISE_SECONDS = 5.0
LOCATION_NAME = "k2"
WORKSPACE_FILENAME = "workspace.yaml"


@dataclass
class DagsterProcesses:
    """What `k2 dev` runs of Dagster, each in a session (and process group) of its own."""

    code_server: subprocess.Popen
    webserver: subprocess.Popen | None = None
    daemon: subprocess.Popen | None = None

    def started(self) -> list[tuple[str, subprocess.Popen]]:
        named = (("code server", self.code_server), ("webserver", self.webserver), ("daemon", self.daemon))
        return [(name, process) for name, process in named if process is not None]


def run_dagster(env: dict[str, str], host: str, port: int) -> int:
    """Run Dagster's code server, webserver and daemon until one exits or this command is stopped.

    Not `dagster dev`: it runs the code server behind a proxy process (`dagster code-server start`) and
    itself besides, two Python processes that cost ~3.4 % of a core at rest (bench/README.md, "Live
    cost"). Here one `dagster api grpc` serves the location and the webserver and daemon reach it
    through a workspace written into DAGSTER_HOME. Ctrl-C or SIGTERM stops the daemon and webserver,
    cancels the runs left (through the code server, whose children the run workers are), then stops
    the code server; every process group is then emptied, so nothing outlives `k2 dev`.
    """
    from k2_resources.dev.devstack.kafka import free_ports

    (code_port,) = free_ports(1)
    workspace = write_workspace(Path(env["DAGSTER_HOME"]), DEFAULT_HOST, code_port)
    processes = DagsterProcesses(start_code_server(env, code_port))
    with sigterm_interrupts():
        try:
            wait_until_serving(processes.code_server, code_port, CODE_SERVER_START_TIMEOUT_SECONDS)
            print(
                f"k2 dev: code server on {DEFAULT_HOST}:{code_port}; Dagster on http://{host}:{port} (Ctrl-C stops it)"
            )
            processes.webserver = start_dagster_process(env, webserver_command(workspace, host, port))
            processes.daemon = start_dagster_process(env, daemon_command(workspace))
            return supervise(processes)
        except KeyboardInterrupt:
            return 0
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stopping short
            stop_dagster(processes)


def write_workspace(dagster_home: Path, host: str, code_port: int) -> Path:
    """The workspace of the webserver and daemon: the one code server `k2 dev` started. The repository's
    workspace.yaml (a python_module each process loads itself) stays as it is for `dg dev`/`dagster dev`."""
    import yaml

    server = {"host": host, "port": code_port, "location_name": LOCATION_NAME}
    path = dagster_home / WORKSPACE_FILENAME
    path.write_text(yaml.safe_dump({"load_from": [{"grpc_server": server}]}))
    return path


# The code server, webserver and daemon run through k2_assets/cli/quiet_dagster.py: Dagster's own modules,
# with the polling of a code server that `k2 dev` never restarts in place slowed down (most of their CPU
# at rest).
QUIET_DAGSTER = [sys.executable, "-m", "k2_assets.cli.quiet_dagster"]


def start_code_server(env: dict[str, str], code_port: int) -> subprocess.Popen:
    """`dagster api grpc` serving k2_assets.definitions; its log level is the one `dagster dev` gave it."""
    from k2_assets.cli.instance import REPO_ROOT

    command = [*QUIET_DAGSTER, "dagster", "api", "grpc", "--host", DEFAULT_HOST, "--port", str(code_port)]
    command += ["-m", "k2_assets.definitions", "-a", "defs", "-d", str(REPO_ROOT)]
    command += ["--location-name", LOCATION_NAME, "--log-level", "warning"]
    return start_dagster_process(env, command)


def webserver_command(workspace: Path, host: str, port: int) -> list[str]:
    return [*QUIET_DAGSTER, "dagster_webserver", "-h", host, "-p", str(port), "-w", str(workspace)]


def daemon_command(workspace: Path) -> list[str]:
    return [*QUIET_DAGSTER, "dagster._daemon", "run", "-w", str(workspace)]


def start_dagster_process(env: dict[str, str], command: list[str]) -> subprocess.Popen:
    """In a session of its own: a terminal's Ctrl-C reaches only `k2 dev`, which decides the order of stopping."""
    from k2_assets.cli.instance import REPO_ROOT

    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, start_new_session=True, preexec_fn=default_sigint
    )


def wait_until_serving(process: subprocess.Popen, port: int, timeout: float) -> None:
    """Until the code server accepts connections. It binds its port only after loading the definitions,
    so a connection means the webserver and daemon will find the location loaded."""
    from k2_resources.dev.processes import wait_until_listening

    try:
        listening = wait_until_listening(
            DEFAULT_HOST, port, time.monotonic() + timeout, lambda: process.poll() is None, poll_seconds=0.5
        )
    except TimeoutError:
        raise SystemExit(
            f"k2 dev: the code server did not serve on port {port} within {timeout:.0f} s"
        ) from None
    if not listening:
        raise SystemExit(f"k2 dev: the code server exited with {process.returncode} before it served")


def supervise(processes: DagsterProcesses) -> int:
    """Wait until a Dagster process exits (an error: they run until stopped), as `dagster dev` did."""
    while True:
        for name, process in processes.started():
            if process.poll() is not None:
                print(f"k2 dev: the {name} exited with {process.returncode}", file=sys.stderr)
                return process.returncode or 1
        time.sleep(SUPERVISE_SECONDS)


def stop_dagster(processes: DagsterProcesses) -> None:
    """Daemon and webserver first (no new runs), then cancel the runs left while the code server can
    still terminate them, then the code server; last, empty each process group."""
    from k2_resources.dev.processes import stop_process_group

    for process in (processes.daemon, processes.webserver):
        interrupt(process)
    for process in (processes.daemon, processes.webserver):
        if process is not None:
            wait_or_kill(process, STOP_TIMEOUT_SECONDS)
    if processes.code_server.poll() is None:
        with contextlib.suppress(KeyboardInterrupt):
            cancel_active_runs()
    interrupt(processes.code_server)
    wait_or_kill(processes.code_server, STOP_TIMEOUT_SECONDS)
    for name, process in processes.started():
        left = stop_process_group(process.pid, STOP_TIMEOUT_SECONDS, wait_first=True)
        if left:
            print(
                f"k2 dev: processes {[p.pid for p in left]} of the {name}'s group would not stop",
                file=sys.stderr,
            )


def interrupt(process: subprocess.Popen | None) -> None:
    """SIGINT, as Ctrl-C in its own terminal would: Dagster's processes shut down cleanly on it."""
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGINT)


def default_sigint() -> None:
    """In the child: let SIGINT interrupt again. A shell starts background jobs with SIGINT ignored, and
    Python then never installs its handler, so Dagster would ignore Ctrl-C and SIGTERM alike."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While Dagster runs, SIGTERM to this process stops it as Ctrl-C would."""

    def interrupt_main(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt_main)
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

    Stopping the daemon and webserver leaves runs in progress: their workers are the code server's
    children, and the long-lived ingestion runs would go on consuming for up to an hour. The launcher
    cancels a run through its code server, so this runs before that server is stopped.
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
