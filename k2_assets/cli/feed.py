"""`k2 feed`: an exchange's live WebSocket trades onto its Kafka topic from a terminal, stats on stdout.

The same client and producer the Dagster `<exchange>_feed` job runs; stats are printed as one JSON line
every report interval and at the end. Ctrl-C stops the feed and flushes what was produced.
"""

from __future__ import annotations

import argparse
import json
import sys

from k2_resources.exchanges import EXCHANGES
from k2_resources.feeds.client import FeedSettings

DEFAULTS = FeedSettings(url="", symbols=())


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `feed` to the `k2` command."""
    parser = subparsers.add_parser("feed", help="run a live exchange feed into Kafka", description=__doc__)
    parser.add_argument("--exchange", required=True, choices=[e.name for e in EXCHANGES if e.feed_url])
    parser.add_argument(
        "--symbols", default=None, help="comma-separated native symbols (default: the exchange's)"
    )
    parser.add_argument("--url", default=None, help="WebSocket endpoint (default: the exchange's feed_url)")
    parser.add_argument("--max-runtime", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--max-trades", type=int, default=None, help="stop after producing this many trades")
    parser.add_argument("--read-timeout", type=float, default=DEFAULTS.read_timeout_seconds)
    parser.add_argument("--report-interval", type=float, default=DEFAULTS.report_interval_seconds)
    parser.set_defaults(func=run_feed)


def run_feed(args: argparse.Namespace) -> int:
    """Run until stopped; a configuration or delivery error exits 1 naming it."""
    from confluent_kafka import KafkaException

    from k2_resources.exchanges import exchange as exchange_named
    from k2_resources.feeds.client import FeedClient, FeedConfigError, feed_settings
    from k2_resources.feeds.sink import TopicSink, trade_message_id
    from k2_resources.kafka import KafkaResource, SchemaRegistryResource
    from k2_resources.settings import (
        KAFKA_BOOTSTRAP_SERVERS,
        KAFKA_CLIENT_PREFIX,
        SCHEMA_REGISTRY_CLIENT_PREFIX,
        SCHEMA_REGISTRY_URL,
        client_properties,
        require_setting,
    )

    config = exchange_named(args.exchange)
    try:
        settings = feed_settings(
            config,
            args.url,
            args.symbols,
            read_timeout_seconds=args.read_timeout,
            report_interval_seconds=args.report_interval,
            max_runtime_seconds=args.max_runtime,
            max_trades=args.max_trades,
        )
        kafka = KafkaResource(
            bootstrap_servers=require_setting(KAFKA_BOOTSTRAP_SERVERS),
            client_config=client_properties(KAFKA_CLIENT_PREFIX),
        )
        registry = SchemaRegistryResource(
            url=require_setting(SCHEMA_REGISTRY_URL),
            client_config=client_properties(SCHEMA_REGISTRY_CLIENT_PREFIX),
        )
        producer_config = {k: v for k, v in kafka.base_config().items() if k != "error_cb"}
        sink = TopicSink(config, producer_config, registry.client())
        client = FeedClient(config, settings, sink, print_report, message_id=trade_message_id)
        try:
            client.run()
        except KeyboardInterrupt:
            print_report(client.stats.metadata())
        finally:
            sink.close()
    except (FeedConfigError, RuntimeError, KafkaException, OSError) as err:
        print(f"k2 feed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


def print_report(metadata: dict) -> None:
    print(json.dumps(metadata), flush=True)
