"""The dev stack's lifecycle and its Kafka, with real processes: the `k2` CLI, the host, real clients."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from k2_resources.dev.devstack import DevstackError, devstack_status, start_devstack, stop_devstack
from k2_resources.dev.devstack import kafka as dev_kafka
from k2_resources.exchanges import EXCHANGES, exchange
from k2_resources.settings import KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL, read_env_file
from k2_resources.trade_schema import trade_v2_schema_str
from tests.conftest import k2

UTC = dt.UTC


def _host_processes(home: Path) -> list[psutil.Process]:
    """Dev stack hosts serving `home`, found by command line: proves how many `up` really started."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        ours = "k2_resources.dev.devstack.stack" in cmdline and str(home) in cmdline
        if ours and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def _watermarks(bootstrap: str, topic: str) -> dict[int, tuple[int, int]]:
    """Assign every partition and read its watermarks, from this process (not the host's)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4()}"})
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in partitions}
    finally:
        consumer.close()


def _schema_ids(registry_url: str) -> dict[str, int]:
    with SchemaRegistryClient({"url": registry_url, "max.retries": 0}) as client:
        return {e.subject: client.get_latest_version(e.subject).schema_id for e in EXCHANGES}


def _is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _is_gone(pid):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still runs")


def test_cli_lifecycle_up_twice_status_down_and_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    devstack_dir = home / "devstack"

    up = k2("devstack", "up", home=home)
    env = read_env_file(home / "devstack.env")
    bootstrap, registry = env[KAFKA_BOOTSTRAP_SERVERS], env[SCHEMA_REGISTRY_URL]
    assert bootstrap.startswith("127.0.0.1:") and registry.startswith("http://127.0.0.1:")
    assert bootstrap in up.stdout and registry in up.stdout
    pid = int((devstack_dir / "devstack.pid").read_text())
    assert [p.pid for p in _host_processes(home)] == [pid]
    assert (devstack_dir / "devstack.log").read_text().strip()

    # Right after `up`, before anything is produced, a consumer elsewhere can assign and read watermarks.
    for config in EXCHANGES:
        assert _watermarks(bootstrap, config.topic) == {p: (0, 0) for p in range(4)}
    ids_before = _schema_ids(registry)

    again = k2("devstack", "up", home=home)
    assert "already up" in again.stdout
    assert int((devstack_dir / "devstack.pid").read_text()) == pid
    assert [p.pid for p in _host_processes(home)] == [pid]
    assert read_env_file(home / "devstack.env") == env

    status = k2("devstack", "status", home=home)
    assert status.stdout.startswith("The K2 dev stack is up")
    assert bootstrap in status.stdout and registry in status.stdout

    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(3):
        producer.produce(exchange("binance").topic, value=b"x", key=str(i).encode())
    assert producer.flush(10) == 0
    assert sum(high for _, high in _watermarks(bootstrap, exchange("binance").topic).values()) == 3

    down = k2("devstack", "down", home=home)
    assert "down" in down.stdout
    _wait_gone(pid)
    assert not (home / "devstack.env").exists()
    assert not (devstack_dir / "devstack.pid").exists()
    assert "not running" in k2("devstack", "down", home=home).stdout
    down_status = k2("devstack", "status", home=home, check=False)
    assert down_status.returncode == 1
    assert down_status.stdout.startswith("The K2 dev stack is down")

    k2("devstack", "up", home=home)
    try:
        env_after = read_env_file(home / "devstack.env")
        assert _schema_ids(env_after[SCHEMA_REGISTRY_URL]) == ids_before
        # The broker keeps its log dirs under K2_HOME: same address, same records.
        assert env_after[KAFKA_BOOTSTRAP_SERVERS] == bootstrap
        marks = _watermarks(env_after[KAFKA_BOOTSTRAP_SERVERS], exchange("binance").topic)
        assert sum(high for _, high in marks.values()) == 3
        broker_pid = dev_kafka.live_broker(home)
        assert broker_pid is not None
    finally:
        k2("devstack", "down", home=home)
    assert _host_processes(home) == []
    _wait_gone(broker_pid)


@pytest.fixture()
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated live process whose pid a stale pid file can name (pid reuse)."""
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_stale_and_reused_pids_are_never_taken_for_the_host(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    home = tmp_path.resolve()
    pid_file = home / "devstack" / "devstack.pid"
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{finished.pid}\n")
    (home / "devstack.env").write_text(f"{KAFKA_BOOTSTRAP_SERVERS}=127.0.0.1:1\n")

    status = devstack_status(home)
    assert not status.running and status.stale_pid == finished.pid
    assert not pid_file.exists() and not (home / "devstack.env").exists()

    pid_file.write_text(f"{sleeper.pid}\n")
    assert stop_devstack(home) is None
    assert sleeper.poll() is None, "down must not signal a process that is not the dev stack host"

    pid_file.write_text(f"{sleeper.pid}\n")
    try:
        info = start_devstack(home)
        assert info.pid != sleeper.pid and not info.already_running
        os.kill(info.pid, signal.SIGKILL)  # the host dies: its pid file is now stale
        _wait_gone(info.pid)
        assert devstack_status(home).stale_pid == info.pid
        restarted = start_devstack(home)
        assert restarted.pid != info.pid and devstack_status(home).healthy
    finally:
        stopped = stop_devstack(home)
    assert stopped == restarted.pid
    assert _host_processes(home) == []
    assert sleeper.poll() is None


def _remove_while_written(home: Path, seconds: float = 10.0) -> None:
    """Delete `home` although the broker may still be writing into it (a segment or checkpoint created
    between rmtree's listing and its rmdir); the host noticing the deletion is what is under test."""
    deadline = time.monotonic() + seconds
    while home.exists() and time.monotonic() < deadline:
        shutil.rmtree(home, ignore_errors=True)
    assert not home.exists(), f"{home} could not be deleted in {seconds:.0f} s"


def test_cluster_ids_are_never_taken_for_an_option() -> None:
    """kafka-storage format -t <id> refused ids starting with '-' (one in 64: a CI run's `devstack up`
    failed on one); every id is still 16 random bytes."""
    ids = [dev_kafka.new_cluster_id() for _ in range(5_000)]
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids)
    assert {len(base64.urlsafe_b64decode(i + "==")) for i in ids} == {16}


