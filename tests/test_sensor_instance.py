"""K2's sensors, evaluated as the code server evaluates them (a context carrying only the instance ref),
share one Dagster instance per process instead of building one per evaluation, and still see the
instance as it is now."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from k2_assets.bronze.jobs import INGESTION_TAG, ingestion_jobs
from k2_assets.definitions import defs
from k2_assets.sensor_instance import sensor_instance

pytestmark = pytest.mark.usefixtures("unreachable_addresses")


def evaluate(ref: dg.InstanceRef, name: str) -> tuple[dg.SensorExecutionData, dg.DagsterInstance]:
    """One evaluation of sensor `name` from the ref alone, as the code server's gRPC call makes it."""
    context = dg.build_sensor_context(instance_ref=ref, repository_def=defs.get_repository_def())
    with context:
        return defs.get_sensor_def(name).evaluate_tick(context), sensor_instance(context)


def test_evaluations_from_one_ref_share_one_instance_that_sees_new_runs(tmp_path: Path) -> None:
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        ref = instance.get_ref()
        first, used = evaluate(ref, "bronze_binance_ingestion_sensor")
        assert [r.tags[INGESTION_TAG] for r in first.run_requests] == ["binance"]  # no run yet: launch one
        job = defs.resolve_job_def(ingestion_jobs["binance"].name)
        run = instance.create_run_for_job(
            job_def=job, tags={INGESTION_TAG: "binance"}, status=dg.DagsterRunStatus.STARTED
        )
        second, used_again = evaluate(ref, "bronze_binance_ingestion_sensor")
        assert used_again is used  # built once for this ref
        assert not second.run_requests and run.run_id in (second.skip_message or "")  # sees the new run
        _, by_another_sensor = evaluate(ref, "k2_orphaned_run_sensor")
        assert by_another_sensor is used


def test_a_context_built_with_an_instance_keeps_it() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        assert sensor_instance(dg.build_sensor_context(instance=instance)) is instance
