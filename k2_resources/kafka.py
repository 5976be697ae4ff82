"""Kafka and Schema Registry as Dagster resources.

Addresses come from the environment (`dg.EnvVar`), so the embedded dev stack and a real cluster differ
only in configuration. Extra client settings (security protocol, SASL credentials, ...) are passed in
`client_config`; secrets there should themselves come from `dg.EnvVar`.
"""

from __future__ import annotations

import time
from typing import Any

import dagster as dg
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient


class KafkaResource(dg.ConfigurableResource):
    """A Kafka cluster: consumers for ingestion, metadata and watermarks for sensors and checks."""

    bootstrap_servers: str
    client_config: dict[str, str] = {}
    request_timeout_seconds: float = 10.0

    def base_config(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap_servers, **self.client_config}

    def consumer(self, group_id: str, **overrides: Any) -> Consumer:
        """A consumer that never commits or resets by itself: K2 decides where reading starts."""
        config = {
            **self.base_config(),
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "error",
            "enable.partition.eof": True,
            **overrides,
        }
        return Consumer(config)

    def partitions(self, consumer: Consumer, topic: str) -> list[int]:
        """The topic's partition ids; a missing topic is an error that names it."""
        metadata = consumer.list_topics(topic, timeout=self.request_timeout_seconds)
        info = metadata.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            reason = info.error if info is not None else "not in metadata"
            raise KafkaException(f"Topic {topic} is not available on {self.bootstrap_servers}: {reason}")
        return sorted(info.partitions)

    def watermarks(
        self, consumer: Consumer, topic: str, partitions: list[int], cached: bool = False
    ) -> dict[int, tuple[int, int]]:
        """(low, high) watermark per partition: asked of the broker, or as last seen in fetch responses."""
        marks = {}
        for p in partitions:
            tp = TopicPartition(topic, p)
            mark = consumer.get_watermark_offsets(tp, cached=True) if cached else None
            if mark is None or mark[1] < 0:
                mark = consumer.get_watermark_offsets(tp, timeout=self.request_timeout_seconds)
            marks[p] = mark
        return marks

    def wait_until_reachable(self, timeout_seconds: float = 60.0) -> None:
        """Retry metadata with exponential backoff until the deadline, then fail naming the servers."""
        consumer = Consumer({**self.base_config(), "group.id": "k2-probe"})
        deadline, backoff, attempts = time.monotonic() + timeout_seconds, 0.5, 0
        try:
            while True:
                attempts += 1
                remaining = deadline - time.monotonic()
                try:
                    consumer.list_topics(timeout=max(0.5, min(self.request_timeout_seconds, remaining)))
                    return
                except KafkaException as err:
                    if time.monotonic() + backoff >= deadline:
                        raise KafkaException(
                            f"Kafka at {self.bootstrap_servers} is unreachable: {attempts} attempts over "
                            f"{timeout_seconds:.0f}s failed ({err}). Check K2_KAFKA_BOOTSTRAP_SERVERS."
                        ) from err
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
        finally:
            consumer.close()


class SchemaRegistryResource(dg.ConfigurableResource):
    """A Confluent-compatible Schema Registry."""

    url: str
    client_config: dict[str, str] = {}

    def client(self) -> SchemaRegistryClient:
        return SchemaRegistryClient({"url": self.url, **self.client_config})
