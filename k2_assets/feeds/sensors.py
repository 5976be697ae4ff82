"""Keep exactly one feed run alive per exchange, and report the topic's freshness check.

Like Bronze ingestion's sensor: runs are found by tag, a failed run delays the next by an exponential
backoff (the feed also backs off inside a run; this covers runs that die), and a run that failed
because the exchange refused its configuration (FeedConfigError: an unknown symbol, a bad URL) is not
relaunched until someone fixes the configuration and launches the job by hand. The sensor never
touches the exchange or Kafka; it reads run history and the feed's own observations.
"""

# No `from __future__ import annotations`: Dagster reads sensor parameter annotations.

import json
import time

import dagster as dg

from k2_assets.bronze.sensors import IngestionState, failure_errors, run_history_state
from k2_assets.feeds.checks import freshness_evaluation
from k2_assets.feeds.jobs import FEED_TAG, feed_jobs
from k2_assets.sensor_instance import sensor_instance
from k2_resources.exchanges import EXCHANGES, ExchangeConfig

CONFIG_ERRORS = frozenset({"FeedConfigError"})


def feed_state(instance: dg.DagsterInstance, exchange: ExchangeConfig) -> tuple[IngestionState, str | None]:
    """The run history's state of the feed, and the configuration error that halts it, if any."""
    tags = {FEED_TAG: exchange.name}

    def config_error(run_id: str) -> str | None:
        message = next((m for name, m in failure_errors(instance, run_id) if name in CONFIG_ERRORS), None)
        return f"run {run_id}: {message}" if message is not None else None

    return run_history_state(instance, tags, config_error)


def build_feed_sensor(exchange: ExchangeConfig) -> dg.SensorDefinition:
    job = feed_jobs[exchange.name]

    @dg.sensor(
        name=f"{exchange.name}_feed_sensor",
        # By name (the job is in the Definitions): a sensor holding the job object is copied when
        # Dagster binds resources to it, and that copy warns (BetaWarning on `owners`, Dagster 1.13.27).
        job_name=job.name,
        minimum_interval_seconds=30,
        # Off until someone points K2 at a real market: a feed run holds a run slot for hours, and the
        # dev stack's trades come from the simulator. Start it in the UI or `dagster sensor start`.
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=f"Keeps one {job.name} run alive (backing off after failures) and reports its freshness check.",
    )
    def keep_feed_alive(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        cursor = json.loads(context.cursor or "{}")
        instance = sensor_instance(context)
        events = freshness_events(instance, exchange, cursor)
        state, config_error = feed_state(instance, exchange)
        requests, skip = [], None
        if state.active is not None:
            skip = f"{job.name} run {state.active.run_id} is {state.active.status.value}"
        elif config_error is not None:
            skip = f"HALTED: the exchange refused the feed's configuration ({config_error[:300]}); fix it, then launch {job.name} by hand"
        elif (wait := state.launch_at() - time.time()) > 0:
            skip = f"{state.failures} {job.name} run(s) failed in a row: next launch in {wait:.0f} s"
        else:
            cursor["launches"] = cursor.get("launches", 0) + 1
            requests = [
                dg.RunRequest(
                    run_key=f"{exchange.name}-feed-{cursor['launches']}", tags={FEED_TAG: exchange.name}
                )
            ]
        return dg.SensorResult(
            run_requests=requests, skip_reason=skip, cursor=json.dumps(cursor), asset_events=events
        )

    return keep_feed_alive


def freshness_events(instance: dg.DagsterInstance, exchange: ExchangeConfig, cursor: dict) -> list:
    """The freshness check's evaluation when its outcome (or the set of silent symbols) changed."""
    evaluation = freshness_evaluation(instance, exchange)
    silent = evaluation.metadata.get("silent_symbols")
    outcome = json.dumps([evaluation.passed, sorted(silent.value) if silent is not None else None])
    if cursor.get("freshness") == outcome:
        return []
    cursor["freshness"] = outcome
    return [evaluation]


feed_sensors = [build_feed_sensor(e) for e in EXCHANGES if e.feed_url]
