"""`produce()`: simulated exchange trades, clean and faulty, onto an exchange's Kafka topic.

Trades come from the seeded market through the real feed mapping, are serialised with confluent-kafka's
AvroSerializer against the Schema Registry (subject `<topic>-value`), keyed by symbol and stamped with
their trade time. Faults replace a share of the records. The report says what was produced and where,
from delivery reports, so tests and the pipeline's own checks can reconcile Bronze, Silver and the DLQ
against it record by record.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from k2_resources.dev.simulator.faults import (
    CLEAN,
    FIELD_FAULTS,
    HISTORY_FAULTS,
    KINDS,
    READABLE,
    UNREADABLE,
    FaultChooser,
    apply_field_fault,
    corrupt_value,
    parse_faults,
    wire_header,
)
from k2_resources.dev.simulator.market import Market, seeded_message_ids, seeded_rng, v2_trades
from k2_resources.exchanges import ExchangeConfig
from k2_resources.exchanges import exchange as exchange_named
from k2_resources.feeds import datetime_to_micros, micros_to_datetime
from k2_resources.settings import (
    KAFKA_BOOTSTRAP_SERVERS,
    KAFKA_CLIENT_PREFIX,
    SCHEMA_REGISTRY_CLIENT_PREFIX,
    SCHEMA_REGISTRY_URL,
    client_properties,
    require_setting,
)
from k2_resources.trade_schema import trade_v2_schema, trade_v2_schema_str

DEFAULT_RATE = 50.0  # trades per second of market time
V3_FIELD = {"name": "venue", "type": ["null", "string"], "default": None, "doc": "V3: trading venue"}
V3_VENUE = "spot"
HISTORY_SIZE = 5_000  # earlier clean records that redelivery / replay_new_id copy from
POLL_EVERY = 1_000
DELIVERY_TIMEOUT_S = 120.0
PRODUCER_CONFIG = {
    # Java-compatible and deterministic for every key, the empty key of empty_symbol included.
    "partitioner": "murmur2_random",
    # Retries never reorder or duplicate: a redelivery in the topic is always an injected one.
    "enable.idempotence": True,
    "linger.ms": 20,
    "message.timeout.ms": 30_000,
}
RELATIVE_TIME = re.compile(r"^([+-])((?:\d+(?:\.\d+)?[smhdw])+)$")
RELATIVE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class ProduceError(RuntimeError):
    """Records were not all delivered; the message names the broker's error."""


@dataclass(frozen=True)
class Outgoing:
    """One Kafka record as sent, with what the report needs to know about it."""

    kind: str
    key: bytes
    value: bytes
    timestamp_ms: int
    message_id: str | None
    market_us: int


def produce(
    exchange: str | ExchangeConfig,
    count: int,
    rate: float = DEFAULT_RATE,
    start: datetime | str | None = None,
    faults: str | Mapping[str, float] | None = None,
    seed: int | None = None,
    realtime: bool = False,
) -> dict[str, Any]:
    """Produce `count` records to the exchange's topic on the configured broker; returns the report.

    `start` is the market time of the first trade (ISO-8601, relative like `-3h`, or a datetime); by
    default trades end now (or, with `realtime`, begin now). `faults` is a spec such as
    `bad_magic=0.01` or `all=0.01`. The same seed and start give the same records.
    """
    if count < 0 or rate <= 0:
        raise ValueError(f"count must be >= 0 and rate > 0, got count={count}, rate={rate}")
    config = exchange if isinstance(exchange, ExchangeConfig) else exchange_named(exchange)
    bootstrap = require_setting(KAFKA_BOOTSTRAP_SERVERS)
    registry_url = require_setting(SCHEMA_REGISTRY_URL)
    plan = Plan(
        exchange=config,
        count=count,
        rate=rate,
        start=resolve_start(start, count, rate, realtime),
        rates=parse_faults(faults),
        seed=seed if seed is not None else random.SystemRandom().randrange(2**32),
    )
    producer = Producer(
        {"bootstrap.servers": bootstrap, **PRODUCER_CONFIG, **client_properties(KAFKA_CLIENT_PREFIX)}
    )
    registry_config = {"url": registry_url, **client_properties(SCHEMA_REGISTRY_CLIENT_PREFIX)}
    with SchemaRegistryClient(registry_config) as registry:
        return run(plan, registry, producer, realtime)


