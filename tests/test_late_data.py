"""The Gold late-data sensor against a real Dagster instance: every closed event hour a Silver change
touches is requested (P-1 and P included), only while Gold is older than the change, never while a Gold
run of the hour is in progress, the hour that just closed only after automation's completion (or its
hold), and no hour is dropped when more than a tick's worth are due."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from k2_assets.definitions import defs
from k2_assets.freshness import freshness_delay
from k2_assets.gold.assets import GOLD_KEY, SILVER_READ_AT
from k2_assets.gold.sensors import MAX_REQUESTS_PER_TICK, collect, due_requests
from k2_assets.partitions import hour_key, hour_start
from k2_assets.silver.assets import EVENT_HOURS, EVENT_HOURS_ADDED, PASS_PARTITIONS

SILVER = dg.AssetKey("silver_binance_trades")


pytestmark = pytest.mark.usefixtures("unreachable_addresses")


def hour(hours_ago: int) -> str:
    return hour_key(datetime.now(UTC) - timedelta(hours=hours_ago))


def silver_pass(instance: dg.DagsterInstance, partition: str, counts: dict[str, int], **extra) -> None:
    """A Silver materialisation of one partition, as the Silver asset records it."""
    metadata = {EVENT_HOURS: dg.MetadataValue.json(counts), PASS_PARTITIONS: 1, **extra}
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=SILVER, partition=partition, metadata=metadata)
    )


def gold_computed(instance: dg.DagsterInstance, partition: str, read_at: datetime | None = None) -> None:
    """A Gold materialisation that read Silver at `read_at` (default: now)."""
    metadata = {SILVER_READ_AT: dg.MetadataValue.timestamp(read_at or datetime.now(UTC))}
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=GOLD_KEY, partition=partition, metadata=metadata)
    )


class Sensor:
    """Ticks of the real sensor definition, carrying its cursor like the daemon does."""

    def __init__(self, instance: dg.DagsterInstance):
        self.instance, self.cursor = instance, None
        self.sensor = defs.get_sensor_def("gold_late_data_sensor")

    def tick(self) -> list[str]:
        context = dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, repository_def=defs.get_repository_def()
        )
        result = self.sensor.evaluate_tick(context)
        self.cursor = result.cursor
        return [r.partition_key for r in result.run_requests]


def test_every_closed_event_hour_of_a_silver_change_is_requested_including_p_minus_1_and_p() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        sensor = Sensor(instance)
        p = hour(72)  # a re-run of a Silver hour three days old
        silver_pass(instance, p, {hour(73): 40, p: 900, hour(100): 3})
        assert sorted(sensor.tick()) == sorted([hour(100), hour(73), p])
        assert sensor.tick() == []  # requested once


def test_an_hour_is_not_requested_when_gold_already_read_the_change() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        sensor = Sensor(instance)
        p = hour(30)
        silver_pass(instance, p, {hour(31): 5, p: 100})
        assert sorted(sensor.tick()) == sorted([hour(31), p])
        gold_computed(instance, p)
        gold_computed(instance, hour(31))
        # Silver P again with the same trades of P but two more late trades of P-1.
        silver_pass(instance, p, {hour(31): 7, p: 100})
        assert sensor.tick() == [hour(31)]
        # A pass whose counts equal those Gold has already read asks for nothing.
        gold_computed(instance, hour(31))
        silver_pass(instance, p, {hour(31): 7, p: 100})
        assert sensor.tick() == []


def test_unchanged_counts_still_request_a_gold_hour_that_never_caught_up() -> None:
    """A request whose run failed leaves Gold behind: the next pass asks again even with equal counts."""
    with dg.DagsterInstance.ephemeral() as instance:
        sensor = Sensor(instance)
        p = hour(10)
        silver_pass(instance, p, {p: 50})
        assert sensor.tick() == [p]  # say this run failed: no Gold materialisation follows
        silver_pass(instance, p, {p: 50})
        assert sensor.tick() == [p]


def test_the_running_hour_is_left_to_automation() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        sensor = Sensor(instance)
        gold_computed(instance, hour(1))  # completed after it closed: later changes are the sensor's
        silver_pass(instance, hour(0), {hour(1): 4, hour(0): 80})
        assert sensor.tick() == [hour(1)]


def test_the_hour_that_just_closed_waits_for_automations_completion() -> None:
    """Late trades of H in Silver H+1 and Silver H's own completion change H in its first minutes: they
    wait for automation's Gold completion (at :10), which reads them all, instead of a Gold run each.
    Only a change after what the completion read is requested; without a completion, the hold ends."""
    with dg.DagsterInstance.ephemeral() as instance:
        closed, running = hour(1), hour(0)
        closed_at = hour_start(running)

        def minutes(m: float) -> float:
            return (closed_at + timedelta(minutes=m)).timestamp()

        gold_computed(instance, closed, read_at=closed_at - timedelta(minutes=3))  # its last refresh
        silver_pass(instance, running, {closed: 4, running: 80})  # late trades of the closed hour
        cursor: dict = {}
        collect(dg.build_sensor_context(instance=instance), cursor)
        assert due_requests(instance, cursor["pending"], minutes(2)) == []
        assert due_requests(instance, cursor["pending"], minutes(9)) == []
        assert closed in cursor["pending"]  # held, not dropped
        held = dict(cursor["pending"])
        after_hold = freshness_delay().total_seconds() / 60 + 1
        unanswered = [r.partition_key for r in due_requests(instance, held, minutes(after_hold))]
        assert unanswered == [closed]  # no completion within the freshness deadline: requested by the sensor
        gold_computed(instance, closed)  # automation's completion read every change so far
        assert due_requests(instance, cursor["pending"], minutes(11)) == []
        assert cursor["pending"] == {}
        silver_pass(instance, running, {closed: 6, running: 90})  # two more late trades after it
        collect(dg.build_sensor_context(instance=instance), cursor)
        assert [r.partition_key for r in due_requests(instance, cursor["pending"], minutes(12))] == [closed]


def test_a_gold_hour_in_progress_is_waited_for_then_checked_again() -> None:
    from tests.test_automation import finish, start_run

    with dg.DagsterInstance.ephemeral() as instance:
        sensor = Sensor(instance)
        p = hour(5)
        run = start_run(instance, {GOLD_KEY}, p)  # e.g. automation's completion, started before the change
        silver_pass(instance, p, {p: 10})
        assert sensor.tick() == []
        assert p in json.loads(sensor.cursor)["pending"]
        finish(instance, run)  # it read Silver before the change and wrote no newer Gold
        assert sensor.tick() == [p]


def test_a_dlq_replay_requests_the_hours_of_the_rows_it_added() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        sensor = Sensor(instance)
        p = hour(48)
        gold_computed(instance, p)
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=SILVER,
                partition=p,
                metadata={"added_to_silver": 3, EVENT_HOURS_ADDED: dg.MetadataValue.json({p: 3})},
                description="silver_dlq_replay",
            )
        )
        assert sensor.tick() == [p]


def test_silver_from_a_run_still_going_or_failing_a_blocking_check_is_not_used() -> None:
    """A Silver run's blocking checks come after its materialisation: wait for the run; a failed check
    (e.g. DLQ rate above the fail rate) keeps Gold as it was; a sound re-run is used."""
    from tests.test_automation import SILVER_BINANCE, end, record_results, start_run

    with dg.DagsterInstance.ephemeral() as instance:
        sensor = Sensor(instance)
        p = hour(20)
        counts = {EVENT_HOURS: dg.MetadataValue.json({p: 10}), PASS_PARTITIONS: 1}
        bad = start_run(instance, SILVER_BINANCE, p)
        record_results(instance, bad, checks_pass=False, metadata=counts)
        assert sensor.tick() == []  # the run has not finished: its checks may still come
        end(instance, bad)
        assert sensor.tick() == []  # it failed a blocking check: Gold is not rebuilt from it
        fixed = start_run(instance, SILVER_BINANCE, p)
        record_results(instance, fixed, metadata=counts)
        end(instance, fixed)
        assert sensor.tick() == [p]


def test_150_late_hours_at_once_are_all_requested_over_ticks() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        sensor = Sensor(instance)
        late = {hour(h): 1 for h in range(200, 350)}
        silver_pass(instance, hour(3), late)
        first = sensor.tick()
        second = sensor.tick()
        assert len(first) == MAX_REQUESTS_PER_TICK
        assert len(second) == 150 - MAX_REQUESTS_PER_TICK
        assert sorted(first + second) == sorted(late)
        assert sensor.tick() == []
