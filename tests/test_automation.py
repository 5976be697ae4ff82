"""Automation without anyone clicking: the running hour refreshes every 5 minutes, and each hour is
completed once after it closes (Silver at :05, Gold at :10). Evaluated by Dagster's own evaluator
against a real instance, tick by tick, at chosen times."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg

from k2_assets.definitions import defs

SILVER = dg.AssetKey("silver_binance_trades")
GOLD = dg.AssetKey("gold_crypto_trades")


def tick(instance: dg.DagsterInstance, at: datetime, cursor=None):
    return dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=at, cursor=cursor)


def requested(result, key: dg.AssetKey) -> set[str]:
    return set(result.get_requested_partitions(key))


def test_running_hour_refreshes_and_closed_hour_completes() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        result = tick(instance, datetime(2026, 11, 23, 10, 12, tzinfo=UTC))
        result = tick(instance, datetime(2026, 11, 23, 10, 16, tzinfo=UTC), result.cursor)
        assert requested(result, SILVER) == {"2026-11-23-10:00"}
        assert requested(result, GOLD) == {"2026-11-23-10:00"}

        result = tick(instance, datetime(2026, 11, 23, 10, 17, tzinfo=UTC), result.cursor)
        assert requested(result, SILVER) == set()  # nothing until the next 5-minute tick

        result = tick(instance, datetime(2026, 11, 23, 10, 21, tzinfo=UTC), result.cursor)
        assert requested(result, SILVER) == {"2026-11-23-10:00"}

        # The hour has closed: at :05 Silver completes it once, besides refreshing the new hour.
        result = tick(instance, datetime(2026, 11, 23, 11, 6, tzinfo=UTC), result.cursor)
        assert requested(result, SILVER) == {"2026-11-23-10:00", "2026-11-23-11:00"}
        assert requested(result, GOLD) == {"2026-11-23-11:00"}

        # Gold completes the closed hour at :10, after Silver had its chance at :05.
        result = tick(instance, datetime(2026, 11, 23, 11, 11, tzinfo=UTC), result.cursor)
        assert requested(result, GOLD) == {"2026-11-23-10:00", "2026-11-23-11:00"}
        assert requested(result, SILVER) == {"2026-11-23-11:00"}  # the closed hour is not redone