@dataclass(frozen=True)
class Plan:
    """What to produce: everything that, with the registry's schema ids, determines the records."""

    exchange: ExchangeConfig
    count: int
    rate: float
    start: datetime
    rates: dict[str, float]
    seed: int

    @property
    def start_us(self) -> int:
        return datetime_to_micros(self.start)


def run(plan: Plan, registry: SchemaRegistryClient, producer: Producer, realtime: bool = False) -> dict:
    """Build, send and account for every record of `plan`, then report once all are delivered."""
    encoder = Encoder(registry, plan.exchange)
    builder = RecordBuilder(plan, encoder, registry)
    chooser = FaultChooser(plan.rates, seeded_rng(plan.seed, f"faults:{plan.exchange.name}"))
    deliveries = Deliveries()
    pace = Pacer(plan.start_us) if realtime else None
    started = time.monotonic()
    for index in range(plan.count):
        record = builder.build(chooser.choose())
        if pace is not None:
            pace.wait_until(record.market_us, producer)
        send(producer, plan.exchange.topic, record, deliveries)
        if index % POLL_EVERY == 0:
            producer.poll(0)
    deliveries.wait(producer, plan.exchange.topic)
    elapsed = time.monotonic() - started
    return report(plan, encoder, deliveries, builder.end_us, elapsed)


def resolve_start(
    start: datetime | str | None, count: int, rate: float, realtime: bool, now: datetime | None = None
) -> datetime:
    """The first trade's market time: explicit, relative to now, or so that the last trade is now."""
    now = now or datetime.now(UTC)
    if start is None:
        return now if realtime else now - timedelta(seconds=count / rate)
    if isinstance(start, datetime):
        return start if start.tzinfo else start.replace(tzinfo=UTC)
    return parse_time(start, now)


def parse_time(text: str, now: datetime) -> datetime:
    """ISO-8601 (UTC unless it has an offset), `now`, or relative to now like `-3h`, `-1h30m`, `+10m`."""
    text = text.strip()
    if text.lower() == "now":
        return now
    relative = RELATIVE_TIME.match(text)
    if relative:
        sign, spec = relative.groups()
        seconds = sum(float(n) * RELATIVE_UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhdw])", spec))
        return now + timedelta(seconds=seconds if sign == "+" else -seconds)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as err:
        raise ValueError(f"Start time {text!r} is neither ISO-8601, 'now', nor relative like -3h") from err
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Encoder:
    """Confluent-framed values: V2 through AvroSerializer, the evolved V3, and oversized decimals."""

    def __init__(self, registry: SchemaRegistryClient, exchange: ExchangeConfig) -> None:
        self.registry = registry
        self.subject = exchange.subject
        self.context = SerializationContext(exchange.topic, MessageField.VALUE)
        self.v2_id = registry.register_schema(self.subject, Schema(trade_v2_schema_str(), "AVRO"))
        self._v2 = AvroSerializer(registry, trade_v2_schema_str())
        self._wide = fastavro.parse_schema(wide_decimal_schema())
        self.v3_id: int | None = None
        self._v3: AvroSerializer | None = None

    def v2(self, record: dict[str, Any]) -> bytes:
        return self._v2(record, self.context)

    def v3(self, record: dict[str, Any]) -> bytes:
        """A V3 value; V3 is registered under the subject on first use, so it gets a schema id of its own."""
        if self._v3 is None:
            schema = v3_schema_str()
            self.v3_id = self.registry.register_schema(self.subject, Schema(schema, "AVRO"))
            self._v3 = AvroSerializer(self.registry, schema)
        return self._v3({**record, "venue": V3_VENUE}, self.context)

    def oversized(self, record: dict[str, Any]) -> bytes:
        """A V2-framed value whose decimal has more digits than decimal(18, 8) allows.

        AvroSerializer (fastavro) refuses such a value, but its bytes are still valid Avro for the V2
        schema: the decimal encoding does not depend on the precision, so writing with a copy of V2
        whose precision is wider gives exactly the body an over-eager producer would send.
        """
        body = io.BytesIO()
        fastavro.schemaless_writer(body, self._wide, record)
        return wire_header(self.v2_id) + body.getvalue()


def v3_schema_str() -> str:
    """V2 plus one optional field with a null default: a BACKWARD-compatible evolution."""
    schema = copy.deepcopy(trade_v2_schema())
    schema["fields"].append(V3_FIELD)
    return json.dumps(schema)


