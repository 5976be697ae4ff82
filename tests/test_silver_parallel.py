"""Two Bronze batches transformed at once (`transform_batches(workers=2)`, `ordered_map`): the output is
the one-at-a-time output in the same order, an error stops the stream after the batches before it,
no more than `workers` batches are taken ahead, and the garbage collector's pause holds while any batch
is being transformed. The registry is the dev stack's, over HTTP."""

from __future__ import annotations

import gc
import json
import random
import threading
import time
import urllib.request
from collections.abc import Iterator

import dagster as dg
import pyarrow as pa
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from k2_assets.bronze.tables import bronze_table_spec
from k2_assets.silver.rules import ValidationRules
from k2_assets.silver.tables import DLQ_TABLE_SPEC, silver_table_spec
from k2_assets.silver.transform import WriterSchemas, gc_paused, ordered_map, transform_batches
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.settings import SCHEMA_REGISTRY_URL
from tests.pipeline_helpers import materialize
from tests.test_silver_registry import QuietHandler, serving
from tests.test_silver_transform import BINANCE, NOW, PARTITION_KEY, bronze, framed, registry, trade, v2_id

__all__ = ["registry", "v2_id"]  # fixtures, imported for pytest


def test_results_come_in_item_order_whatever_order_they_finish_in() -> None:
    delays = [random.Random(7).uniform(0, 0.01) for _ in range(60)]

    def slow_square(i: int) -> int:
        time.sleep(delays[i])
        return i * i

    assert list(ordered_map(slow_square, range(60), 2, "test")) == [i * i for i in range(60)]


def test_two_items_are_worked_on_at_the_same_time() -> None:
    both_started = threading.Barrier(2, timeout=5)  # broken (an error) if the work ran one at a time
    threads: set[str] = set()

    def meet(i: int) -> int:
        threads.add(threading.current_thread().name)
        both_started.wait()
        return i

    assert list(ordered_map(meet, range(2), 2, "k2-test")) == [0, 1]
    assert len(threads) == 2 and all(name.startswith("k2-test") for name in threads)


def test_an_error_comes_after_the_results_before_it_and_nothing_after_it_is_yielded() -> None:
    def fail_on_three(i: int) -> int:
        if i == 3:
            raise RuntimeError("registry unusable")
        return i

    seen = []
    with pytest.raises(RuntimeError, match="registry unusable"):
        for value in ordered_map(fail_on_three, range(10), 2, "test"):
            seen.append(value)
    assert seen == [0, 1, 2]


def test_no_more_than_workers_items_are_taken_ahead_and_a_stopped_consumer_stops_it() -> None:
    taken: list[int] = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            taken.append(i)
            yield i
            i += 1

    stream = ordered_map(lambda i: i, endless(), 2, "test")
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert len(taken) <= 5 + 1  # 5 consumed, at most one more being worked on
    stream.close()  # waits for the one in progress
    before = len(taken)
    time.sleep(0.05)
    assert len(taken) == before


def test_the_collector_stays_paused_until_the_last_overlapping_pause_ends() -> None:
    assert gc.isenabled()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with gc_paused():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with gc_paused():
            second_in.set()
            first_out.wait(5)
            seen["after the first pause ended"] = gc.isenabled()
        seen["after both ended"] = gc.isenabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"after the first pause ended": False, "after both ended": True}
    assert gc.isenabled()


def test_two_workers_give_the_one_at_a_time_output_batch_for_batch(
    registry: SchemaRegistryClient, v2_id: int
) -> None:
    good = framed(v2_id, trade())
    bad_values = [
        framed(v2_id, trade(side="UNKNOWN")),
        b"",
        None,
        good + b"\x00",
        good[:-3],
        b"\x01" + good[1:],
        b"\x00" + (v2_id + 5000).to_bytes(4, "big") + good[5:],
    ]
    rng = random.Random(12)
    batches, offset = [], 0
    for size in (50, 1, 0, 200, 33, 120, 7, 64):
        values = [rng.choice(bad_values) if rng.random() < 0.2 else good for _ in range(size)]
        batches.append(bronze(values, first_offset=offset))
        offset += size

    def run(workers: int) -> list[tuple[pa.RecordBatch, pa.RecordBatch]]:
        return list(
            transform_batches(
                batches, BINANCE, WriterSchemas(registry), ValidationRules(), PARTITION_KEY, NOW, workers
            )
        )

    one, two = run(1), run(2)
    assert len(one) == len(two) == len(batches)
    assert sum(dlq.num_rows for _, dlq in one) > 0 and sum(silver.num_rows for silver, _ in one) > 0
    for (silver_1, dlq_1), (silver_2, dlq_2) in zip(one, two, strict=True):
        assert silver_2.equals(silver_1)
        assert dlq_2.equals(dlq_1)


# --- In the Silver step -------------------------------------------------------------------------------

FAILING_ID = 4242  # the registry answers HTTP 500 for it: not "schema not found", so the run must stop
BINANCE_SILVER_KEYS = ["silver_binance_trades", "silver_dlq_trades/binance"]


class RegistryFailingOneId(QuietHandler):
    """The dev registry, except that it answers HTTP 500 for schema id FAILING_ID."""

    upstream = ""

    def do_GET(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's naming)
        if self.path.startswith(f"/schemas/ids/{FAILING_ID}"):
            status, body = 500, json.dumps({"error_code": 50001, "message": "store unavailable"}).encode()
        else:
            with urllib.request.urlopen(self.upstream + self.path, timeout=10) as upstream:
                status, body = upstream.status, upstream.read()
        self.answer(status, body, "application/vnd.schemaregistry.v1+json")


@pytest.fixture()
def registry_failing_one_id(devstack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """That registry, set as the run's K2_SCHEMA_REGISTRY_URL."""
    handler = type("Handler", (RegistryFailingOneId,), {"upstream": devstack_env[SCHEMA_REGISTRY_URL]})
    with serving(handler) as url:
        monkeypatch.setenv(SCHEMA_REGISTRY_URL, url)
        yield url


def test_an_error_in_a_transform_thread_fails_the_step_and_commits_nothing(
    registry_failing_one_id: str, v2_id: int
) -> None:
    good = framed(v2_id, trade())
    bronze_table = IcebergCatalogResource().ensure_table(bronze_table_spec(BINANCE))
    arrow = bronze_table.schema().as_arrow()
    for first in range(0, 400, 100):  # four data files, read as four batches: the last one fails
        values = [good] * 100 if first < 300 else [b"\x00" + FAILING_ID.to_bytes(4, "big") + good[5:]] * 100
        bronze_table.append(pa.Table.from_batches([bronze(values, first_offset=first)]).cast(arrow))
    silver_spec = silver_table_spec(BINANCE)
    before = {
        spec.name: IcebergCatalogResource().ensure_table(spec).current_snapshot()
        for spec in (silver_spec, DLQ_TABLE_SPEC)
    }

    with dg.DagsterInstance.ephemeral() as instance:
        result = materialize(instance, BINANCE_SILVER_KEYS, PARTITION_KEY, raise_on_error=False)

    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert f"schema id {FAILING_ID}" in str(failure.event_specific_data.error)
    after = {
        spec.name: IcebergCatalogResource().ensure_table(spec).current_snapshot()
        for spec in (silver_spec, DLQ_TABLE_SPEC)
    }
    assert after == before  # neither table got a commit: not the three good batches, not the DLQ
