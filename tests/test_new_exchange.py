"""Adding an exchange is one entry in `EXCHANGES` plus its native-message mapping, and nothing else.

A copy of the code gets a third exchange, Coinbase, only that way: one `ExchangeConfig` entry typed
into the tuple in k2_resources/exchanges.py and a k2_resources/feeds/coinbase.py written here for its
`matches` channel. Everything below then runs in subprocesses that import the copy (PYTHONPATH), and
finds Coinbase everywhere: its topic, Bronze, Silver, DLQ slice, checks, jobs, sensors and schedules
(the same ones Kraken has, by name), the simulator's native messages mapped to valid V2 records, and
`k2 run` landing its rows in every layer with Bronze = Silver + DLQ per exchange.
"""

from __future__ import annotations

import difflib
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DEVSTACK_UP_SECONDS

SOURCE_ROOT = Path(__file__).resolve().parents[1]
# What the package needs at run time: both packages, the Dagster instance files, the workspace.
COPIED = ("k2_assets", "k2_resources", "deploy", "dagster.yaml", "workspace.yaml", "pyproject.toml")
NEW = "coinbase"
TEMPLATE = "kraken"  # an exchange whose per-exchange definitions the new one must mirror, name for name
NEW_RUN_TRADES = 1_500
COMPOSE_FILE = SOURCE_ROOT / "docker" / "docker-compose.yml"

ENTRY = f'''    ExchangeConfig(
        name="{NEW}",
        retention_days=7,
        target_file_size_bytes=64 * MB,
        commit_interval_seconds=10.0,
        feed_url="wss://ws-feed.exchange.coinbase.com",
        feed_symbols=("BTC-USD", "ETH-USD"),
        simulated_instruments=(
            SimulatedInstrument("BTC-USD", 67_245.0, 2, 0.01, 8, 690_000_000, 0.6),
            SimulatedInstrument("ETH-USD", 3_479.0, 2, 0.1, 8, 510_000_000, 0.4),
        ),
        run_trades={NEW_RUN_TRADES},
    ),
'''

MAPPING = '''"""Coinbase Exchange `matches` channel -> V2 records (written by tests/test_new_exchange.py).

One `match` message is one trade: prices and sizes are strings, the product is `BTC-USD`, and `side`
is the maker's order side, so the aggressor (V2's side) is the other one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from k2_resources.exchanges import ExchangeConfig
from k2_resources.feeds import (
    MessageIdFactory,
    SequenceFactory,
    field,
    micros_to_datetime,
    new_message_id,
    quote_currency,
    to_decimal,
    v2_record,
)
from k2_resources.feeds.protocol import Classified, Kind
from k2_resources.dev.simulator.market import Book, Market, NativeMessage

MESSAGE_TYPES = ("match", "last_match")
TAKER_SIDE = {"buy": "SELL", "sell": "BUY"}


def to_v2(
    message: Mapping[str, Any],
    exchange: ExchangeConfig,
    received_at_us: int,
    next_sequence: SequenceFactory,
    *,
    message_id: MessageIdFactory = new_message_id,
) -> list[dict[str, Any]]:
    if message.get("type") not in MESSAGE_TYPES:
        raise ValueError(f"Not a Coinbase match: {dict(message)!r}")
    product = field(message, "product_id", str)
    symbol, currency = quote_currency(exchange, product.replace("-", "/"))
    maker_side = field(message, "side", str)
    if maker_side not in TAKER_SIDE:
        raise ValueError(f"Coinbase side should be buy or sell, got {maker_side!r}")
    moment = datetime.fromisoformat(field(message, "time", str)).astimezone(UTC)
    record = v2_record(
        exchange=exchange,
        exchange_trade_id=field(message, "trade_id", int),
        symbol=symbol,
        currency=currency,
        timestamp=moment,
        price=to_decimal(field(message, "price", str), "price"),
        quantity=to_decimal(field(message, "size", str), "size"),
        side=TAKER_SIDE[maker_side],
        received_at_us=received_at_us,
        next_sequence=next_sequence,
        message_id=message_id,
        vendor_data={"product_id": product, "sequence": str(field(message, "sequence", int))},
    )
    return [record]


def simulated_message(market: Market, book: Book) -> NativeMessage:
    trade_us = market.next_slot_us()
    maker_side = market.rng.choice(("buy", "sell"))
    price = Decimal(market.step_price(book, TAKER_SIDE[maker_side].lower()))
    message = {
        "type": "match",
        "trade_id": book.take_trade_id(),
        "sequence": book.messages,
        "time": micros_to_datetime(trade_us).isoformat().replace("+00:00", "Z"),
        "product_id": book.instrument.symbol,
        "size": f"{market.quantity(book.instrument):f}",
        "price": f"{price:f}",
        "side": maker_side,
    }
    book.messages += 1
    return NativeMessage(json.dumps(message, separators=(",", ":")), trade_us + market.latency_us())


def connect_url(url: str, symbols: Sequence[str]) -> str:
    return url


def subscribe_requests(symbols: Sequence[str]) -> list[dict[str, Any]]:
    return [{"type": "subscribe", "product_ids": list(symbols), "channels": ["matches", "heartbeat"]}]


def ping_request(number: int) -> dict[str, Any] | None:
    return None


def classify(message: Mapping[str, Any]) -> Classified:
    kind = message.get("type")
    if kind in MESSAGE_TYPES:
        return Classified(Kind.TRADES)
    if kind == "heartbeat":
        return Classified(Kind.HEARTBEAT)
    if kind == "subscriptions":
        return Classified(Kind.ACK, str(message.get("channels")))
    if kind == "error":
        return Classified(Kind.REJECTED, str(message.get("message")))
    return Classified(Kind.UNKNOWN, f"type {kind!r}")
'''

