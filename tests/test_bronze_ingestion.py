"""Bronze lands every Kafka record exactly once: counts, crashes, concurrent runs, gaps, retention.

Every test runs against its own real dev stack (broker + registry processes) and its own SQLite
catalog; ingestion runs as `k2 ingest` subprocesses so crashes are real SIGKILLs.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from pyiceberg.exceptions import NoSuchTableError

from k2_assets.bronze.ingestion import FencedError, IngestionSettings, TopicIngestion, read_stored_offsets
from k2_assets.bronze.tables import bronze_table_spec
from k2_assets.definitions import defs
from k2_resources.exchanges import exchange
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.kafka import KafkaResource
from tests.conftest import k2, k2_env

BINANCE = exchange("binance")
TOPIC = BINANCE.topic


def produce_raw(count: int, value_size: int = 150, start: int = 0) -> Counter[int]:
    """Produce `count` opaque records (Bronze never decodes); returns delivered records per partition."""
    delivered: Counter[int] = Counter()
    errors: list[str] = []

    def on_delivery(err, msg) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            delivered[msg.partition()] += 1

    producer = Producer({"bootstrap.servers": os.environ["K2_KAFKA_BOOTSTRAP_SERVERS"], "linger.ms": 5})
    # Recent record times: the broker's time retention (72 h) deletes records whose timestamps are older.
    now_ms = int(time.time() * 1000)
    for i in range(start, start + count):
        value = b"\x00\x00\x00\x00\x01" + i.to_bytes(8, "big") + os.urandom(value_size - 13)
        while True:
            try:
                producer.produce(
                    TOPIC,
                    value,
                    key=f"SYM{i % 13}".encode(),
                    timestamp=now_ms + i,
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                producer.poll(0.1)
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush(30)
    assert not errors, errors
    return delivered


def bronze_rows(home: Path) -> pa.Table:
    catalog = IcebergCatalogResource(properties=sqlite_catalog(home))
    return catalog.load_table(bronze_table_spec(BINANCE)).scan().to_arrow()


def sqlite_catalog(home: Path) -> dict[str, str]:
    return {"type": "sql", "uri": f"sqlite:///{home}/catalog.db", "warehouse": f"file://{home}/warehouse"}


def assert_exactly_once(
    rows: pa.Table, per_partition: dict[int, int], first: dict[int, int] | None = None
) -> None:
    """Each partition holds offsets first..first+count-1, each exactly once."""
    first = first or {}
    assert rows.num_rows == sum(per_partition.values())
    for p, count in per_partition.items():
        offsets = sorted(rows.filter(pc.equal(rows["partition"], p))["offset"].to_pylist())
        start = first.get(p, 0)
        assert offsets == list(range(start, start + count)), f"partition {p}"


def ingest(
    home: Path, *args: str, crash_at: str | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    env = {"K2_CRASH_AT": crash_at} if crash_at else None
    return k2(
        "ingest", "--exchange", "binance", "--drain", *args, home=home, check=False, timeout=timeout, env=env
    )


def test_n_records_land_as_n_rows_with_contiguous_offsets(fresh_devstack: Path) -> None:
    produced = produce_raw(12_000)
    job = defs.resolve_job_def("bronze_binance_ingestion")
    run_config = {"ops": {"ingest_binance_trades": {"config": {"drain": True, "max_batch_records": 2500}}}}
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(run_config=run_config, instance=instance)
        materializations = [
            e.event_specific_data.materialization
            for e in result.all_events
            if e.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION
        ]
    rows = bronze_rows(fresh_devstack)
    assert_exactly_once(rows, produced)
    assert rows["raw_bytes"][0].as_py()[:5] == b"\x00\x00\x00\x00\x01"  # untouched value bytes
    assert set(rows["topic"].to_pylist()) == {TOPIC}

    # One materialization per commit, each saying what it wrote.
    assert len(materializations) >= 5
    assert {m.asset_key for m in materializations} == {dg.AssetKey("bronze_binance_trades")}
    assert sum(m.metadata["rows"].value for m in materializations) == 12_000
    last = materializations[-1].metadata
    assert last["consumer_lag"].value == 0
    assert {"bytes", "commit_seconds", "offsets", "snapshot_id"} <= set(last)

    # The offsets stored with the data equal the consumer group's, mirrored for lag tools.
    table = IcebergCatalogResource(properties=sqlite_catalog(fresh_devstack)).load_table(
        bronze_table_spec(BINANCE)
    )
    stored = read_stored_offsets(table)
    assert stored == dict(produced.items())
    consumer = Consumer(
        {"bootstrap.servers": os.environ["K2_KAFKA_BOOTSTRAP_SERVERS"], "group.id": BINANCE.consumer_group}
    )
    committed = consumer.committed([TopicPartition(TOPIC, p) for p in produced], timeout=10)
    consumer.close()
    assert {tp.partition: tp.offset for tp in committed} == stored


@pytest.mark.parametrize(
    "crash_at",
    [
        "bronze.before_data_files:2",
        "bronze.after_data_files:2",
        "bronze.after_iceberg_commit:2",
        "bronze.after_group_commit:3",
    ],
)
def test_sigkill_around_the_commit_loses_and_doubles_nothing(fresh_devstack: Path, crash_at: str) -> None:
    produced = produce_raw(6_000)
    crashed = ingest(fresh_devstack, "--max-batch-records", "1000", crash_at=crash_at)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    partial = bronze_rows(fresh_devstack).num_rows
    assert partial < 6_000  # the crash really stopped it part-way
    resumed = ingest(fresh_devstack, "--max-batch-records", "1000")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_exactly_once(bronze_rows(fresh_devstack), produced)


def committed_rows(home: Path) -> int:
    try:
        return bronze_rows(home).num_rows
    except NoSuchTableError:
        return 0


def test_sigkill_at_random_moments_then_restart(fresh_devstack: Path) -> None:
    produced = produce_raw(20_000)
    rng = random.Random(7)
    env = k2_env(fresh_devstack)
    command = [
        sys.executable,
        "-m",
        "k2_assets.cli",
        "ingest",
        "--exchange",
        "binance",
        "--drain",
        "--max-batch-records",
        "150",
    ]
    progress = [0]
    for _ in range(4):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while (
            committed_rows(fresh_devstack) <= progress[-1]
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)  # wait until this run commits, then kill it somewhere in its commit stream
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
        progress.append(committed_rows(fresh_devstack))
    assert progress == sorted(progress) and progress[-1] < 20_000, progress
    final = ingest(fresh_devstack, "--max-batch-records", "150")
    assert final.returncode == 0, final.stderr[-3000:]
    assert_exactly_once(bronze_rows(fresh_devstack), produced)


def make_ingestion(
    catalog: IcebergCatalogResource, kafka: KafkaResource, run_id: str
) -> tuple[TopicIngestion, Consumer]:
    table = catalog.ensure_table(bronze_table_spec(BINANCE))
    consumer = kafka.consumer(BINANCE.consumer_group)
    ingestion = TopicIngestion(
        table=table,
        consumer=consumer,
        topic=TOPIC,
        settings=IngestionSettings(commit_interval_seconds=5, max_batch_records=700, drain=True),
        run_id=run_id,
        watermarks=lambda ps, cached: kafka.watermarks(consumer, TOPIC, ps, cached),
        partitions=lambda: kafka.partitions(consumer, TOPIC),
        topic_id=kafka.topic_id(TOPIC),
    )
    return ingestion, consumer


def test_second_of_two_concurrent_runs_is_fenced(fresh_devstack: Path) -> None:
    produced = produce_raw(5_000)
    catalog = IcebergCatalogResource(properties=sqlite_catalog(fresh_devstack))
    kafka = KafkaResource(bootstrap_servers=os.environ["K2_KAFKA_BOOTSTRAP_SERVERS"])
    # Both runs read the same stored offsets before either commits, as two runs started at once would.
    first, first_consumer = make_ingestion(catalog, kafka, "run-a")
    second, second_consumer = make_ingestion(catalog, kafka, "run-b")
    try:
        assert first.run().rows == 5_000
        with pytest.raises(FencedError, match="another ingestion run"):
            second.run()
    finally:
        first_consumer.close()
        second_consumer.close()
    assert_exactly_once(bronze_rows(fresh_devstack), produced)


def test_two_ingestion_processes_at_once_leave_exact_rows(fresh_devstack: Path) -> None:
    produced = produce_raw(15_000)
    env = k2_env(fresh_devstack)
    command = [
        sys.executable,
        "-m",
        "k2_assets.cli",
        "ingest",
        "--exchange",
        "binance",
        "--drain",
        "--max-batch-records",
        "300",
    ]
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert any(code == 0 for code, _ in outcomes), outcomes
    for code, err in outcomes:
        assert code == 0 or "another ingestion run" in err, err[-3000:]
    assert_exactly_once(bronze_rows(fresh_devstack), produced)


def test_unreachable_broker_fails_with_a_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "k2home"
    home.mkdir()
    (home / "devstack.env").write_text(
        "K2_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9\nK2_SCHEMA_REGISTRY_URL=http://127.0.0.1:9\n"
    )
    started = time.monotonic()
    failed = ingest(home, "--broker-timeout-seconds", "4", timeout=120)
    assert failed.returncode == 1
    assert "Kafka at 127.0.0.1:9 is unreachable" in failed.stderr
    assert "K2_KAFKA_BOOTSTRAP_SERVERS" in failed.stderr
    assert time.monotonic() - started < 90
