"""Feed mappings from hand-written native messages, and the simulated market that feeds them."""

from __future__ import annotations

import itertools
import json
import re
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from k2_resources.dev.simulator.market import Market, seeded_message_ids, seeded_rng, v2_trades
from k2_resources.exchanges import exchange
from k2_resources.feeds import binance, kraken, parse_message

BINANCE = exchange("binance")
KRAKEN = exchange("kraken")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
RECEIVED_US = 1_714_000_000_123_456
START_US = 1_714_521_600_000_000  # 2024-05-01T00:00:00Z

BINANCE_EVENT = {
    "e": "trade",
    "E": 1714000000105,
    "s": "BTCUSDT",
    "t": 3612000123,
    "p": "67250.01000000",
    "q": "0.00123000",
    "T": 1714000000103,
    "m": True,
    "M": True,
}

KRAKEN_FRAME = """{"channel": "trade", "type": "update", "data": [
  {"symbol": "XBT/USD", "side": "buy", "price": 9876543210.12345678, "qty": 0.00010001,
   "ord_type": "market", "trade_id": 78400001, "timestamp": "2024-04-24T23:06:40.010088Z"},
  {"symbol": "BTC/USD", "side": "sell", "price": 67240.1, "qty": 40,
   "ord_type": "limit", "trade_id": 78400002, "timestamp": "2024-04-24T23:06:40.010088Z"},
  {"symbol": "ETH/USD", "side": "buy", "price": 3478.07, "qty": 1.23456789,
   "ord_type": "limit", "trade_id": 61200000, "timestamp": "2024-04-24T23:06:41.000001+00:00"}
]}"""


def counter(start: int = 1):
    """A next_sequence function like a handler's: 1, 2, 3, ..."""
    return itertools.count(start).__next__


def test_binance_buyer_maker_is_a_sell_and_fields_map_exactly() -> None:
    [record] = binance.to_v2(BINANCE_EVENT, BINANCE, RECEIVED_US, counter(7))
    assert record["side"] == "SELL"  # the buyer was passive, so the aggressor sold
    assert record["trade_id"] == "BINANCE-3612000123"
    assert record["source_sequence"] == 3612000123
    assert record["platform_sequence"] == 7
    assert (record["symbol"], record["currency"], record["exchange"]) == ("BTCUSDT", "USDT", "BINANCE")
    assert record["price"] == Decimal("67250.01") and record["price"].as_tuple().exponent == -8
    assert record["quantity"] == Decimal("0.00123")
    assert record["timestamp"] == datetime(2024, 4, 24, 23, 6, 40, 103000, tzinfo=UTC)
    assert record["ingestion_timestamp"] == datetime(2024, 4, 24, 23, 6, 40, 123456, tzinfo=UTC)
    assert record["vendor_data"] == {
        "is_buyer_maker": "true",
        "event_type": "trade",
        "event_time": "1714000000105",
    }
    assert (record["asset_class"], record["trade_conditions"]) == ("crypto", [])
    assert UUID4.match(record["message_id"])


def test_binance_taker_buy_and_combined_stream_wrapper() -> None:
    event = {**BINANCE_EVENT, "m": False}
    wrapped = {"stream": "btcusdt@trade", "data": event}
    [plain] = binance.to_v2(event, BINANCE, RECEIVED_US, counter(), message_id=lambda: "fixed")
    [combined] = binance.to_v2(wrapped, BINANCE, RECEIVED_US, counter(), message_id=lambda: "fixed")
    assert plain["side"] == "BUY"
    assert plain["vendor_data"]["is_buyer_maker"] == "false"
    assert plain == combined


