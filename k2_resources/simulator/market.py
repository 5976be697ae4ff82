"""A seeded market: native WebSocket frames as Binance and Kraken send them, and their V2 records.

The simulator produces through the same feed mappings a live handler runs (`k2_resources.feeds`), so the
frames here are JSON text, not dicts: parsing them is part of what gets exercised. Everything random
comes from `random.Random` instances derived from one seed, so a seed reproduces the frames and every V2
field (message ids included). Time is market time: trades advance from `start` at `rate` trades per
second, each in its own slot `[i, i + 1) / rate`, so N trades never run past `start + N / rate`.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from k2_resources.exchanges import ExchangeConfig
from k2_resources.feeds import micros_to_datetime, parse_message

MICROS = 1_000_000
PRICE_STEP_SIGMA = 0.0002  # per-trade log-return: about 1 % drift over 2,500 trades
MAX_LATENCY_MS = 80  # exchange -> handler
KRAKEN_MAX_BATCH = 5
KRAKEN_LEGACY_SHARE = 0.25  # share of BTC/DOGE frames spelt the v1 way (XBT/USD, XDG/USD)


@dataclass(frozen=True)
class Instrument:
    """One order book: its native symbol, a realistic starting price, tick and typical trade size."""

    symbol: str
    price: float
    price_decimals: int
    median_quantity: float
    quantity_decimals: int
    first_trade_id: int
    weight: float
    legacy_symbol: str | None = None


INSTRUMENTS: dict[str, tuple[Instrument, ...]] = {
    "binance": (
        Instrument("BTCUSDT", 67_250.0, 2, 0.004, 5, 3_612_000_000, 0.40),
        Instrument("ETHUSDT", 3_480.0, 2, 0.05, 4, 1_487_000_000, 0.25),
        Instrument("SOLUSDT", 152.0, 2, 1.5, 3, 812_000_000, 0.15),
        Instrument("BNBUSDT", 590.0, 2, 0.3, 3, 790_000_000, 0.10),
        Instrument("DOGEUSDT", 0.16, 5, 1_500.0, 0, 612_000_000, 0.10),
    ),
    "kraken": (
        Instrument("BTC/USD", 67_240.0, 1, 0.01, 8, 78_400_000, 0.45, legacy_symbol="XBT/USD"),
        Instrument("ETH/USD", 3_478.0, 2, 0.2, 8, 61_200_000, 0.30),
        Instrument("SOL/USD", 151.9, 2, 4.0, 8, 9_800_000, 0.15),
        Instrument("DOGE/USD", 0.1601, 7, 2_000.0, 8, 7_300_000, 0.10, legacy_symbol="XDG/USD"),
    ),
}


@dataclass(frozen=True)
class NativeMessage:
    """One WebSocket frame and when the handler received it (market clock, µs since the epoch)."""

    text: str
    received_at_us: int


@dataclass
class Book:
    """Mutable state of one instrument: last price and the next exchange trade id."""

    instrument: Instrument
    price: float
    next_trade_id: int
    messages: int = 0


TRADE_ID_SPREAD = 10**12


def seeded_rng(seed: int, purpose: str) -> random.Random:
    """An independent stream per purpose, so adding faults does not change the market's prices."""
    return random.Random(f"k2-simulator:{seed}:{purpose}")


def seeded_message_ids(rng: random.Random) -> Callable[[], str]:
    """UUID-v4-shaped ids drawn from `rng`: reproducible, unlike uuid.uuid4()."""
    return lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))


