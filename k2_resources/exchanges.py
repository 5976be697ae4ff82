"""The exchanges K2 ingests: one entry each. Adding an exchange is an entry here plus its feed mapping.

Every per-exchange asset, job, sensor, check, table and topic, the simulator's market and `k2 run`'s
trades are generated from this list, so nothing else names an exchange. The native-message mapping
(the same code a live feed handler runs, and the simulator's rendering of a trade in that exchange's
format) lives in `k2_resources.feeds.<name>` and is found through `ExchangeConfig.feed_module`.
tests/test_new_exchange.py adds a third exchange this way and finds it everywhere.

`python -m k2_resources.exchanges topics` prints the topics; `... create-topics --bootstrap-servers H:P`
creates them with each exchange's partitions and retention (the Docker deployment's kafka-init).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

MB = 1024 * 1024


@dataclass(frozen=True)
class SimulatedInstrument:
    """One order book the simulator trades (`k2 produce`, `k2 run`): native symbol, a realistic starting
    price, its tick (decimals), typical trade size and lot step, where exchange trade ids start, and its
    share of the exchange's trades. `legacy_symbol` is an older spelling the exchange also sends
    (Kraken's `XBT/USD`): the feed mapping decides how often.
    """

    symbol: str
    price: float
    price_decimals: int
    median_quantity: float
    quantity_decimals: int
    first_trade_id: int
    weight: float
    legacy_symbol: str | None = None


@dataclass(frozen=True)
class ExchangeConfig:
    """What differs between exchanges: topic, retention, file size, commit cadence, symbols, DLQ limits, topic shape."""

    name: str
    retention_days: int
    target_file_size_bytes: int
    commit_interval_seconds: float
    symbol_aliases: dict[str, str] = field(default_factory=dict)
    quote_currencies: tuple[str, ...] = ("USDT", "USDC", "USD", "EUR", "BTC", "ETH")
    dlq_warn_rate: float = 0.01
    dlq_fail_rate: float = 0.05
    # The topic, as the dev stack creates it (a real cluster's topics are its operators').
    kafka_partitions: int = 4
    kafka_retention_hours: float = 72.0
    # The live feed (k2_resources/feeds/client.py): the documented endpoint, the symbols it subscribes to
    # by default (native spelling), and how long a symbol may go without a trade before the topic's
    # freshness check fails.
    feed_url: str = ""
    feed_symbols: tuple[str, ...] = ()
    feed_max_silence_seconds: float = 300.0
    # The simulator: the instruments it trades, and how many trades `k2 run` produces over its hours.
    simulated_instruments: tuple[SimulatedInstrument, ...] = ()
    run_trades: int = 3_000

    @property
    def code(self) -> str:
        """The value of the V2 `exchange` field, e.g. BINANCE."""
        return self.name.upper()

    @property
    def topic(self) -> str:
        return f"market.crypto.trades.{self.name}"

    @property
    def subject(self) -> str:
        """Schema Registry subject (TopicNameStrategy)."""
        return f"{self.topic}-value"

    @property
    def consumer_group(self) -> str:
        return f"k2-bronze-{self.name}"

    @property
    def feed_module(self) -> ModuleType:
        """The module mapping this exchange's native WebSocket messages to V2 records."""
        return importlib.import_module(f"k2_resources.feeds.{self.name}")

    def normalise_symbol(self, raw: str) -> tuple[str, str, str]:
        """(symbol, base, quote) with aliases applied: Kraken `XBT/USD` -> (`BTCUSD`, `BTC`, `USD`)."""
        raw = raw.strip().upper()
        if "/" in raw:
            base, quote = raw.split("/", 1)
        else:
            quote = next((q for q in self.quote_currencies if raw.endswith(q) and len(raw) > len(q)), "")
            base = raw[: len(raw) - len(quote)] if quote else raw
        base = self.symbol_aliases.get(base, base)
        quote = self.symbol_aliases.get(quote, quote)
        return f"{base}{quote}", base, quote


EXCHANGES: tuple[ExchangeConfig, ...] = (
    ExchangeConfig(
        name="binance",
        retention_days=7,
        target_file_size_bytes=128 * MB,
        commit_interval_seconds=10.0,
        feed_url="wss://stream.binance.com:9443/stream",
        feed_symbols=("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "DOGEUSDT"),
        simulated_instruments=(
            SimulatedInstrument("BTCUSDT", 67_250.0, 2, 0.004, 5, 3_612_000_000, 0.40),
            SimulatedInstrument("ETHUSDT", 3_480.0, 2, 0.05, 4, 1_487_000_000, 0.25),
            SimulatedInstrument("SOLUSDT", 152.0, 2, 1.5, 3, 812_000_000, 0.15),
            SimulatedInstrument("BNBUSDT", 590.0, 2, 0.3, 3, 790_000_000, 0.10),
            SimulatedInstrument("DOGEUSDT", 0.16, 5, 1_500.0, 0, 612_000_000, 0.10),
        ),
        run_trades=6_000,
    ),
    ExchangeConfig(
        name="kraken",
        retention_days=14,
        target_file_size_bytes=64 * MB,
        commit_interval_seconds=30.0,
        symbol_aliases={"XBT": "BTC", "XDG": "DOGE"},
        feed_url="wss://ws.kraken.com/v2",
        feed_symbols=("BTC/USD", "ETH/USD", "SOL/USD", "DOGE/USD"),
        simulated_instruments=(
            SimulatedInstrument("BTC/USD", 67_240.0, 1, 0.01, 8, 78_400_000, 0.45, legacy_symbol="XBT/USD"),
            SimulatedInstrument("ETH/USD", 3_478.0, 2, 0.2, 8, 61_200_000, 0.30),
            SimulatedInstrument("SOL/USD", 151.9, 2, 4.0, 8, 9_800_000, 0.15),
            SimulatedInstrument("DOGE/USD", 0.1601, 7, 2_000.0, 8, 7_300_000, 0.10, legacy_symbol="XDG/USD"),
        ),
        run_trades=3_000,
    ),
)


def exchange(name: str) -> ExchangeConfig:
    """The configured exchange called `name`, or an error that lists the configured ones."""
    for config in EXCHANGES:
        if config.name == name.lower():
            return config
    raise KeyError(f"Unknown exchange {name!r}: configured exchanges are {[e.name for e in EXCHANGES]}")


def main(argv: list[str] | None = None) -> int:
    """`topics`: one topic per line; `create-topics`: create the missing ones (compose's kafka-init)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m k2_resources.exchanges", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("topics", help="print every exchange's topic, one per line")
    create = commands.add_parser("create-topics", help="create every exchange's topic that does not exist")
    create.add_argument("--bootstrap-servers", required=True)
    create.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.command == "topics":
        print("\n".join(e.topic for e in EXCHANGES))
        return 0
    from k2_resources.dev.devstack.kafka import ensure_topics

    for topic, partitions in ensure_topics(args.bootstrap_servers, EXCHANGES, args.timeout).items():
        print(f"{topic}: {partitions} partitions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
