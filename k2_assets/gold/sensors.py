"""Late data reaches its Gold hour without anyone asking.

Gold H depends on Silver H and H+1, which covers trades that arrive within about an hour. Every Silver
materialisation records which event hours it contained (`event_hours` metadata); this sensor reads new
Silver materialisations and requests the Gold partitions outside that normal window, so a trade that
arrives hours or days late, or a replayed old day, is folded into its Gold hour.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import dagster as dg

from k2_assets.gold.assets import GOLD_KEY
from k2_assets.partitions import HOUR_KEY_FORMAT, hourly_partitions
from k2_assets.resources import automation_status
from k2_assets.silver.assets import silver_asset_key
from k2_resources.exchanges import EXCHANGES

MAX_REQUESTS_PER_TICK = 100


def normal_gold_hours(silver_partition: str) -> set[str]:
    """Gold hours that Silver partition P feeds through the partition mapping: P-1 and P."""
    hour = datetime.strptime(silver_partition, HOUR_KEY_FORMAT).replace(tzinfo=UTC)
    return {hour.strftime(HOUR_KEY_FORMAT), (hour - timedelta(hours=1)).strftime(HOUR_KEY_FORMAT)}


def late_hours(records: list[dg.EventLogRecord]) -> dict[str, int]:
    """Gold hours the records' Silver materialisations hold trades for, beyond what the mapping covers.

    A range run records the same `event_hours` on every partition it materialises, so the normal
    window is the union over the partitions of each run. Returns hour -> newest storage id asking.
    """
    by_run: dict[str, list[dg.EventLogRecord]] = {}
    for record in records:
        by_run.setdefault(record.run_id, []).append(record)
    valid = set(hourly_partitions.get_partition_keys())
    wanted: dict[str, int] = {}
    for run_records in by_run.values():
        normal: set[str] = set()
        hours: set[str] = set()
        for record in run_records:
            materialization = record.asset_materialization
            if materialization is None or materialization.partition is None:
                continue
            normal |= normal_gold_hours(materialization.partition)
            entry = materialization.metadata.get("event_hours")
            hours |= set(entry.value) if entry is not None else set()
        for hour in (hours - normal) & valid:
            wanted[hour] = max(wanted.get(hour, 0), max(r.storage_id for r in run_records))
    return wanted


@dg.sensor(
    name="gold_late_data_sensor",
    target=[GOLD_KEY],
    minimum_interval_seconds=60,
    default_status=automation_status(),
    description="Requests Gold hours that new Silver partitions hold trades for, outside the normal window.",
)
def gold_late_data_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    cursor: dict[str, int] = json.loads(context.cursor or "{}")
    records: list[dg.EventLogRecord] = []
    for exchange in EXCHANGES:
        key = silver_asset_key(exchange)
        after = cursor.get(key.to_user_string())
        result = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, after_storage_id=after), limit=500, ascending=True
        )
        records += result.records
        if result.records:
            cursor[key.to_user_string()] = result.records[-1].storage_id
    wanted = late_hours(records)
    requests = [
        dg.RunRequest(run_key=f"late-{hour}-{storage_id}", partition_key=hour, asset_selection=[GOLD_KEY])
        for hour, storage_id in sorted(wanted.items())[:MAX_REQUESTS_PER_TICK]
    ]
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor))
