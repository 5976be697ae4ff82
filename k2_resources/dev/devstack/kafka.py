"""The dev stack's Kafka: a real Apache Kafka broker (KRaft, one node) run from the Apache jars.

The jars come from Maven Central (`org.apache.kafka:kafka_2.13` and its runtime dependencies), resolved
by Maven once and cached outside any K2_HOME (`~/.cache/k2/`, or `K2_KAFKA_JARS`), so every dev stack and
test on the machine shares one copy. Each K2_HOME has its own broker under `$K2_HOME/devstack/kafka/`:

- `server.properties`: written on every start from the ports in `ports.json` (kept, so addresses stay
  stable across `down`/`up` and a restarted broker is where clients last saw it);
- `data/`: the KRaft metadata and log dirs, formatted once; they survive `down`, `up` and a SIGKILL, so
  records and committed consumer-group offsets are kept;
- `kafka.pid`, `broker.log`; `sasl.json`: the generated credentials of the SASL/PLAIN listener, which lets
  tests (and users) try a secured cluster by configuration only.

librdkafka's in-memory mock cluster remains an explicit fallback for machines without Java
(`K2_DEVSTACK_KAFKA=mock`); it keeps ~5 MB per partition and loses everything on restart.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from k2_resources.dev.processes import wait_until_listening
from k2_resources.exchanges import ExchangeConfig
from k2_resources.settings import DEVSTACK_KAFKA, KAFKA_JARS

KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
LOG4J_VERSION = "2.24.3"
KAFKA_MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"
HOST = "127.0.0.1"
SASL_USER = "k2"

# A small heap and the serial collector: one dev broker shares two cores with Dagster and the tests.
JVM_OPTIONS = (
    "-Xms64m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)

_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>k2.devstack</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_{SCALA_VERSION}</artifactId>
      <version>{KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{LOG4J_VERSION}</version></dependency>
  </dependencies>
</project>
"""

# The broker logs warnings to broker.log, plus the lines that say it started and stopped.
_LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = ${sys:k2.broker.log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.file.ref = file
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = info
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = info
"""


class KafkaSetupError(RuntimeError):
    """The broker cannot be installed or started here; the message says which setting or tool to fix."""


@dataclass(frozen=True)
class BrokerPorts:
    plaintext: int
    controller: int
    sasl: int


@dataclass(frozen=True)
class SaslCredentials:
    """The dev broker's SASL/PLAIN user, as a client configures it."""

    bootstrap_servers: str
    username: str
    password: str

    def client_config(self) -> dict[str, str]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanisms": "PLAIN",
            "sasl.username": self.username,
            "sasl.password": self.password,
        }


def kafka_impl() -> str:
    """Which Kafka the dev stack runs: `apache` (a real broker, the default) or the librdkafka `mock`."""
    try:
        return DEVSTACK_KAFKA.value()
    except ValueError as err:
        raise KafkaSetupError(str(err)) from None


def describe() -> str:
    return f"Apache Kafka {KAFKA_VERSION} (KRaft, single node)"


# --------------------------------------------------------------------------------------------------
# The jars
# --------------------------------------------------------------------------------------------------


def jars_dir() -> Path:
    configured = KAFKA_JARS.raw()
    if configured:
        return Path(configured).expanduser().resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "k2" / f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}"


def _installed(folder: Path) -> bool:
    return (folder / ".complete").exists() and any(folder.glob(f"kafka_{SCALA_VERSION}-*.jar"))