# The two files the claim allows to change.
EXCHANGE_LIST = "k2_resources/exchanges.py"
NEW_MAPPING = f"k2_resources/feeds/{NEW}.py"


def copy_tree(root: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        source = SOURCE_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=ignore)
        else:
            shutil.copy2(source, root / name)


def add_exchange(root: Path) -> None:
    """One entry appended to the EXCHANGES tuple's text, and the new exchange's mapping module."""
    path = root / EXCHANGE_LIST
    head, opening, rest = path.read_text().partition("EXCHANGES: tuple[ExchangeConfig, ...] = (\n")
    assert opening, f"no EXCHANGES tuple in {EXCHANGE_LIST}"
    closing = rest.index("\n)\n") + 1
    path.write_text(head + opening + rest[:closing] + ENTRY + rest[closing:])
    (root / NEW_MAPPING).write_text(MAPPING)


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the code with Coinbase added."""
    root = tmp_path_factory.mktemp("three-exchanges")
    copy_tree(root)
    add_exchange(root)
    return root


def run_python(
    root: Path, script: str, timeout: float = 300, extra_path: Path | None = None, **env: str
) -> str:
    """`script` in a fresh interpreter importing the code at `root` (then `extra_path`); its stdout."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("K2_", "DAGSTER_"))}
    path = os.pathsep.join(str(p) for p in (root, extra_path) if p is not None)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env={**clean, "PYTHONPATH": path, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


# --------------------------------------------------------------------------------------------------
# Only the two allowed places change
# --------------------------------------------------------------------------------------------------


def changed_files(left: Path, right: Path, prefix: str = "") -> set[str]:
    """Files that differ between two trees, or exist in one only (caches excluded)."""
    compared = filecmp.dircmp(left, right, ignore=["__pycache__"])
    changed = {prefix + name for name in compared.left_only + compared.right_only + compared.diff_files}
    for name in compared.common_dirs:
        changed |= changed_files(left / name, right / name, f"{prefix}{name}/")
    return changed


def test_only_the_exchange_list_and_the_new_mapping_change(three: Path) -> None:
    changed = set()
    for name in COPIED:
        if (SOURCE_ROOT / name).is_dir():
            changed |= changed_files(SOURCE_ROOT / name, three / name, f"{name}/")
        elif not filecmp.cmp(SOURCE_ROOT / name, three / name, shallow=False):
            changed.add(name)
    assert changed == {EXCHANGE_LIST, NEW_MAPPING}
    diff = difflib.ndiff(
        (SOURCE_ROOT / EXCHANGE_LIST).read_text().splitlines(),
        (three / EXCHANGE_LIST).read_text().splitlines(),
    )
    edits = [line for line in diff if line[:1] in "+-"]
    assert all(line.startswith("+ ") for line in edits), "lines of the exchange list were changed, not added"
    assert "".join(line[2:] + "\n" for line in edits) == ENTRY


# --------------------------------------------------------------------------------------------------
# Definitions: the new exchange has everything Kraken has, name for name, and nothing else is added
# --------------------------------------------------------------------------------------------------

LIST_DEFINITIONS = """
import json
import dagster as dg
from k2_assets.definitions import defs
from k2_resources.exchanges import EXCHANGES
from tests.test_definitions import definitions_snapshot

snapshot = definitions_snapshot()
runs_with_defaults = {}
for name in snapshot["jobs"]:
    try:
        runs_with_defaults[name] = bool(dg.validate_run_config(defs.resolve_job_def(name), {})["ops"])
    except dg.DagsterInvalidConfigError:
        runs_with_defaults[name] = False
extra = {"exchanges": [e.name for e in EXCHANGES], "topics": [e.topic for e in EXCHANGES]}
print(json.dumps({**snapshot, **extra, "runs_with_defaults": runs_with_defaults}))
"""
PLACEHOLDERS = {"K2_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "K2_SCHEMA_REGISTRY_URL": "http://127.0.0.1:9"}
SECTIONS = ("assets", "checks", "jobs", "sensors", "schedules")


@pytest.fixture(scope="module")
def definitions(three: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """test_definitions' snapshot of this tree's definitions (two exchanges) and of the copy's (three).

    `tests` is imported from this tree in both, the K2 packages from the tree being snapshotted.
    """
    homes = {label: str(tmp_path_factory.mktemp(f"home-{label}")) for label in ("two", "three")}
    return {
        label: json.loads(
            run_python(root, LIST_DEFINITIONS, extra_path=SOURCE_ROOT, K2_HOME=homes[label], **PLACEHOLDERS)
        )
        for label, root in (("two", SOURCE_ROOT), ("three", three))
    }


def collapse(tree: Any) -> Any:
    """The snapshot with the new exchange renamed to the template one (lists deduplicated), so a new
    exchange that mirrors the template exactly collapses onto the two-exchange snapshot. Entries that
    collapse onto each other must be equal."""
    if isinstance(tree, dict):
        collapsed: dict[str, Any] = {}
        for key, value in tree.items():
            name, value = key.replace(NEW, TEMPLATE), collapse(value)
            assert collapsed.get(name, value) == value, f"{key} differs from its {TEMPLATE} twin"
            collapsed[name] = value
        return collapsed
    if isinstance(tree, list):
        return sorted({json.dumps(collapse(item)) for item in tree})
    return tree.replace(NEW, TEMPLATE) if isinstance(tree, str) else tree


@pytest.mark.parametrize("kind", SECTIONS)
def test_the_new_exchange_has_every_per_exchange_definition(
    definitions: dict[str, dict[str, Any]], kind: str
) -> None:
    """Its assets, checks, jobs, sensors and schedules are the template exchange's, name for name."""
    two, three = set(definitions["two"][kind]), set(definitions["three"][kind])
    per_exchange = {name for name in two if TEMPLATE in name}
    assert per_exchange, f"no {kind} of {TEMPLATE} to compare with"
    assert not any(NEW in name for name in two)
    assert three - two == {name.replace(TEMPLATE, NEW) for name in per_exchange}
    assert two <= three


@pytest.mark.parametrize("kind", SECTIONS)
def test_the_new_exchanges_definitions_mirror_the_template_and_nothing_else_changes(
    definitions: dict[str, dict[str, Any]], kind: str
) -> None:
    """Same deps, partitions, checks' blocking, job selections, sensor targets and schedules; shared
    definitions (Gold, the DLQ replay) gain the new exchange wherever they name the template's."""
    two, three = definitions["two"][kind], definitions["three"][kind]
    assert collapse(three) == collapse(two)


def test_the_new_exchange_has_its_topic_bronze_silver_and_a_dlq_slice(
    definitions: dict[str, dict[str, Any]],
) -> None:
    three = definitions["three"]
    assert three["exchanges"] == ["binance", "kraken", NEW]
    assert f"market.crypto.trades.{NEW}" in three["topics"]
    assets = three["assets"]
    assert {f"bronze_{NEW}_trades", f"silver_{NEW}_trades", f"silver_dlq_trades/{NEW}"} <= set(assets)
    assert f"silver_{NEW}_trades" in assets["gold_crypto_trades"]["deps"]
    assert f"bronze_{NEW}_ingestion" in three["jobs"] and f"bronze_{NEW}_ingestion_sensor" in three["sensors"]


def test_the_new_exchanges_jobs_need_no_run_config_file(definitions: dict[str, dict[str, Any]]) -> None:
    """Its sensors and schedules launch its jobs with their defaults (run_config/README.md)."""
    jobs = [name for name in definitions["three"]["jobs"] if NEW in name]
    assert len(jobs) == 5, jobs
    assert all(definitions["three"]["runs_with_defaults"][name] for name in jobs)
    assert not list((SOURCE_ROOT / "run_config").glob(f"*{TEMPLATE}*"))


def kafka_init_command() -> list[str]:
    """The command of docker-compose.yml's kafka-init service: `python -m <module> <args>`."""
    import yaml

    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]["kafka-init"]["command"]


def run_kafka_init(root: Path, args: list[str]) -> str:
    """kafka-init's module run with `args` in the code at `root`."""
    command = kafka_init_command()
    module = command[command.index("-m") + 1]
    return run_python(root, f"import importlib; importlib.import_module({module!r}).main({args!r})")


def test_kafka_init_of_the_compose_file_lists_the_new_topic(three: Path) -> None:
    printed = run_kafka_init(three, ["topics"])
    assert printed.split() == [f"market.crypto.trades.{e}" for e in ("binance", "kraken", NEW)]


# --------------------------------------------------------------------------------------------------
# The simulator renders the new exchange's native messages, and its mapping turns them into V2
# --------------------------------------------------------------------------------------------------

SIMULATE = """
import itertools, json
import fastavro.validation
from k2_resources.exchanges import exchange
from k2_resources.feeds import parse_message
from k2_resources.dev.simulator.market import Market, seeded_message_ids, seeded_rng, v2_trades
from k2_resources.trade_schema import trade_v2_parsed

config = exchange("coinbase")
start_us, count = 1_780_000_000_000_000, 400
frames = [m.text for m in itertools.islice(Market(config, 3, start_us, 10.0).messages(), count)]
records = list(itertools.islice(v2_trades(Market(config, 3, start_us, 10.0), seeded_message_ids(seeded_rng(3, "ids"))), count))
schema = trade_v2_parsed()
print(json.dumps({
    "frames": [parse_message(f) for f in frames],
    "records": [{k: str(v) for k, v in r.items()} for r in records],
    "valid": [fastavro.validation.validate(r, schema, raise_errors=False) for r in records],
}, default=str))
"""


@pytest.fixture(scope="module")
def simulated(three: Path) -> dict[str, list]:
    return json.loads(run_python(three, SIMULATE))


def test_the_simulator_produces_the_new_exchanges_native_messages(simulated: dict[str, list]) -> None:
    frames = simulated["frames"]
    assert len(frames) == 400
    assert {f["type"] for f in frames} == {"match"}
    assert {f["product_id"] for f in frames} == {"BTC-USD", "ETH-USD"}
    assert {f["side"] for f in frames} == {"buy", "sell"}
    ids = [f["trade_id"] for f in frames]
    assert len(set(ids)) == len(ids)


def test_the_mapping_turns_them_into_valid_v2_records(simulated: dict[str, list]) -> None:
    frames, records = simulated["frames"], simulated["records"]
    assert len(records) == len(frames)
    assert all(simulated["valid"])
    assert {r["exchange"] for r in records} == {"COINBASE"}
    assert {r["symbol"] for r in records} == {"BTCUSD", "ETHUSD"}
    assert {r["currency"] for r in records} == {"USD"}
    for frame, record in zip(frames, records, strict=True):
        assert record["trade_id"] == f"COINBASE-{frame['trade_id']}"
        assert float(record["price"]) == float(frame["price"]) and float(record["quantity"]) == float(
            frame["size"]
        )
        assert record["side"] == {"buy": "SELL", "sell": "BUY"}[frame["side"]]


# --------------------------------------------------------------------------------------------------
# `k2 run` on the copy: a real dev stack, every exchange's rows in every layer
# --------------------------------------------------------------------------------------------------

COUNT_ROWS = """
import json
import pyarrow.compute as pc
from k2_assets.tables import all_table_specs
from k2_resources.exchanges import EXCHANGES
from k2_resources.iceberg import IcebergCatalogResource

catalog = IcebergCatalogResource()
tables = {s.name: catalog.ensure_table(s) for s in all_table_specs()}

def rows(name, column=None, value=None):
    table = tables[name]
    if table.current_snapshot() is None:
        return 0
    data = table.scan().to_arrow()
    return data.num_rows if column is None else pc.sum(pc.equal(data[column], value)).as_py() or 0

print(json.dumps({e.name: {
    "bronze": rows(f"bronze_{e.name}_trades"),
    "silver": rows(f"silver_{e.name}_trades"),
    "dlq": rows("silver_dlq_trades", "exchange", e.name),
    "gold": rows("gold_crypto_trades", "exchange", e.code),
} for e in EXCHANGES}))
"""
K2_RUN_SECONDS = 1200


@pytest.fixture(scope="module")
def k2_run(
    three: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, subprocess.CompletedProcess]]:
    """`k2 run` of the copy in a K2_HOME of its own; the dev stack it starts is stopped afterwards."""
    home = tmp_path_factory.mktemp("k2run")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("K2_", "DAGSTER_"))}
    env = {**clean, "PYTHONPATH": str(three), "K2_HOME": str(home)}

    def k2(*args: str, timeout: float) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "k2_assets.cli", *args]
        return subprocess.run(command, cwd=three, env=env, capture_output=True, text=True, timeout=timeout)

    try:
        # Started first with a CI machine's patience; `k2 run` then finds it running.
        up = k2("devstack", "up", "--timeout", str(DEVSTACK_UP_SECONDS), timeout=DEVSTACK_UP_SECONDS + 60)
        assert up.returncode == 0, up.stderr[-4000:]
        done = k2("run", timeout=K2_RUN_SECONDS)
        print(done.stdout)  # the report: rows per table and every check, shown when a test fails
        yield home, done
    finally:
        k2("devstack", "down", timeout=120)


