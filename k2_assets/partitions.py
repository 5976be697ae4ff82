"""Hourly UTC partitions shared by Silver (ingestion hour) and Gold (event hour).

`end_offset=1` makes the running hour a partition, so it can be refreshed during the hour and
completed after it closes.
"""

from __future__ import annotations

from datetime import timedelta

import dagster as dg

PARTITIONS_START = "2025-01-01-00:00"

hourly_partitions = dg.HourlyPartitionsDefinition(start_date=PARTITIONS_START, end_offset=1, timezone="UTC")

HOUR_KEY_FORMAT = "%Y-%m-%d-%H:00"


def hourly_automation(complete_at_minute: int) -> dg.AutomationCondition:
    """Refresh the running hour on every 5-minute tick; complete the hour just closed once, at
    `complete_at_minute` past the hour (Gold later than Silver, so it sees Silver's last refresh).
    Nothing is requested while the asset or any of its dependencies is being materialised."""
    refresh = (
        dg.AutomationCondition.cron_tick_passed("*/5 * * * *")
        & dg.AutomationCondition.in_latest_time_window()
    )
    closed_hour = dg.AutomationCondition.in_latest_time_window(lookback_delta=timedelta(hours=2)) & ~(
        dg.AutomationCondition.in_latest_time_window()
    )
    complete = dg.AutomationCondition.cron_tick_passed(f"{complete_at_minute} * * * *") & closed_hour
    quiet = ~dg.AutomationCondition.in_progress() & ~dg.AutomationCondition.any_deps_in_progress()
    return ((refresh | complete) & quiet).with_label(
        f"refresh the running hour every 5 min; complete the closed hour at :{complete_at_minute:02d}"
    )


def hourly_freshness_checks(keys: list[dg.AssetKey]) -> list[dg.AssetChecksDefinition]:
    """The latest closed hour of each asset is materialised within K2_FRESHNESS_DELAY_MINUTES of closing."""
    from k2_assets.resources import freshness_deadline_cron

    return list(
        dg.build_time_partition_freshness_checks(assets=keys, deadline_cron=freshness_deadline_cron())
    )
