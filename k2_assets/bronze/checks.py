"""Bronze freshness: each Bronze table is updated within a few commit intervals of its exchange."""

from __future__ import annotations

from datetime import timedelta

from k2_assets.bronze.assets import bronze_asset_key
from k2_assets.freshness import LastUpdateRule, build_freshness_check
from k2_resources.exchanges import EXCHANGES

COMMIT_INTERVALS_OF_SLACK = 3

bronze_freshness_rules = [
    LastUpdateRule(
        bronze_asset_key(exchange),
        max_age=timedelta(seconds=COMMIT_INTERVALS_OF_SLACK * exchange.commit_interval_seconds),
    )
    for exchange in EXCHANGES
]
bronze_freshness_checks = [build_freshness_check(rule) for rule in bronze_freshness_rules]