def test_host_exits_when_its_k2_home_is_deleted(tmp_path: Path) -> None:
    """Hosts of deleted temporary homes (old pytest folders) must not pile up."""
    home = tmp_path.resolve() / "home"
    info = start_devstack(home)
    try:
        _remove_while_written(home)
        _wait_gone(info.pid, timeout=10)
        _wait_gone(info.broker_pid, timeout=10)  # the host takes its broker with it
        assert not home.exists(), "the exiting host must not recreate the deleted home"
    finally:
        stop_devstack(home)
        shutil.rmtree(home, ignore_errors=True)


def test_up_fails_clearly_when_the_host_cannot_start(tmp_path: Path) -> None:
    home = tmp_path.resolve()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = k2("devstack", "up", "--registry-port", str(port), home=home, check=False)
        assert result.returncode == 1
        assert "exited with code 1" in result.stderr
        assert "Address already in use" in result.stderr  # the log tail is in the message

        with pytest.raises(DevstackError, match="Address already in use"):
            start_devstack(home, registry_port=port)
    assert not (home / "devstack.env").exists()
    assert not (home / "devstack" / "devstack.pid").exists()
    assert _host_processes(home) == []
    assert dev_kafka.live_broker(home) is None  # the broker this `up` started was stopped again


def test_mock_cluster_only_when_asked_and_said_so(tmp_path: Path) -> None:
    home = tmp_path.resolve()
    up = k2("devstack", "up", home=home, env={"K2_DEVSTACK_KAFKA": "mock"})
    try:
        assert "mock" in up.stderr and "K2_DEVSTACK_KAFKA=mock" in up.stderr
        assert "librdkafka mock cluster" in k2("devstack", "status", home=home).stdout
        assert dev_kafka.live_broker(home) is None
    finally:
        k2("devstack", "down", home=home)


