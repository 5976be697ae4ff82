"""What a real Kafka broker does that the mock cluster never did, and how Bronze ingestion copes with it.

Each test runs its own dev stack (a real Apache Kafka broker process and the registry host) and its own
SQLite catalog: transaction markers and compaction leave offsets that are never delivered, topics get
deleted and recreated or grow partitions, retention deletes records, the broker dies with SIGKILL, and
secured listeners reject wrong credentials.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewPartitions, NewTopic

from k2_assets.bronze.ingestion import IngestionSettings, TopicIngestion
from k2_assets.bronze.tables import bronze_table_spec
from k2_resources.dev.devstack import kafka as dev_kafka
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.kafka import KafkaAuthenticationError, KafkaResource, close_consumer
from tests.conftest import k2, k2_env
from tests.test_bronze_ingestion import BINANCE, TOPIC, bronze_rows, ingest, produce_raw, sqlite_catalog


def bootstrap() -> str:
    return os.environ["K2_KAFKA_BOOTSTRAP_SERVERS"]


_ADMINS: dict[str, AdminClient] = {}


@pytest.fixture(autouse=True)
def _drop_admins() -> None:
    yield
    _ADMINS.clear()  # this test's broker is stopped next: its clients would retry it forever


def admin() -> AdminClient:
    """One Admin client per broker, kept alive: a dropped client cancels the futures it returned."""
    return _ADMINS.setdefault(bootstrap(), AdminClient({"bootstrap.servers": bootstrap()}))


def high_watermarks(topic: str = TOPIC) -> dict[int, tuple[int, int]]:
    consumer = Consumer({"bootstrap.servers": bootstrap(), "group.id": "probe"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in partitions}
    finally:
        consumer.close()


def readable_offsets(topic: str = TOPIC) -> dict[int, list[int]]:
    """Every record offset a read_committed consumer receives, per partition: what Bronze must hold."""
    marks = high_watermarks(topic)
    consumer = Consumer({"bootstrap.servers": bootstrap(), "group.id": "probe", "enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in marks.items()])
    offsets: dict[int, list[int]] = {p: [] for p in marks}
    done: set[int] = {p for p, (low, high) in marks.items() if low == high}
    deadline = time.monotonic() + 60
    while len(done) < len(marks) and time.monotonic() < deadline:
        for msg in consumer.consume(1000, timeout=1):
            if msg.error() is None:
                offsets[msg.partition()].append(msg.offset())
            elif msg.offset() >= marks[msg.partition()][1]:
                done.add(msg.partition())
    consumer.close()
    assert len(done) == len(marks), "could not read the topic to its end"
    return offsets


def assert_bronze_holds(home: Path, expected: dict[int, list[int]]) -> None:
    rows = bronze_rows(home)
    assert rows.num_rows == sum(len(v) for v in expected.values())
    for p, offsets in expected.items():
        got = sorted(rows.filter(pc.equal(rows["partition"], p))["offset"].to_pylist())
        assert got == offsets, f"partition {p}"


def produce_transactions(committed: int, aborted: int, per_transaction: int = 5) -> None:
    """Transactions spread over all partitions; markers occupy an offset after each one."""
    producer = Producer({"bootstrap.servers": bootstrap(), "transactional.id": "k2-test-txn"})
    producer.init_transactions(30)
    for t in range(committed + aborted):
        producer.begin_transaction()
        for i in range(per_transaction):
            producer.produce(TOPIC, b"\x00\x00\x00\x00\x01" + bytes([t, i]) * 20, partition=(t + i) % 4)
        producer.flush(30)
        if t < committed:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)


def test_the_dev_broker_is_real_apache_kafka(fresh_devstack: Path) -> None:
    status = k2("devstack", "status", home=fresh_devstack).stdout
    assert f"Apache Kafka {dev_kafka.KAFKA_VERSION} (KRaft, single node)" in status
    pid = dev_kafka.live_broker(fresh_devstack)
    assert pid is not None and dev_kafka.is_broker_for(pid, fresh_devstack)
    # Topics were created through the Admin API with the exchange config's partitions and retention.
    resource = ConfigResource(ConfigResource.Type.TOPIC, TOPIC)
    config = admin().describe_configs([resource])[resource].result(timeout=10)
    assert config["retention.ms"].value == str(int(BINANCE.kafka_retention_hours * 3600 * 1000))
    assert len(high_watermarks()) == BINANCE.kafka_partitions


def test_records_and_offsets_survive_down_up_and_sigkill(fresh_devstack: Path) -> None:
    produce_raw(1_000)
    group = Consumer({"bootstrap.servers": bootstrap(), "group.id": "k2-test-group"})
    group.commit(offsets=[TopicPartition(TOPIC, 0, 7)], asynchronous=False)
    group.close()
    before = high_watermarks()

    k2("devstack", "down", home=fresh_devstack)
    assert k2("devstack", "status", home=fresh_devstack, check=False).returncode == 1
    k2("devstack", "up", home=fresh_devstack)
    assert high_watermarks() == before

    os.kill(dev_kafka.live_broker(fresh_devstack), signal.SIGKILL)
    time.sleep(0.5)
    started = time.monotonic()
    up = k2("devstack", "up", home=fresh_devstack)
    assert "Apache Kafka" in up.stdout
    assert time.monotonic() - started < 30
    assert high_watermarks() == before
    group = Consumer({"bootstrap.servers": bootstrap(), "group.id": "k2-test-group"})
    assert group.committed([TopicPartition(TOPIC, 0)], timeout=10)[0].offset == 7
    group.close()


def test_transaction_markers_are_not_gaps_and_drain_finishes(fresh_devstack: Path) -> None:
    produce_transactions(committed=6, aborted=2)
    started = time.monotonic()
    done = ingest(fresh_devstack, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 60  # drained, rather than waiting for max_runtime
    expected = readable_offsets()
    assert sum(len(v) for v in expected.values()) == 30  # the aborted records are not readable
    assert_bronze_holds(fresh_devstack, expected)

    # The next run resumes after the markers without re-reading or calling them lost.
    produce_transactions(committed=2, aborted=0)
    again = ingest(fresh_devstack, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_bronze_holds(fresh_devstack, readable_offsets())


def test_compacted_topic_holes_are_not_gaps(fresh_devstack: Path) -> None:
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        TOPIC,
        set_config={"cleanup.policy": "compact", "segment.ms": "100", "min.cleanable.dirty.ratio": "0.01"},
    )
    admin().alter_configs([resource])[resource].result(timeout=10)
    producer = Producer({"bootstrap.servers": bootstrap()})
    deadline = time.monotonic() + 90
    while True:  # rewrite a few keys until the cleaner has removed older versions from the log
        for i in range(200):
            producer.produce(TOPIC, b"v" * 50, key=f"k{i % 5}".encode(), partition=0)
        producer.flush(10)
        readable = readable_offsets()[0]
        if len(readable) < high_watermarks()[0][1]:
            break
        assert time.monotonic() < deadline, "the log cleaner never compacted partition 0"
        time.sleep(1)
    expected = readable_offsets()
    done = ingest(fresh_devstack, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gap" not in done.stderr.lower()
    rows = bronze_rows(fresh_devstack)
    got = sorted(rows.filter(pc.equal(rows["partition"], 0))["offset"].to_pylist())
    # Compaction may go on while Bronze reads, so Bronze holds a subset of what was readable before
    # and everything still readable now; never an offset twice.
    assert len(got) == len(set(got))
    assert set(readable_offsets()[0]) <= set(got) <= set(expected[0]) | set(readable_offsets()[0])


def test_recreated_topic_is_detected_after_it_grew_past_the_stored_offsets(fresh_devstack: Path) -> None:
    produce_raw(2_000)
    assert ingest(fresh_devstack).returncode == 0
    stored = {p: high for p, (_, high) in high_watermarks().items()}
    admin().delete_topics([TOPIC])[TOPIC].result(timeout=30)
    deadline = time.monotonic() + 30
    while True:
        futures = admin().create_topics([NewTopic(TOPIC, num_partitions=4, replication_factor=1)])
        try:
            futures[TOPIC].result(timeout=30)
            break
        except Exception:  # the deletion completes asynchronously
            assert time.monotonic() < deadline
            time.sleep(0.5)
    produce_raw(6_000)
    assert all(high > stored[p] for p, (_, high) in high_watermarks().items())  # grown past them
    failed = ingest(fresh_devstack)
    assert failed.returncode == 1
    assert "deleted and recreated" in failed.stderr and "accept_gaps" in failed.stderr
    assert bronze_rows(fresh_devstack).num_rows == 2_000

    accepted = ingest(fresh_devstack, "--accept-gaps")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert bronze_rows(fresh_devstack).num_rows == 8_000  # the new topic read from its start


def test_records_deleted_by_retention_before_ingestion_fail_loudly(fresh_devstack: Path) -> None:
    produce_raw(400)
    assert ingest(fresh_devstack).returncode == 0
    produce_raw(400, start=400)
    resource = ConfigResource(
        ConfigResource.Type.TOPIC, TOPIC, set_config={"retention.ms": "500", "segment.ms": "100"}
    )
    admin().alter_configs([resource])[resource].result(timeout=10)
    stored = {p: high for p, (_, high) in high_watermarks().items()}
    deadline = time.monotonic() + 90
    while not all(low > 0 for low, _ in high_watermarks().values()):  # real retention moves the start
        produce_raw(8, start=10_000)  # a new record rolls the segment, which can then be deleted
        assert time.monotonic() < deadline, "retention never deleted a segment"
        time.sleep(0.5)
    lows = {p: low for p, (low, _) in high_watermarks().items()}
    assert any(lows[p] > 0 for p in stored)

    failed = ingest(fresh_devstack)
    assert failed.returncode == 1
    assert f"Kafka gap on {TOPIC} partition" in failed.stderr
    assert "deleted before Bronze read them" in failed.stderr
    assert bronze_rows(fresh_devstack).num_rows == 400  # nothing was committed by the failed run


def _sasl_env(home: Path, password: str) -> dict[str, str]:
    credentials = dev_kafka.sasl_credentials(home)
    return {
        "K2_KAFKA_BOOTSTRAP_SERVERS": credentials.bootstrap_servers,
        "K2_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "K2_KAFKA__SASL_MECHANISMS": "PLAIN",
        "K2_KAFKA__SASL_USERNAME": credentials.username,
        "K2_KAFKA__SASL_PASSWORD": password,
    }


def _ingest_over_sasl(home: Path, password: str) -> subprocess.CompletedProcess:
    env = _sasl_env(home, password)
    return k2("ingest", "--exchange", "binance", "--drain", home=home, check=False, env=env, timeout=120)


def test_sasl_cluster_by_configuration_only(fresh_devstack: Path) -> None:
    produce_raw(300)
    credentials = dev_kafka.sasl_credentials(fresh_devstack)
    wrong = "not-the-password-4711"
    started = time.monotonic()
    failed = _ingest_over_sasl(fresh_devstack, wrong)
    assert failed.returncode == 1
    assert time.monotonic() - started < 60  # no retrying forever against wrong credentials
    assert "K2_KAFKA__SASL_PASSWORD" in failed.stderr
    assert wrong not in failed.stderr + failed.stdout
    assert "Authentication failed" in failed.stderr

    done = _ingest_over_sasl(fresh_devstack, credentials.password)
    assert done.returncode == 0, done.stderr[-3000:]
    assert credentials.password not in done.stderr + done.stdout
    assert bronze_rows(fresh_devstack).num_rows == 300


def test_wrong_credentials_fail_the_resource_at_once(fresh_devstack: Path) -> None:
    credentials = dev_kafka.sasl_credentials(fresh_devstack)
    config = {k: v for k, v in credentials.client_config().items() if k != "bootstrap.servers"}
    kafka = KafkaResource(
        bootstrap_servers=credentials.bootstrap_servers, client_config={**config, "sasl.password": "x"}
    )
    with pytest.raises(KafkaAuthenticationError, match="K2_KAFKA__SASL_USERNAME"):
        kafka.wait_until_reachable(30)


def _ingestion(
    home: Path, settings: IngestionSettings, stop: threading.Event
) -> tuple[TopicIngestion, Consumer]:
    catalog = IcebergCatalogResource(properties=sqlite_catalog(home))
    kafka = KafkaResource(bootstrap_servers=bootstrap())
    consumer = kafka.consumer(BINANCE.consumer_group)
    ingestion = TopicIngestion(
        table=catalog.ensure_table(bronze_table_spec(BINANCE)),
        consumer=consumer,
        topic=TOPIC,
        settings=settings,
        run_id="test",
        watermarks=lambda ps, cached: kafka.watermarks(consumer, TOPIC, ps, cached),
        partitions=lambda: kafka.partitions(consumer, TOPIC),
        topic_id=kafka.topic_id(TOPIC),
        should_stop=stop.is_set,
    )
    return ingestion, consumer


def test_partitions_added_while_running_are_read_from_offset_zero(fresh_devstack: Path) -> None:
    produce_raw(1_000)
    stop = threading.Event()
    settings = IngestionSettings(commit_interval_seconds=0.5, partition_refresh_seconds=1.0)
    ingestion, consumer = _ingestion(fresh_devstack, settings, stop)
    runner = threading.Thread(target=ingestion.run)
    runner.start()
    try:
        admin().create_partitions([NewPartitions(TOPIC, 6)])[TOPIC].result(timeout=30)
        produce_raw(2_000, start=1_000)  # keyed: lands on all six partitions
        deadline = time.monotonic() + 60
        while set(ingestion.next_offsets) != set(range(6)) or ingestion.summary.rows < 3_000:
            assert time.monotonic() < deadline, (ingestion.next_offsets, ingestion.summary.rows)
            time.sleep(0.2)
    finally:
        stop.set()
        runner.join(60)
        consumer.close()
    assert_bronze_holds(fresh_devstack, readable_offsets())
    assert {4, 5} <= set(pc.unique(bronze_rows(fresh_devstack)["partition"]).to_pylist())


def test_broker_sigkill_during_ingestion_loses_and_doubles_nothing(fresh_devstack: Path) -> None:
    producer = Producer({"bootstrap.servers": bootstrap(), "enable.idempotence": True, "linger.ms": 5})
    producing = threading.Event()
    producing.set()

    def keep_producing() -> None:
        i = 0
        while producing.is_set():
            try:
                producer.produce(
                    TOPIC, b"\x00\x00\x00\x00\x01" + i.to_bytes(8, "big") * 10, key=str(i % 7).encode()
                )
                i += 1
            except BufferError:
                producer.poll(0.1)
            if i % 100 == 0:
                producer.poll(0)
                time.sleep(0.05)
        producer.flush(120)

    writer = threading.Thread(target=keep_producing)
    writer.start()
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "k2_assets.cli",
            "ingest",
            "--exchange",
            "binance",
            "--max-runtime-seconds",
            "40",
            "--commit-interval-seconds",
            "1",
            "--broker-timeout-seconds",
            "60",
        ],
        env=k2_env(fresh_devstack),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(8)
        os.kill(dev_kafka.live_broker(fresh_devstack), signal.SIGKILL)
        time.sleep(4)
        k2("devstack", "up", home=fresh_devstack)
        time.sleep(8)
    finally:
        producing.clear()
        writer.join(180)
    _, stderr = run.communicate(timeout=180)
    # The run rode out the outage (or failed clearly); either way the next run completes the stream.
    assert run.returncode == 0 or "Kafka unreachable" in stderr, stderr[-3000:]
    final = ingest(fresh_devstack, timeout=180)
    assert final.returncode == 0, final.stderr[-3000:]
    expected = readable_offsets()
    assert sum(len(v) for v in expected.values()) > 1_000
    assert_bronze_holds(fresh_devstack, expected)


def test_group_commit_does_not_block_when_the_broker_is_gone(fresh_devstack: Path) -> None:
    produce_raw(500)
    stop = threading.Event()
    ingestion, consumer = _ingestion(
        fresh_devstack, IngestionSettings(commit_interval_seconds=1, drain=True), stop
    )
    try:
        assert ingestion.run().rows == 500
        os.kill(dev_kafka.live_broker(fresh_devstack), signal.SIGKILL)
        time.sleep(0.5)
        started = time.monotonic()
        ingestion._commit_consumer_group()
        assert time.monotonic() - started < 2
        started = time.monotonic()
        close_consumer(consumer, timeout_seconds=3)  # librdkafka's own close would wait 45 s or more
        assert time.monotonic() - started < 5
    finally:
        k2("devstack", "up", home=fresh_devstack)
