"""Every change to Silver after a Gold hour closed reaches that Gold hour, without anyone asking.

Gold H is computed from the Silver rows of every exchange whose trade time falls in H, wherever they
sit in Silver. Automation completes each hour once after it closes; this sensor covers everything
that changes Silver afterwards: trades ingested minutes or days late (they land in a later Silver
partition), a DLQ replay, a re-run of an old Silver hour, a backfill.

Every Silver materialisation records which event hours it holds and how many trades of each
(`event_hours`; a DLQ replay records the hours of the rows it added, `event_hours_added`). For each
new one, the sensor works out which closed event hours it may have changed, and when: an hour whose
trade count differs from the previous pass of the same Silver partition changed now; an hour whose
count is the same as in the passes before has been as it is since the oldest of them. (Counts stand
for content because a pass over a Bronze window that is still filling only adds rows; a re-run that
swapped rows for as many others of the same hour, e.g. under changed validation rules, would not be
seen: the run that changes the rules should be followed by a Gold backfill.) Gold
materialisations record when they pinned their Silver snapshots (`silver_read_at`). An hour is
requested when its latest Gold materialisation read Silver before that change; a Gold run of the hour
already queued or running is waited for (then checked again), never doubled. At most
MAX_REQUESTS_PER_TICK hours are requested per tick; the rest stay in the cursor for the next ticks.

Deciding "closed" from the Silver materialisation's own timestamp (not from the clock) keeps the
running hour out: automation refreshes it every few minutes anyway.

The hour that just closed is left to automation's completion first: Silver's refreshes of the new hour
(late trades of the old one) and Silver's own completion at :05 change it in its first minutes, and
automation completes Gold H at :10, reading all of them. Requesting each change as it came cost two
whole Gold runs an hour that the completion then repeated (bench/README.md, "Live cost", session 10).
So changes to H are kept pending, not requested, until Gold H has read Silver after H closed (the
completion's run) or the freshness deadline (`freshness_delay()`) has passed since H closed (a completion that did not
come, made up before that deadline's check could fail); a
change newer than what the completion read is requested then, as any other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import dagster as dg

from k2_assets.freshness import freshness_delay
from k2_assets.gold.assets import GOLD_KEY, SILVER_READ_AT
from k2_assets.partitions import REFRESHES_PER_HOUR, hour_window, hourly_partitions
from k2_assets.resources import automation_status
from k2_assets.sensor_instance import sensor_instance
from k2_assets.silver.assets import EVENT_HOURS, EVENT_HOURS_ADDED, PASS_PARTITIONS, silver_asset_key
from k2_assets.silver.checks import BLOCKING_CHECKS
from k2_resources.exchanges import EXCHANGES

MAX_REQUESTS_PER_TICK = 100
RECORDS_PER_TICK = 500
# How many earlier passes of a Silver partition are compared: an hour of the running hour's refreshes.
PASSES_LOOKED_BACK = REFRESHES_PER_HOUR
# A Gold run of one hour reads at most one hour of Silver: anything longer is hung (run monitoring).
GOLD_RUN_TAGS = {"dagster/max_runtime": "3600"}
IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def _metadata_value(materialization: dg.AssetMaterialization, name: str):
    entry = materialization.metadata.get(name)
    return entry.value if entry is not None else None


def _counts(value) -> dict[str, int]:
    """`event_hours` as hour -> count (older materialisations stored a plain list of hours)."""
    if isinstance(value, Mapping):
        return {str(k): int(v) for k, v in value.items()}
    return {str(hour): -1 for hour in value or []}


def _earlier_full_passes(instance: dg.DagsterInstance, record: dg.EventLogRecord) -> list[dg.EventLogRecord]:
    """Single-partition full passes of the same Silver partition before `record`, newest first."""
    materialization = record.asset_materialization
    earlier = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=materialization.asset_key,
            asset_partitions=[materialization.partition],
            before_storage_id=record.storage_id,
        ),
        limit=PASSES_LOOKED_BACK,
        ascending=False,
    ).records
    passes = []
    for earlier_record in earlier:
        if EVENT_HOURS_ADDED in earlier_record.asset_materialization.metadata:
            break  # a DLQ replay changed the partition there
        if not _single(earlier_record.asset_materialization):
            break
        passes.append(earlier_record)
    return passes


def changed_hours(instance: dg.DagsterInstance, record: dg.EventLogRecord) -> dict[str, float]:
    """Closed Gold hour -> since when its Silver rows are as this materialisation left them.

    For a full pass, an hour whose trade count is the same in the passes before it has been unchanged
    since the oldest of those passes; any other hour, or one that lost all its rows, changed now.
    """
    materialization = record.asset_materialization
    if materialization is None or materialization.partition is None:
        return {}
    added = _metadata_value(materialization, EVENT_HOURS_ADDED)
    if added is not None:  # a DLQ replay: exactly these hours gained rows now
        since = dict.fromkeys(_counts(added), record.timestamp)
    else:
        counts = _counts(_metadata_value(materialization, EVENT_HOURS))
        passes = _earlier_full_passes(instance, record) if _single(materialization) else []
        history = [
            (p.timestamp, _counts(_metadata_value(p.asset_materialization, EVENT_HOURS))) for p in passes
        ]
        vanished = set(history[0][1]) - set(counts) if history else set()
        since = {}
        for hour in set(counts) | vanished:
            since[hour] = record.timestamp
            for moment, earlier in history:
                if counts.get(hour, -1) < 0 or earlier.get(hour) != counts.get(hour):
                    break
                since[hour] = moment
    return {
        hour: moment
        for hour, moment in since.items()
        if hourly_partitions.has_partition_key(hour) and hour_window(hour)[1].timestamp() <= record.timestamp
    }


def _single(materialization: dg.AssetMaterialization) -> bool:
    """Whether the pass covered this partition alone (a range run records the range's totals)."""
    return _metadata_value(materialization, PASS_PARTITIONS) == 1


def gold_read_at(instance: dg.DagsterInstance, hour: str) -> float:
    """When the latest Gold computation of `hour` pinned its Silver snapshots (0: never)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=GOLD_KEY, asset_partitions=[hour]), limit=10, ascending=False
    ).records
    for record in records:  # the dedup job's stage-2 rewrites record no read time: look past them
        value = _metadata_value(record.asset_materialization, SILVER_READ_AT)
        if value is not None:
            return float(value)
    return 0.0


def gold_in_progress(instance: dg.DagsterInstance, hour: str) -> bool:
    runs = instance.get_run_records(
        filters=dg.RunsFilter(tags={"dagster/partition": hour}, statuses=IN_PROGRESS), limit=20
    )
    return any(GOLD_KEY in (r.dagster_run.asset_selection or ()) for r in runs)


def silver_usable(instance: dg.DagsterInstance, record: dg.EventLogRecord) -> bool | None:
    """Whether Gold may be computed from this Silver materialisation; None while its run is going.

    Its blocking checks are evaluated after the materialisation is recorded, in the same run, so the
    run must have finished before they can be known. A failed one (conservation, or a DLQ rate above
    the fail rate) holds Gold back: Gold keeps what it had, and a fixed Silver run is seen afresh.
    """
    if not record.run_id:
        return True  # recorded outside a run
    run = instance.get_run_by_id(record.run_id)
    if run is not None and not run.is_finished:
        return None
    evaluations = instance.get_records_for_run(
        record.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ).records
    for evaluation_record in evaluations:
        evaluation = evaluation_record.event_log_entry.dagster_event.event_specific_data
        if (
            evaluation.asset_key == record.asset_key
            and evaluation.check_name in BLOCKING_CHECKS
            and not evaluation.passed
            and evaluation.severity == dg.AssetCheckSeverity.ERROR
        ):
            return False
    return True


def collect(context: dg.SensorEvaluationContext, cursor: dict) -> None:
    """Fold new Silver materialisations into `cursor["pending"]` (hour -> Silver change time)."""
    after, pending = cursor.setdefault("after", {}), cursor.setdefault("pending", {})
    instance = sensor_instance(context)
    for exchange in EXCHANGES:
        name = silver_asset_key(exchange).to_user_string()
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=silver_asset_key(exchange), after_storage_id=after.get(name)),
            limit=RECORDS_PER_TICK,
            ascending=True,
        )
        for record in result.records:
            usable = silver_usable(instance, record)
            if usable is None:
                break  # its run is still going: look again next tick, from here
            if usable:
                for hour, since in changed_hours(instance, record).items():
                    pending[hour] = max(pending.get(hour, 0.0), since)
            after[name] = record.storage_id


def awaiting_completion(hour: str, read_at: float, now: float) -> bool:
    """Whether `hour` closed so recently that automation's completion of Gold, which reads every change
    made so far, is still to come: Gold has not read Silver since the hour closed, within the freshness deadline."""
    closed = hour_window(hour)[1].timestamp()
    return read_at < closed and now < closed + freshness_delay().total_seconds()


def due_requests(instance: dg.DagsterInstance, pending: dict[str, float], now: float) -> list[dg.RunRequest]:
    """Run requests for pending hours whose Gold is older than their Silver; settled hours leave; an
    hour awaiting automation's completion stays pending."""
    requests: list[dg.RunRequest] = []
    for hour in sorted(pending):
        if len(requests) >= MAX_REQUESTS_PER_TICK:
            break
        since, read_at = pending[hour], gold_read_at(instance, hour)
        if read_at >= since:
            del pending[hour]  # Gold already read this change
        elif awaiting_completion(hour, read_at, now):
            continue  # the completion will read it; looked at again next tick
        elif not gold_in_progress(instance, hour):  # else: check again once that run is over
            del pending[hour]
            requests.append(
                dg.RunRequest(
                    run_key=f"late-{hour}-{int(since * 1_000_000)}",
                    partition_key=hour,
                    asset_selection=[GOLD_KEY],
                    tags=GOLD_RUN_TAGS,
                )
            )
    return requests


@dg.sensor(
    name="gold_late_data_sensor",
    target=[GOLD_KEY],
    # Late trades of a closed hour reach Gold a minute or two later either way; half the evaluations.
    minimum_interval_seconds=120,
    default_status=automation_status(),
    description="Requests every closed Gold hour whose Silver trades changed after Gold last read them.",
)
def gold_late_data_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    cursor: dict = json.loads(context.cursor or "{}")
    collect(context, cursor)
    requests = due_requests(sensor_instance(context), cursor["pending"], time.time())
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor, sort_keys=True))
