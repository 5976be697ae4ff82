"""`k2 produce` against the real dev stack: what lands on the topic is what the report says.

Every test reads back only the offsets its own report names, so runs sharing a topic stay independent.
The fault classifier here is written from the V2 contract, not from the simulator's code: it looks at
bytes, asks the registry about schema ids, decodes with fastavro and checks fields.
"""

from __future__ import annotations

import io
import json
import struct
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, Consumer, Message, TopicPartition
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from k2_resources.dev.simulator import producer as producer_module
from k2_resources.dev.simulator.faults import parse_faults
from k2_resources.dev.simulator.producer import ProduceError, produce
from k2_resources.exchanges import exchange
from k2_resources.settings import read_env_file
from k2_resources.trade_schema import trade_v2_parsed, trade_v2_schema_str
from tests.conftest import k2

START = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
V2 = Schema(trade_v2_schema_str(), "AVRO")
UNREADABLE = {"empty_value", "bad_magic", "unknown_schema_id", "truncated_body", "trailing_garbage"}
ALL_KINDS = UNREADABLE | {
    "nonpositive_price",
    "nonpositive_quantity",
    "decimal_overflow",
    "side_unknown",
    "empty_symbol",
    "future_timestamp",
    "exchange_mismatch",
    "redelivery",
    "replay_new_id",
    "late_trade",
    "v3_schema",
}


@pytest.fixture(scope="module")
def stack(devstack_home: Path) -> Iterator[dict[str, str]]:
    """The module's dev stack exported into this process for module-scoped runs (devstack_env is per test)."""
    with pytest.MonkeyPatch.context() as patch:
        values = read_env_file(devstack_home / "devstack.env")
        for key, value in values.items():
            patch.setenv(key, value)
        patch.setenv("K2_HOME", str(devstack_home))
        yield values


@pytest.fixture(scope="module")
def registry(stack: dict[str, str]) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": stack["K2_SCHEMA_REGISTRY_URL"]})


@pytest.fixture(scope="module")
def faulty_run(stack: dict[str, str]) -> tuple[dict[str, Any], list[Message]]:
    """Kraken with every fault kind at 2 % per record, and the records read back."""
    report = produce("kraken", 4_000, rate=80.0, start=START, faults="all=0.02", seed=20260302)
    return report, read_back(stack, report)


def read_back(stack: dict[str, str], report: dict[str, Any]) -> list[Message]:
    """The records a report names, partition by partition in offset order."""
    consumer = Consumer(
        {
            "bootstrap.servers": stack["K2_KAFKA_BOOTSTRAP_SERVERS"],
            "group.id": f"test-{uuid.uuid4()}",
            "enable.auto.commit": False,
        }
    )
    records: list[Message] = []
    try:
        for partition, span in sorted(report["partitions"].items()):
            records.extend(read_partition(consumer, report["topic"], int(partition), span))
    finally:
        consumer.close()
    return records


def read_partition(consumer: Consumer, topic: str, partition: int, span: dict[str, int]) -> list[Message]:
    consumer.assign([TopicPartition(topic, partition, span["first_offset"])])
    records: list[Message] = []
    next_offset = span["first_offset"]
    while next_offset <= span["last_offset"]:
        # Never ask for more than the span holds: consume() would wait out its timeout for the rest.
        batch = consumer.consume(min(1_000, span["last_offset"] - next_offset + 1), timeout=10)
        assert batch, f"partition {partition} ended before offset {span['last_offset']}"
        assert all(m.error() is None for m in batch), [m.error() for m in batch if m.error()]
        records.extend(m for m in batch if m.offset() <= span["last_offset"])
        next_offset = batch[-1].offset() + 1
    return records


class Classifier:
    """Tells each record's fault kind from its bytes, the registry and its decoded fields alone."""

    def __init__(self, registry: SchemaRegistryClient, exchange_code: str) -> None:
        self.registry = registry
        self.exchange_code = exchange_code
        self.writers: dict[int, Any] = {}
        self.seen_values: set[bytes] = set()
        self.seen_trades: dict[tuple[str, str], str] = {}

    def writer_schema(self, schema_id: int) -> Any | None:
        """The parsed writer schema, or None when the registry never issued `schema_id`."""
        if schema_id not in self.writers:
            try:
                text = self.registry.get_schema(schema_id).schema_str
            except SchemaRegistryError as err:
                assert err.http_status_code == 404, err
                self.writers[schema_id] = None
            else:
                self.writers[schema_id] = fastavro.parse_schema(json.loads(text))
        return self.writers[schema_id]

    def classify(self, message: Message) -> tuple[str, dict[str, Any] | None]:
        value = message.value()
        if not value:
            return "empty_value", None
        if value[0] != 0:
            return "bad_magic", None
        (schema_id,) = struct.unpack(">I", value[1:5])
        writer = self.writer_schema(schema_id)
        if writer is None:
            return "unknown_schema_id", None
        body = io.BytesIO(value[5:])
        try:
            record = fastavro.schemaless_reader(body, writer, trade_v2_parsed())
        except Exception:  # any decode failure of a well-framed body is a truncation here
            return "truncated_body", None
        if body.tell() != len(value) - 5:
            return "trailing_garbage", None
        return self.field_kind(value, record, writer), record

    def field_kind(self, value: bytes, record: dict[str, Any], writer: Any) -> str:
        natural_key = (record["symbol"], record["trade_id"])
        repeated_value = value in self.seen_values
        replayed = self.seen_trades.get(natural_key, record["message_id"]) != record["message_id"]
        self.seen_values.add(value)
        self.seen_trades.setdefault(natural_key, record["message_id"])
        lag = record["ingestion_timestamp"] - record["timestamp"]
        checks = [
            ("v3_schema", "venue" in {f["name"] for f in writer["fields"]}),
            ("redelivery", repeated_value),
            ("replay_new_id", replayed),
            ("decimal_overflow", max(abs(record["price"]), abs(record["quantity"])) >= Decimal(10**10)),
            ("nonpositive_price", record["price"] <= 0),
            ("nonpositive_quantity", record["quantity"] <= 0),
            ("side_unknown", record["side"] not in ("BUY", "SELL")),
            ("empty_symbol", record["symbol"] == ""),
            ("exchange_mismatch", record["exchange"] != self.exchange_code),
            ("future_timestamp", lag < -timedelta(days=1)),
            ("late_trade", lag > timedelta(hours=1)),
        ]
        return next((kind for kind, hit in checks if hit), "clean")


