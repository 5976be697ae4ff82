"""K2's freshness rules against a real (ephemeral) Dagster instance: hour H of Silver and Gold counts as
arrived only when it was materialised after it closed, and Bronze is fresh within its allowed age.

Materialisations are recorded now; the rules are evaluated at chosen times around them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from k2_assets.freshness import HourArrivalRule, LastUpdateRule, expected_hour, freshness_delay
from k2_assets.partitions import hour_key

SILVER = dg.AssetKey("silver_binance_trades")
BRONZE = dg.AssetKey("bronze_binance_trades")


def this_hour() -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def materialise(instance: dg.DagsterInstance, key: dg.AssetKey, hour: datetime | None = None) -> None:
    partition = hour_key(hour) if hour else None
    instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition))


def test_the_expected_hour_is_the_latest_whose_deadline_passed() -> None:
    delay = timedelta(minutes=20)
    assert expected_hour(datetime(2026, 12, 7, 11, 20, tzinfo=UTC), delay) == datetime(
        2026, 12, 7, 10, tzinfo=UTC
    )
    assert expected_hour(datetime(2026, 12, 7, 11, 19, tzinfo=UTC), delay) == datetime(
        2026, 12, 7, 9, tzinfo=UTC
    )


def test_an_hour_counts_only_once_materialised_after_it_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K2_FRESHNESS_DELAY_MINUTES", "15")
    rule = HourArrivalRule(SILVER)
    running, closed = this_hour(), this_hour() - timedelta(hours=1)
    with dg.DagsterInstance.ephemeral() as instance:
        # The running hour, refreshed now: at its deadline it has not been completed.
        materialise(instance, SILVER, running)
        at_deadline = (running + timedelta(hours=1, minutes=15, seconds=1)).timestamp()
        refreshed_only = rule.evaluate(instance, at_deadline)
        assert not refreshed_only.passed
        assert "only refreshed while running" in (refreshed_only.description or "")

        # The previous hour: nothing yet, then a materialisation now, after it closed.
        after_previous_deadline = (closed + timedelta(hours=1, minutes=15, seconds=1)).timestamp()
        missing = rule.evaluate(instance, after_previous_deadline)
        assert not missing.passed and "missing" in (missing.description or "")
        materialise(instance, SILVER, closed)
        arrived = rule.evaluate(instance, after_previous_deadline)
        assert arrived.passed
        assert arrived.metadata["expected_partition"].value == hour_key(closed)
        # Fresh until the next hour's deadline, when the next hour is judged.
        next_deadline = closed + timedelta(hours=2, minutes=15)
        assert arrived.metadata["fresh_until"].value == next_deadline.timestamp()


def test_bronze_is_fresh_within_its_allowed_age() -> None:
    rule = LastUpdateRule(BRONZE, max_age=timedelta(seconds=30))
    with dg.DagsterInstance.ephemeral() as instance:
        assert not rule.evaluate(instance, datetime.now(UTC).timestamp()).passed  # never updated
        materialise(instance, BRONZE)
        now = datetime.now(UTC).timestamp()
        assert rule.evaluate(instance, now).passed
        assert not rule.evaluate(instance, now + 31).passed


@pytest.mark.parametrize("value", ["60", "-1", "ten"])
def test_a_freshness_delay_outside_0_to_59_minutes_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("K2_FRESHNESS_DELAY_MINUTES", value)
    with pytest.raises(ValueError, match="K2_FRESHNESS_DELAY_MINUTES"):
        freshness_delay()
