"""A live exchange feed: one WebSocket connection at a time, native messages -> V2 records -> a sink.

The exchanges promise little: connections drop (Binance closes every one after 24 h), sockets go
silent without closing, reconnects are rate-limited per IP, and a trade missed while disconnected is
gone (Kraken's snapshot returns only the latest trades). So the client:

- reconnects with exponential backoff and jitter after connections that failed (closed before a trade
  and younger than `healthy_after_seconds`), at once after a healthy one, and never more than
  `reconnect_limit` times per `reconnect_window_seconds`;
- hands a connection over to a new one before the exchange's age limit (Binance: 24 h), reading the
  old one until the new one delivers, so the limit costs no trades;
- treats `read_timeout_seconds` without any frame as a dead socket (WebSocket pings catch a dead TCP
  peer, not a live server that stopped sending);
- checks each symbol's exchange trade ids: an id more than one past the last is a gap, recorded with
  its size in the stats and logged; an id at or below the last is a resend (after a reconnect or in
  Kraken's snapshot), produced again under the same message_id so Gold's dedup removes it;
- counts and logs malformed or unknown frames and goes on; a rejected subscription is configuration,
  so it fails at once naming the setting.

Everything it knows is in `FeedStats`, which `metadata()` turns into Dagster metadata.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect

from k2_resources.exchanges import ExchangeConfig
from k2_resources.feeds import datetime_to_micros, parse_message
from k2_resources.feeds.protocol import Kind

log = logging.getLogger(__name__)

Sink = Callable[[list[dict[str, Any]]], None]
MAX_GAPS_KEPT = 100  # the latest gaps in metadata; the counts cover all of them
LOG_FIRST_MALFORMED = 20  # then every LOG_EVERY_MALFORMED-th, so a broken stream cannot flood the log
LOG_EVERY_MALFORMED = 1000
SHOWN_CHARS = 300
HANDOVER_MARGIN_SECONDS = 600.0  # hand over this long before an exchange's connection age limit
MIN_RATE_WINDOW_SECONDS = 1.0


class FeedConfigError(ValueError):
    """The feed's configuration cannot work (the exchange refused it); the message names the setting."""