def test_binance_message_ids_are_fresh_per_record() -> None:
    first = binance.to_v2(BINANCE_EVENT, BINANCE, RECEIVED_US, counter())[0]["message_id"]
    second = binance.to_v2(BINANCE_EVENT, BINANCE, RECEIVED_US, counter())[0]["message_id"]
    assert first != second


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"e": "aggTrade"}, "Not a Binance trade event"),
        ({"t": True}, "'t'"),
        ({"t": "3612000123"}, "'t'"),
        ({"p": 67250.01}, "'p'"),
        ({"p": "67250.010000001"}, "more than 8 decimal places"),
        ({"q": "NaN"}, "not a decimal"),
        ({"q": "abc"}, "not a decimal"),
        ({"p": "12345678901.5"}, "does not fit decimal"),
        ({"m": "true"}, "'m'"),
        ({"s": "FOOBAR"}, "Cannot split symbol"),
    ],
)
def test_binance_malformed_events_raise_value_error(change: dict, complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        binance.to_v2({**BINANCE_EVENT, **change}, BINANCE, RECEIVED_US, counter())


def test_binance_event_without_trade_time_raises() -> None:
    event = {k: v for k, v in BINANCE_EVENT.items() if k != "T"}
    with pytest.raises(ValueError, match="lacks field 'T'"):
        binance.to_v2(event, BINANCE, RECEIVED_US, counter())


def test_kraken_keeps_every_trade_of_a_message() -> None:
    records = kraken.to_v2(parse_message(KRAKEN_FRAME), KRAKEN, RECEIVED_US, counter())
    assert [r["trade_id"] for r in records] == ["KRAKEN-78400001", "KRAKEN-78400002", "KRAKEN-61200000"]
    assert [r["platform_sequence"] for r in records] == [1, 2, 3]
    assert [r["side"] for r in records] == ["BUY", "SELL", "BUY"]
    assert len({r["message_id"] for r in records}) == 3
    assert all(r["ingestion_timestamp"] == records[0]["ingestion_timestamp"] for r in records)


def test_kraken_xbt_normalises_to_btc_with_usd_quote() -> None:
    xbt, btc, eth = kraken.to_v2(parse_message(KRAKEN_FRAME), KRAKEN, RECEIVED_US, counter())
    assert (xbt["symbol"], xbt["currency"]) == ("BTCUSD", "USD")
    assert (btc["symbol"], btc["currency"]) == ("BTCUSD", "USD")
    assert (eth["symbol"], eth["currency"]) == ("ETHUSD", "USD")
    assert xbt["vendor_data"] == {"pair": "XBT/USD", "order_type": "market"}
    assert btc["vendor_data"] == {"pair": "BTC/USD", "order_type": "limit"}


def test_kraken_decimals_and_timestamps_are_exact() -> None:
    xbt, btc, eth = kraken.to_v2(parse_message(KRAKEN_FRAME), KRAKEN, RECEIVED_US, counter())
    # 18 significant digits: a float would have rounded it.
    assert xbt["price"] == Decimal("9876543210.12345678")
    assert xbt["quantity"] == Decimal("0.00010001")
    assert btc["price"] == Decimal("67240.10000000") and btc["quantity"] == Decimal("40.00000000")
    assert eth["quantity"] == Decimal("1.23456789")
    assert xbt["timestamp"] == datetime(2024, 4, 24, 23, 6, 40, 10088, tzinfo=UTC)
    assert eth["timestamp"] == datetime(2024, 4, 24, 23, 6, 41, 1, tzinfo=UTC)
    assert xbt["source_sequence"] == 78400001


def test_kraken_frame_parsed_with_floats_is_refused() -> None:
    with pytest.raises(ValueError, match="parse_float=Decimal"):
        kraken.to_v2(json.loads(KRAKEN_FRAME), KRAKEN, RECEIVED_US, counter())


@pytest.mark.parametrize(
    ("frame", "complaint"),
    [
        ('{"channel": "heartbeat"}', "Not a Kraken trade message"),
        ('{"method": "subscribe", "success": true}', "Not a Kraken trade message"),
        ('{"channel": "trade", "type": "delta", "data": []}', "Not a Kraken trade message"),
        ('{"channel": "trade", "type": "update", "data": {}}', "'data'"),
        ('{"channel": "trade", "type": "update", "data": [42]}', "not an object"),
        ("[1, 2]", "not an object"),
        ("{not json", "not JSON"),
    ],
)
def test_kraken_malformed_messages_raise_value_error(frame: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        kraken.to_v2(parse_message(frame), KRAKEN, RECEIVED_US, counter())


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"side": "b"}, "'buy' or 'sell'"),
        ({"timestamp": "2024-04-24T23:06:40.010088"}, "no UTC offset"),
        ({"timestamp": "yesterday"}, "not RFC 3339"),
        ({"trade_id": 1.5}, "'trade_id'"),
        ({"qty": Decimal("NaN")}, "not a decimal"),
        ({"qty": Decimal("1e400")}, "does not fit decimal"),
        ({"price": True}, "'price'"),
    ],
)
def test_kraken_malformed_trades_raise_value_error(change: dict, complaint: str) -> None:
    trade = {**json.loads(KRAKEN_FRAME, parse_float=Decimal)["data"][1], **change}
    message = {"channel": "trade", "type": "snapshot", "data": [trade]}
    with pytest.raises(ValueError, match=re.escape(complaint)):
        kraken.to_v2(message, KRAKEN, RECEIVED_US, counter())


