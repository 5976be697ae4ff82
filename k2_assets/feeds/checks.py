"""`symbols_fresh`: fails when a feed symbol has had no trade for longer than the exchange allows.

The feed's latest observation of the topic asset holds each symbol's last trade time. A symbol older
than `ExchangeConfig.feed_max_silence_seconds` (measured now, so a feed that died ages too) fails the
check, naming the silent symbols. The feed sensor reports the check whenever its outcome changes;
running it by hand evaluates it again.
"""

# No `from __future__ import annotations`: Dagster reads the asset check's parameter annotations.

import time

import dagster as dg

from k2_assets.bronze.assets import kafka_topic_key
from k2_assets.freshness import as_check_result
from k2_resources.exchanges import EXCHANGES, ExchangeConfig

FRESH_CHECK = "feed_symbols_fresh"


def latest_feed_stats(instance: dg.DagsterInstance, exchange: ExchangeConfig) -> dict | None:
    """The per-symbol stats of the newest observation the feed made of the topic, if any."""
    records = instance.fetch_observations(kafka_topic_key(exchange), limit=1).records
    if not records:
        return None
    observation = records[0].asset_observation
    value = observation.metadata.get("symbols") if observation else None
    return value.value if value is not None else None


def silent_symbols(symbols: dict, max_silence_seconds: float, now_us: int) -> dict[str, float | None]:
    """symbol -> seconds since its last trade (None: never traded), for those silent too long."""
    silent = {}
    for name, stats in symbols.items():
        last = stats.get("last_trade_us")
        age = None if last is None else (now_us - last) / 1e6
        if age is None or age > max_silence_seconds:
            silent[name] = None if age is None else round(age, 1)
    return silent


def freshness_evaluation(
    instance: dg.DagsterInstance, exchange: ExchangeConfig, now_us: int | None = None
) -> dg.AssetCheckEvaluation:
    now_us = now_us if now_us is not None else time.time_ns() // 1000
    limit = exchange.feed_max_silence_seconds
    stats = latest_feed_stats(instance, exchange)
    if stats is None:
        passed, description, metadata = False, f"no {exchange.name} feed has reported yet", {}
    else:
        silent = silent_symbols(stats, limit, now_us)
        passed = not silent
        description = (
            f"every symbol traded within {limit:g} s"
            if passed
            else f"silent longer than {limit:g} s (feed_max_silence_seconds): "
            + ", ".join(f"{s} ({'never' if a is None else f'{a:g} s'})" for s, a in sorted(silent.items()))
        )
        metadata = {"silent_symbols": dg.MetadataValue.json(silent), "symbols": len(stats)}
    return dg.AssetCheckEvaluation(
        asset_key=kafka_topic_key(exchange),
        check_name=FRESH_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={**metadata, "max_silence_seconds": limit},
        description=description,
    )


def build_freshness_check(exchange: ExchangeConfig) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=kafka_topic_key(exchange),
        name=FRESH_CHECK,
        description=f"Every {exchange.name} feed symbol traded within {exchange.feed_max_silence_seconds:g} s, "
        "per the feed's latest observation of the topic.",
    )
    def feed_symbols_fresh(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        return as_check_result(freshness_evaluation(context.instance, exchange))

    return feed_symbols_fresh


feed_freshness_checks = [build_freshness_check(e) for e in EXCHANGES if e.feed_url]
