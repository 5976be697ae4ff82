"""K2's freshness checks, and the sensor that evaluates them without a run or a process.

Two rules, each a plain `@dg.asset_check` on its asset (so it shows in the UI and runs by hand) whose
logic is a function of the instance and the time, `FreshnessRule.evaluate`:
- `LastUpdateRule` (Bronze): the table was updated within `max_age` of now.
- `HourArrivalRule` (Silver, Gold): hour H was materialised after it closed, by H + 1 h + delay, for the
  latest hour whose deadline has passed (the delay is K2_FRESHNESS_DELAY_MINUTES, read when a check is
  evaluated, not at import).

Dagster's `build_*_freshness_checks` are superseded by `FreshnessPolicy`, which judges only the latest
materialisation of any partition: it cannot say that a given hour arrived. K2 states both rules itself.

The sensor evaluates every rule inside the code server's sensor evaluation and reports the results as
runless `AssetCheckEvaluation`s: a run per evaluation (a run worker plus a step process per check)
was the largest single cost of K2 idle (bench/README.md, "Live cost"). It reports a check the first
time, whenever its outcome changes, and again once a passing result's `fresh_until` has passed (the
moment it could first turn overdue); in between nothing is written.
"""

# No `from __future__ import annotations`: Dagster reads the asset check's context annotation.

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import dagster as dg

from k2_assets.partitions import HOUR, floor_hour, hour_key
from k2_assets.sensor_instance import sensor_instance
from k2_resources.settings import FRESHNESS_DELAY_MINUTES

CHECK_NAME = "freshness_check"
FRESH_UNTIL = "fresh_until"


def freshness_delay() -> timedelta:
    """How long after an hour closes its Silver and Gold partitions must exist (K2_FRESHNESS_DELAY_MINUTES)."""
    return timedelta(minutes=FRESHNESS_DELAY_MINUTES.value())


def last_update(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None) -> float | None:
    """The time of the latest materialisation or observation of `key` (of one partition if given)."""
    records_filter = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None)
    times = [
        records[0].timestamp
        for records in (
            instance.fetch_materializations(records_filter, limit=1).records,
            instance.fetch_observations(records_filter, limit=1).records,
        )
        if records
    ]
    return max(times, default=None)


def evaluation(
    key: dg.AssetKey, passed: bool, description: str, metadata: dict, fresh_until: float | None
) -> dg.AssetCheckEvaluation:
    if passed and fresh_until is not None:
        metadata = {**metadata, FRESH_UNTIL: dg.MetadataValue.timestamp(fresh_until)}
    return dg.AssetCheckEvaluation(
        asset_key=key,
        check_name=CHECK_NAME,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata=metadata,
        description=description,
    )


class FreshnessRule(Protocol):
    asset_key: dg.AssetKey

    @property
    def description(self) -> str: ...

    def evaluate(self, instance: dg.DagsterInstance, now: float) -> dg.AssetCheckEvaluation: ...


@dataclass(frozen=True)
class LastUpdateRule:
    """The asset was updated (materialised or observed) within `max_age` of now."""

    asset_key: dg.AssetKey
    max_age: timedelta

    @property
    def description(self) -> str:
        return f"Updated within the last {self.max_age.total_seconds():g} s."

    def evaluate(self, instance: dg.DagsterInstance, now: float) -> dg.AssetCheckEvaluation:
        updated = last_update(instance, self.asset_key)
        limit = self.max_age.total_seconds()
        metadata: dict = {"max_age_seconds": limit}
        if updated is None:
            return evaluation(self.asset_key, False, "never updated", metadata, None)
        metadata["last_updated"] = dg.MetadataValue.timestamp(updated)
        age = now - updated
        passed = age <= limit
        description = (
            f"last updated {age:.0f} s ago, {'within' if passed else 'past'} the {limit:g} s allowed"
        )
        return evaluation(self.asset_key, passed, description, metadata, updated + limit)


@dataclass(frozen=True)
class HourArrivalRule:
    """Hour H of the asset was materialised after H closed, by H + 1 h + the freshness delay.

    Judged for the latest hour whose deadline has passed. A materialisation made while H was still
    running (the 5-minute refresh) does not count: only one after the hour closed holds all of it.
    """

    asset_key: dg.AssetKey

    @property
    def description(self) -> str:
        return (
            "The latest hour whose deadline has passed was materialised after it closed, by the end of "
            f"the hour plus {FRESHNESS_DELAY_MINUTES.name} (default {FRESHNESS_DELAY_MINUTES.default})."
        )

    def evaluate(self, instance: dg.DagsterInstance, now: float) -> dg.AssetCheckEvaluation:
        delay = freshness_delay()
        hour = expected_hour(datetime.fromtimestamp(now, UTC), delay)
        key = hour_key(hour)
        closed, deadline = hour + HOUR, hour + HOUR + delay
        metadata: dict = {
            "expected_partition": key,
            "deadline": dg.MetadataValue.timestamp(deadline.timestamp()),
        }
        updated = last_update(instance, self.asset_key, key)
        if updated is not None:
            metadata["last_updated"] = dg.MetadataValue.timestamp(updated)
        passed = updated is not None and updated >= closed.timestamp()
        if passed:
            description = f"hour {key} was materialised after it closed"
        elif updated is None:
            description = f"hour {key} is missing: it was due by {deadline:%H:%M} UTC"
        else:
            description = (
                f"hour {key} was only refreshed while running, not completed by {deadline:%H:%M} UTC"
            )
        return evaluation(self.asset_key, passed, description, metadata, (deadline + HOUR).timestamp())


def expected_hour(now: datetime, delay: timedelta) -> datetime:
    """The latest hour H with H + 1 h + delay <= now."""
    return floor_hour(now - HOUR - delay)


def build_freshness_check(rule: FreshnessRule) -> dg.AssetChecksDefinition:
    """The rule as an asset check of its asset (runnable by hand; the sensor below reports it)."""

    @dg.asset_check(asset=rule.asset_key, name=CHECK_NAME, description=rule.description)
    def freshness_check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        return as_check_result(rule.evaluate(context.instance, time.time()))

    return freshness_check


def as_check_result(evaluation: dg.AssetCheckEvaluation) -> dg.AssetCheckResult:
    """A sensor-side evaluation as the result of the same check run by hand."""
    return dg.AssetCheckResult(
        passed=evaluation.passed,
        severity=evaluation.severity,
        metadata=evaluation.metadata,
        description=evaluation.description,
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
    rules: Sequence[FreshnessRule],
    name: str,
    minimum_interval_seconds: int,
    default_status: dg.DefaultSensorStatus,
) -> dg.SensorDefinition:
    """A sensor that evaluates `rules` in its own evaluation and reports them without a run."""

    @dg.sensor(
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description="Evaluates the freshness checks of Bronze, Silver and Gold in the sensor itself "
        "(no run) and reports each when it is new, changed, or could have turned overdue.",
    )
    def freshness_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        cursor: dict = json.loads(context.cursor or "{}")
        now, events, instance = time.time(), [], sensor_instance(context)
        for rule in rules:
            result = rule.evaluate(instance, now)
            key = f"{result.asset_key.to_user_string()}:{result.check_name}"
            if due(result, cursor.get(key), now):
                events.append(result)
                cursor[key] = {"passed": result.passed, "until": fresh_until(result)}
        return dg.SensorResult(asset_events=events, cursor=json.dumps(cursor, sort_keys=True))

    return freshness_sensor
