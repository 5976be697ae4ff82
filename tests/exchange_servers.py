"""Local WebSocket servers that speak Binance's and Kraken's documented trade protocols, from a script.

A script is a list of sessions, one per client connection in order. A session is a list of steps:
new trades, resends of earlier trades, a trade-id jump, heartbeats, raw (malformed or unknown) frames,
silence, a server-initiated close, or a refusal. The frames are rendered when the server is built, so
`sent` (every trade the server will send, resends included, in order) is known before the client
connects and tests can compare what the feed produced against it trade by trade.

Binance: combined streams chosen in the URL (`/stream?streams=btcusdt@trade/...`), one trade per frame
wrapped as {"stream", "data"}, prices and quantities as strings. Kraken v2: the client subscribes with
{"method": "subscribe", "params": {"channel": "trade", "symbol": [...], "snapshot": true}}; the server
answers with a status message, one ack per symbol (or an error for an unknown pair), a snapshot of the
latest trades of each book (after a reconnect: trades already sent), then batched updates, heartbeats
and pongs, prices and quantities as JSON numbers.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve

SNAPSHOT_SIZE = 5  # Kraken sends up to 50; fewer keeps the tests' numbers readable
KRAKEN_MAX_BATCH = 5


@dataclass(frozen=True)
class Trade:
    """One exchange trade as the server sends it (native symbol, exact decimal text)."""

    symbol: str
    trade_id: int
    price: str
    qty: str
    time_us: int
    side: str  # the taker's: buy / sell
    ord_type: str


# Steps of a session.
@dataclass(frozen=True)
class Trades:
    count: int


@dataclass(frozen=True)
class Replay:
    """Send the last `count` trades again (a server resending after a reconnect)."""

    count: int


@dataclass(frozen=True)
class Skip:
    """Advance `symbol`'s trade ids by `count`: those trades are never sent (a gap)."""

    symbol: str
    count: int


@dataclass(frozen=True)
class Heartbeat:
    pass


@dataclass(frozen=True)
class Raw:
    text: str


@dataclass(frozen=True)
class Status:
    system: str


@dataclass(frozen=True)
class Silence:
    seconds: float


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class Ping:
    """A WebSocket ping frame (Binance sends one every 20 s and drops a client that does not pong)."""


@dataclass(frozen=True)
class Refuse:
    """Close the connection right after the handshake, before anything is sent."""


Step = Trades | Replay | Skip | Heartbeat | Raw | Status | Silence | Close | Refuse | Ping


@dataclass
class Tape:
    """Per-symbol monotonic trade ids and a random-walk price, seeded."""

    symbols: tuple[str, ...]
    seed: int
    next_ids: dict[str, int] = field(default_factory=dict)
    prices: dict[str, Decimal] = field(default_factory=dict)
    history: list[Trade] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        for i, symbol in enumerate(self.symbols):
            self.next_ids[symbol] = 1_000_000 * (i + 1) + self.rng.randrange(1000)
            self.prices[symbol] = Decimal(self.rng.choice(("67250.1", "3480.25", "152.04", "0.16012")))

    def trade(self, symbol: str | None = None) -> Trade:
        symbol = symbol or self.rng.choice(self.symbols)
        step = Decimal(self.rng.randint(-3, 3)) * Decimal("0.01")
        price = max(Decimal("0.00001"), self.prices[symbol] + step)
        self.prices[symbol] = price
        qty = Decimal(self.rng.randint(1, 10**9)).scaleb(-8)
        trade = Trade(
            symbol=symbol,
            trade_id=self.next_ids[symbol],
            price=format(price.normalize(), "f"),
            qty=format(qty.normalize(), "f"),
            time_us=time.time_ns() // 1000,
            side=self.rng.choice(("buy", "sell")),
            ord_type=self.rng.choice(("limit", "market")),
        )
        self.next_ids[symbol] += 1
        self.history.append(trade)
        return trade


@dataclass(frozen=True)
class Frame:
    text: str
    trades: tuple[Trade, ...] = ()


Action = Frame | Silence | Close | Refuse | Ping


