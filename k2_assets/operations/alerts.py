"""Alert sensors: a person is told when K2 needs one, through a chat webhook (k2_resources/alerting.py).

Three sensors, each only reading the Dagster instance (never Kafka or Iceberg, so a tick stays short):
- runs: the newest finished run of a job failed (per job; a later success resolves it);
- checks: an ERROR-severity asset check failed (per check and partition; a later pass resolves it);
- ingestion: per exchange, ingestion halted for a person (FencedError, KafkaGapError), consumer lag
  above K2_ALERT_LAG_RECORDS in the newest Bronze commit, or no Bronze commit for K2_ALERT_SILENT_MINUTES.
They are Dagster sensors of K2's own rather than `run_failure_sensor`, whose cursor Dagster owns: the
rate limit and the recovery announcement keep their state in the cursor (`AlertBook`). The sensors run
by default when K2_ALERT_WEBHOOK_URL is set, and are stopped otherwise.
"""

# No `from __future__ import annotations`: Dagster reads the sensors' resource parameter annotations.

import json
import time
from collections.abc import Callable, Iterable, Iterator

import dagster as dg

from k2_assets.bronze.assets import bronze_asset_key
from k2_assets.bronze.sensors import HALTED_CHECK, failure_errors, ingestion_state
from k2_assets.sensor_instance import sensor_instance
from k2_resources.alerting import (
    AlertBook,
    AlertSettings,
    AlertWebhookResource,
    Condition,
    notify,
)
from k2_resources.exchanges import EXCHANGES
from k2_resources.settings import ALERT_WEBHOOK_URL

ALERT_INTERVAL_SECONDS = 60
PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
CHECK_EVENTS_PER_TICK = 200  # per check: evaluations newer than the cursor


def alert_status() -> dg.DefaultSensorStatus:
    """Alerts run once there is somewhere to send them."""
    configured = ALERT_WEBHOOK_URL.is_set()
    return dg.DefaultSensorStatus.RUNNING if configured else dg.DefaultSensorStatus.STOPPED


def _result(book: AlertBook, sent: list[str], failed: list[str], **cursor: object) -> dg.SensorResult:
    """Cursor saved either way: what was sent is not sent again, what failed stays due."""
    reason = (
        "; ".join([*(f"sent {s}" for s in sent), *(f"NOT SENT {f}" for f in failed)]) or "nothing to announce"
    )
    return dg.SensorResult(skip_reason=reason, cursor=book.to_cursor(**cursor))


def run_conditions(
    instance: dg.DagsterInstance, job_names: list[str], settings: AlertSettings
) -> Iterator[Condition]:
    finished = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE]
    for job_name in job_names:
        records = instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=finished), limit=1)
        if not records:
            continue
        run = records[0].dagster_run
        errors = failure_errors(instance, run.run_id) if run.status == dg.DagsterRunStatus.FAILURE else []
        # The cause, not Dagster's wrapper ("Error occurred while executing op ...").
        errors = [e for e in errors if not e[0].startswith("Dagster")] or errors
        what = f": {errors[0][0]}: {errors[0][1][:300]}" if errors else ""
        partition = run.tags.get("dagster/partition")
        summary = f"Run {run.run_id} of job {job_name}{f' (partition {partition})' if partition else ''} " + (
            f"failed{what}" if run.status == dg.DagsterRunStatus.FAILURE else "succeeded"
        )
        yield Condition(
            f"run:{job_name}",
            run.status == dg.DagsterRunStatus.FAILURE,
            summary,
            settings.run_url(run.run_id),
        )