def test_exchange_config_finds_the_feed_modules() -> None:
    assert BINANCE.feed_module is binance
    assert KRAKEN.feed_module is kraken


def frames(name: str, seed: int, count: int, rate: float = 50.0) -> list[str]:
    market = Market(exchange(name), seed, START_US, rate)
    return [m.text for m in itertools.islice(market.messages(), count)]


def test_market_is_reproducible_from_its_seed() -> None:
    for name in ("binance", "kraken"):
        assert frames(name, 3, 300) == frames(name, 3, 300)
        assert frames(name, 3, 300) != frames(name, 4, 300)


def test_market_records_are_reproducible_message_ids_included() -> None:
    def records(seed: int) -> list[dict]:
        market = Market(KRAKEN, seed, START_US, 50.0)
        ids = seeded_message_ids(seeded_rng(seed, "ids"))
        return list(itertools.islice(v2_trades(market, ids), 500))

    first, second = records(11), records(11)
    assert first == second
    assert all(UUID4.match(r["message_id"]) for r in first)
    assert len({r["message_id"] for r in first}) == 500


def test_kraken_market_batches_one_to_five_trades_with_monotonic_ids_per_book() -> None:
    last_id: dict[str, int] = {}
    sizes, pairs = set(), set()
    for text in frames("kraken", 5, 2_000):
        message = parse_message(text)
        sizes.add(len(message["data"]))
        for trade in message["data"]:
            pairs.add(trade["symbol"])
            book = KRAKEN.normalise_symbol(trade["symbol"])[0]  # XBT/USD is the BTC/USD book
            assert trade["trade_id"] > last_id.get(book, 0)
            last_id[book] = trade["trade_id"]
    assert sizes == {1, 2, 3, 4, 5}
    assert {"BTC/USD", "XBT/USD", "ETH/USD"} <= pairs


def test_market_times_advance_at_the_rate_and_stay_bounded() -> None:
    for name, rate in (("binance", 40.0), ("kraken", 200.0)):
        market = Market(exchange(name), 9, START_US, rate)
        trades = list(itertools.islice(v2_trades(market, seeded_message_ids(seeded_rng(9, "ids"))), 4_000))
        times = [int(r["timestamp"].timestamp() * 1_000_000) for r in trades]
        assert times == sorted(times)
        assert times[0] >= START_US and times[-1] < START_US + 4_000 / rate * 1_000_000
        assert times[-1] > START_US + 0.95 * 4_000 / rate * 1_000_000  # the rate is trades per second
        assert all(r["ingestion_timestamp"] > r["timestamp"] for r in trades)


def test_market_prices_are_realistic_and_positive_with_8dp_quantities() -> None:
    market = Market(BINANCE, 2, START_US, 50.0)
    trades = list(itertools.islice(v2_trades(market, seeded_message_ids(seeded_rng(2, "ids"))), 5_000))
    by_symbol: dict[str, list[Decimal]] = defaultdict(list)
    for record in trades:
        by_symbol[record["symbol"]].append(record["price"])
        assert record["quantity"] > 0 and record["quantity"].as_tuple().exponent == -8
    assert {"BTCUSDT", "ETHUSDT", "SOLUSDT"} <= set(by_symbol)
    assert all(Decimal(50_000) < p < Decimal(90_000) for p in by_symbol["BTCUSDT"])
    assert all(Decimal(2_500) < p < Decimal(4_500) for p in by_symbol["ETHUSDT"])
    assert len(set(by_symbol["BTCUSDT"])) > 100  # the price walks
    sides = {r["side"] for r in trades}
    assert sides == {"BUY", "SELL"}