def wide_decimal_schema() -> dict[str, Any]:
    schema = copy.deepcopy(trade_v2_schema())
    for entry in schema["fields"]:
        if entry["name"] in ("price", "quantity"):
            entry["type"]["precision"] = 38
    return schema


def unknown_schema_id(registry: SchemaRegistryClient, rng: random.Random) -> int:
    """A schema id the registry says it never issued (404), so the fault cannot decode by accident."""
    for _ in range(20):
        candidate = rng.randrange(10**9, 2**31 - 1)
        try:
            registry.get_schema(candidate)
        except SchemaRegistryError as err:
            if err.http_status_code == 404:
                return candidate
            raise
    raise ProduceError("The Schema Registry claims to know every candidate schema id; cannot fake one")


class RecordBuilder:
    """Turns the next kind into the next record, drawing trades from the market as it goes."""

    def __init__(self, plan: Plan, encoder: Encoder, registry: SchemaRegistryClient) -> None:
        self.plan = plan
        self.encoder = encoder
        self.registry = registry
        self.rng = seeded_rng(plan.seed, f"fault-values:{plan.exchange.name}")
        self.new_id = seeded_message_ids(seeded_rng(plan.seed, f"message-ids:{plan.exchange.name}"))
        market = Market(plan.exchange, plan.seed, plan.start_us, plan.rate)
        self.trades: Iterator[dict[str, Any]] = v2_trades(market, self.new_id)
        self.history: list[tuple[dict[str, Any], Outgoing]] = []
        self.end_us = plan.start_us
        self._unknown_id: int | None = None
        self._builders: dict[str, Callable[[str, dict[str, Any], int], Outgoing]] = {
            CLEAN: self._clean,
            "v3_schema": self._v3,
            **dict.fromkeys(UNREADABLE, self._unreadable),
            **dict.fromkeys(FIELD_FAULTS, self._field_fault),
        }

    def build(self, kind: str) -> Outgoing:
        """The record for `kind`; a history fault before any clean record exists falls back to clean."""
        if kind in HISTORY_FAULTS and not self.history:
            kind = CLEAN  # nothing to repeat yet
        if kind in HISTORY_FAULTS:
            return self._repeat(kind)
        trade = next(self.trades)
        market_us = datetime_to_micros(trade["timestamp"])
        self.end_us = max(self.end_us, market_us)
        return self._builders[kind](kind, trade, market_us)

    def _clean(self, kind: str, trade: dict[str, Any], market_us: int) -> Outgoing:
        record = self._outgoing(kind, trade, self.encoder.v2(trade), market_us)
        self._remember(trade, record)
        return record

    def _v3(self, kind: str, trade: dict[str, Any], market_us: int) -> Outgoing:
        return self._outgoing(kind, trade, self.encoder.v3(trade), market_us)

    def _unreadable(self, kind: str, trade: dict[str, Any], market_us: int) -> Outgoing:
        if kind == "unknown_schema_id" and self._unknown_id is None:
            self._unknown_id = unknown_schema_id(self.registry, self.rng)
        value = corrupt_value(kind, self.encoder.v2(trade), self.rng, self._unknown_id or 0)
        return replace(self._outgoing(kind, trade, value, market_us), message_id=None)

    def _field_fault(self, kind: str, trade: dict[str, Any], market_us: int) -> Outgoing:
        faulty = apply_field_fault(kind, trade, self.rng, self.plan.exchange)
        encode = self.encoder.oversized if kind == "decimal_overflow" else self.encoder.v2
        record = self._outgoing(kind, faulty, encode(faulty), market_us)
        # A future_timestamp record keeps the Kafka timestamp of its real trade time.
        return record if kind != "future_timestamp" else replace(record, timestamp_ms=market_us // 1000)

    def _repeat(self, kind: str) -> Outgoing:
        """redelivery: the same bytes again; replay_new_id: the same trade under a new message_id."""
        trade, earlier = self.history[self.rng.randrange(len(self.history))]
        if kind == "redelivery":
            return replace(earlier, kind=kind, market_us=self.end_us)
        # The feed handler receives the same exchange trade again: a new message_id and a later receive
        # time (ingestion_timestamp), which is how Gold's dedup tells the first copy from the replay.
        first_received = trade["ingestion_timestamp"]
        first_us = first_received if isinstance(first_received, int) else datetime_to_micros(first_received)
        received_us = max(self.end_us, first_us) + 1_000
        received = received_us if isinstance(first_received, int) else micros_to_datetime(received_us)
        replayed = {**trade, "message_id": self.new_id(), "ingestion_timestamp": received}
        return self._outgoing(kind, replayed, self.encoder.v2(replayed), self.end_us)

    def _outgoing(self, kind: str, record: dict[str, Any], value: bytes, market_us: int) -> Outgoing:
        timestamp_ms = datetime_to_micros(record["timestamp"]) // 1000
        key = record["symbol"].encode()
        return Outgoing(kind, key, value, timestamp_ms, record["message_id"], market_us)

    def _remember(self, trade: dict[str, Any], record: Outgoing) -> None:
        if len(self.history) < HISTORY_SIZE:
            self.history.append((trade, record))
        else:
            self.history[self.rng.randrange(HISTORY_SIZE)] = (trade, record)


@dataclass
class Deliveries:
    """What the broker confirmed: offsets per partition, unreadable records' locations, errors."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys((CLEAN, *KINDS), 0))
    message_ids: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in (*READABLE, CLEAN)})
    offsets: dict[int, list[int]] = field(default_factory=dict)
    unreadable: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pending: int = 0

    def sent(self, record: Outgoing) -> Callable[[KafkaError | None, Message], None]:
        """Account for a record handed to the producer; returns its delivery callback."""
        self.pending += 1
        self.counts[record.kind] += 1
        if record.message_id is not None:
            self.message_ids[record.kind].append(record.message_id)
        return functools.partial(self._delivered, record.kind)

    def _delivered(self, kind: str, err: KafkaError | None, message: Message) -> None:
        self.pending -= 1
        if err is not None:
            self.errors.append(str(err))
            return
        partition, offset = message.partition(), message.offset()
        self.offsets.setdefault(partition, []).append(offset)
        if kind in UNREADABLE:
            self.unreadable.append({"kind": kind, "partition": partition, "offset": offset})

    def wait(self, producer: Producer, topic: str) -> None:
        """Flush, then fail naming the broker's error if any record was not delivered."""
        remaining = producer.flush(DELIVERY_TIMEOUT_S)
        if self.errors:
            raise ProduceError(
                f"{len(self.errors)} record(s) to {topic} failed delivery; first error: {self.errors[0]}"
            )
        if remaining or self.pending:
            raise ProduceError(f"{self.pending} record(s) to {topic} undelivered after {DELIVERY_TIMEOUT_S}s")


def send(producer: Producer, topic: str, record: Outgoing, deliveries: Deliveries) -> None:
    """Produce one record, waiting on delivery reports while the local queue is full."""
    on_delivery = deliveries.sent(record)
    while True:
        try:
            producer.produce(
                topic,
                value=record.value,
                key=record.key,
                timestamp=record.timestamp_ms,
                on_delivery=on_delivery,
            )
            return
        except BufferError:
            producer.poll(0.1)


class Pacer:
    """Holds each record back until the wall clock has advanced as far as its market time (--realtime)."""

    def __init__(self, start_us: int) -> None:
        self.start_us = start_us
        self.wall_start = time.monotonic()

    def wait_until(self, market_us: int, producer: Producer) -> None:
        target = self.wall_start + (market_us - self.start_us) / 1_000_000
        while (left := target - time.monotonic()) > 0:
            producer.poll(min(left, 0.1))


def report(plan: Plan, encoder: Encoder, deliveries: Deliveries, end_us: int, elapsed: float) -> dict:
    """The run's report; partition keys are strings so the dict equals its JSON round trip."""
    partitions = {
        str(p): {"first_offset": min(offsets), "last_offset": max(offsets), "count": len(offsets)}
        for p, offsets in sorted(deliveries.offsets.items())
    }
    return {
        "exchange": plan.exchange.name,
        "topic": plan.exchange.topic,
        "count": sum(p["count"] for p in partitions.values()),
        "clean": deliveries.counts[CLEAN],
        "faults": {kind: deliveries.counts[kind] for kind in KINDS},
        "unreadable": sorted(deliveries.unreadable, key=lambda u: (u["partition"], u["offset"])),
        "message_ids": deliveries.message_ids,
        "schema_ids": {"v2": encoder.v2_id, "v3": encoder.v3_id},
        "partitions": partitions,
        "seed": plan.seed,
        "rate": plan.rate,
        "start": plan.start.isoformat(),
        "end": micros_to_datetime(end_us).isoformat(),
        "elapsed_seconds": round(elapsed, 3),
    }