def run_partition(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """The partition a run wrote: its `dagster/partition` tag, or `start...end` of a range run (one key
    when start = end: Silver and Gold run as single-run ranges, whose checks carry no partition)."""
    run = instance.get_run_by_id(run_id)
    tags = run.tags if run is not None else {}
    if PARTITION_TAG in tags:
        return tags[PARTITION_TAG]
    start, end = tags.get(RANGE_START_TAG), tags.get(RANGE_END_TAG)
    if start is None:
        return None
    return start if start == end else f"{start}...{end}"


def _check_summary(
    evaluation: dg.AssetCheckEvaluation, partition: str | None, run_id: str, failing: bool
) -> str:
    facts = ", ".join(f"{k}={v.value}" for k, v in list(evaluation.metadata.items())[:8])
    where = f"{evaluation.asset_key.to_user_string()}{f' partition {partition}' if partition else ''}"
    verdict = "FAILED" if failing else "passed"
    return f"Check {evaluation.check_name} on {where} {verdict} (run {run_id}): {evaluation.description or ''} {facts}"


def check_conditions(
    instance: dg.DagsterInstance,
    check_keys: list[dg.AssetCheckKey],
    after: dict[str, int],
    settings: AlertSettings,
) -> Iterator[Condition]:
    """The newest completed evaluation of each (check, partition) since the execution ids in `after`.

    Read per check through the check-execution history, which every event log storage supports (a
    global event query needs a run-aware cursor on SQLite). `after` is advanced in place, never past
    an execution still in progress.
    """
    for check_key in check_keys:
        name = check_key.to_user_string()
        history = instance.event_log_storage.get_asset_check_execution_history(
            check_key, limit=CHECK_EVENTS_PER_TICK
        )
        fresh = [r for r in history if r.id > after.get(name, 0)]
        pending = [
            r.id
            for r in fresh
            if r.event is None
            or r.event.dagster_event.event_type != dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ]
        if fresh:
            after[name] = min(pending) - 1 if pending else max(r.id for r in fresh)
        newest: dict[str | None, Condition] = {}
        for record in fresh:  # newest first
            if record.id in pending:
                continue
            evaluation = record.event.dagster_event.event_specific_data
            partition = record.partition or run_partition(instance, record.run_id)
            if partition in newest:
                continue
            failing = not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
            key = f"check:{evaluation.asset_key.to_user_string()}:{check_key.name}"
            key += f":{partition}" if partition else ""
            summary = _check_summary(evaluation, partition, record.run_id, failing).strip()
            newest[partition] = Condition(key, failing, summary, settings.asset_url(evaluation.asset_key))
        yield from newest.values()


def ingestion_conditions(
    instance: dg.DagsterInstance, settings: AlertSettings, now: float
) -> Iterator[Condition]:
    for exchange in EXCHANGES:
        key = bronze_asset_key(exchange)
        halt = ingestion_state(instance, exchange).halt
        summary = (
            f"{exchange.name} ingestion HALTED by run {halt.run_id} ({'/'.join(halt.errors)}): {halt.message[:300]}"
            " -- see docs/runbooks/"
            if halt
            else f"{exchange.name} ingestion is no longer halted"
        )
        yield Condition(
            f"halted:{exchange.name}",
            halt is not None,
            summary,
            settings.run_url(halt.run_id) if halt else settings.asset_url(key),
        )
        event = instance.get_latest_materialization_event(key)
        if event is None:
            continue
        lag_value = event.asset_materialization.metadata.get("consumer_lag")
        lag = lag_value.value if lag_value is not None else -1
        yield Condition(
            f"lag:{exchange.name}",
            lag > settings.lag_records,
            f"{exchange.name} consumer lag {lag} records at the newest Bronze commit "
            f"(alert above {settings.lag_records:g}, run {event.run_id})",
            settings.asset_url(key),
        )
        age = now - event.timestamp
        yield Condition(
            f"silent:{exchange.name}",
            age > settings.silent_seconds,
            f"{exchange.name}: newest Bronze commit is {age / 60:.1f} min old "
            f"(alert above {settings.silent_seconds / 60:g} min)",
            settings.asset_url(key),
        )


def run_alert_conditions(
    context: dg.SensorEvaluationContext, settings: AlertSettings, now: float, state: dict
) -> Iterator[Condition]:
    jobs = sorted(job.name for job in context.repository_def.get_all_jobs())
    return run_conditions(sensor_instance(context), jobs, settings)


def check_alert_conditions(
    context: dg.SensorEvaluationContext, settings: AlertSettings, now: float, state: dict
) -> Iterator[Condition]:
    # The ingestion sensor announces halts, with their reason; its check would say it twice.
    keys = [k for k in context.repository_def.asset_graph.asset_check_keys if k.name != HALTED_CHECK]
    return check_conditions(
        sensor_instance(context), sorted(keys, key=str), state.setdefault("after", {}), settings
    )


def ingestion_alert_conditions(
    context: dg.SensorEvaluationContext, settings: AlertSettings, now: float, state: dict
) -> Iterator[Condition]:
    return ingestion_conditions(sensor_instance(context), settings, now)


ConditionsOf = Callable[[dg.SensorEvaluationContext, AlertSettings, float, dict], Iterable[Condition]]


def build_alert_sensor(name: str, description: str, conditions_of: ConditionsOf) -> dg.SensorDefinition:
    """A sensor announcing `conditions_of`'s conditions; `state` is the cursor, kept between ticks."""

    @dg.sensor(
        name=name,
        minimum_interval_seconds=ALERT_INTERVAL_SECONDS,
        default_status=alert_status(),
        description=description,
    )
    def alert(context: dg.SensorEvaluationContext, alert_webhook: AlertWebhookResource) -> dg.SensorResult:
        settings, now = AlertSettings.from_env(), time.time()
        state, book = json.loads(context.cursor or "{}"), AlertBook(context.cursor)
        conditions = list(conditions_of(context, settings, now, state))  # may advance `state`
        sent, failed = notify(alert_webhook, book, conditions, now, settings.repeat_seconds)
        return _result(book, sent, failed, **{k: v for k, v in state.items() if k != "alerts"})

    return alert


alert_sensors = [
    build_alert_sensor(
        "k2_run_failure_alert_sensor",
        "Webhook alert when a job's newest finished run failed; recovery when a later run succeeds.",
        run_alert_conditions,
    ),
    build_alert_sensor(
        "k2_check_failure_alert_sensor",
        "Webhook alert when an ERROR asset check fails (conservation, duplicates, DLQ rate, freshness); "
        "recovery when the same check and partition passes again.",
        check_alert_conditions,
    ),
    build_alert_sensor(
        "k2_ingestion_alert_sensor",
        "Webhook alert per exchange: ingestion halted for a person, consumer lag above the threshold, or "
        "no Bronze commit for too long; recovery when each ends.",
        ingestion_alert_conditions,
    ),
]
