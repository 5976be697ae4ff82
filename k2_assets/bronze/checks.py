"""Bronze freshness: each Bronze table is updated within a few commit intervals of its exchange."""

from __future__ import annotations

from datetime import timedelta

import dagster as dg

from k2_assets.bronze.assets import bronze_asset_key
from k2_resources.exchanges import EXCHANGES

COMMIT_INTERVALS_OF_SLACK = 3

bronze_freshness_checks: list[dg.AssetChecksDefinition] = [
    check
    for exchange in EXCHANGES
    for check in dg.build_last_update_freshness_checks(
        assets=[bronze_asset_key(exchange)],
        lower_bound_delta=timedelta(seconds=COMMIT_INTERVALS_OF_SLACK * exchange.commit_interval_seconds),
    )
]
