"""A seeded market: each exchange's trades as native WebSocket frames, and their V2 records.

The instruments come from the exchange's entry (`ExchangeConfig.simulated_instruments`) and the frames
from its feed module (`k2_resources.feeds.<name>.simulated_message`, next to the `to_v2` that parses
them), so the simulator names no exchange. It produces through the same feed mappings a live handler
runs, so the frames are JSON text, not dicts: parsing them is part of what gets exercised. Everything
random comes from `random.Random` instances derived from one seed, so a seed reproduces the frames and
every V2 field (message ids included). Time is market time: trades advance from `start` at `rate`
trades per second, each in its own slot `[i, i + 1) / rate`, so N trades never run past
`start + N / rate`.
"""

from __future__ import annotations

import itertools
import math
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from k2_resources.exchanges import ExchangeConfig, SimulatedInstrument
from k2_resources.feeds import parse_message

MICROS = 1_000_000
PRICE_STEP_SIGMA = 0.0002  # per-trade log-return: about 1 % drift over 2,500 trades
MAX_LATENCY_MS = 80  # exchange -> handler


@dataclass(frozen=True)
class NativeMessage:
    """One WebSocket frame and when the handler received it (market clock, µs since the epoch)."""

    text: str
    received_at_us: int


@dataclass
class Book:
    """Mutable state of one instrument: last price and the next exchange trade id."""

    instrument: SimulatedInstrument
    price: float
    next_trade_id: int
    messages: int = 0

    def take_trade_id(self) -> int:
        """The book's next exchange trade id, used up: ids never repeat within a run."""
        self.next_trade_id += 1
        return self.next_trade_id - 1


TRADE_ID_SPREAD = 10**12


def seeded_rng(seed: int, purpose: str) -> random.Random:
    """An independent stream per purpose, so adding faults does not change the market's prices."""
    return random.Random(f"k2-simulator:{seed}:{purpose}")


def seeded_message_ids(rng: random.Random) -> Callable[[], str]:
    """UUID-v4-shaped ids drawn from `rng`: reproducible, unlike uuid.uuid4()."""
    return lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))


class Market:
    """The trades of one exchange's instruments; its feed module renders each as a native frame.

    A renderer (`simulated_message(market, book)`) draws everything random from `rng` and the methods
    below, so the same seed gives the same frames.
    """

    def __init__(self, exchange: ExchangeConfig, seed: int, start_us: int, rate: float) -> None:
        if not exchange.simulated_instruments:
            raise ValueError(
                f"The simulator has no instruments for exchange {exchange.name!r}: "
                "set simulated_instruments in its entry in k2_resources/exchanges.py"
            )
        if rate <= 0:
            raise ValueError(f"rate must be positive trades per second, got {rate}")
        self.render = simulated_message_renderer(exchange)
        self.exchange = exchange
        self.start_us = start_us
        self.rate = rate
        self.trades = 0
        self.rng = seeded_rng(seed, f"market:{exchange.name}")
        instruments = exchange.simulated_instruments
        # Exchange trade ids never repeat, so each run continues from a seed-drawn point: two runs with
        # different seeds do not collide on (exchange, symbol, trade_id), and the same seed replays exactly.
        self._books = [
            Book(i, i.price, i.first_trade_id + self.rng.randrange(TRADE_ID_SPREAD)) for i in instruments
        ]
        self._cum_weights = list(itertools.accumulate(i.weight for i in instruments))

    def messages(self) -> Iterator[NativeMessage]:
        """Frames without end, in the order a handler receives them."""
        while True:
            yield self.render(self, self.rng.choices(self._books, cum_weights=self._cum_weights)[0])

    def next_slot_us(self) -> int:
        """The time of the next trade: random within its slot, so times are monotonic and bounded."""
        offset = (self.trades + self.rng.random()) / self.rate
        self.trades += 1
        return self.start_us + int(offset * MICROS)

    def skip_slots(self, count: int) -> None:
        """Use up `count` slots for trades sharing the last one's time (a sweep), so rate stays trades/s."""
        self.trades += count

    def step_price(self, book: Book, side: str) -> str:
        """Random-walk the price one trade, nudged by the aggressor side, rounded to the tick."""
        drift = PRICE_STEP_SIGMA / 4 if side == "buy" else -PRICE_STEP_SIGMA / 4
        tick = 10.0**-book.instrument.price_decimals
        book.price = max(tick, book.price * math.exp(self.rng.gauss(drift, PRICE_STEP_SIGMA)))
        return f"{book.price:.{book.instrument.price_decimals}f}"

    def next_level(self, book: Book, side: str) -> str:
        """The next price level a sweep fills: 1-3 ticks further in the aggressor's direction."""
        tick = 10.0**-book.instrument.price_decimals
        move = self.rng.randint(1, 3) * tick
        book.price = book.price + move if side == "buy" else max(tick, book.price - move)
        return f"{book.price:.{book.instrument.price_decimals}f}"

    def quantity(self, instrument: SimulatedInstrument) -> Decimal:
        """Log-normal trade size on the instrument's lot step: many small trades, a few large."""
        size = self.rng.lognormvariate(math.log(instrument.median_quantity), 1.1)
        step = Decimal(1).scaleb(-instrument.quantity_decimals)
        return max(step, Decimal(f"{size:.{instrument.quantity_decimals}f}")).quantize(Decimal("1e-8"))

    def latency_us(self) -> int:
        """Exchange -> handler delay of one frame."""
        return self.rng.randint(1_000, MAX_LATENCY_MS * 1000)


Renderer = Callable[[Market, Book], NativeMessage]


def simulated_message_renderer(exchange: ExchangeConfig) -> Renderer:
    """The exchange's `simulated_message`, or an error naming the module that lacks it."""
    render = getattr(exchange.feed_module, "simulated_message", None)
    if render is None:
        raise ValueError(
            f"{exchange.feed_module.__name__} has no simulated_message(market, book): "
            f"the simulator cannot render {exchange.name} trades"
        )
    return render


def v2_trades(market: Market, message_id: Callable[[], str]) -> Iterator[dict[str, Any]]:
    """V2 records of the market's trades, through the exchange's feed mapping, numbered from 1."""
    mapping = market.exchange.feed_module
    sequence = iter(range(1, 2**63))
    for native in market.messages():
        message = parse_message(native.text)
        yield from mapping.to_v2(
            message, market.exchange, native.received_at_us, sequence.__next__, message_id=message_id
        )
