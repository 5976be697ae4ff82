"""Keep exactly one ingestion run alive per exchange, back off after failures, stop for a person.

A sensor only looks at run state and launches runs; it never touches Kafka (a sensor that polls for
data stalls the daemon). The QueuedRunCoordinator's tag limit (dagster.yaml) is the second guard, and
Bronze's commit fencing the third: even two runs that do start cannot both commit.

After a failed run the next one waits BACKOFF_BASE_SECONDS, doubling with each failure in a row up to
BACKOFF_CAP_SECONDS: a broker outage is retried until the broker is back (ingestion recovers by
itself), without a run every minute meanwhile. A failure that only a person can resolve (another writer
owns the stream: FencedError; records Bronze never had are gone from Kafka: KafkaGapError; read from
the failed run's own failure event) stops the relaunching: the sensor says why in its skip reason and
fails the Bronze asset's `ingestion_not_halted` check, until someone acts. Launching the job by hand
(e.g. with `accept_gaps` once the gap is understood) resumes it: a run that succeeds, or any run after
the halting one that fails for another reason, ends the halt.
"""

# No `from __future__ import annotations`: Dagster reads the asset check's parameter annotations.

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import dagster as dg

from k2_assets.bronze.assets import bronze_asset_key
from k2_assets.bronze.jobs import INGESTION_TAG, ingestion_jobs
from k2_assets.resources import automation_status
from k2_assets.sensor_instance import sensor_instance
from k2_resources.exchanges import EXCHANGES, ExchangeConfig

H = TypeVar("H")  # what makes a job's newest failure one that needs a person

ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
FINISHED_STATUSES = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
# Errors of k2_assets/bronze/ingestion.py that retrying cannot fix, by class name.
NEEDS_A_PERSON = frozenset({"FencedError", "KafkaGapError"})
BACKOFF_BASE_SECONDS = 30.0
# Each tick is a gRPC evaluation (daemon + code server CPU) and a run lives up to four hours, so nearly every
# tick only finds the run alive. Worst case, a run that ended is replaced ~60 s later (+ the queue's
# dequeue interval and the run's start): ~60 s more of Bronze lag, caught up by the next run.
INGESTION_SENSOR_SECONDS = 60
BACKOFF_CAP_SECONDS = 15 * 60.0
RUNS_LOOKED_AT = 12  # enough failures in a row to reach the cap
HALTED_CHECK = "ingestion_not_halted"


@dataclass(frozen=True)
class Halt:
    run_id: str
    errors: tuple[str, ...]
    message: str


@dataclass(frozen=True)
class IngestionState:
    """What the run history says about an exchange's ingestion."""

    active: dg.DagsterRun | None = None
    halt: Halt | None = None
    failures: int = 0  # failed (or cancelled) runs in a row, newest first
    last_end: float | None = None

    def backoff_seconds(self) -> float:
        if not self.failures:
            return 0.0
        return min(BACKOFF_BASE_SECONDS * 2 ** (self.failures - 1), BACKOFF_CAP_SECONDS)

    def launch_at(self) -> float:
        return (self.last_end or 0.0) + self.backoff_seconds()


def _error_chain(error) -> Iterator:
    seen = 0
    while error is not None and seen < 20:
        yield error
        error = error.cause or error.context
        seen += 1


def failure_errors(instance: dg.DagsterInstance, run_id: str) -> list[tuple[str, str]]:
    """(exception class name, message) of the run's step failures, each with its causes."""
    errors: list[tuple[str, str]] = []
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    for record in records:
        event = record.event_log_entry.dagster_event
        error = event.step_failure_data.error if event and event.step_failure_data else None
        errors += [(link.cls_name or "", (link.message or "").strip()) for link in _error_chain(error)]
    return errors


def needs_a_person(instance: dg.DagsterInstance, run_id: str) -> Halt | None:
    """The halt a failed run calls for, if one of its errors is one that retrying cannot fix."""
    found = [(name, message) for name, message in failure_errors(instance, run_id) if name in NEEDS_A_PERSON]
    if not found:
        return None
    return Halt(run_id, tuple(dict.fromkeys(name for name, _ in found)), found[0][1])


def run_history_state(
    instance: dg.DagsterInstance, tags: dict[str, str], halting: Callable[[str], H | None]
) -> tuple[IngestionState, H | None]:
    """A kept-alive job's state from its runs with `tags`: active, or the failures since the last
    success and whether the newest failure (`halting(run_id)`) needs a person."""
    active = instance.get_run_records(filters=dg.RunsFilter(tags=tags, statuses=ACTIVE_STATUSES), limit=1)
    if active:
        return IngestionState(active=active[0].dagster_run), None
    finished = instance.get_run_records(
        filters=dg.RunsFilter(tags=tags, statuses=FINISHED_STATUSES), limit=RUNS_LOOKED_AT
    )
    failures = 0
    for record in finished:
        if record.dagster_run.status == dg.DagsterRunStatus.SUCCESS:
            break
        if failures == 0 and record.dagster_run.status == dg.DagsterRunStatus.FAILURE:
            halt = halting(record.dagster_run.run_id)
            if halt is not None:
                return IngestionState(), halt
        failures += 1
    last_end = finished[0].end_time if finished else None
    return IngestionState(failures=failures, last_end=last_end), None