class ExchangeServer:
    """A scripted exchange on 127.0.0.1 in a thread of its own; `url` is what the feed connects to."""

    def __init__(
        self, exchange: str, symbols: tuple[str, ...], script: list[list[Step]], seed: int = 1
    ) -> None:
        self.live: LiveMarket | None = None  # set for a live broadcast instead of the script
        self.exchange = exchange
        self.symbols = symbols
        self.tape = Tape(symbols, seed)
        self.sessions = [self._render(i, steps) for i, steps in enumerate(script)]
        self.sent: list[Trade] = [
            t for s in self.sessions for a in s if isinstance(a, Frame) for t in a.trades
        ]
        self.connections: list[float] = []  # monotonic time of each accepted connection
        self.closed: dict[int, float] = {}  # connection index -> monotonic time it ended
        self.requests: list[str] = []  # the request path of each connection
        self.received: list[dict[str, Any]] = []  # client messages (Kraken subscribes, pings)
        self.pong_seconds: list[float] = []  # how long the client took to answer each ping frame
        self.done = threading.Event()  # the last session's actions were all sent
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        path = "/stream" if self.exchange == "binance" else "/v2"
        return f"ws://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> ExchangeServer:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(ready,), daemon=True, name="exchange-server"
        )
        self._thread.start()
        assert ready.wait(10), "the exchange server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def unique_trades(self) -> dict[tuple[str, int], Trade]:
        return {(t.symbol, t.trade_id): t for t in self.sent}

    # Rendering: the script's steps as frames, before any client connects.

    def _render(self, index: int, steps: list[Step]) -> list[Action]:
        actions: list[Action] = []
        if self.exchange == "kraken" and not any(isinstance(s, Refuse) for s in steps):
            actions += self._kraken_greeting()
        for step in steps:
            actions += self._render_step(step)
        return actions

    def _render_step(self, step: Step) -> list[Action]:
        if isinstance(step, Trades):
            return self._trade_frames([self.tape.trade() for _ in range(step.count)])
        if isinstance(step, Replay):
            return self._trade_frames(list(self.tape.history[-step.count :]))
        if isinstance(step, Skip):
            self.tape.next_ids[step.symbol] += step.count
            return []
        if isinstance(step, Heartbeat):
            return [Frame(self._heartbeat())]
        if isinstance(step, Raw):
            return [Frame(step.text)]
        if isinstance(step, Status):
            return [Frame(kraken_status(step.system))]
        return [step]

    def _trade_frames(self, trades: list[Trade]) -> list[Action]:
        if self.exchange == "binance":
            return [Frame(binance_frame(t), (t,)) for t in trades]
        frames: list[Action] = []
        while trades:
            # A batch is one book's consecutive trades, as one taker order sweeping levels.
            size = self.tape.rng.randint(1, KRAKEN_MAX_BATCH)
            batch = [trades.pop(0)]
            while trades and len(batch) < size and trades[0].symbol == batch[0].symbol:
                batch.append(trades.pop(0))
            frames.append(Frame(kraken_frame("update", batch), tuple(batch)))
        return frames

    def _kraken_greeting(self) -> list[Action]:
        """What Kraken sends after a subscribe: status, an ack per symbol, the snapshot of each book."""
        actions: list[Action] = [Frame(kraken_status("online"))]
        actions += [Frame(kraken_ack(s)) for s in self.symbols]
        for symbol in self.symbols:
            if not any(t.symbol == symbol for t in self.tape.history):
                for _ in range(SNAPSHOT_SIZE):  # the book's trades from before this session
                    self.tape.trade(symbol)
            latest = [t for t in self.tape.history if t.symbol == symbol][-SNAPSHOT_SIZE:]
            actions.append(Frame(kraken_frame("snapshot", latest), tuple(latest)))
        return actions

    def _heartbeat(self) -> str:
        return json.dumps({"channel": "heartbeat"}) if self.exchange == "kraken" else "{}"

    # Serving.

    def _serve(self, ready: threading.Event) -> None:
        asyncio.run(self._main(ready))

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", 0, ping_interval=None) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            ready.set()
            await self._stop.wait()

    async def _handler(self, ws: ServerConnection) -> None:
        index = len(self.connections)
        self.connections.append(time.monotonic())
        self.requests.append(ws.request.path if ws.request else "")
        try:
            if self.live is not None:
                await self.live.serve(self, ws)
            else:
                await self._scripted(ws, index)
        finally:
            self.closed[index] = time.monotonic()

    async def _scripted(self, ws: ServerConnection, index: int) -> None:
        actions = self.sessions[index] if index < len(self.sessions) else []
        if actions and isinstance(actions[0], Refuse):
            await ws.close(1013, "try again later")
            return
        if self.exchange == "binance":
            self._check_binance_path(ws.request.path if ws.request else "")
        else:
            await self._await_subscribe(ws)
        reader = asyncio.create_task(self._answer(ws))
        try:
            for action in actions:
                if isinstance(action, Frame):
                    await ws.send(action.text)
                elif isinstance(action, Silence):
                    await until_closed(ws, action.seconds)
                elif isinstance(action, Ping):
                    sent = time.monotonic()
                    await asyncio.wait_for(await ws.ping(), 5)
                    self.pong_seconds.append(time.monotonic() - sent)
                elif isinstance(action, Close):
                    await ws.close(1001, "server going away")
                    return
            if index >= len(self.sessions) - 1:
                self.done.set()
            await self._idle(ws)
        except Exception:  # the client went away mid-session: the next connection gets the next session
            return
        finally:
            reader.cancel()

    async def _idle(self, ws: ServerConnection) -> None:
        """After the script: Kraken keeps sending heartbeats, Binance sends nothing."""
        while True:
            if self.exchange == "kraken":
                await ws.send(self._heartbeat())
            await until_closed(ws, 0.2)

    def _check_binance_path(self, path: str) -> None:
        query = parse_qs(urlsplit(path).query)
        streams = query.get("streams", [""])[0].split("/")
        expected = [f"{s.lower()}@trade" for s in self.symbols]
        assert urlsplit(path).path == "/stream" and streams == expected, f"unexpected Binance request {path}"

    async def _await_subscribe(self, ws: ServerConnection) -> None:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        self.received.append(message)
        params = message.get("params", {})
        unknown = [s for s in params.get("symbol", []) if s not in self.symbols]
        if message.get("method") != "subscribe" or params.get("channel") != "trade" or unknown:
            error = {
                "error": f"Currency pair not supported {unknown}",
                "method": "subscribe",
                "success": False,
            }
            await ws.send(json.dumps(error))
            await until_closed(ws, 5)
            raise ConnectionError("subscription refused")

    async def _answer(self, ws: ServerConnection) -> None:
        """Kraken answers application pings with pongs."""
        async for text in ws:
            message = json.loads(text)
            self.received.append(message)
            if message.get("method") == "ping":
                await ws.send(json.dumps({"method": "pong", "req_id": message.get("req_id")}))


