"""Gold: the cross-exchange trades asset, the dedup job and its audit, late-data sensor, schedule."""

from __future__ import annotations

import dagster as dg

from k2_assets.freshness import HourArrivalRule, build_freshness_check
from k2_assets.gold.assets import GOLD_KEY, gold_crypto_trades
from k2_assets.gold.jobs import audit_asset, gold_dedup_job
from k2_assets.gold.schedules import gold_dedup_hourly
from k2_assets.gold.sensors import gold_late_data_sensor

freshness_rules = [HourArrivalRule(GOLD_KEY)]
freshness_checks = [build_freshness_check(rule) for rule in freshness_rules]

defs = dg.Definitions(
    assets=[gold_crypto_trades, audit_asset],
    asset_checks=freshness_checks,
    jobs=[gold_dedup_job],
    sensors=[gold_late_data_sensor],
    schedules=[gold_dedup_hourly],
)
