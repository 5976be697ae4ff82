"""V2 records of a live feed onto the exchange's topic, exactly as the contract says, none lost silently.

The producer is idempotent (`enable.idempotence`, `acks=all`): librdkafka's own retries never duplicate
or reorder. A record whose delivery still fails (its `message.timeout.ms` ran out, e.g. a broker outage)
is produced again, up to `max_redeliveries` times; past that, or on a fatal producer error, the feed
fails loudly rather than carry on with a hole. `close()` flushes and fails if anything is undelivered.

Each record's message_id is a UUID derived from (exchange, symbol, exchange trade id), so a trade the
exchange sends again (after a reconnect, in Kraken's snapshot, in the next run) carries the same id and
Gold's dedup removes the copy.
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from k2_resources.exchanges import ExchangeConfig
from k2_resources.feeds import datetime_to_micros
from k2_resources.trade_schema import trade_v2_schema_str

log = logging.getLogger(__name__)

# Fixed forever: changing it would give every trade a new message_id and defeat Gold's dedup.
MESSAGE_ID_NAMESPACE = uuid.UUID("6c1f8f2e-3b0e-5d4a-9c57-4b2f1e0a7d11")
PRODUCER_CONFIG = {
    "enable.idempotence": True,
    "acks": "all",
    # Java-compatible, like the simulator's: one symbol always lands on one partition.
    "partitioner": "murmur2_random",
    "linger.ms": 20,
}
DEFAULT_MAX_REDELIVERIES = 5
FLUSH_TIMEOUT_SECONDS = 60.0


def trade_message_id(record: dict[str, Any]) -> str:
    """The same UUID for the same exchange trade, whenever and however often it is received."""
    return str(
        uuid.uuid5(MESSAGE_ID_NAMESPACE, f"{record['exchange']}|{record['symbol']}|{record['trade_id']}")
    )


class FeedDeliveryError(KafkaException):
    """Records could not be delivered after every retry; the message names the broker's error."""


@dataclass(frozen=True)
class Pending:
    key: bytes
    value: bytes
    timestamp_ms: int
    attempt: int


class TopicSink:
    """A `Sink` for FeedClient: serialise with AvroSerializer, produce keyed by symbol at trade time."""

    def __init__(
        self,
        exchange: ExchangeConfig,
        producer_config: dict[str, Any],
        registry: SchemaRegistryClient,
        max_redeliveries: int = DEFAULT_MAX_REDELIVERIES,
    ) -> None:
        self.topic = exchange.topic
        self.producer = Producer({**producer_config, **PRODUCER_CONFIG})
        self.serializer = AvroSerializer(registry, trade_v2_schema_str())
        self.context = SerializationContext(exchange.topic, MessageField.VALUE)
        self.max_redeliveries = max_redeliveries
        self.delivered = 0
        self.redelivered = 0
        self.in_flight = 0
        self._retry: list[Pending] = []
        self._failure: str | None = None

    def __call__(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            value = self.serializer(record, self.context)
            timestamp_ms = datetime_to_micros(record["timestamp"]) // 1000
            self._produce(Pending(record["symbol"].encode(), value, timestamp_ms, 0))
        self.poll()

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports, re-produce failed records, fail if one is past its last retry."""
        self.producer.poll(timeout)
        if self._failure is not None:
            raise FeedDeliveryError(self._failure)
        retry, self._retry = self._retry, []
        for pending in retry:
            self.redelivered += 1
            self._produce(pending)

    def close(self, timeout: float = FLUSH_TIMEOUT_SECONDS) -> None:
        """Flush everything, retries included; undelivered records are an error, not a log line."""
        self.producer.flush(timeout)
        while self._retry and self._failure is None:
            self.poll()
            self.producer.flush(timeout)
        self.poll()
        if self.in_flight:
            raise FeedDeliveryError(
                f"{self.in_flight} record(s) to {self.topic} undelivered after {timeout:g} s"
            )

    def metadata(self) -> dict[str, int]:
        return {
            "kafka_delivered": self.delivered,
            "kafka_redelivered": self.redelivered,
            "kafka_in_flight": self.in_flight,
        }

    def _produce(self, pending: Pending) -> None:
        callback = functools.partial(self._delivered, pending)
        while True:
            try:
                self.producer.produce(
                    self.topic,
                    value=pending.value,
                    key=pending.key,
                    timestamp=pending.timestamp_ms,
                    on_delivery=callback,
                )
                self.in_flight += 1
                return
            except BufferError:  # the local queue is full: wait for deliveries
                self.producer.poll(0.1)

    def _delivered(self, pending: Pending, err: KafkaError | None, message: Message) -> None:
        self.in_flight -= 1
        if err is None:
            self.delivered += 1
            return
        if err.fatal() or pending.attempt >= self.max_redeliveries:
            self._failure = f"A record to {self.topic} (key {pending.key!r}) failed delivery {pending.attempt + 1} time(s): {err.str()}"
            return
        log.warning("Delivery to %s failed (%s); producing the record again", self.topic, err.str())
        self._retry.append(Pending(pending.key, pending.value, pending.timestamp_ms, pending.attempt + 1))
