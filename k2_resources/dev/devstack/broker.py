"""The dev stack's Kafka: librdkafka's in-memory mock cluster, plus probes that look at it as a client would.

No Kafka broker can be installed here, but the `confluent-kafka` wheel's librdkafka can run a mock
cluster that speaks the Kafka protocol on 127.0.0.1 to unmodified clients in other processes. It lives
exactly as long as the client that created it, so the dev stack's host process holds that client. It is
memory-only: a restart starts with empty topics, which is also how tests simulate a recreated topic.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from k2_resources.kafka_clients import query_watermarks

# Watermarks per topic and partition, as a consumer in another process sees them.
TopicWatermarks = dict[str, dict[int, tuple[int, int]]]


class MockBroker:
    """A one-broker mock cluster, alive until `close()` (or the end of the process)."""

    def __init__(self, num_brokers: int = 1) -> None:
        self._producer: Producer | None = Producer({"test.mock.num.brokers": num_brokers})
        metadata = self._producer.list_topics(timeout=10)
        self.bootstrap_servers = ",".join(
            f"{broker.host}:{broker.port}" for _, broker in sorted(metadata.brokers.items())
        )

    def ensure_topics(self, topics: Iterable[str], timeout: float = 10.0) -> dict[str, int]:
        """Create each topic (partition count per topic) by asking for its metadata.

        The mock cluster creates a topic with 4 partitions when a producer asks for it (`AdminClient.
        create_topics` times out against it), and consumers do not auto-create: doing it here means a
        consumer can assign and read watermarks as soon as the stack is up, before anything is produced.
        """
        producer = self._require_producer()
        counts: dict[str, int] = {}
        for topic in topics:
            deadline = time.monotonic() + timeout
            while True:
                info = producer.list_topics(topic, timeout=timeout).topics.get(topic)
                if info is not None and info.error is None and info.partitions:
                    counts[topic] = len(info.partitions)
                    break
                if time.monotonic() > deadline:
                    reason = info.error if info is not None else "not in metadata"
                    raise KafkaException(f"The mock cluster did not create topic {topic}: {reason}")
                time.sleep(0.05)
        return counts

    def close(self) -> None:
        """Flush and drop the client that owns the cluster, which stops the cluster."""
        if self._producer is not None:
            self._producer.flush(5)
            self._producer = None

    def _require_producer(self) -> Producer:
        if self._producer is None:
            raise RuntimeError("The mock cluster is closed")
        return self._producer


def probe_topics(bootstrap_servers: str, topics: Iterable[str], timeout: float = 10.0) -> TopicWatermarks:
    """Do what a fresh consumer does first: find each topic's partitions, assign them, read watermarks.

    Used by `up` (from another process than the host) to prove the topics are ready before it reports
    success, and by `status` to show what is on them. A missing topic raises, naming it.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": "k2-devstack-probe",
            "enable.auto.commit": False,
            "socket.timeout.ms": int(timeout * 1000),
        }
    )
    try:
        result: TopicWatermarks = {}
        for topic in topics:
            info = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
            if info is None or info.error is not None or not info.partitions:
                reason = info.error if info is not None else "not in metadata"
                raise KafkaException(f"Topic {topic} is not available on {bootstrap_servers}: {reason}")
            partitions = sorted(info.partitions)
            consumer.assign([TopicPartition(topic, p) for p in partitions])
            result[topic] = {
                p: query_watermarks(consumer, TopicPartition(topic, p), timeout) for p in partitions
            }
            consumer.unassign()
        return result
    finally:
        consumer.close()
