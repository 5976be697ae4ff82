"""Plain confluent-kafka helpers, free of Dagster so the dev stack's processes start fast."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

# Errors of a partition whose leader is moving (a broker that just restarted): asked again shortly.
LEADER_MOVING_ERRORS = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TIMED_OUT,
}


def query_watermarks(consumer: Consumer, tp: TopicPartition, timeout_seconds: float) -> tuple[int, int]:
    """(low, high) from the broker, retried while the partition's leader is still being elected."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=max(0.5, deadline - time.monotonic()))
        except KafkaException as err:
            error = err.args[0]
            retry = error.code() in LEADER_MOVING_ERRORS or error.retriable()
            if not retry or time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
