"""Hourly UTC partitions shared by Silver (ingestion hour) and Gold (event hour), and their automation.

`end_offset=1` makes the running hour a partition, so it can be refreshed during the hour and
completed after it closes. The partitions start at K2_PARTITIONS_START (default: a recent date), so a
fresh install does not show years of hours that can never hold data.

K2_PARTITIONS_START is read here, once, at import, and nowhere else: `hourly_partitions` is K2's only
partitions definition. It stays static (not a resource, not read per run) because the partition keys
are part of the code location's snapshot, which the code server, the daemon and every run must agree on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import ParamSpec, TypeVar

import dagster as dg

from k2_resources.settings import PARTITIONS_START

HOUR_KEY_FORMAT = "%Y-%m-%d-%H:00"
HOUR = timedelta(hours=1)
MICROS_PER_HOUR = 3_600_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def start_hour_key(raw: str) -> str:
    """`YYYY-MM-DD` or `YYYY-MM-DD-HH:00` (UTC) as an hour key."""
    for pattern in (HOUR_KEY_FORMAT, "%Y-%m-%d"):
        try:
            return datetime.strptime(raw, pattern).replace(tzinfo=UTC).strftime(HOUR_KEY_FORMAT)
        except ValueError:
            continue
    raise ValueError("a UTC date YYYY-MM-DD or hour YYYY-MM-DD-HH:00")


def partitions_start() -> str:
    """The first hourly partition, from K2_PARTITIONS_START."""
    return PARTITIONS_START.parsed(start_hour_key)


hourly_partitions = dg.HourlyPartitionsDefinition(start_date=partitions_start(), end_offset=1, timezone="UTC")


P = ParamSpec("P")
T = TypeVar("T")


def accepting_beta(build: Callable[P, T]) -> Callable[P, T]:
    """`build`, called without the BetaWarning of a beta parameter K2 relies on knowingly.

    Two partition features K2 needs are beta in Dagster 1.13 with no GA equivalent: an asset's
    `backfill_policy` (a range of hours as one run) and `allow_nonexistent_upstream_partitions` (the
    running hour reading the hour after it, which does not exist yet). Only those two parameters' warnings
    are accepted, only around the call that passes them; any other warning still shows.
    """

    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=r"Parameter `(backfill_policy|allow_nonexistent_upstream_partitions)`",
                category=dg.BetaWarning,
            )
            return build(*args, **kwargs)

    return call


# --- Hours: every conversion between moments, hour keys and µs timestamps, here and nowhere else ----------


def hour_key(moment: datetime) -> str:
    """The partition key of the hour `moment` falls in (`moment` in UTC)."""
    return moment.astimezone(UTC).strftime(HOUR_KEY_FORMAT)


def hour_start(key: str) -> datetime:
    """The first moment of the hour partition `key`."""
    return datetime.strptime(key, HOUR_KEY_FORMAT).replace(tzinfo=UTC)


def hour_window(key: str) -> tuple[datetime, datetime]:
    """[start, end) of the hour partition `key`."""
    start = hour_start(key)
    return start, start + HOUR


def floor_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def to_micros(moment: datetime) -> int:
    """µs since the epoch (Iceberg's and Arrow's timestamp unit), exactly: no float on the way."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


# The running hour is refreshed on this cron. Gold is at most one period plus a refresh's start and run
# behind: every 5 minutes left it ~5 min 14 s behind at worst (bench/README.md, "Live cost"); every 4
# keeps it under 5 min, for a quarter more refresh runs.
REFRESH_MINUTES = 4
REFRESH_CRON = f"*/{REFRESH_MINUTES} * * * *"
REFRESHES_PER_HOUR = 60 // REFRESH_MINUTES


def hourly_automation(complete_at_minute: int) -> dg.AutomationCondition:
    """Refresh the running hour on every REFRESH_CRON tick; complete each hour once after it closes.

    The completion is latched: the hour that closed is remembered from the `complete_at_minute` tick
    until it has actually been requested, so a run of the asset or of a dependency still queued or in
    progress at the tick delays the completion instead of dropping it (a one-shot tick gated by
    "nothing in progress" lost the hour for good). The latch is reset only by a request, not by an
    update, so the running hour's last refresh finishing after the tick does not count as completion.
    Nothing is requested while the asset or any of its dependencies is being materialised. Changes to
    an hour after its completion (late trades, replays, re-runs) are the Gold late-data sensor's job.
    """
    refresh = (
        dg.AutomationCondition.cron_tick_passed(REFRESH_CRON) & dg.AutomationCondition.in_latest_time_window()
    ).with_label(f"{REFRESH_MINUTES}-minute tick, running hour")
    just_closed = (
        dg.AutomationCondition.in_latest_time_window(lookback_delta=timedelta(hours=2))
        & ~dg.AutomationCondition.in_latest_time_window()
    )
    tick = dg.AutomationCondition.cron_tick_passed(f"{complete_at_minute} * * * *")
    # A request on the evaluation just before the tick (the last refresh) must not cancel the latch.
    requested_since_tick = dg.AutomationCondition.newly_requested() & ~tick
    completion_due = (
        (tick & just_closed)
        .since(requested_since_tick)
        .with_label(f"closed at the :{complete_at_minute:02d} tick, not yet requested")
    )
    quiet = (
        ~dg.AutomationCondition.in_progress() & ~dg.AutomationCondition.any_deps_in_progress()
    ).with_label("nothing of it or its dependencies in progress")
    # A dependency whose blocking check failed (e.g. Silver's DLQ rate above the fail rate) holds it back.
    # (Unlike all_deps_blocking_checks_passed, a check that has not run yet does not hold anything back.)
    inputs_sound = ~dg.AutomationCondition.any_deps_match(
        dg.AutomationCondition.any_checks_match(dg.AutomationCondition.check_failed(), blocking_only=True)
    ).with_label("no blocking check of a dependency failed")
    return ((refresh | completion_due) & quiet & inputs_sound).with_label(
        f"refresh the running hour every {REFRESH_MINUTES} min; complete each closed hour from :{complete_at_minute:02d} "
        "once nothing it depends on is in progress"
    )
