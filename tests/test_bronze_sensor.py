"""The ingestion sensor keeps exactly one run alive per exchange, only looks at run state, backs off
after failures (exponentially, capped) and halts, visibly, after a failure that needs a person."""

from __future__ import annotations

import json
import time

import dagster as dg
import pytest

from k2_assets.bronze.ingestion import FencedError, KafkaGapError
from k2_assets.bronze.jobs import INGESTION_TAG
from k2_assets.bronze.sensors import (
    BACKOFF_BASE_SECONDS,
    BACKOFF_CAP_SECONDS,
    HALTED_CHECK,
    ingestion_state,
)
from k2_assets.definitions import defs
from k2_resources.exchanges import exchange

SENSOR = "bronze_binance_ingestion_sensor"


def evaluate(name: str, instance: dg.DagsterInstance, cursor: str | None = None):
    sensor = defs.get_sensor_def(name)
    return sensor.evaluate_tick(
        dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=defs.get_repository_def())
    )


pytestmark = pytest.mark.usefixtures("unreachable_addresses")


def add_run(instance: dg.DagsterInstance, exchange: str, status: dg.DagsterRunStatus) -> str:
    """A run record as the daemon or a person would have left it (nothing executes)."""
    job = defs.resolve_job_def(f"bronze_{exchange}_ingestion")
    return instance.create_run_for_job(job_def=job, tags={INGESTION_TAG: exchange}, status=status).run_id


def failed_at(instance: dg.DagsterInstance, ended: float) -> str:
    """A binance ingestion run that failed (the worker crashed, say) at the time `ended`."""
    run_id = add_run(instance, "binance", dg.DagsterRunStatus.STARTED)
    event = dg.DagsterEvent(
        event_type_value=dg.DagsterEventType.RUN_FAILURE.value, job_name="bronze_binance_ingestion"
    )
    instance.report_dagster_event(event, run_id=run_id, timestamp=ended)
    return run_id


def executed_run(instance: dg.DagsterInstance, error: Exception | None) -> dg.ExecuteInProcessResult:
    """A real run tagged as binance ingestion whose op raises `error` (None: it succeeds), so its
    failure events are exactly what Dagster records when the ingestion op raises that exception."""

    @dg.op(name="ingest_binance_trades")
    def ingest() -> None:
        if error is not None:
            raise error

    @dg.job(name="bronze_binance_ingestion_by_hand", tags={INGESTION_TAG: "binance"})
    def by_hand() -> None:
        ingest()

    return by_hand.execute_in_process(instance=instance, raise_on_error=False)


def check_evaluations(result) -> list[bool]:
    return [e.passed for e in result.asset_events if getattr(e, "check_name", None) == HALTED_CHECK]


def test_sensor_launches_one_run_when_none_is_alive_and_none_while_one_is() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        first = evaluate(SENSOR, instance)
        assert len(first.run_requests) == 1
        request = first.run_requests[0]
        assert request.tags[INGESTION_TAG] == "binance"
        assert json.loads(first.cursor)["launches"] == 1

        run_id = add_run(instance, "binance", dg.DagsterRunStatus.STARTED)
        busy = evaluate(SENSOR, instance, first.cursor)
        assert busy.run_requests == [] and run_id in (busy.skip_message or "")
        # Another exchange's run does not hold this one back.
        assert len(evaluate("bronze_kraken_ingestion_sensor", instance).run_requests) == 1

        instance.report_dagster_event(
            dg.DagsterEvent(event_type_value=dg.DagsterEventType.RUN_SUCCESS.value, job_name="x"),
            run_id=run_id,
        )
        again = evaluate(SENSOR, instance, busy.cursor or first.cursor)
        assert len(again.run_requests) == 1  # a run that ended well is followed at once
        assert again.run_requests[0].run_key != request.run_key  # a run_key is used once: each launch is new


def test_a_created_but_not_yet_started_run_counts_as_alive() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        add_run(instance, "kraken", dg.DagsterRunStatus.NOT_STARTED)
        assert evaluate("bronze_kraken_ingestion_sensor", instance).run_requests == []


def test_failures_back_off_exponentially_up_to_a_cap() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        now = time.time()
        failed_at(instance, now - 1)
        result = evaluate(SENSOR, instance)
        assert result.run_requests == [] and "backing off" in result.skip_message
        waits = []
        for _ in range(10):
            failed_at(instance, now)
            waits.append(ingestion_state(instance, exchange("binance")).backoff_seconds())
        assert waits[:3] == [BACKOFF_BASE_SECONDS * 2, BACKOFF_BASE_SECONDS * 4, BACKOFF_BASE_SECONDS * 8]
        assert waits[-1] == BACKOFF_CAP_SECONDS and max(waits) == BACKOFF_CAP_SECONDS
        assert f"next launch in {BACKOFF_CAP_SECONDS:.0f} s" in evaluate(SENSOR, instance).skip_message


def test_a_transient_outage_recovers_by_itself_once_the_backoff_has_passed() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        executed_run(instance, RuntimeError("Kafka unreachable at 127.0.0.1:9 for 60 s"))
        state = ingestion_state(instance, exchange("binance"))
        assert state.failures == 1 and state.halt is None
        failed_at(instance, time.time() - 4 * BACKOFF_BASE_SECONDS - 1)  # the second failure, 2 min ago
        assert len(evaluate(SENSOR, instance).run_requests) == 1  # 2 failures: 60 s wait, long over
        assert executed_run(instance, None).success  # the broker is back: that run works
        assert ingestion_state(instance, exchange("binance")).failures == 0


@pytest.mark.parametrize(
    "error", [FencedError("another run owns the stream"), KafkaGapError("offsets 10-99 gone")]
)
def test_a_failure_that_needs_a_person_halts_the_sensor_until_a_run_by_hand_succeeds(
    error: Exception,
) -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        failed = executed_run(instance, error)
        assert not failed.success
        halted = evaluate(SENSOR, instance)
        assert halted.run_requests == []
        assert "HALTED" in halted.skip_message and type(error).__name__ in halted.skip_message
        assert failed.run_id in halted.skip_message and str(error) in halted.skip_message
        assert check_evaluations(halted) == [False]  # the Bronze check fails, once
        later = evaluate(SENSOR, instance, halted.cursor)
        assert later.run_requests == [] and check_evaluations(later) == []
        assert ingestion_state(instance, exchange("kraken")).halt is None  # only this exchange

        assert executed_run(instance, None).success  # someone fixed it and launched a run by hand
        resumed = evaluate(SENSOR, instance, later.cursor)
        assert len(resumed.run_requests) == 1
        assert check_evaluations(resumed) == [True]