class Market:
    """The trades of one exchange's instruments, as that exchange's native frames."""

    def __init__(self, exchange: ExchangeConfig, seed: int, start_us: int, rate: float) -> None:
        if exchange.name not in INSTRUMENTS:
            raise ValueError(f"The simulator has no instruments for exchange {exchange.name!r}")
        if rate <= 0:
            raise ValueError(f"rate must be positive trades per second, got {rate}")
        self.exchange = exchange
        self.start_us = start_us
        self.rate = rate
        self.trades = 0
        self._rng = seeded_rng(seed, f"market:{exchange.name}")
        # Exchange trade ids never repeat, so each run continues from a seed-drawn point: two runs with
        # different seeds do not collide on (exchange, symbol, trade_id), and the same seed replays exactly.
        self._books = [
            Book(i, i.price, i.first_trade_id + self._rng.randrange(TRADE_ID_SPREAD))
            for i in INSTRUMENTS[exchange.name]
        ]
        self._cum_weights = list(itertools.accumulate(i.weight for i in INSTRUMENTS[exchange.name]))

    def messages(self) -> Iterator[NativeMessage]:
        """Frames without end, in the order a handler receives them."""
        frame = self._binance_frame if self.exchange.name == "binance" else self._kraken_frame
        while True:
            yield frame(self._rng.choices(self._books, cum_weights=self._cum_weights)[0])

    def _next_slot_us(self) -> int:
        """The time of the next trade: random within its slot, so times are monotonic and bounded."""
        offset = (self.trades + self._rng.random()) / self.rate
        self.trades += 1
        return self.start_us + int(offset * MICROS)

    def _step_price(self, book: Book, side: str) -> str:
        """Random-walk the price one trade, nudged by the aggressor side, rounded to the tick."""
        drift = PRICE_STEP_SIGMA / 4 if side == "buy" else -PRICE_STEP_SIGMA / 4
        tick = 10.0**-book.instrument.price_decimals
        book.price = max(tick, book.price * math.exp(self._rng.gauss(drift, PRICE_STEP_SIGMA)))
        return f"{book.price:.{book.instrument.price_decimals}f}"

    def _next_level(self, book: Book, side: str) -> str:
        """The next price level a sweep fills: 1-3 ticks further in the aggressor's direction."""
        tick = 10.0**-book.instrument.price_decimals
        move = self._rng.randint(1, 3) * tick
        book.price = book.price + move if side == "buy" else max(tick, book.price - move)
        return f"{book.price:.{book.instrument.price_decimals}f}"

    def _quantity(self, instrument: Instrument) -> Decimal:
        """Log-normal trade size on the instrument's lot step: many small trades, a few large."""
        size = self._rng.lognormvariate(math.log(instrument.median_quantity), 1.1)
        step = Decimal(1).scaleb(-instrument.quantity_decimals)
        return max(step, Decimal(f"{size:.{instrument.quantity_decimals}f}")).quantize(Decimal("1e-8"))

    def _binance_frame(self, book: Book) -> NativeMessage:
        """A combined-stream `trade` event: one trade, prices as 8-dp strings, times in ms."""
        trade_ms = self._next_slot_us() // 1000
        event_ms = trade_ms + self._rng.randint(0, 5)
        buyer_is_maker = self._rng.random() < 0.5
        price = Decimal(self._step_price(book, "sell" if buyer_is_maker else "buy"))
        event = {
            "e": "trade",
            "E": event_ms,
            "s": book.instrument.symbol,
            "t": book.next_trade_id,
            "p": f"{price:.8f}",
            "q": f"{self._quantity(book.instrument):.8f}",
            "T": trade_ms,
            "m": buyer_is_maker,
            "M": True,
        }
        book.next_trade_id += 1
        stream = f"{book.instrument.symbol.lower()}@trade"
        text = json.dumps({"stream": stream, "data": event}, separators=(",", ":"))
        return NativeMessage(text, event_ms * 1000 + self._latency_us())

    def _kraken_frame(self, book: Book) -> NativeMessage:
        """A v2 `trade` message: one taker order sweeping 1-5 price levels, all at one timestamp."""
        count = self._rng.randint(1, KRAKEN_MAX_BATCH)
        trade_us = self._next_slot_us()
        self.trades += count - 1  # the sweep's trades use up their slots, so rate stays trades/s
        side = self._rng.choice(("buy", "sell"))
        order_type = "market" if self._rng.random() < 0.4 else "limit"
        symbol = book.instrument.symbol
        if book.instrument.legacy_symbol and self._rng.random() < KRAKEN_LEGACY_SHARE:
            symbol = book.instrument.legacy_symbol
        stamp = micros_to_datetime(trade_us).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        trades = [self._kraken_trade(book, symbol, side, order_type, stamp, level) for level in range(count)]
        message_type = "snapshot" if book.messages == 0 else "update"
        book.messages += 1
        text = f'{{"channel":"trade","type":"{message_type}","data":[{",".join(trades)}]}}'
        return NativeMessage(text, trade_us + self._latency_us())

    def _kraken_trade(
        self, book: Book, symbol: str, side: str, order_type: str, stamp: str, level: int
    ) -> str:
        """One entry of `data`, written by hand so price and qty are JSON numbers with exact digits."""
        price = self._step_price(book, side) if level == 0 else self._next_level(book, side)
        quantity = format(self._quantity(book.instrument).normalize(), "f")
        trade_id = book.next_trade_id
        book.next_trade_id += 1
        return (
            f'{{"symbol":{json.dumps(symbol)},"side":"{side}","price":{price},"qty":{quantity},'
            f'"ord_type":"{order_type}","trade_id":{trade_id},"timestamp":"{stamp}"}}'
        )

    def _latency_us(self) -> int:
        return self._rng.randint(1_000, MAX_LATENCY_MS * 1000)


def v2_trades(market: Market, message_id: Callable[[], str]) -> Iterator[dict[str, Any]]:
    """V2 records of the market's trades, through the exchange's feed mapping, numbered from 1."""
    mapping = market.exchange.feed_module
    sequence = iter(range(1, 2**63))
    for native in market.messages():
        message = parse_message(native.text)
        yield from mapping.to_v2(
            message, market.exchange, native.received_at_us, sequence.__next__, message_id=message_id
        )
