"""Freshness checks evaluated inside a sensor: no run and no process per evaluation.

Dagster's `build_sensor_for_freshness_checks` launches a run whenever a check may be overdue. Bronze's
last-update checks may be overdue a few commit intervals after each commit, so that was a run every
minute: a run worker plus one step process per check (multiprocess executor), each a new Python
process importing K2 (measured in bench/README.md, "Live cost": the largest single cost of K2 idle).

This sensor calls the very same check functions (Dagster's, from the declared check definitions)
inside the code server's sensor evaluation and reports
their results as runless `AssetCheckEvaluation`s. Like Dagster's sensor it reports a check the first
time, whenever its outcome changes, and again once a passing result's `fresh_until` has passed (the
moment it could first turn overdue); in between nothing is written. The checks stay declared on their
assets, so they show in the UI and can still be run by hand.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import dagster as dg

FRESH_UNTIL = "dagster/fresh_until_timestamp"


@dataclass(frozen=True)
class SensorCheckContext:
    """What Dagster's freshness check functions read from their execution context, taken from a sensor's.

    `dg.build_asset_check_context` has no job, and the time-partition check reads the asset's partitions
    from `context.job_def`: the code location's asset job stands in for the run's.
    """

    instance: dg.DagsterInstance
    job_def: dg.JobDefinition
    selected_asset_check_keys: frozenset[dg.AssetCheckKey]


def evaluate(
    instance: dg.DagsterInstance, job: dg.JobDefinition, checks: Sequence[dg.AssetChecksDefinition]
) -> Iterator[dg.AssetCheckEvaluation]:
    """Run each freshness check's own function in this process; its results as check evaluations."""
    for checks_def in checks:
        names = {spec.asset_key: spec.name for spec in checks_def.check_specs}
        context = SensorCheckContext(instance, job, frozenset(checks_def.check_keys))
        for result in checks_def.node_def.compute_fn.decorated_fn(context):
            yield dg.AssetCheckEvaluation(
                asset_key=result.asset_key,
                check_name=result.check_name or names[result.asset_key],
                passed=result.passed,
                metadata=result.metadata,
                severity=result.severity,
                description=result.description,
            )


def due(evaluation: dg.AssetCheckEvaluation, last: dict | None, now: float) -> bool:
    """Whether to report `evaluation`: first time, changed outcome, or the last pass's fresh_until is over."""
    if last is None or last["passed"] != evaluation.passed:
        return True
    return bool(evaluation.passed) and now >= last.get("until", 0.0)


def fresh_until(evaluation: dg.AssetCheckEvaluation) -> float:
    value = evaluation.metadata.get(FRESH_UNTIL)
    return float(value.value) if value is not None else 0.0


def build_freshness_sensor(
    checks: Sequence[dg.AssetChecksDefinition],
    name: str,
    minimum_interval_seconds: int,
    default_status: dg.DefaultSensorStatus,
) -> dg.SensorDefinition:
    """A sensor that evaluates `checks` in its own evaluation and reports them without a run."""

    @dg.sensor(
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description="Evaluates the freshness checks of Bronze, Silver and Gold in the sensor itself "
        "(no run) and reports each when it is new, changed, or could have turned overdue.",
    )
    def freshness_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        cursor: dict = json.loads(context.cursor or "{}")
        now, events = time.time(), []
        job = context.repository_def.get_implicit_global_asset_job_def()
        for evaluation in evaluate(context.instance, job, checks):
            key = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
            if due(evaluation, cursor.get(key), now):
                events.append(evaluation)
                cursor[key] = {"passed": evaluation.passed, "until": fresh_until(evaluation)}
        return dg.SensorResult(asset_events=events, cursor=json.dumps(cursor, sort_keys=True))

    return freshness_sensor
