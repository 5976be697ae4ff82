"""Runs whose worker died are failed within a bounded time, so their run slots and partitions free up.

K2 launches runs with Dagster's DefaultRunLauncher: each run is a process the code server starts on its
own machine (the `k2-code` container in Docker, the code server of `k2 dev` locally). That launcher
gives run monitoring no worker health check, so a run whose worker went down with the code server (an
upgrade restarts `k2-code`; an OOM kill; a crash) stayed STARTED forever: it held a run slot, kept its
partitions "in progress" for automation, and, for ingestion, kept the ingestion sensor from starting
the next run.

This sensor is evaluated by the code server too, so it sees the processes runs execute in. Every
ORPHAN_CHECK_SECONDS it fails each STARTED run whose worker (the pid its RUN_START event recorded) no
longer exists, is a zombie, or is another process that was created after the run started (a restarted
container hands out the same small pids again). Failed this way, the run counts as a crash: run
retries re-execute it, and the ingestion sensor starts the next ingestion run. It never starts runs,
so it runs whatever K2_AUTOMATION says.

It assumes what K2 deploys: run workers on the code server's host. A run launcher that puts runs
elsewhere (DockerRunLauncher, Kubernetes) has its own worker health check and must not use this.
"""

from __future__ import annotations

import dagster as dg
import psutil

from k2_assets.sensor_instance import sensor_instance

# A worker dies rarely (a code server restart): failing its run within ~2 min frees its slot soon enough,
# at half the evaluations of every minute.
ORPHAN_CHECK_SECONDS = 120
# A worker process is created just before it records RUN_START; allow for clock granularity.
CREATE_TIME_SLACK_SECONDS = 5.0


def worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid of the run's worker process, from its RUN_START event."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_START, limit=1).records
    event = records[0].event_log_entry.dagster_event if records else None
    return event.pid if event is not None else None


def worker_alive(pid: int, run_started_at: float) -> bool:
    try:
        process = psutil.Process(pid)
        return (
            process.create_time() <= run_started_at + CREATE_TIME_SLACK_SECONDS
            and process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.NoSuchProcess:
        return False


def orphaned_runs(instance: dg.DagsterInstance) -> list[tuple[dg.DagsterRun, int]]:
    """STARTED runs whose worker process is gone, with the pid they were started under."""
    orphans = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        pid = worker_pid(instance, record.dagster_run.run_id)
        started = record.start_time
        if pid is not None and started is not None and not worker_alive(pid, started):
            orphans.append((record.dagster_run, pid))
    return orphans


@dg.sensor(
    name="k2_orphaned_run_sensor",
    minimum_interval_seconds=ORPHAN_CHECK_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Fails STARTED runs whose worker process died (e.g. with a restarted code server).",
)
def orphaned_run_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    failed, instance = [], sensor_instance(context)
    for run, pid in orphaned_runs(instance):
        current = instance.get_run_by_id(run.run_id)
        if current is None or current.status != dg.DagsterRunStatus.STARTED:
            continue  # it finished while we looked
        instance.report_run_failed(
            current,
            f"The run's worker process (pid {pid}) no longer exists: it died, most likely with a restarted "
            "code server. Failed by k2_orphaned_run_sensor so its run slot and partitions are freed.",
        )
        failed.append(run.run_id)
    if failed:
        context.log.warning(f"Failed runs whose worker died: {failed}")
        return dg.SkipReason(f"failed {len(failed)} run(s) whose worker died: {', '.join(failed)}")
    return dg.SkipReason("every STARTED run's worker is alive")
