"""Start, stop and inspect the dev stack: a Kafka broker and a Schema Registry host (`serve`).

Two detached processes per K2_HOME, each found again through its pid file:
- the Kafka broker, a real Apache Kafka JVM (`k2_resources.dev.devstack.kafka`, files under
  `$K2_HOME/devstack/kafka/`), whose records and offsets survive `down`, `up` and a SIGKILL;
- the host (`python -m k2_resources.dev.devstack.stack serve`), which serves the Schema Registry, and holds
  librdkafka's mock cluster instead of a broker when `K2_DEVSTACK_KAFKA=mock` (no Java).

`up` starts whichever of them is not running, so a broker killed with SIGKILL comes back by `up` on
its old ports with its data. Files under `$K2_HOME/devstack/`:

- `devstack.pid`: the host's pid, written by `up`; a pid whose process is gone, or is not a dev stack
  host for this K2_HOME (pid reuse), is stale and cleaned up, never signalled.
- `addresses.json`: written by the host once it answers; `up` waits for it.
- `devstack.log`: the host's output; `up` shows its tail when the host fails to start.
- `registry.json`: the registry's state; it survives `down`, so schema ids are stable across restarts.
- `lock`: serialises `up` and `down` for one K2_HOME.

`$K2_HOME/devstack.env` (the addresses every K2 process loads) exists only while the stack is up.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from k2_resources.dev.devstack import kafka as broker
from k2_resources.dev.devstack.broker import TopicWatermarks, probe_topics
from k2_resources.exchanges import EXCHANGES
from k2_resources.settings import KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL, k2_home

HOST_MODULE = "k2_resources.dev.devstack.stack"
HOST = "127.0.0.1"
MOCK_KAFKA = "librdkafka mock cluster (fallback: in memory, lost on restart)"
LOG_TAIL_LINES = 40
REGISTRY_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"

# Popen objects of hosts started by this process, so stopping one also reaps it (no zombie that
# would look alive) and no ResourceWarning is raised for a child that is meant to outlive the call.
_SPAWNED: dict[int, subprocess.Popen[bytes]] = {}


class DevstackError(RuntimeError):
    """The dev stack could not be started or reached; the message says why and what the log said."""


@dataclass(frozen=True)
class DevstackInfo:
    """A running dev stack: where its services listen."""

    home: Path
    pid: int
    bootstrap_servers: str
    registry_url: str
    kafka: str = ""  # which Kafka serves bootstrap_servers, for people: "Apache Kafka 4.1.1 (...)"
    broker_pid: int | None = None  # the broker's own process (None for the mock cluster in the host)
    already_running: bool = False
    startup_seconds: float | None = None
    schema_ids: dict[str, int] = field(default_factory=dict)

    @property
    def serving(self) -> bool:
        """Both parts run: the host, and the broker process (or the mock cluster inside the host)."""
        return self.kafka == MOCK_KAFKA or self.broker_pid is not None

    def env(self) -> dict[str, str]:
        """The settings K2 reads (the contents of devstack.env)."""
        return {KAFKA_BOOTSTRAP_SERVERS: self.bootstrap_servers, SCHEMA_REGISTRY_URL: self.registry_url}


@dataclass(frozen=True)
class DevstackStatus:
    """What `status` found: the host, and whether each service answered a client."""

    info: DevstackInfo | None
    stale_pid: int | None = None
    unpublished_pid: int | None = None  # a host that runs but has not published addresses (starting?)
    topics: TopicWatermarks = field(default_factory=dict)
    kafka_error: str | None = None
    registry_error: str | None = None
    registry_subjects: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.info is not None

    @property
    def healthy(self) -> bool:
        return self.running and self.kafka_error is None and self.registry_error is None


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _home(home: Path | str | None) -> Path:
    """The K2_HOME to use, absolute and created (the host's identity check compares this path)."""
    if home is None:
        return k2_home()
    path = Path(home).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_dir(home: Path) -> Path:
    """Not created here: an exiting host must not recreate a K2_HOME that was deleted under it."""
    return home / "devstack"


def pid_path(home: Path) -> Path:
    return state_dir(home) / "devstack.pid"


def log_path(home: Path) -> Path:
    return state_dir(home) / "devstack.log"


def addresses_path(home: Path) -> Path:
    return state_dir(home) / "addresses.json"


def registry_state_path(home: Path) -> Path:
    return state_dir(home) / "registry.json"


def env_path(home: Path) -> Path:
    return home / "devstack.env"


def _write_atomically(path: Path, text: str) -> None:
    """Readers in other processes see the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_env(home: Path, info: DevstackInfo) -> None:
    lines = [f"# Written by `k2 devstack up` (host pid {info.pid}); removed by `k2 devstack down`."]
    lines += [f"{key}={value}" for key, value in info.env().items()]
    _write_atomically(env_path(home), "\n".join(lines) + "\n")


def _clear_runtime_files(home: Path) -> None:
    """Remove what describes a running stack; registry.json and the log stay."""
    for path in (pid_path(home), addresses_path(home), env_path(home)):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(home: Path) -> Iterator[None]:
    """Serialise up/down for one K2_HOME, so two `up`s cannot start two hosts."""
    state_dir(home).mkdir(parents=True, exist_ok=True)
    with open(state_dir(home) / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def log_tail(home: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines the host wrote since `offset` (the log is appended to across restarts)."""
    path = log_path(home)
    if not path.exists():
        return "(no log written)"
    with open(path, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


# --------------------------------------------------------------------------------------------------
# The host process, seen from outside
# --------------------------------------------------------------------------------------------------


def _is_alive(pid: int) -> bool:
    """Running and not a zombie; a zombie we spawned is reaped here."""
    spawned = _SPAWNED.get(pid)
    if spawned is not None and spawned.poll() is not None:
        del _SPAWNED[pid]
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_host_for(pid: int, home: Path) -> bool:
    """Whether `pid` is this K2_HOME's host, so a reused pid is never mistaken for (or signalled as) it."""
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return HOST_MODULE in cmdline and str(home) in cmdline and "serve" in cmdline


def _live_host(home: Path) -> tuple[int | None, int | None]:
    """(pid of the running host, stale pid) from the pid file; stale files are removed."""
    try:
        pid = int(pid_path(home).read_text().strip())
    except (FileNotFoundError, ValueError):
        pid = None
    if pid is not None and _is_alive(pid) and _is_host_for(pid, home):
        return pid, None
    if pid is not None or env_path(home).exists():
        _clear_runtime_files(home)
    return None, pid


def _read_addresses(home: Path, pid: int) -> DevstackInfo | None:
    """The stack as the host `pid` published it, or None if it has not published (yet).

    With a real broker the host publishes only the registry; the broker's address is its own
    (`ports.json`), and `broker_pid` is None while its process is not running.
    """
    try:
        data = json.loads(addresses_path(home).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if data.get("pid") != pid:
        return None
    if data.get("kafka") == "mock":
        bootstrap, kafka, broker_pid = data["bootstrap_servers"], MOCK_KAFKA, None
    else:
        broker_pid = broker.live_broker(home)
        try:
            bootstrap, kafka = broker.bootstrap_servers(home), broker.describe()
        except FileNotFoundError:
            return None
    return DevstackInfo(
        home=home,
        pid=pid,
        bootstrap_servers=bootstrap,
        registry_url=data["registry_url"],
        kafka=kafka,
        broker_pid=broker_pid,
    )


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL: the host shuts its servers down on SIGTERM."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _is_alive(pid):
                return
            time.sleep(0.02)
    if _is_alive(pid):
        raise DevstackError(f"The dev stack host (pid {pid}) did not exit after SIGKILL")


def _spawn(home: Path, registry_port: int, mock_kafka: bool) -> subprocess.Popen[bytes]:
    """Start the host detached (own session, no terminal), its output appended to the log."""
    command = [sys.executable, "-m", HOST_MODULE, "serve", "--home", str(home)]
    command += ["--registry-port", str(registry_port), *(["--mock-kafka"] if mock_kafka else [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path(home), "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    _SPAWNED[process.pid] = process
    return process


def _wait_published(home: Path, process: subprocess.Popen[bytes], timeout: float, log_offset: int) -> None:
    """Wait until the host publishes its addresses; fail early, with the log tail, if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if json.loads(addresses_path(home).read_text()).get("pid") == process.pid:
                return
        code = process.poll()
        if code is not None:
            _SPAWNED.pop(process.pid, None)
            raise DevstackError(
                f"The dev stack host exited with code {code} while starting. "
                f"Last lines of {log_path(home)}:\n{log_tail(home, log_offset)}"
            )
        time.sleep(0.02)
    raise DevstackError(
        f"The dev stack host (pid {process.pid}) did not become ready within {timeout:.0f} s. "
        f"Last lines of {log_path(home)}:\n{log_tail(home, log_offset)}"
    )


def _start_broker(home: Path, kafka_port: int, timeout: float) -> int:
    """Start this K2_HOME's Kafka broker and wait until it serves metadata; returns its pid."""
    log = broker.broker_log_path(home)
    log_offset = log.stat().st_size if log.exists() else 0
    try:
        process, ports = broker.spawn_broker(home, kafka_port)
    except broker.KafkaSetupError as err:
        raise DevstackError(str(err)) from err
    _SPAWNED[process.pid] = process
    try:
        broker.wait_until_serving(f"{HOST}:{ports.plaintext}", timeout, alive=lambda: process.poll() is None)
    except broker.KafkaSetupError as err:
        with contextlib.suppress(DevstackError):
            _terminate(process.pid, timeout=5.0)
        tail = _file_tail(log, log_offset)
        raise DevstackError(f"Kafka did not start: {err}. Last lines of {log}:\n{tail}") from err
    return process.pid


def _file_tail(path: Path, offset: int) -> str:
    if not path.exists():
        return "(no log written)"
    with open(path, "rb") as handle:
        handle.seek(offset)
        return "\n".join(handle.read().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]) or "(empty)"


def register_exchange_schemas(registry_url: str, timeout: float = 10.0) -> dict[str, int]:
    """Register the V2 trade schema under `<topic>-value` for every exchange: subject -> schema id.

    Plain HTTP rather than `SchemaRegistryClient`: importing the client costs ~0.6 s on every `up`, and
    the request is the same one the client sends (POST /subjects/{subject}/versions).
    """
    from k2_resources.trade_schema import trade_v2_schema_str

    body = {"schema": trade_v2_schema_str(), "schemaType": "AVRO", "references": []}
    return {
        exchange.subject: registry_request(
            registry_url, "POST", f"subjects/{quote(exchange.subject, safe='')}/versions", body, timeout
        )["id"]
        for exchange in EXCHANGES
    }


def registry_request(
    registry_url: str, method: str, path: str, body: Any = None, timeout: float = 5.0
) -> Any:
    """One registry call; an error answer becomes DevstackError with Confluent's code and message."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{registry_url}/{path}", data=data, method=method, headers={"Content-Type": REGISTRY_CONTENT_TYPE}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise DevstackError(
            f"{method} {registry_url}/{path} answered {err.code}: {err.read().decode()}"
        ) from err


def probe_registry(registry_url: str, timeout: float = 5.0) -> list[str]:
    """The registry's subjects, read over HTTP as a client would: proves it answers."""
    return registry_request(registry_url, "GET", "subjects", timeout=timeout)


# --------------------------------------------------------------------------------------------------
# Public API: up, down, status
# --------------------------------------------------------------------------------------------------


def start_devstack(
    home: Path | str | None = None, registry_port: int = 0, timeout: float = 60.0, kafka_port: int = 0
) -> DevstackInfo:
    """Start the dev stack for `home` (default: K2_HOME): whichever of broker and host is not running.

    Returns only when the exchange topics exist (created through the Admin API with each exchange's
    partition count and retention), a consumer in this process can assign them and read their
    watermarks, and V2 is registered for every exchange; then writes devstack.env. On any failure
    what this call started is stopped and DevstackError says why (with the log's tail).
    """
    home = _home(home)
    try:
        mock = broker.kafka_impl() == "mock"
    except broker.KafkaSetupError as err:
        raise DevstackError(str(err)) from err
    with _exclusive(home):
        host_pid, _ = _live_host(home)
        running = _read_addresses(home, host_pid) if host_pid is not None else None
        if running is not None and running.serving:
            return _running_info(home, running)
        started = time.monotonic()
        started_pids: list[int] = []
        try:
            if host_pid is None:
                log_offset = log_path(home).stat().st_size if log_path(home).exists() else 0
                process = _spawn(home, registry_port, mock)
                pid_path(home).write_text(f"{process.pid}\n")
                started_pids.append(process.pid)
                host_pid = process.pid
            if mock:
                print(
                    f"k2 devstack: using {MOCK_KAFKA} because {broker.DEVSTACK_KAFKA.name}=mock",
                    file=sys.stderr,
                )
            elif broker.live_broker(home) is None:
                started_pids.append(_start_broker(home, kafka_port, timeout))
            if host_pid in started_pids:
                _wait_published(home, _SPAWNED[host_pid], timeout, log_offset)
            info = _read_addresses(home, host_pid)
            if info is None:
                raise DevstackError(f"The dev stack host (pid {host_pid}) published no usable addresses")
            topics = [e.topic for e in EXCHANGES]
            if not mock:
                broker.ensure_topics(info.bootstrap_servers, EXCHANGES, timeout=timeout)
            probe_topics(info.bootstrap_servers, topics, timeout=timeout)
            schema_ids = register_exchange_schemas(info.registry_url)
            _write_env(home, info)
        except BaseException as err:
            for pid in reversed(started_pids):
                with contextlib.suppress(DevstackError):
                    _terminate(pid, timeout=5.0)
            if host_pid in started_pids:
                _clear_runtime_files(home)
            if isinstance(err, DevstackError | KeyboardInterrupt):
                raise
            raise DevstackError(
                f"The dev stack started but is not usable: {err}. Last lines of {log_path(home)}:\n"
                f"{log_tail(home)}"
            ) from err
        return replace(info, startup_seconds=time.monotonic() - started, schema_ids=schema_ids)


def _running_info(home: Path, info: DevstackInfo) -> DevstackInfo:
    """A stack whose broker and host both run (devstack.env restored if someone removed it)."""
    if not env_path(home).exists():
        _write_env(home, info)
    return replace(info, already_running=True)


def stop_devstack(home: Path | str | None = None, timeout: float = 10.0) -> int | None:
    """Stop the dev stack for `home`: the stopped host's pid, or None if no host was running.

    The real broker's records and offsets stay under `$K2_HOME/devstack/kafka/data` for the next
    `up`; the mock cluster's are gone. The registry's state is kept either way.
    """
    home = _home(home)
    with _exclusive(home):
        pid, _ = _live_host(home)
        broker_pid = broker.live_broker(home)
        if broker_pid is not None:
            _terminate(broker_pid, timeout)  # SIGTERM: a clean shutdown, so the next start needs no recovery
            broker.broker_pid_path(home).unlink(missing_ok=True)
        if pid is not None:
            _terminate(pid, timeout)
        _clear_runtime_files(home)
        return pid if pid is not None else broker_pid


def devstack_status(home: Path | str | None = None, timeout: float = 5.0) -> DevstackStatus:
    """Whether the host and broker run and whether Kafka and the registry answer a client right now."""
    home = _home(home)
    pid, stale = _live_host(home)
    info = _read_addresses(home, pid) if pid is not None else None
    if pid is None or info is None:
        return DevstackStatus(info=None, stale_pid=stale, unpublished_pid=pid)
    topics, kafka_error, subjects, registry_error = {}, None, [], None
    try:
        if not info.serving:
            raise DevstackError(
                f"the Kafka broker is not running ({broker.broker_log_path(home)}); run `k2 devstack up`"
            )
        topics = probe_topics(info.bootstrap_servers, [e.topic for e in EXCHANGES], timeout=timeout)
    except Exception as err:  # any failure means "not reachable"; the message is the diagnosis
        kafka_error = str(err)
    try:
        subjects = probe_registry(info.registry_url, timeout=timeout)
    except Exception as err:
        registry_error = str(err)
    return DevstackStatus(
        info=info,
        topics=topics,
        kafka_error=kafka_error,
        registry_error=registry_error,
        registry_subjects=subjects,
    )


# --------------------------------------------------------------------------------------------------
# The host process
# --------------------------------------------------------------------------------------------------


def serve(home: Path, registry_port: int, mock_kafka: bool = False) -> int:
    """Run the registry (and, as a fallback, the mock cluster) until SIGTERM/SIGINT; publish addresses."""
    from k2_resources.dev.devstack.registry import SchemaStore, start_registry_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("k2.devstack")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    log.info("starting dev stack host pid %d for %s", os.getpid(), home)
    store = SchemaStore(registry_state_path(home))
    addresses: dict[str, Any] = {"pid": os.getpid(), "kafka": "mock" if mock_kafka else "apache"}
    mock = None
    if mock_kafka:
        from k2_resources.dev.devstack.broker import MockBroker

        log.warning("Kafka is %s, not a real broker", MOCK_KAFKA)
        mock = MockBroker()
        addresses["bootstrap_servers"] = mock.bootstrap_servers
        log.info(
            "mock kafka %s, topics %s",
            mock.bootstrap_servers,
            mock.ensure_topics([e.topic for e in EXCHANGES]),
        )
    server = start_registry_server(store, HOST, registry_port)
    _publish(home, {**addresses, "registry_url": server.url})
    log.info("ready: schema registry %s", server.url)
    broker_pid = None
    while not stop.wait(0.5):
        broker_pid = broker.live_broker(home) if broker.broker_pid_path(home).exists() else broker_pid
        reason = _orphaned(home)
        if reason:
            log.warning("exiting: %s", reason)
            if broker_pid is not None and broker.is_broker_for(broker_pid, home):
                log.warning("stopping the orphaned Kafka broker (pid %d) too", broker_pid)
                with contextlib.suppress(DevstackError):
                    _terminate(broker_pid, timeout=5.0)
            break
    log.info("stopping")
    server.shutdown()
    server.server_close()
    if mock is not None:
        mock.close()
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        if json.loads(addresses_path(home).read_text()).get("pid") == os.getpid():
            addresses_path(home).unlink()
    log.info("stopped")
    return 0


def _orphaned(home: Path) -> str | None:
    """Why this host should exit although nobody stopped it, or None.

    A host whose K2_HOME was deleted (pytest's old temporary folders, `rm -rf .k2`) can never be found
    by `down` again; without this check such hosts (and their brokers) would pile up, each holding
    ports and memory.
    """
    if not (home / "devstack").is_dir():
        return f"{home / 'devstack'} was removed"
    try:
        named = int((home / "devstack" / "devstack.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return None if named == os.getpid() else f"the pid file names another host ({named})"


def _publish(home: Path, addresses: dict[str, Any]) -> None:
    _write_atomically(addresses_path(home), json.dumps(addresses, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m k2_resources.dev.devstack.stack serve --home H [--registry-port P]` (started by `up`)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {HOST_MODULE}", description="The dev stack host process."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the mock Kafka cluster and the schema registry")
    serve_parser.add_argument("--home", type=Path, required=True)
    serve_parser.add_argument("--registry-port", type=int, default=0)
    serve_parser.add_argument("--mock-kafka", action="store_true", help="host librdkafka's mock cluster")
    args = parser.parse_args(argv)
    return serve(args.home.resolve(), args.registry_port, args.mock_kafka)


if __name__ == "__main__":
    sys.exit(main())
