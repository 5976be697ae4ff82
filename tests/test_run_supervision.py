"""The orphaned-run sensor against a real instance and real processes: a STARTED run whose worker
process is gone is failed, one whose worker lives is left alone, and a reused pid does not pass for the
worker. (The same with a real code server killed mid-run: tests/test_instance.py.)"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import dagster as dg
import pytest

from k2_assets.definitions import defs
from k2_assets.run_supervision import worker_alive

pytestmark = pytest.mark.usefixtures("unreachable_addresses")


@pytest.fixture()
def sleeper() -> Iterator[subprocess.Popen]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def started_run(instance: dg.DagsterInstance, pid: int) -> str:
    """A run that its worker (pid) started, as RUN_START records it."""
    run = instance.create_run_for_job(
        job_def=defs.resolve_job_def("bronze_binance_ingestion"), status=dg.DagsterRunStatus.NOT_STARTED
    )
    event = dg.DagsterEvent(
        event_type_value=dg.DagsterEventType.RUN_START.value, job_name=run.job_name, pid=pid
    )
    instance.report_dagster_event(event, run_id=run.run_id)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
    return run.run_id


def tick(instance: dg.DagsterInstance) -> str | None:
    sensor = defs.get_sensor_def("k2_orphaned_run_sensor")
    context = dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def())
    return sensor.evaluate_tick(context).skip_message


def test_a_run_whose_worker_died_is_failed_and_a_live_one_is_not(sleeper: subprocess.Popen) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with dg.DagsterInstance.ephemeral() as instance:
        orphan = started_run(instance, dead.pid)
        alive = started_run(instance, sleeper.pid)
        message = tick(instance)
        assert orphan in message and alive not in message
        assert instance.get_run_by_id(orphan).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(alive).status == dg.DagsterRunStatus.STARTED
        failure = instance.get_records_for_run(orphan, of_type=dg.DagsterEventType.RUN_FAILURE).records
        assert f"pid {dead.pid}" in failure[0].event_log_entry.dagster_event.message
        assert "alive" in tick(instance)  # nothing more to fail


def test_a_pid_now_held_by_a_younger_process_is_not_the_worker(sleeper: subprocess.Popen) -> None:
    """A restarted container reuses small pids: the process must predate the run to be its worker."""
    assert worker_alive(sleeper.pid, time.time())
    assert not worker_alive(sleeper.pid, time.time() - 3600)  # the run started before this process


def test_every_job_has_a_max_runtime() -> None:
    """Run monitoring ends a hung run at its `dagster/max_runtime`; asset runs get the instance default."""
    jobs = [j for j in defs.resolve_all_job_defs() if not j.name.startswith("__")]
    assert len(jobs) >= 6
    missing = [j.name for j in jobs if float(j.tags.get("dagster/max_runtime", 0)) <= 0]
    assert missing == []