def install_jars(timeout: float = 900.0) -> Path:
    """Resolve the broker's jars from Maven Central into the cache (once); returns the folder."""
    folder = jars_dir()
    if _installed(folder):
        return folder
    if KAFKA_JARS.is_set():
        raise KafkaSetupError(f"{KAFKA_JARS.name}={folder} holds no Kafka {KAFKA_VERSION} jars")
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaSetupError(
            "Maven (`mvn`) is needed once to fetch the Kafka broker's jars from Maven Central; install it, "
            f"point {KAFKA_JARS.name} at a folder of Kafka jars, or set {DEVSTACK_KAFKA.name}=mock"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as work:
        (Path(work) / "pom.xml").write_text(_POM)
        staging = Path(work) / "jars"
        command = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(Path(work) / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise KafkaSetupError(
                f"Maven could not fetch Kafka {KAFKA_VERSION}: {(done.stdout + done.stderr)[-2000:]}"
            )
        (staging / ".complete").write_text(f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    return folder


def java_executable() -> str:
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise KafkaSetupError(
            "Java 17+ is needed to run the dev stack's Kafka broker (set JAVA_HOME or put `java` on PATH), "
            f"or set {DEVSTACK_KAFKA.name}=mock to use librdkafka's in-memory mock cluster instead"
        )
    return java


# --------------------------------------------------------------------------------------------------
# One broker per K2_HOME
# --------------------------------------------------------------------------------------------------


def broker_dir(home: Path) -> Path:
    return home / "devstack" / "kafka"


def broker_pid_path(home: Path) -> Path:
    return broker_dir(home) / "kafka.pid"


def broker_log_path(home: Path) -> Path:
    return broker_dir(home) / "broker.log"


def free_ports(count: int, host: str = HOST) -> list[int]:
    """`count` distinct ports nothing listens on now. All sockets stay bound until every port is picked:
    picking them one at a time lets the OS hand out the same port twice (a broker whose PLAINTEXT and
    CONTROLLER listeners got one port refused to format its log dirs)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


def _port_free(port: int) -> bool:
    """Whether a listener could bind `port` now (as the JVM does, with SO_REUSEADDR: a killed broker's
    connections in TIME_WAIT do not keep it from coming back on its old port)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def broker_ports(home: Path, plaintext_port: int = 0) -> BrokerPorts:
    """The broker's ports: those it used before if they are free, else new free ones (then stored)."""
    path = broker_dir(home) / "ports.json"
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, TypeError):
        stored = BrokerPorts(**json.loads(path.read_text()))
        wanted_ok = plaintext_port in (0, stored.plaintext)
        if wanted_ok and all(_port_free(p) for p in (stored.plaintext, stored.controller, stored.sasl)):
            return stored
    plaintext, controller, sasl = free_ports(3)
    while plaintext_port in (controller, sasl):
        plaintext, controller, sasl = free_ports(3)
    ports = BrokerPorts(plaintext=plaintext_port or plaintext, controller=controller, sasl=sasl)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ports.__dict__) + "\n")
    return ports


def sasl_credentials(home: Path, ports: BrokerPorts | None = None) -> SaslCredentials:
    """The SASL listener's user (a password generated once per K2_HOME, readable by its owner only)."""
    path = broker_dir(home) / "sasl.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"username": SASL_USER, "password": secrets.token_urlsafe(18)}, handle)
    stored = json.loads(path.read_text())
    ports = ports or BrokerPorts(**json.loads((broker_dir(home) / "ports.json").read_text()))
    return SaslCredentials(f"{HOST}:{ports.sasl}", stored["username"], stored["password"])


def _server_properties(home: Path, ports: BrokerPorts, credentials: SaslCredentials) -> str:
    data = broker_dir(home) / "data"
    jaas = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'user_{credentials.username}="{credentials.password}";'
    )
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{ports.controller}",
        "listeners": f"PLAINTEXT://{HOST}:{ports.plaintext},CONTROLLER://{HOST}:{ports.controller},"
        f"SASL_PLAINTEXT://{HOST}:{ports.sasl}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{ports.plaintext},SASL_PLAINTEXT://{HOST}:{ports.sasl}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
        "sasl.enabled.mechanisms": "PLAIN",
        "listener.name.sasl_plaintext.plain.sasl.jaas.config": jaas,
        "log.dirs": str(data),
        "num.partitions": "4",
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "group.initial.rebalance.delay.ms": "0",
        # After a SIGKILL the controller waits for the dead broker's session to expire before the
        # restarted one may serve (9 s by default): keep that short for a one-node dev cluster.
        "broker.session.timeout.ms": "2000",
        "broker.heartbeat.interval.ms": "500",
        # Retention is enforced within seconds, so a topic's `retention.ms` really deletes records in tests.
        "log.retention.check.interval.ms": "1000",
        "log.segment.delete.delay.ms": "1000",
        "log.cleaner.backoff.ms": "1000",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def _java_command(home: Path, main_class: str, *args: str) -> list[str]:
    jars = install_jars()
    log4j = broker_dir(home) / "log4j2.properties"
    return [
        java_executable(),
        *JVM_OPTIONS,
        f"-Dlog4j2.configurationFile={log4j}",
        f"-Dk2.broker.log={broker_log_path(home)}",
        "-cp",
        f"{jars}/*",
        main_class,
        *args,
    ]