def test_missing_java_fails_clearly(tmp_path: Path) -> None:
    env = {"JAVA_HOME": str(tmp_path / "no-jdk"), "PATH": str(Path(sys.executable).parent)}
    result = k2("devstack", "up", home=tmp_path.resolve(), env=env, check=False)
    assert result.returncode == 1
    assert "Java 17+" in result.stderr and "K2_DEVSTACK_KAFKA=mock" in result.stderr
    assert _host_processes(tmp_path.resolve()) == []


def test_invalid_kafka_choice_names_the_setting(tmp_path: Path) -> None:
    result = k2("devstack", "up", home=tmp_path.resolve(), env={"K2_DEVSTACK_KAFKA": "redpanda"}, check=False)
    assert (
        result.returncode == 1
        and "K2_DEVSTACK_KAFKA must be one of apache, mock, not 'redpanda'" in result.stderr
    )


def _v2_record() -> dict[str, object]:
    return {
        "message_id": str(uuid.uuid4()),
        "trade_id": "BINANCE-789012",
        "symbol": "BTCUSDT",
        "exchange": "BINANCE",
        "asset_class": "crypto",
        "timestamp": dt.datetime(2026, 1, 20, 14, 3, 7, 123456, tzinfo=UTC),
        "price": decimal.Decimal("64321.12345678"),
        "quantity": decimal.Decimal("0.00012345"),
        "currency": "USDT",
        "side": "SELL_SHORT",
        "trade_conditions": ["odd_lot"],
        "source_sequence": 9_007_199_254_740_993,
        "ingestion_timestamp": dt.datetime(2026, 1, 20, 14, 3, 7, 200001, tzinfo=UTC),
        "platform_sequence": None,
        "vendor_data": {"is_buyer_maker": "true", "event_type": "trade"},
    }


def test_v2_round_trip_through_the_dev_broker(devstack_env: dict[str, str]) -> None:
    topic = exchange("binance").topic
    ctx = SerializationContext(topic, MessageField.VALUE)
    record = _v2_record()
    with SchemaRegistryClient({"url": devstack_env[SCHEMA_REGISTRY_URL], "max.retries": 0}) as client:
        value = AvroSerializer(client, trade_v2_schema_str())(record, ctx)
        v2_id = client.get_latest_version(exchange("binance").subject).schema_id
        assert value[0] == 0 and int.from_bytes(value[1:5], "big") == v2_id

        producer = Producer({"bootstrap.servers": devstack_env[KAFKA_BOOTSTRAP_SERVERS]})
        producer.produce(topic, value=value, key=record["trade_id"].encode())
        assert producer.flush(10) == 0

        consumer = Consumer(
            {"bootstrap.servers": devstack_env[KAFKA_BOOTSTRAP_SERVERS], "group.id": f"test-{uuid.uuid4()}"}
        )
        try:
            consumer.assign([TopicPartition(topic, p, 0) for p in range(4)])
            message = None
            deadline = time.monotonic() + 10
            while message is None and time.monotonic() < deadline:
                polled = consumer.poll(0.5)
                if polled is not None and polled.error() is None:
                    message = polled
        finally:
            consumer.close()
        assert message is not None, "the produced record never arrived"
        decoded = AvroDeserializer(client, trade_v2_schema_str())(message.value(), ctx)

    assert decoded == record
    assert isinstance(decoded["price"], decimal.Decimal) and decoded["price"] == decimal.Decimal(
        "64321.12345678"
    )
    assert decoded["timestamp"] == dt.datetime(2026, 1, 20, 14, 3, 7, 123456, tzinfo=UTC)
    assert decoded["side"] == "SELL_SHORT" and decoded["vendor_data"]["event_type"] == "trade"
    assert message.key() == b"BINANCE-789012"


def test_broker_ports_are_distinct_even_when_the_os_reuses_ports(tmp_path: Path) -> None:
    """CI once got one port for PLAINTEXT and CONTROLLER (picked one at a time, each released before the
    next), and the broker refused to format its log dirs."""
    assert len(set(dev_kafka.free_ports(200))) == 200
    for attempt in range(50):
        ports = dev_kafka.broker_ports(tmp_path / str(attempt))
        assert len({ports.plaintext, ports.controller, ports.sasl}) == 3, ports
