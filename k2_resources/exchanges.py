"""The exchanges K2 ingests: one entry each. Adding an exchange is an entry here plus its feed mapping.

Every per-exchange asset, job, sensor, check and table is generated from this list, so nothing else
names an exchange. The native-message mapping (the same code a live feed handler runs) lives in
`k2_resources.feeds.<name>` and is found through `ExchangeConfig.feed_module`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

MB = 1024 * 1024


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
    ),
    ExchangeConfig(
        name="kraken",
        retention_days=14,
        target_file_size_bytes=64 * MB,
        commit_interval_seconds=30.0,
        symbol_aliases={"XBT": "BTC", "XDG": "DOGE"},
        feed_url="wss://ws.kraken.com/v2",
        feed_symbols=("BTC/USD", "ETH/USD", "SOL/USD", "DOGE/USD"),
    ),
)


def exchange(name: str) -> ExchangeConfig:
    """The configured exchange called `name`, or an error that lists the configured ones."""
    for config in EXCHANGES:
        if config.name == name.lower():
            return config
    raise KeyError(f"Unknown exchange {name!r}: configured exchanges are {[e.name for e in EXCHANGES]}")
