"""The ingestion sensor keeps exactly one run alive per exchange, and only looks at run state."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from k2_assets.bronze.jobs import INGESTION_TAG
from k2_assets.definitions import defs


def evaluate(name: str, instance: dg.DagsterInstance, cursor: str | None = None):
    sensor = defs.get_sensor_def(name)
    return sensor.evaluate_tick(
        dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=defs.get_repository_def())
    )


@pytest.fixture(autouse=True)
def settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating a run resolves resource config; nothing here connects to these addresses."""
    monkeypatch.setenv("K2_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    monkeypatch.setenv("K2_SCHEMA_REGISTRY_URL", "http://127.0.0.1:9")


def add_run(instance: dg.DagsterInstance, exchange: str, status: dg.DagsterRunStatus) -> str:
    """A run record as the daemon or a person would have left it (nothing executes)."""
    from dagster._core.test_utils import create_run_for_test

    job_name = f"bronze_{exchange}_ingestion"
    return create_run_for_test(
        instance, job_name=job_name, tags={INGESTION_TAG: exchange}, status=status
    ).run_id


def test_sensor_launches_one_run_when_none_is_alive_and_none_while_one_is() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        first = evaluate("bronze_binance_ingestion_sensor", instance)
        assert len(first.run_requests) == 1
        request = first.run_requests[0]
        assert request.tags[INGESTION_TAG] == "binance"
        assert json.loads(first.cursor) == {"launches": 1}

        run_id = add_run(instance, "binance", dg.DagsterRunStatus.STARTED)
        busy = evaluate("bronze_binance_ingestion_sensor", instance, first.cursor)
        assert busy.run_requests == [] and run_id in (busy.skip_message or "")
        # Another exchange's run does not hold this one back.
        assert len(evaluate("bronze_kraken_ingestion_sensor", instance).run_requests) == 1

        instance.report_run_failed(instance.get_run_by_id(run_id))
        again = evaluate("bronze_binance_ingestion_sensor", instance, busy.cursor or first.cursor)
        assert len(again.run_requests) == 1
        assert again.run_requests[0].run_key != request.run_key  # a run_key is used once: each launch is new


def test_a_created_but_not_yet_started_run_counts_as_alive() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        add_run(instance, "kraken", dg.DagsterRunStatus.NOT_STARTED)
        assert evaluate("bronze_kraken_ingestion_sensor", instance).run_requests == []
