"""`prefetched`, the handoff between the Silver pass's stages: order kept, errors raised in the
consumer, a producer never more than `depth` ahead, and stopped when the consumer stops."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from k2_assets.silver.assets import prefetched


def test_items_arrive_in_order_and_from_another_thread() -> None:
    threads: list[str] = []

    def numbers() -> Iterator[int]:
        for i in range(1000):
            threads.append(threading.current_thread().name)
            yield i

    assert list(prefetched(numbers(), "test")) == list(range(1000))
    assert set(threads) == {"k2-silver-test"}


def test_an_error_in_the_producer_is_raised_in_the_consumer_after_the_items_before_it() -> None:
    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise RuntimeError("registry unusable")

    seen = []
    with pytest.raises(RuntimeError, match="registry unusable"):
        for item in prefetched(failing(), "test"):
            seen.append(item)
    assert seen == [1, 2]


def test_the_producer_stays_at_most_depth_ahead_and_stops_with_the_consumer() -> None:
    produced: list[int] = []
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    stream = prefetched(endless(), "test", depth=2)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()  # joins the producer
    assert closed.is_set()
    # 5 consumed, 2 waiting in the queue, 1 produced and blocked on the full queue: never more.
    assert len(produced) <= 5 + 2 + 1
