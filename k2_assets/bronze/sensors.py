"""Keep exactly one ingestion run alive per exchange.

A sensor only looks at run state and launches runs; it never touches Kafka (a sensor that polls for
data stalls the daemon). The QueuedRunCoordinator's tag limit (dagster.yaml) is the second guard, and
Bronze's commit fencing the third: even two runs that do start cannot both commit.
"""

from __future__ import annotations

import json

import dagster as dg

from k2_assets.bronze.jobs import INGESTION_TAG, ingestion_jobs
from k2_assets.resources import automation_status
from k2_resources.exchanges import EXCHANGES, ExchangeConfig

ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def build_ingestion_sensor(exchange: ExchangeConfig) -> dg.SensorDefinition:
    job = ingestion_jobs[exchange.name]

    @dg.sensor(
        name=f"bronze_{exchange.name}_ingestion_sensor",
        job=job,
        minimum_interval_seconds=30,
        default_status=automation_status(),
        description=f"Launches {job.name} whenever no run of it is queued or running.",
    )
    def keep_alive(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        active = context.instance.get_run_records(
            filters=dg.RunsFilter(tags={INGESTION_TAG: exchange.name}, statuses=ACTIVE_STATUSES), limit=1
        )
        if active:
            return dg.SkipReason(
                f"{job.name} run {active[0].dagster_run.run_id} is {active[0].dagster_run.status.value}"
            )
        launches = json.loads(context.cursor or "{}").get("launches", 0) + 1
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"{exchange.name}-ingestion-{launches}", tags={INGESTION_TAG: exchange.name}
                )
            ],
            cursor=json.dumps({"launches": launches}),
        )

    return keep_alive


ingestion_sensors = [build_ingestion_sensor(e) for e in EXCHANGES]