@dataclass(frozen=True)
class FeedSettings:
    """Every tunable of a feed, with its default; the Dagster config and the CLI take theirs from here."""

    url: str
    symbols: tuple[str, ...]
    read_timeout_seconds: float = 60.0
    ping_interval_seconds: float = 20.0
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    backoff_jitter: float = 0.25
    healthy_after_seconds: float = 30.0
    reconnect_limit: int = 20
    reconnect_window_seconds: float = 300.0
    open_timeout_seconds: float = 10.0
    report_interval_seconds: float = 30.0
    max_runtime_seconds: float | None = None
    max_trades: int | None = None
    max_connection_seconds: float | None = None  # default: the exchange's limit less HANDOVER_MARGIN_SECONDS

    def validate(self) -> FeedSettings:
        """Refuse values that cannot mean what they say, naming the setting."""
        if not self.url:
            raise FeedConfigError("feed url is empty: set it in the run config or the exchange's feed_url")
        if not self.symbols:
            raise FeedConfigError("feed symbols is empty: name at least one symbol")
        positive = (
            "read_timeout_seconds",
            "ping_interval_seconds",
            "backoff_initial_seconds",
            "backoff_max_seconds",
            "reconnect_limit",
            "reconnect_window_seconds",
            "open_timeout_seconds",
            "report_interval_seconds",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise FeedConfigError(f"feed setting {name} must be positive, not {getattr(self, name)}")
        for name in ("max_runtime_seconds", "max_trades", "max_connection_seconds"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise FeedConfigError(f"feed setting {name} must be positive or unset, not {value}")
        if not 0 <= self.backoff_jitter < 1:
            raise FeedConfigError(f"feed setting backoff_jitter must be in [0, 1), not {self.backoff_jitter}")
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise FeedConfigError("feed setting backoff_max_seconds must be >= backoff_initial_seconds")
        return self


@dataclass(frozen=True)
class Gap:
    symbol: str
    after_trade_id: int
    next_trade_id: int
    connection: int
    at_us: int

    @property
    def missing(self) -> int:
        return self.next_trade_id - self.after_trade_id - 1


@dataclass
class SymbolStats:
    trades: int = 0
    last_trade_id: int | None = None
    last_trade_us: int | None = None
    gaps: int = 0
    missing: int = 0
    duplicates: int = 0


@dataclass
class FeedStats:
    """Counts since the feed started; `metadata()` is what the UI shows."""

    exchange: str
    symbols: dict[str, SymbolStats] = field(default_factory=dict)
    messages: int = 0
    trades: int = 0
    duplicates: int = 0
    malformed: int = 0
    unknown: int = 0
    heartbeats: int = 0
    connections: int = 0
    reconnects: int = 0
    handovers: int = 0
    silent_timeouts: int = 0
    rate_limited_waits: int = 0
    gaps: deque[Gap] = field(default_factory=lambda: deque(maxlen=MAX_GAPS_KEPT))
    gap_count: int = 0
    system_status: str = ""
    started: float = field(default_factory=time.monotonic)
    last_report: tuple[float, int] = (0.0, 0)  # (monotonic time, messages) of the previous report
    last_rate: float | None = None

    def symbol(self, name: str) -> SymbolStats:
        return self.symbols.setdefault(name, SymbolStats())

    def see_trade(self, symbol: str, trade_id: int | None, trade_us: int, connection: int) -> Gap | None:
        """Account for one trade; returns the gap it reveals, if any. Resends do not move ids back."""
        stats = self.symbol(symbol)
        stats.trades += 1
        self.trades += 1
        stats.last_trade_us = max(stats.last_trade_us or trade_us, trade_us)
        if trade_id is None:
            return None
        last = stats.last_trade_id
        if last is not None and trade_id <= last:
            stats.duplicates += 1
            self.duplicates += 1
            return None
        stats.last_trade_id = trade_id
        if last is None or trade_id == last + 1:
            return None
        gap = Gap(symbol, last, trade_id, connection, time.time_ns() // 1000)
        stats.gaps += 1
        stats.missing += gap.missing
        self.gaps.append(gap)
        self.gap_count += 1
        return gap

    def _rate(self) -> float:
        """Messages per second since the previous report; a report right after another (the final one)
        repeats the previous figure instead of dividing a handful of messages by milliseconds."""
        clock = time.monotonic()
        since, messages_then = self.last_report if self.last_report[0] else (self.started, 0)
        if clock - since < MIN_RATE_WINDOW_SECONDS and self.last_rate is not None:
            return self.last_rate
        self.last_rate = (self.messages - messages_then) / max(clock - since, 1e-6)
        self.last_report = (clock, self.messages)
        return self.last_rate

    def metadata(self, now_us: int | None = None) -> dict[str, Any]:
        """Flat numbers for the UI's plots, plus a per-symbol table and the latest gaps as JSON."""
        now_us = now_us if now_us is not None else time.time_ns() // 1000
        rate = self._rate()
        per_symbol = {
            name: {
                "trades": s.trades,
                "last_trade_id": s.last_trade_id,
                "last_trade_us": s.last_trade_us,
                "last_trade_age_seconds": _age(now_us, s.last_trade_us),
                "gaps": s.gaps,
                "missing_trades": s.missing,
                "duplicates": s.duplicates,
            }
            for name, s in sorted(self.symbols.items())
        }
        ages = [
            v["last_trade_age_seconds"]
            for v in per_symbol.values()
            if v["last_trade_age_seconds"] is not None
        ]
        return {
            "exchange": self.exchange,
            "messages_per_second": round(rate, 3),
            "messages": self.messages,
            "trades_produced": self.trades,
            "duplicates": self.duplicates,
            "connections": self.connections,
            "reconnects": self.reconnects,
            "handovers": self.handovers,
            "silent_timeouts": self.silent_timeouts,
            "gaps": self.gap_count,
            "missing_trades": sum(s.missing for s in self.symbols.values()),
            "malformed_messages": self.malformed,
            "unknown_messages": self.unknown,
            "system_status": self.system_status or "n/a",
            "max_last_trade_age_seconds": max(ages) if ages else -1.0,
            "symbols": per_symbol,
            "recent_gaps": [{**g.__dict__, "missing": g.missing} for g in list(self.gaps)[-20:]],
        }


def _age(now_us: int, then_us: int | None) -> float | None:
    return None if then_us is None else round((now_us - then_us) / 1e6, 3)


class Backoff:
    """Exponential delays with proportional jitter, reset by a healthy connection."""

    def __init__(self, settings: FeedSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.failures = 0
        self.rng = rng or random.Random()

    def next_delay(self, healthy: bool) -> float:
        if healthy:
            self.failures = 0
            return 0.0
        base = min(
            self.settings.backoff_initial_seconds * 2**self.failures, self.settings.backoff_max_seconds
        )
        self.failures += 1
        jitter = self.settings.backoff_jitter
        return base * self.rng.uniform(1 - jitter, 1 + jitter)


class ReconnectLimiter:
    """At most `limit` connection attempts in any `window` seconds (exchanges ban IPs that exceed theirs)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.attempts: deque[float] = deque()

    def wait_seconds(self, now: float) -> float:
        while self.attempts and now - self.attempts[0] >= self.window:
            self.attempts.popleft()
        if len(self.attempts) < self.limit:
            return 0.0
        return self.attempts[0] + self.window - now

    def record(self, now: float) -> None:
        self.attempts.append(now)


class StopFeed(Exception):
    """Raised inside the loop when a stop condition (runtime, trade count, stop()) is met."""


class FeedClient:
    """Runs one exchange's feed until stopped; records go to `sink`, stats to `on_report` periodically."""

    def __init__(
        self,
        exchange: ExchangeConfig,
        settings: FeedSettings,
        sink: Sink,
        on_report: Callable[[dict[str, Any]], None] | None = None,
        logger: logging.Logger | Any = log,
        message_id: Callable[[dict[str, Any]], str] | None = None,
    ) -> None:
        self.exchange = exchange
        self.settings = settings.validate()
        self.protocol: ModuleType = exchange.feed_module
        self.sink = sink
        self.on_report = on_report
        self.log = logger
        self.message_id = message_id
        self.stats = FeedStats(exchange.name)
        self.backoff = Backoff(settings)
        self.limiter = ReconnectLimiter(settings.reconnect_limit, settings.reconnect_window_seconds)
        self.sequence = itertools.count(1)
        self._stopping = False
        self._deadline = (
            time.monotonic() + settings.max_runtime_seconds if settings.max_runtime_seconds else None
        )
        self._next_report = time.monotonic() + settings.report_interval_seconds

    def stop(self) -> None:
        """Ask the feed to end after the frame in hand (thread-safe enough: a flag read by the loop)."""
        self._stopping = True

    def run(self) -> FeedStats:
        """Blocking entry point for Dagster ops and the CLI."""
        return asyncio.run(self.run_async())

    async def run_async(self) -> FeedStats:
        url = self.protocol.connect_url(self.settings.url, self.settings.symbols)
        self.log.info(f"{self.exchange.name} feed: {url} for {', '.join(self.settings.symbols)}")
        try:
            while True:
                self._check_stop()
                started = time.monotonic()
                trades_before = self.stats.trades
                await self._rate_limit()
                try:
                    await self._connection(url)
                except websockets.InvalidURI as err:
                    raise FeedConfigError(
                        f"feed url {self.settings.url!r} is not a WebSocket URL: {err}"
                    ) from err
                except (TimeoutError, OSError, websockets.WebSocketException) as err:
                    self.log.warning(
                        f"{self.exchange.name} feed connection ended: {type(err).__name__}: {err}"
                    )
                healthy = self.stats.trades > trades_before or (
                    time.monotonic() - started >= self.settings.healthy_after_seconds
                )
                await self._pause(self.backoff.next_delay(healthy))
                self.stats.reconnects += 1
        except StopFeed as stop:
            self.log.info(f"{self.exchange.name} feed stopping: {stop}")
        self.report()
        return self.stats

    def report(self) -> dict[str, Any]:
        metadata = self.stats.metadata()
        if self.on_report is not None:
            self.on_report(metadata)
        return metadata

    async def _rate_limit(self) -> None:
        wait = self.limiter.wait_seconds(time.monotonic())
        if wait > 0:
            self.stats.rate_limited_waits += 1
            self.log.warning(
                f"{self.exchange.name} feed: {self.settings.reconnect_limit} connections in "
                f"{self.settings.reconnect_window_seconds:g} s, waiting {wait:.1f} s (reconnect_limit)"
            )
            await self._pause(wait)
        self.limiter.record(time.monotonic())

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake for stop conditions and reports."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._check_stop()
            self._maybe_report()
            await asyncio.sleep(min(left, 0.2))

    async def _connection(self, url: str) -> None:
        """One logical connection: a socket, replaced by a handover before the exchange's age limit."""
        ws = await self._open(url)
        try:
            while True:
                ws = await self._read(ws, url)
        finally:
            await ws.close()

    async def _open(self, url: str) -> ClientConnection:
        s = self.settings
        ws = await connect(
            url,
            open_timeout=s.open_timeout_seconds,
            ping_interval=s.ping_interval_seconds,
            ping_timeout=s.read_timeout_seconds,
            close_timeout=2,
            max_queue=1024,
        )
        self.stats.connections += 1
        for request in self.protocol.subscribe_requests(s.symbols):
            await ws.send(json.dumps(request))
        return ws

    def _max_age(self) -> float | None:
        """How long one socket may live: the setting, else the exchange's limit less a margin."""
        if self.settings.max_connection_seconds is not None:
            return self.settings.max_connection_seconds
        limit = getattr(self.protocol, "MAX_CONNECTION_SECONDS", None)
        return limit - HANDOVER_MARGIN_SECONDS if limit else None

    async def _read(self, ws: ClientConnection, url: str) -> ClientConnection:
        """Frames of `ws` until it fails (raises) or reaches its age limit (returns its successor)."""
        pings = itertools.count(1)
        last_frame = opened = time.monotonic()
        next_ping = last_frame + self.settings.ping_interval_seconds
        max_age = self._max_age()
        while True:
            self._check_stop()
            if max_age is not None and time.monotonic() - opened >= max_age:
                return await self._handover(ws, url)
            frame = await self._recv(ws, last_frame + self.settings.read_timeout_seconds, next_ping)
            if frame is None:  # time for an application-level ping (Kraken's; Binance has none)
                ping = self.protocol.ping_request(next(pings))
                if ping is not None:
                    await ws.send(json.dumps(ping))
                next_ping = time.monotonic() + self.settings.ping_interval_seconds
                continue
            # A pong only proves the socket; a stalled subscription answers pings too.
            if self.handle(frame, self.stats.connections) is not Kind.PONG:
                last_frame = time.monotonic()
            self._maybe_report()

    async def _handover(self, old: ClientConnection, url: str) -> ClientConnection:
        """Make before break: open the successor, keep reading `old` until the successor's first frame,
        then close `old`. Trades both carried are produced twice under one message_id (Gold dedups);
        none falls between the two, which a disconnect-then-reconnect at the exchange's limit would lose."""
        connection = self.stats.connections
        new = await self._open(url)
        self.stats.handovers += 1
        self.log.info(f"{self.exchange.name} feed: handing connection {connection} over before its age limit")
        first = asyncio.ensure_future(new.recv())
        old_frame: asyncio.Future | None = asyncio.ensure_future(old.recv())
        try:
            while not first.done():
                waiting = {first} if old_frame is None else {first, old_frame}
                done, _ = await asyncio.wait(
                    waiting, timeout=self.settings.read_timeout_seconds, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    raise TimeoutError("neither socket delivered a frame during the handover")
                if old_frame in done:
                    old_frame = self._take_old_frame(old_frame, old, connection)
        except BaseException:
            first.cancel()
            await new.close()
            raise
        finally:
            if old_frame is not None:
                old_frame.cancel()
            await old.close()
        self.handle(first.result(), self.stats.connections)
        return new

    def _take_old_frame(
        self, frame: asyncio.Future, old: ClientConnection, connection: int
    ) -> asyncio.Future | None:
        """Handle a frame the old socket delivered during a handover; the next read, or None once it closed."""
        try:
            self.handle(frame.result(), connection)
        except websockets.ConnectionClosed:
            return None
        return asyncio.ensure_future(old.recv())

    async def _recv(self, ws: ClientConnection, dead_at: float, ping_at: float) -> str | bytes | None:
        """The next frame; None at `ping_at`; past `dead_at` without a frame the socket is dead.

        recv() is awaited in short slices so stop conditions and reports are served while the market is
        quiet; cancelling websockets' recv() loses no data.
        """
        while True:
            now = time.monotonic()
            if now >= dead_at:
                self.stats.silent_timeouts += 1
                self.log.warning(
                    f"{self.exchange.name} feed: no frame for {self.settings.read_timeout_seconds:g} s "
                    "(read_timeout_seconds): the socket is dead, reconnecting"
                )
                raise TimeoutError(f"no frame for {self.settings.read_timeout_seconds:g} s")
            if now >= ping_at:
                return None
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for returns a frame that was ready when
                # the task was cancelled and drops the cancellation, so Ctrl-C was lost under load.
                async with asyncio.timeout(min(0.5, dead_at - now, ping_at - now)):
                    return await ws.recv()
            except TimeoutError:
                self._check_stop()
                self._maybe_report()

    def handle(self, frame: str | bytes, connection: int) -> Kind | None:
        """One frame: trades to the sink, control messages acted on, anything else counted; its kind."""
        self.stats.messages += 1
        received_us = time.time_ns() // 1000
        try:
            message = parse_message(frame)
            kind = self.protocol.classify(message)
        except ValueError as err:
            self._malformed(frame, err)
            return None
        if kind.kind is Kind.TRADES:
            self._trades(message, frame, received_us, connection)
        elif kind.kind is Kind.REJECTED:
            raise FeedConfigError(
                f"{kind.detail} -- check the feed symbols setting {list(self.settings.symbols)}"
            )
        elif kind.kind is Kind.STATUS:
            self._status(kind.detail)
        elif kind.kind is Kind.HEARTBEAT:
            self.stats.heartbeats += 1
        elif kind.kind is Kind.UNKNOWN:
            self.stats.unknown += 1
            if self.stats.unknown <= LOG_FIRST_MALFORMED or self.stats.unknown % LOG_EVERY_MALFORMED == 0:
                self.log.warning(
                    f"{self.exchange.name} feed: unknown message #{self.stats.unknown}: {_shown(frame)}"
                )
        return kind.kind

    def _trades(self, message: dict[str, Any], frame: str | bytes, received_us: int, connection: int) -> None:
        try:
            records = self.protocol.to_v2(message, self.exchange, received_us, self.sequence.__next__)
        except ValueError as err:
            self._malformed(frame, err)
            return
        for record in records:
            if self.message_id is not None:
                record["message_id"] = self.message_id(record)
            gap = self.stats.see_trade(
                record["symbol"],
                record["source_sequence"],
                datetime_to_micros(record["timestamp"]),
                connection,
            )
            if gap is not None:
                self.log.warning(
                    f"{self.exchange.name} feed: trade-id gap on {gap.symbol}: {gap.missing} trade(s) missing "
                    f"between {gap.after_trade_id} and {gap.next_trade_id} (connection {connection})"
                )
        self.sink(records)
        if self.settings.max_trades is not None and self.stats.trades >= self.settings.max_trades:
            self._stopping = True

    def _status(self, status: str) -> None:
        if status != self.stats.system_status:
            level = self.log.info if status == "online" else self.log.warning
            level(f"{self.exchange.name} system status: {status}")
        self.stats.system_status = status

    def _malformed(self, frame: str | bytes, err: ValueError) -> None:
        self.stats.malformed += 1
        count = self.stats.malformed
        if count <= LOG_FIRST_MALFORMED or count % LOG_EVERY_MALFORMED == 0:
            self.log.warning(
                f"{self.exchange.name} feed: malformed message #{count} skipped ({err}): {_shown(frame)}"
            )

    def _maybe_report(self) -> None:
        now = time.monotonic()
        if now >= self._next_report:
            self._next_report = now + self.settings.report_interval_seconds
            self.report()

    def _check_stop(self) -> None:
        if self._stopping:
            reason = "stop requested"
            if self.settings.max_trades is not None and self.stats.trades >= self.settings.max_trades:
                reason = f"max_trades {self.settings.max_trades} reached"
            raise StopFeed(reason)
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise StopFeed(f"max_runtime_seconds {self.settings.max_runtime_seconds:g} reached")


def _shown(frame: str | bytes) -> str:
    text = frame if isinstance(frame, str) else repr(frame)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def feed_settings(
    exchange: ExchangeConfig, url: str | None, symbols: str | Sequence[str] | None, **tunables: Any
) -> FeedSettings:
    """Validated settings: the exchange's endpoint and symbols unless given, FeedSettings' defaults for
    tunables left out (None)."""
    given = {name: value for name, value in tunables.items() if value is not None}
    return FeedSettings(
        url=url or exchange.feed_url, symbols=parse_symbols(symbols, exchange.feed_symbols), **given
    ).validate()


def parse_symbols(text: str | Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    """Symbols from a comma-separated string or a list; the exchange's defaults when none are given."""
    if text is None:
        return tuple(default)
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(s.strip() for s in items if s.strip())
