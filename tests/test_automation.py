"""Automation without anyone clicking: the running hour refreshes every 4 minutes, and each hour is
completed once after it closes (Silver from :05, Gold from :10), also when runs are in progress at the
tick. Evaluated by Dagster's own evaluator against a real instance, tick by tick, at chosen times."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import pytest

from k2_assets.definitions import defs

SILVER = dg.AssetKey("silver_binance_trades")
GOLD = dg.AssetKey("gold_crypto_trades")


pytestmark = pytest.mark.usefixtures("unreachable_addresses")


def tick(instance: dg.DagsterInstance, at: datetime, cursor=None):
    return dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=at, cursor=cursor)


def requested(result, key: dg.AssetKey) -> set[str]:
    return set(result.get_requested_partitions(key))


def test_running_hour_refreshes_and_closed_hour_completes() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        result = tick(instance, datetime(2026, 11, 23, 10, 13, tzinfo=UTC))
        result = tick(instance, datetime(2026, 11, 23, 10, 17, tzinfo=UTC), result.cursor)
        assert requested(result, SILVER) == {"2026-11-23-10:00"}
        assert requested(result, GOLD) == {"2026-11-23-10:00"}

        result = tick(instance, datetime(2026, 11, 23, 10, 18, tzinfo=UTC), result.cursor)
        assert requested(result, SILVER) == set()  # nothing until the next refresh tick (:20)

        result = tick(instance, datetime(2026, 11, 23, 10, 21, tzinfo=UTC), result.cursor)
        assert requested(result, SILVER) == {"2026-11-23-10:00"}

        # Every 4 minutes (Gold then stays under 5 min behind): the :28 tick, which */5 does not have.
        result = tick(instance, datetime(2026, 11, 23, 10, 26, tzinfo=UTC), result.cursor)
        result = tick(instance, datetime(2026, 11, 23, 10, 29, tzinfo=UTC), result.cursor)
        assert requested(result, GOLD) == {"2026-11-23-10:00"}

        # The hour has closed: at :05 Silver completes it once, besides refreshing the new hour.
        result = tick(instance, datetime(2026, 11, 23, 11, 6, tzinfo=UTC), result.cursor)
        assert requested(result, SILVER) == {"2026-11-23-10:00", "2026-11-23-11:00"}
        assert requested(result, GOLD) == {"2026-11-23-11:00"}

        # Gold completes the closed hour at :10, after Silver had its chance at :05.
        result = tick(instance, datetime(2026, 11, 23, 11, 11, tzinfo=UTC), result.cursor)
        assert requested(result, GOLD) == {"2026-11-23-10:00", "2026-11-23-11:00"}
        assert requested(result, SILVER) == {"2026-11-23-11:00"}  # the closed hour is not redone


def start_run(instance: dg.DagsterInstance, keys: set[dg.AssetKey], partition: str) -> dg.DagsterRun:
    """A run planning `keys` for `partition`, left STARTED: what the status cache sees while one works."""
    job = defs.resolve_implicit_global_asset_job_def()
    return instance.create_run_for_job(
        job_def=job,
        asset_selection=frozenset(keys),
        tags={"dagster/partition": partition},
        status=dg.DagsterRunStatus.STARTED,
    )


def record_results(
    instance: dg.DagsterInstance, run: dg.DagsterRun, checks_pass: bool = True, metadata: dict | None = None
) -> None:
    """What the run records as it works: its materialisations (with `metadata`), then its checks."""
    from dagster._core.events import StepMaterializationData

    partition = run.tags["dagster/partition"]

    def record(event_type: dg.DagsterEventType, data) -> None:
        event = dg.DagsterEvent(
            event_type_value=event_type.value, job_name=run.job_name, event_specific_data=data
        )
        instance.report_dagster_event(event, run_id=run.run_id)

    for key in sorted(run.asset_selection, key=str):
        materialization = dg.AssetMaterialization(asset_key=key, partition=partition, metadata=metadata)
        record(dg.DagsterEventType.ASSET_MATERIALIZATION, StepMaterializationData(materialization))
        for spec in defs.resolve_assets_def(key).check_specs:
            if spec.asset_key == key:
                evaluation = dg.AssetCheckEvaluation(
                    asset_key=key, check_name=spec.name, passed=checks_pass, partition=partition
                )
                record(dg.DagsterEventType.ASSET_CHECK_EVALUATION, evaluation)


def end(instance: dg.DagsterInstance, run: dg.DagsterRun) -> None:
    """The run is over: nothing of it is in progress any more."""
    event = dg.DagsterEvent(event_type_value=dg.DagsterEventType.RUN_SUCCESS.value, job_name=run.job_name)
    instance.report_dagster_event(event, run_id=run.run_id)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.SUCCESS


def finish(instance: dg.DagsterInstance, run: dg.DagsterRun, checks_pass: bool = True) -> None:
    """The run records its materialisations and check results, and ends."""
    record_results(instance, run, checks_pass)
    end(instance, run)


SILVER_BINANCE = {SILVER, dg.AssetKey(["silver_dlq_trades", "binance"])}


def at(hour: int, minute: int, second: int = 0) -> datetime:
    return datetime(2026, 11, 23, hour, minute, second, tzinfo=UTC)


def test_gold_completion_waits_for_an_unfinished_silver_run_and_is_not_lost() -> None:
    """The review's scenario: Silver 10:00 still running at the 11:10 tick used to lose Gold 10:00."""
    with dg.DagsterInstance.ephemeral() as instance:
        result = tick(instance, at(11, 2))
        result = tick(instance, at(11, 6), result.cursor)
        assert "2026-11-23-10:00" in requested(result, SILVER)
        run = start_run(instance, SILVER_BINANCE, "2026-11-23-10:00")

        result = tick(instance, at(11, 10, 30), result.cursor)
        assert "2026-11-23-10:00" not in requested(result, GOLD)  # its dependency is still being written
        result = tick(instance, at(11, 11), result.cursor)
        assert requested(result, GOLD) == set()

        finish(instance, run)
        result = tick(instance, at(11, 11, 30), result.cursor)  # between refresh ticks (:08, :12)
        assert requested(result, GOLD) == {"2026-11-23-10:00"}  # completed as soon as Silver is quiet
        seen = []
        for minute in (13, 15, 20, 40):
            result = tick(instance, at(11, minute), result.cursor)
            seen.append("2026-11-23-10:00" in requested(result, GOLD))
        assert seen == [False] * 4  # once: the latch is reset by the request