def new_cluster_id() -> str:
    """A random KRaft cluster id as Kafka makes them: 16 random bytes in URL-safe base64, never starting
    with '-', which kafka-storage's argument parser would take for an option (one id in 64 would)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _format_storage(home: Path, properties: Path) -> None:
    """Format the KRaft log dirs once; a formatted data dir is reused as is (records are kept)."""
    data = broker_dir(home) / "data"
    if (data / "meta.properties").exists():
        return
    cluster_id = new_cluster_id()
    command = _java_command(home, STORAGE_TOOL_CLASS, "format", "-t", cluster_id, "-c", str(properties))
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise KafkaSetupError(f"Formatting the Kafka log dirs failed: {(done.stdout + done.stderr)[-2000:]}")


def is_broker_for(pid: int, home: Path) -> bool:
    """Whether `pid` is this K2_HOME's broker (never signal a reused pid)."""
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return KAFKA_MAIN_CLASS in cmdline and str(broker_dir(home) / "server.properties") in cmdline


def live_broker(home: Path) -> int | None:
    """The pid of this K2_HOME's running broker, or None (a stale pid file is removed)."""
    path = broker_pid_path(home)
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    if alive and is_broker_for(pid, home):
        return pid
    path.unlink(missing_ok=True)
    return None


def spawn_broker(home: Path, plaintext_port: int = 0) -> tuple[subprocess.Popen[bytes], BrokerPorts]:
    """Write the config, format storage if new, and start the broker detached; returns at once."""
    folder = broker_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    ports = broker_ports(home, plaintext_port)
    credentials = sasl_credentials(home, ports)
    properties = folder / "server.properties"
    properties.write_text(_server_properties(home, ports, credentials))
    (folder / "log4j2.properties").write_text(_LOG4J2)
    _format_storage(home, properties)
    with open(broker_log_path(home), "ab") as log:
        process = subprocess.Popen(
            _java_command(home, KAFKA_MAIN_CLASS, str(properties)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    broker_pid_path(home).write_text(f"{process.pid}\n")
    return process, ports


def bootstrap_servers(home: Path) -> str:
    ports = BrokerPorts(**json.loads((broker_dir(home) / "ports.json").read_text()))
    return f"{HOST}:{ports.plaintext}"


def wait_until_serving(bootstrap: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Until the broker accepts connections and answers metadata with itself as a live broker.

    The port is probed with a plain socket first, so no client logs "connection refused" while the JVM
    starts; then metadata proves KRaft has elected this node.
    """
    host, port = bootstrap.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    try:
        if not wait_until_listening(host, int(port), deadline, alive):
            raise KafkaSetupError("the Kafka broker exited while starting")
    except TimeoutError:
        raise KafkaSetupError(
            f"the Kafka broker at {bootstrap} did not listen within {timeout:.0f} s"
        ) from None
    admin = AdminClient({"bootstrap.servers": bootstrap})
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if admin.list_topics(timeout=2).brokers:
                return
        except KafkaException as err:
            last = err
        time.sleep(0.05)
    raise KafkaSetupError(f"the Kafka broker at {bootstrap} did not answer within {timeout:.0f} s ({last})")


def ensure_topics(
    bootstrap: str, exchanges: tuple[ExchangeConfig, ...], timeout: float = 30.0
) -> dict[str, int]:
    """Create each exchange's topic through the Admin API with its partition count and retention.

    A topic that exists is left as it is (its records, partitions and config are the user's).
    Returns topic -> partition count once every partition has a leader (a consumer can then read
    its watermarks).
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = admin.list_topics(timeout=timeout).topics
    wanted = [
        NewTopic(
            e.topic,
            num_partitions=e.kafka_partitions,
            replication_factor=1,
            config={"retention.ms": str(int(e.kafka_retention_hours * 3600 * 1000))},
        )
        for e in exchanges
        if e.topic not in existing
    ]
    if wanted:
        for topic, future in admin.create_topics(wanted, request_timeout=timeout).items():
            try:
                future.result(timeout=timeout)
            except KafkaException as err:
                if err.args[0].code() != err.args[0].TOPIC_ALREADY_EXISTS:
                    raise KafkaSetupError(f"Could not create topic {topic}: {err}") from err
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        counts = {
            e.topic: len(topics[e.topic].partitions)
            for e in exchanges
            if e.topic in topics and all(p.leader >= 0 for p in topics[e.topic].partitions.values())
        }
        if len(counts) == len(exchanges) and all(counts.values()):
            return counts
        if time.monotonic() > deadline:
            raise KafkaSetupError(f"Topics did not appear in metadata within {timeout:.0f} s: {counts}")
        time.sleep(0.1)