def test_kafka_init_creates_every_topic_on_a_real_broker(
    three: Path, k2_run: tuple[Path, subprocess.CompletedProcess]
) -> None:
    """The compose file's kafka-init command, pointed at the dev broker, reports the new topic with the
    partitions of its entry (the broker answers: ensure_topics waits for every partition's leader)."""
    from k2_resources.settings import read_env_file

    home, _ = k2_run
    bootstrap = read_env_file(home / "devstack.env")["K2_KAFKA_BOOTSTRAP_SERVERS"]
    command = kafka_init_command()
    args = [bootstrap if arg == "kafka:9092" else arg for arg in command[command.index("-m") + 2 :]]
    printed = run_kafka_init(three, args)
    assert f"market.crypto.trades.{NEW}: 4 partitions" in printed.splitlines(), printed


def test_k2_run_passes_with_the_new_exchange(k2_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    _, done = k2_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"All \d+ checks passed", done.stdout), done.stdout[-3000:]
    assert f"produced {NEW_RUN_TRADES} {NEW} records" in done.stdout
    verdicts = [
        line.split()[:3] for line in done.stdout.splitlines() if line.strip()[:4] in ("PASS", "WARN", "FAIL")
    ]
    checks = {(asset, check) for verdict, asset, check in verdicts if verdict == "PASS"}
    new = {(asset, check) for asset, check in checks if NEW in asset}
    assert new == {(a.replace(TEMPLATE, NEW), c) for a, c in checks if TEMPLATE in a}, sorted(checks)
    assert (f"silver_{NEW}_trades", "bronze_rows_equal_silver_plus_dlq") in new


def test_k2_run_lands_every_exchanges_rows_with_conservation(
    three: Path, k2_run: tuple[Path, subprocess.CompletedProcess]
) -> None:
    home, done = k2_run
    produced = {m[1]: int(m[0]) for m in re.findall(r"produced (\d+) (\w+) records", done.stdout)}
    assert produced == {"binance": 6_000, "kraken": 3_000, NEW: NEW_RUN_TRADES}, done.stdout[-3000:]
    counts = json.loads(run_python(three, COUNT_ROWS, K2_HOME=str(home)))
    for name, rows in counts.items():
        assert rows["bronze"] == produced[name], (name, rows)
        assert rows["silver"] + rows["dlq"] == rows["bronze"], (name, rows)
        assert rows["silver"] > 0 and rows["dlq"] > 0 and 0 < rows["gold"] <= rows["silver"], (name, rows)