class LiveMarket:
    """Binance-style live broadcast: `count` trades at `rate` per second to every open connection, and
    each connection closed by the server once it is `max_age` seconds old (Binance's 24-hour limit,
    scaled down). `ExchangeServer.sent` fills as trades are broadcast."""

    def __init__(self, count: int, rate: float, max_age: float) -> None:
        self.count, self.rate, self.max_age = count, rate, max_age
        self.subscribers: set[ServerConnection] = set()
        self._task: asyncio.Task | None = None

    async def serve(self, server: ExchangeServer, ws: ServerConnection) -> None:
        server._check_binance_path(ws.request.path if ws.request else "")
        if self._task is None:
            self._task = asyncio.create_task(self._broadcast(server))
        self.subscribers.add(ws)
        try:
            await until_closed(ws, self.max_age)
            await ws.close(1001, "connection age limit")
        except ConnectionError:
            pass
        finally:
            self.subscribers.discard(ws)

    async def _broadcast(self, server: ExchangeServer) -> None:
        for _ in range(self.count):
            trade = server.tape.trade()
            server.sent.append(trade)
            for ws in list(self.subscribers):
                try:
                    await ws.send(binance_frame(trade))
                except Exception:
                    self.subscribers.discard(ws)
            await asyncio.sleep(1 / self.rate)
        server.done.set()


async def until_closed(ws: ServerConnection, seconds: float) -> None:
    """Wait `seconds`, or raise as soon as the client has gone (so the server can shut down)."""
    try:
        await asyncio.wait_for(ws.wait_closed(), seconds)
    except TimeoutError:
        return
    raise ConnectionError("the client closed the connection")


def binance_frame(trade: Trade) -> str:
    trade_ms = trade.time_us // 1000
    event = {
        "e": "trade",
        "E": trade_ms + 2,
        "s": trade.symbol,
        "t": trade.trade_id,
        "p": f"{Decimal(trade.price):.8f}",
        "q": f"{Decimal(trade.qty):.8f}",
        "T": trade_ms,
        "m": trade.side == "sell",  # buyer is maker <=> the taker sold
        "M": True,
    }
    return json.dumps({"stream": f"{trade.symbol.lower()}@trade", "data": event}, separators=(",", ":"))


def kraken_time(time_us: int) -> str:
    return datetime.fromtimestamp(time_us // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S") + (
        f".{time_us % 1_000_000:06d}Z"
    )


def kraken_frame(kind: str, trades: list[Trade]) -> str:
    """Written by hand so price and qty are JSON numbers with exactly the tape's digits."""
    entries = ",".join(
        f'{{"symbol":"{t.symbol}","side":"{t.side}","price":{t.price},"qty":{t.qty},'
        f'"ord_type":"{t.ord_type}","trade_id":{t.trade_id},"timestamp":"{kraken_time(t.time_us)}"}}'
        for t in trades
    )
    return f'{{"channel":"trade","type":"{kind}","data":[{entries}]}}'


def kraken_status(system: str) -> str:
    data = [{"api_version": "v2", "connection_id": 1234, "system": system, "version": "2.0.9"}]
    return json.dumps({"channel": "status", "type": "update", "data": data})


def kraken_ack(symbol: str) -> str:
    result = {"channel": "trade", "snapshot": True, "symbol": symbol}
    return json.dumps({"method": "subscribe", "result": result, "success": True, "req_id": 1})
