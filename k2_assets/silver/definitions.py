"""Silver: per-exchange decode/validate assets, the DLQ slices, their checks, and the DLQ replay job."""

from __future__ import annotations

import dagster as dg

from k2_assets.freshness import HourArrivalRule, build_freshness_check
from k2_assets.silver.assets import silver_asset_key, silver_assets
from k2_assets.silver.jobs import silver_dlq_replay
from k2_resources.exchanges import EXCHANGES

freshness_rules = [HourArrivalRule(silver_asset_key(e)) for e in EXCHANGES]
freshness_checks = [build_freshness_check(rule) for rule in freshness_rules]

defs = dg.Definitions(assets=silver_assets, asset_checks=freshness_checks, jobs=[silver_dlq_replay])