def ingestion_state(instance: dg.DagsterInstance, exchange: ExchangeConfig) -> IngestionState:
    tags = {INGESTION_TAG: exchange.name}
    state, halt = run_history_state(instance, tags, lambda run_id: needs_a_person(instance, run_id))
    return IngestionState(halt=halt) if halt is not None else state


def halted_check_evaluation(exchange: ExchangeConfig, halt: Halt | None) -> dg.AssetCheckEvaluation:
    metadata = {"halting_run": halt.run_id, "errors": ", ".join(halt.errors)} if halt else {}
    return dg.AssetCheckEvaluation(
        asset_key=bronze_asset_key(exchange),
        check_name=HALTED_CHECK,
        passed=halt is None,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=metadata,
        description=(halt.message[:500] if halt else "ingestion runs are being kept alive"),
    )


def build_halted_check(exchange: ExchangeConfig) -> dg.AssetChecksDefinition:
    """The check the sensor reports: failed while ingestion is halted for a person, passed otherwise."""

    @dg.asset_check(
        asset=bronze_asset_key(exchange),
        name=HALTED_CHECK,
        description=f"{exchange.name} ingestion is not halted by a failure that needs a person "
        "(FencedError, KafkaGapError). Reported by the ingestion sensor; running it re-reads the run history.",
    )
    def ingestion_not_halted(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        halt = ingestion_state(context.instance, exchange).halt
        evaluation = halted_check_evaluation(exchange, halt)
        return dg.AssetCheckResult(
            passed=evaluation.passed, metadata=evaluation.metadata, description=evaluation.description
        )

    return ingestion_not_halted


def build_ingestion_sensor(exchange: ExchangeConfig) -> dg.SensorDefinition:
    job = ingestion_jobs[exchange.name]

    @dg.sensor(
        name=f"bronze_{exchange.name}_ingestion_sensor",
        # By name (the job is in the Definitions): a sensor holding the job object is copied when
        # Dagster binds resources to it, and that copy warns (BetaWarning on `owners`, Dagster 1.13.27).
        job_name=job.name,
        minimum_interval_seconds=INGESTION_SENSOR_SECONDS,
        default_status=automation_status(),
        description=f"Keeps one {job.name} run alive: backs off after failures, halts on one that needs a person.",
    )
    def keep_alive(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        cursor = json.loads(context.cursor or "{}")
        state = ingestion_state(sensor_instance(context), exchange)
        if state.active is not None:
            return dg.SkipReason(f"{job.name} run {state.active.run_id} is {state.active.status.value}")
        if state.halt is not None:
            return halted(job, exchange, state.halt, cursor)
        events = []
        if cursor.get("halted_by"):  # someone acted: the halt is over
            events.append(halted_check_evaluation(exchange, None))
            cursor["halted_by"] = None
        wait = state.launch_at() - time.time()
        if wait > 0:
            return dg.SensorResult(
                skip_reason=f"{state.failures} {job.name} run(s) failed in a row: backing off, next launch in "
                f"{wait:.0f} s ({state.backoff_seconds():.0f} s after the last)",
                cursor=json.dumps(cursor),
                asset_events=events,
            )
        launches = cursor.get("launches", 0) + 1
        cursor["launches"] = launches
        request = dg.RunRequest(
            run_key=f"{exchange.name}-ingestion-{launches}", tags={INGESTION_TAG: exchange.name}
        )
        return dg.SensorResult(run_requests=[request], cursor=json.dumps(cursor), asset_events=events)

    return keep_alive


def halted(job: dg.JobDefinition, exchange: ExchangeConfig, halt: Halt, cursor: dict) -> dg.SensorResult:
    """Launch nothing; fail the check once per halt; say what happened and what a person can do."""
    events = [] if cursor.get("halted_by") == halt.run_id else [halted_check_evaluation(exchange, halt)]
    cursor["halted_by"] = halt.run_id
    reason = (
        f"HALTED: {job.name} run {halt.run_id} failed with {'/'.join(halt.errors)}, which retrying cannot fix: "
        f"{halt.message[:300]} -- Resolve it, then launch {job.name} by hand (for an understood gap with "
        "accept_gaps: true); when that run succeeds this sensor keeps ingestion alive again."
    )
    return dg.SensorResult(skip_reason=reason, cursor=json.dumps(cursor), asset_events=events)


ingestion_sensors = [build_ingestion_sensor(e) for e in EXCHANGES]
ingestion_halted_checks = [build_halted_check(e) for e in EXCHANGES]
