"""`<exchange>_feed`: the exchange's WebSocket trades onto its Kafka topic until stopped or timed out.

The feed reports its stats (messages/s, trades produced, reconnects, gaps, last trade age per symbol)
as observations of the Kafka topic asset every `report_interval_seconds`, so the UI plots them and the
freshness check (checks.py) reads the latest one.
"""

# No `from __future__ import annotations` here: Dagster reads op parameter annotations at definition time.

import dagster as dg
from pydantic import Field

from k2_assets.bronze.assets import kafka_topic_key
from k2_assets.tunables import Tunables
from k2_resources.exchanges import EXCHANGES, ExchangeConfig
from k2_resources.feeds.client import FeedClient, FeedSettings, feed_settings
from k2_resources.feeds.sink import TopicSink, trade_message_id
from k2_resources.kafka import KafkaResource, SchemaRegistryResource

# One feed run per exchange: the sensor looks for runs with this tag (dagster.yaml can limit it).
FEED_TAG = "k2/feed"
# A restart costs the trades of the seconds between two runs (the sensor ticks every 30 s; Binance cannot
# replay them, they show as gaps), so a run lives a day; the bound keeps one run's event log finite.
DEFAULT_MAX_RUNTIME_SECONDS = 24 * 3600.0
DEFAULTS = FeedSettings(url="", symbols=())


class FeedConfig(Tunables):
    """Where to connect and how patiently; defaults come from the exchange's config and FeedSettings.

    FeedSettings (k2_resources/feeds/client.py) declares these tunables' defaults and checks their
    bounds (`validate`, naming the setting); this config only exposes them to Dagster.
    """

    url: str | None = Field(None, description="WebSocket endpoint. Default: the exchange's feed_url.")
    symbols: list[str] | None = Field(
        None, description="Native symbols. Default: the exchange's feed_symbols."
    )
    max_runtime_seconds: float = Field(
        DEFAULT_MAX_RUNTIME_SECONDS, description="Stop after this long (seconds)."
    )
    max_trades: int | None = Field(None, description="Stop after producing this many trades (smoke tests).")
    read_timeout_seconds: float = Field(
        DEFAULTS.read_timeout_seconds, description="Seconds without a frame that mean a dead socket."
    )
    backoff_initial_seconds: float = Field(
        DEFAULTS.backoff_initial_seconds, description="First reconnect delay (seconds), doubled per failure."
    )
    backoff_max_seconds: float = Field(
        DEFAULTS.backoff_max_seconds, description="Longest reconnect delay (seconds)."
    )
    reconnect_limit: int = Field(DEFAULTS.reconnect_limit, description="Connections per reconnect window.")
    reconnect_window_seconds: float = Field(
        DEFAULTS.reconnect_window_seconds, description="The window reconnect_limit counts in (seconds)."
    )
    report_interval_seconds: float = Field(
        DEFAULTS.report_interval_seconds,
        description="How often stats are reported as observations (seconds).",
    )

    def settings(self, exchange: ExchangeConfig) -> FeedSettings:
        tunables = {k: v for k, v in self.model_dump().items() if k not in ("url", "symbols")}
        return feed_settings(exchange, self.url, self.symbols, **tunables)


def build_feed_job(exchange: ExchangeConfig) -> dg.JobDefinition:
    topic_key = kafka_topic_key(exchange)

    @dg.op(
        name=f"run_{exchange.name}_feed", description=f"{exchange.name} WebSocket trades -> {exchange.topic}."
    )
    def run_feed(
        context: dg.OpExecutionContext,
        config: FeedConfig,
        kafka: KafkaResource,
        schema_registry: SchemaRegistryResource,
    ) -> None:
        settings = config.settings(exchange)
        producer_config = {k: v for k, v in kafka.base_config().items() if k != "error_cb"}
        sink = TopicSink(exchange, producer_config, schema_registry.client())

        def report(metadata: dict) -> None:
            sink.poll()
            context.log_event(dg.AssetObservation(asset_key=topic_key, metadata=observation(metadata, sink)))

        client = FeedClient(exchange, settings, sink, report, context.log, message_id=trade_message_id)
        try:
            stats = client.run()
        except BaseException:
            flush_after_failure(sink, context.log)
            raise
        sink.close()
        context.log_event(
            dg.AssetObservation(asset_key=topic_key, metadata=observation(stats.metadata(), sink))
        )
        context.log.info(
            f"{exchange.name} feed: {stats.trades} trades produced ({stats.duplicates} resent), "
            f"{stats.reconnects} reconnects, {stats.gap_count} gaps, {stats.malformed} malformed messages"
        )

    @dg.job(
        name=f"{exchange.name}_feed",
        description=f"Long-running {exchange.name} WebSocket feed into {exchange.topic}.",
        # Longer than the default max_runtime_seconds: run monitoring ends a hung run, the sensor starts the next.
        tags={FEED_TAG: exchange.name, "dagster/max_runtime": str(int(DEFAULT_MAX_RUNTIME_SECONDS + 3600))},
    )
    def feed_job() -> None:
        run_feed()

    return feed_job


def flush_after_failure(sink: TopicSink, log) -> None:
    """Deliver what was produced before the feed failed; a delivery error then is logged, so that the
    run fails with the feed's own error."""
    try:
        sink.close()
    except Exception as err:
        log.error(f"Flushing after the feed failed also failed: {err}")


def observation(stats: dict, sink: TopicSink) -> dict:
    """The stats as Dagster metadata: numbers stay numbers (plotted), nested parts become JSON."""
    metadata = {**stats, **sink.metadata()}
    for name, symbol in stats["symbols"].items():
        if symbol["last_trade_age_seconds"] is not None:
            metadata[f"last_trade_age_seconds/{name}"] = symbol["last_trade_age_seconds"]
    for key in ("symbols", "recent_gaps"):
        metadata[key] = dg.MetadataValue.json(metadata[key])
    return metadata


feed_jobs = {e.name: build_feed_job(e) for e in EXCHANGES if e.feed_url}
