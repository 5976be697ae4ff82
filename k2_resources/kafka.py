"""Kafka and Schema Registry as Dagster resources.

Addresses come from the environment (`dg.EnvVar`), so the embedded dev stack and a real cluster differ
only in configuration. Extra client settings (security protocol, SASL credentials, TLS, client id) are
in `client_config`, which `k2_assets.resources` fills with a `dg.EnvVar` per `K2_KAFKA__*` /
`K2_SCHEMA_REGISTRY__*` variable, so their values are never part of the run config Dagster shows.
A client that fails to authenticate fails at once with an error that names those settings.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import dagster as dg
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from k2_resources.kafka_clients import query_watermarks
from k2_resources.settings import (
    KAFKA_BOOTSTRAP_SERVERS,
    KAFKA_CLIENT_PREFIX,
    SCHEMA_REGISTRY_CLIENT_PREFIX,
    SCHEMA_REGISTRY_URL,
    client_property_variables,
    is_secret_property,
)

log = logging.getLogger(__name__)

# Errors after which retrying cannot help: the credentials or TLS settings are wrong.
AUTH_ERRORS = {KafkaError._AUTHENTICATION, KafkaError._SSL, KafkaError.SASL_AUTHENTICATION_FAILED}


class KafkaAuthenticationError(KafkaException):
    """Kafka refused the client's credentials or TLS handshake; names the settings to check."""


class _FailOnAuthError:
    """librdkafka's error callback: an authentication failure ends the client's work at once (raised
    from the poll, consume or metadata call that served it) instead of being retried forever. Raised
    once per client, so closing the client afterwards does not raise it again."""

    def __init__(self) -> None:
        self.raised = False

    def __call__(self, err: KafkaError) -> None:
        if err.code() in AUTH_ERRORS and not self.raised:
            self.raised = True
            raise KafkaAuthenticationError(
                f"Kafka rejected the client's credentials or TLS settings: {err.str()}. Check "
                f"{KAFKA_BOOTSTRAP_SERVERS} and the {KAFKA_CLIENT_PREFIX}* settings (e.g. "
                f"{KAFKA_CLIENT_PREFIX}SECURITY_PROTOCOL, {KAFKA_CLIENT_PREFIX}SASL_MECHANISMS, "
                f"{KAFKA_CLIENT_PREFIX}SASL_USERNAME, {KAFKA_CLIENT_PREFIX}SASL_PASSWORD)."
            )
        log.debug("Kafka client error: %s", err.str())


def close_consumer(consumer: Consumer, timeout_seconds: float = 10.0) -> bool:
    """Close a consumer, waiting at most `timeout_seconds`; False if it was still closing then.

    With the broker gone, librdkafka's close waits for the consumer group's pending offset commit,
    for 45 s or (seen in tests) indefinitely, which would keep a finished ingestion run alive. Bronze
    never depends on that commit (offsets live in Iceberg), so the run moves on and the process's exit
    ends the close.
    """
    closing = threading.Thread(target=consumer.close, name="kafka-consumer-close", daemon=True)
    closing.start()
    closing.join(timeout_seconds)
    if closing.is_alive():
        log.warning(
            "The Kafka consumer did not close within %.0f s (broker unreachable?); moving on", timeout_seconds
        )
        return False
    return True


def masked(config: dict[str, Any]) -> dict[str, Any]:
    """A client config fit for logs: secret values replaced."""
    return {k: ("***" if is_secret_property(k) else v) for k, v in config.items()}


class KafkaResource(dg.ConfigurableResource):
    """A Kafka cluster: consumers for ingestion, metadata and watermarks for sensors and checks."""

    bootstrap_servers: str
    client_config: dict[str, str] = {}
    request_timeout_seconds: float = 10.0

    def base_config(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "error_cb": _FailOnAuthError(),
            **self.client_config,
        }

    def topic_id(self, topic: str) -> str | None:
        """The topic's id (a new one after a delete and recreate), or None where the broker has none."""
        admin = AdminClient({k: v for k, v in self.base_config().items() if k != "error_cb"})
        try:
            future = admin.describe_topics(
                TopicCollection([topic]), request_timeout=self.request_timeout_seconds
            )[topic]
            description = future.result(timeout=self.request_timeout_seconds + 5)
        except KafkaException as err:
            log.warning(
                "Kafka gave no topic id for %s (%s): recreation is detected by offsets only", topic, err
            )
            return None
        topic_id = str(description.topic_id) if description.topic_id is not None else None
        return topic_id if topic_id and topic_id != "AAAAAAAAAAAAAAAAAAAAAA" else None

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
                mark = query_watermarks(consumer, tp, self.request_timeout_seconds)
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
                except KafkaAuthenticationError:
                    raise
                except KafkaException as err:
                    consumer.poll(0)  # serves the error callback, which raises on an authentication failure
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
        """A registry client; basic auth and TLS come from `K2_SCHEMA_REGISTRY__*` settings."""
        return SchemaRegistryClient({"url": self.url, **self.client_config})


def env_client_config(prefix: str) -> dict[str, Any]:
    """A `dg.EnvVar` per client property the environment sets under `prefix` (values stay out of config)."""
    return {prop: dg.EnvVar(name) for prop, name in client_property_variables(prefix).items()}


def kafka_from_env() -> KafkaResource:
    return KafkaResource(
        bootstrap_servers=dg.EnvVar(KAFKA_BOOTSTRAP_SERVERS),
        client_config=env_client_config(KAFKA_CLIENT_PREFIX),
    )


def schema_registry_from_env() -> SchemaRegistryResource:
    return SchemaRegistryResource(
        url=dg.EnvVar(SCHEMA_REGISTRY_URL), client_config=env_client_config(SCHEMA_REGISTRY_CLIENT_PREFIX)
    )