def test_silver_completion_waits_for_its_own_last_refresh_and_is_not_lost() -> None:
    """Silver 10:00's 10:55 refresh still in progress at 11:05: the completion follows it, once."""
    with dg.DagsterInstance.ephemeral() as instance:
        result = tick(instance, at(10, 51))
        result = tick(instance, at(10, 55, 30), result.cursor)
        assert requested(result, SILVER) == {"2026-11-23-10:00"}
        refresh = start_run(instance, SILVER_BINANCE, "2026-11-23-10:00")

        result = tick(instance, at(11, 5, 30), result.cursor)
        assert requested(result, SILVER) == {"2026-11-23-11:00"}  # 10:00 is busy: not requested, remembered
        result = tick(instance, at(11, 6), result.cursor)
        assert requested(result, SILVER) == set()

        # The refresh finishing is not the completion: it read Bronze before the hour closed.
        finish(instance, refresh)
        result = tick(instance, at(11, 7), result.cursor)
        assert requested(result, SILVER) == {"2026-11-23-10:00"}
        result = tick(instance, at(11, 10, 30), result.cursor)
        assert requested(result, SILVER) == {"2026-11-23-11:00"}  # not twice
        assert "2026-11-23-10:00" in requested(result, GOLD)


def test_a_completion_delayed_past_the_next_hour_still_happens() -> None:
    """A run stuck in progress for over an hour delays the completion; it is not forgotten at the next hour."""
    with dg.DagsterInstance.ephemeral() as instance:
        result = tick(instance, at(10, 51))
        stuck = start_run(instance, SILVER_BINANCE, "2026-11-23-10:00")
        for hour, minute in ((11, 5), (11, 30), (12, 5), (12, 10), (12, 30)):
            result = tick(instance, at(hour, minute, 30), result.cursor)
            assert "2026-11-23-10:00" not in requested(result, SILVER)
        finish(instance, stuck)
        result = tick(instance, at(12, 31), result.cursor)
        assert requested(result, SILVER) == {"2026-11-23-10:00"}


def test_a_failed_blocking_check_on_silver_holds_gold_back_until_silver_is_sound() -> None:
    """Silver 10:00 with its DLQ rate above the fail rate (a misaddressed registry, say): Gold 10:00 is
    not completed from it; once a fixed Silver run passes, the remembered completion goes ahead."""
    with dg.DagsterInstance.ephemeral() as instance:
        result = tick(instance, at(11, 2))
        result = tick(instance, at(11, 6), result.cursor)
        finish(instance, start_run(instance, SILVER_BINANCE, "2026-11-23-10:00"), checks_pass=False)
        result = tick(instance, at(11, 10, 30), result.cursor)
        assert "2026-11-23-10:00" not in requested(result, GOLD)
        result = tick(instance, at(11, 20, 30), result.cursor)
        assert "2026-11-23-10:00" not in requested(result, GOLD)
        finish(instance, start_run(instance, SILVER_BINANCE, "2026-11-23-10:00"))  # re-run after the fix
        result = tick(instance, at(11, 21), result.cursor)
        assert requested(result, GOLD) == {"2026-11-23-10:00"}


def freshness_tick(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def("freshness_checks_sensor")
    return sensor(dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs))


def test_freshness_checks_are_reported_without_a_run_when_new_changed_or_due() -> None:
    """The freshness sensor evaluates Dagster's own check functions in its evaluation (no run request)
    and reports a check the first time, when its outcome changes, and not while a pass is still fresh."""
    bronze = dg.AssetKey("bronze_binance_trades")
    checks = defs.resolve_asset_graph().asset_check_keys
    with dg.DagsterInstance.ephemeral() as instance:
        first = freshness_tick(instance, None)
        assert not first.run_requests
        reported = {(e.asset_key, e.check_name): e.passed for e in first.asset_events}
        assert set(reported) <= checks and len(reported) == 5  # 2 Bronze, 2 Silver, 1 Gold
        assert reported[(bronze, "freshness_check")] is False  # never materialised

        again = freshness_tick(instance, first.cursor)
        assert again.asset_events == []  # nothing changed, nothing is written

        instance.report_runless_asset_event(dg.AssetMaterialization(bronze))
        updated = freshness_tick(instance, again.cursor)
        assert [(e.asset_key, e.passed) for e in updated.asset_events] == [(bronze, True)]
        assert freshness_tick(instance, updated.cursor).asset_events == []  # still fresh