def trade_time_ms(record: dict[str, Any]) -> int:
    return (record["timestamp"] - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


@pytest.mark.parametrize(("name", "count"), [("binance", 3_000), ("kraken", 2_500)])
def test_clean_run_decodes_through_the_registry_as_reported(
    stack: dict[str, str], registry: SchemaRegistryClient, name: str, count: int
) -> None:
    before = datetime.now(UTC)
    report = produce(name, count, seed=17)
    config = exchange(name)
    records = read_back(stack, report)
    deserialize = AvroDeserializer(registry, trade_v2_schema_str())
    context = SerializationContext(config.topic, MessageField.VALUE)
    decoded = [deserialize(m.value(), context) for m in records]

    assert report["count"] == count == len(records) == report["clean"]
    assert set(report["faults"]) == ALL_KINDS and not any(report["faults"].values())
    assert sorted(r["message_id"] for r in decoded) == sorted(report["message_ids"]["clean"])
    assert len(set(report["message_ids"]["clean"])) == count
    for message, record in zip(records, decoded, strict=True):
        assert message.key() == record["symbol"].encode()
        assert message.timestamp() == (TIMESTAMP_CREATE_TIME, trade_time_ms(record))
        assert record["exchange"] == config.code and record["price"] > 0 and record["quantity"] > 0
        assert before - timedelta(seconds=count / 50 + 1) <= record["timestamp"] <= datetime.now(UTC)
    assert sum(p["count"] for p in report["partitions"].values()) == count
    assert report["schema_ids"] == {"v2": registry.lookup_schema(config.subject, V2).schema_id, "v3": None}


def test_every_fault_kind_appears_as_often_as_reported(
    faulty_run: tuple[dict[str, Any], list[Message]],
) -> None:
    report, records = faulty_run
    assert report["count"] == len(records) == 4_000
    assert set(report["faults"]) == ALL_KINDS
    assert all(report["faults"][kind] > 0 for kind in ALL_KINDS), report["faults"]
    assert report["clean"] + sum(report["faults"].values()) == 4_000
    assert set(report["message_ids"]) == (ALL_KINDS - UNREADABLE) | {"clean"}
    for kind, ids in report["message_ids"].items():
        assert len(ids) == (report["clean"] if kind == "clean" else report["faults"][kind]), kind
    assert Counter(u["kind"] for u in report["unreadable"]) == {k: report["faults"][k] for k in UNREADABLE}


def test_independent_classification_reproduces_the_report(
    faulty_run: tuple[dict[str, Any], list[Message]], registry: SchemaRegistryClient
) -> None:
    report, records = faulty_run
    classifier = Classifier(registry, "KRAKEN")
    unreadable, message_ids = [], {kind: [] for kind in report["message_ids"]}
    for message in records:
        kind, record = classifier.classify(message)
        if record is None:
            unreadable.append({"kind": kind, "partition": message.partition(), "offset": message.offset()})
        else:
            message_ids[kind].append(record["message_id"])
            assert message.key() == record["symbol"].encode()
    assert sorted(unreadable, key=lambda u: (u["partition"], u["offset"])) == report["unreadable"]
    for kind, ids in message_ids.items():
        assert sorted(ids) == sorted(report["message_ids"][kind]), kind


def test_fault_timestamps_follow_the_contract(
    faulty_run: tuple[dict[str, Any], list[Message]], registry: SchemaRegistryClient
) -> None:
    """future_timestamp keeps the real trade time on Kafka; late_trade is stamped with its late time."""
    report, records = faulty_run
    classifier = Classifier(registry, "KRAKEN")
    checked = Counter()
    for message in records:
        kind, record = classifier.classify(message)
        if kind in ("future_timestamp", "late_trade", "redelivery", "replay_new_id", "clean"):
            kafka_ms = message.timestamp()[1]
            ingestion_ms = trade_time_ms({"timestamp": record["ingestion_timestamp"]})
            if kind == "future_timestamp":
                assert trade_time_ms(record) - kafka_ms > 86_400_000 and abs(ingestion_ms - kafka_ms) < 1_000
            else:
                assert kafka_ms == trade_time_ms(record), kind
            checked[kind] += 1
    assert checked["future_timestamp"] == report["faults"]["future_timestamp"]
    assert checked["late_trade"] == report["faults"]["late_trade"]


def test_v3_records_decode_with_the_v2_reader(
    faulty_run: tuple[dict[str, Any], list[Message]], registry: SchemaRegistryClient
) -> None:
    report, records = faulty_run
    v2_id, v3_id = report["schema_ids"]["v2"], report["schema_ids"]["v3"]
    assert v3_id is not None and v3_id != v2_id
    v3_fields = [f["name"] for f in json.loads(registry.get_schema(v3_id).schema_str)["fields"]]
    assert v3_fields[-1] == "venue"
    kraken = exchange("kraken")
    assert v3_id in {
        registry.get_version(kraken.subject, v).schema_id for v in registry.get_versions(kraken.subject)
    }
    deserialize = AvroDeserializer(registry, trade_v2_schema_str())
    context = SerializationContext(kraken.topic, MessageField.VALUE)
    v3_records = [m for m in records if m.value() and m.value()[:5] == b"\x00" + struct.pack(">I", v3_id)]
    assert len(v3_records) == report["faults"]["v3_schema"]
    decoded = [deserialize(m.value(), context) for m in v3_records]
    assert all("venue" not in r and r["price"] > 0 and r["side"] in ("BUY", "SELL") for r in decoded)
    assert sorted(r["message_id"] for r in decoded) == sorted(report["message_ids"]["v3_schema"])


def test_same_seed_gives_identical_records(stack: dict[str, str]) -> None:
    runs = [produce("binance", 800, start=START, faults="all=0.03", seed=99) for _ in range(2)]
    first, second = (read_back(stack, run) for run in runs)
    assert runs[0]["message_ids"] == runs[1]["message_ids"]
    assert runs[0]["faults"] == runs[1]["faults"]
    assert [p["count"] for p in runs[0]["partitions"].values()] == [
        p["count"] for p in runs[1]["partitions"].values()
    ]
    assert [(m.partition(), m.key(), m.value(), m.timestamp()) for m in first] == [
        (m.partition(), m.key(), m.value(), m.timestamp()) for m in second
    ]
    other = read_back(stack, produce("binance", 50, start=START, seed=100))
    assert {m.value() for m in other}.isdisjoint(m.value() for m in first)


def test_delivery_failure_fails_the_run_naming_the_error(
    devstack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("K2_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # nothing listens there
    monkeypatch.setitem(producer_module.PRODUCER_CONFIG, "message.timeout.ms", 1_500)
    with pytest.raises(ProduceError, match="failed delivery; first error: .*timed out"):
        produce("kraken", 5, seed=1)


def test_cli_prints_and_writes_the_report(devstack_home: Path, tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    result = k2(
        "produce", "--exchange", "kraken", "--count", "300", "--start", "-3h", "--rate", "10",
        "--faults", "bad_magic=0.1,late_trade=0.1", "--seed", "5", "--report", str(report_file),
        home=devstack_home,
    )  # fmt: skip
    report = json.loads(result.stdout)
    assert report == json.loads(report_file.read_text())
    assert report["count"] == 300 and report["seed"] == 5
    assert report["faults"]["bad_magic"] > 0 and report["faults"]["late_trade"] > 0
    assert report["faults"]["empty_value"] == 0
    start = datetime.fromisoformat(report["start"])
    assert abs(start - (datetime.now(UTC) - timedelta(hours=3))) < timedelta(minutes=2)
    assert datetime.fromisoformat(report["end"]) - start <= timedelta(seconds=30)


def test_cli_fails_fast_naming_a_missing_setting(tmp_path: Path) -> None:
    result = k2("produce", "--exchange", "binance", "--count", "10", home=tmp_path, check=False)
    assert result.returncode == 1
    assert "K2_KAFKA_BOOTSTRAP_SERVERS" in result.stderr


def test_cli_refuses_unknown_fault_kinds(tmp_path: Path) -> None:
    result = k2(
        "produce",
        "--exchange",
        "binance",
        "--count",
        "1",
        "--faults",
        "gremlins=0.1",
        home=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "Unknown fault kind 'gremlins'" in result.stderr


def test_fault_spec_parsing() -> None:
    rates = parse_faults("all=0.01,bad_magic=0.05")
    assert set(rates) == ALL_KINDS and rates["bad_magic"] == 0.05 and rates["late_trade"] == 0.01
    with pytest.raises(ValueError, match="more than one per record"):
        parse_faults("all=0.1")
    with pytest.raises(ValueError, match="not kind=rate"):
        parse_faults("bad_magic")
