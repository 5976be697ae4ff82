"""Benchmark: wall time and peak RSS of one Gold hour, and of gold_dedup_job over a day of Gold.

1. One Gold hour: `--trades` Silver rows (default 10M; 1 % are redeliveries, i.e. exact message_id
   duplicates) whose trade time falls in one closed event hour, split 2:1 between the Binance and Kraken
   Silver tables, ingested within one ingestion hour. `gold_crypto_trades` is then materialised for that
   hour through Dagster in a child process: PyIceberg reads Silver, DuckDB drops duplicate message_ids,
   the IO manager writes Gold, both Gold checks run. The same-run baseline is DuckDB alone, also in a
   child, with the same memory limit and threads: `read_parquet` over the Silver files PyIceberg plans
   for the hour, the same dedup SQL (first copy by lineage, sorted by trade time), `COPY` to zstd Parquet.
   It runs before and after the Gold run; the ratio is against the mean of the two.
2. gold_dedup_job: `--hours` event hours (default 24, ending with the running hour) of
   `--trades-per-hour` Gold rows each (default 1M). 1 % of the rows are duplicates: 4/5 trades replayed under a new
   message_id in the same hour (same exchange, symbol and trade_id), 1/5 copies of the previous hour's
   trades under the same message_id one hour later. The job runs in a child process: stage 1 audits
   them, stage 2 rewrites every affected hour. With `--landed DIR` the day is landed once into DIR and
   every later run of the same shape reuses it (restored from a hard-linked pristine copy before each
   job run); with `--baseline-code CHECKOUT` (e.g. `git archive <commit> | tar -x -C CHECKOUT`) that
   checkout's job runs on the same rows before and after this one's, each verified the same way.

Rows are generated with vectorised Arrow/NumPy straight into the tables through the real catalog (no
Avro), in the tables' declared schemas. Each figure is printed only after the result was verified:
Gold holds exactly the expected rows, the checks passed, the audit names exactly the injected copies.
Peak RSS is the child's own kernel high-water mark (see bench/_common.py).

    .venv/bin/python bench/bench_gold.py [--trades 10000000] [--hours 24] [--trades-per-hour 1000000]
    .venv/bin/python bench/bench_gold.py --only dedup --landed /tmp/gold-day --baseline-code /tmp/k2-main
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ChildResult, dagster_child_args, k2_child_env, run_child  # noqa: E402

MICROS_PER_HOUR = 3_600_000_000
CHUNK_ROWS = 1_000_000  # rows generated and appended at a time: bounds this process's memory
SILVER_FILE_ROWS = 250_000  # Silver's data files hold an IO manager chunk (DEFAULT_CHUNK_ROWS) at most
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
HOUR_FORMAT = "%Y-%m-%d-%H:00"
CHILD_TIMEOUT_SECONDS = 4 * 3600


@dataclass(frozen=True)
class Venue:
    """What differs between the exchanges' Silver rows."""

    name: str
    code: str
    symbols: tuple[str, ...]
    currency: str
    prices: tuple[float, ...]

    @property
    def topic(self) -> str:
        return f"market.crypto.trades.{self.name}"


VENUES = (
    Venue(
        "binance", "BINANCE", ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT"), "USDT", (67e3, 3.5e3, 150, 600)
    ),
    Venue("kraken", "KRAKEN", ("BTCUSD", "ETHUSD", "SOLUSD"), "USD", (67e3, 3.5e3, 150)),
)


# --- Vectorised Silver rows ---------------------------------------------------------------------------


def uuid_strings(rng: np.random.Generator, n: int) -> pa.Array:
    """n random UUID-shaped strings (36 chars), built as one Arrow buffer: no Python object per row."""
    chars = HEX[rng.integers(0, 16, size=(n, 32), dtype=np.uint8)]
    dash = np.full((n, 1), ord("-"), dtype=np.uint8)
    parts = (
        chars[:, :8],
        dash,
        chars[:, 8:12],
        dash,
        chars[:, 12:16],
        dash,
        chars[:, 16:20],
        dash,
        chars[:, 20:],
    )
    data = np.ascontiguousarray(np.hstack(parts))
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def decimals(unscaled: np.ndarray) -> pa.Array:
    """decimal(18, 8) from non-negative unscaled int64 values (two little-endian words per value)."""
    words = np.zeros((len(unscaled), 2), dtype=np.int64)
    words[:, 0] = unscaled
    return pa.Array.from_buffers(pa.decimal128(18, 8), len(unscaled), [None, pa.py_buffer(words)])


def timestamps(micros: np.ndarray) -> pa.Array:
    return pa.array(micros, pa.int64()).cast(pa.timestamp("us", tz="UTC"))


def silver_rows(
    venue: Venue, rng: np.random.Generator, sequence: np.ndarray, hour: datetime, ingested: datetime
) -> pa.Table:
    """Silver rows of `venue` for trade numbers `sequence`, traded in `hour`, ingested in the hour `ingested`.

    Column for column what Silver writes: V2 fields, exchange_date of the trade time, lineage with unique
    (partition, offset) per trade number.
    """
    n = len(sequence)
    hour_us = int(hour.timestamp() * 1_000_000)
    ingested_us = int(ingested.timestamp() * 1_000_000)
    trade_us = hour_us + rng.integers(0, MICROS_PER_HOUR, size=n)
    pick = rng.integers(0, len(venue.symbols), size=n)
    price = np.asarray(venue.prices)[pick] * rng.uniform(0.99, 1.01, size=n)
    kafka_partition = (sequence % 4).astype(np.int32)
    columns = {
        "message_id": uuid_strings(rng, n),
        "trade_id": pc.binary_join_element_wise(venue.code + "-", pa.array(sequence).cast(pa.string()), ""),
        "symbol": pa.array(venue.symbols).take(pa.array(pick)),
        "exchange": pa.repeat(pa.scalar(venue.code), n),
        "asset_class": pa.repeat(pa.scalar("crypto"), n),
        "timestamp": pa.array(trade_us, pa.int64()),
        "price": decimals(np.round(price * 1e8).astype(np.int64)),
        "quantity": decimals(rng.integers(1, 50_000_000, size=n)),
        "currency": pa.repeat(pa.scalar(venue.currency), n),
        "side": pa.array(["BUY", "SELL"]).take(pa.array(rng.integers(0, 2, size=n))),
        "trade_conditions": pa.ListArray.from_arrays(np.zeros(n + 1, np.int32), pa.array([], pa.string())),
        "source_sequence": pa.array(sequence, pa.int64()),
        "ingestion_timestamp": pa.array(trade_us + rng.integers(1_000, 50_000, size=n), pa.int64()),
        "platform_sequence": pa.array(sequence, pa.int64()),
        "vendor_data": pa.repeat(pa.scalar('{"event_type": "trade"}'), n),
        "exchange_date": timestamps(trade_us).cast(pa.date32()),
        "validation_timestamp": timestamps(np.full(n, ingested_us + MICROS_PER_HOUR)),
        "bronze_ingestion_timestamp": timestamps(ingested_us + rng.integers(0, MICROS_PER_HOUR, size=n)),
        "schema_id": pa.repeat(pa.scalar(1, pa.int32()), n),
        "topic": pa.repeat(pa.scalar(venue.topic), n),
        "partition": pa.array(kafka_partition),
        "offset": pa.array(sequence // 4, pa.int64()),
    }
    return pa.table(columns)


def redelivered(rows: pa.Table, rng: np.random.Generator, count: int, first_offset: int) -> pa.Table:
    """`count` of `rows` delivered again: same record, later offset and Bronze ingestion (Gold keeps the first)."""
    copies = rows.take(pa.array(rng.choice(rows.num_rows, size=count, replace=False)))
    later = pc.add(copies["bronze_ingestion_timestamp"].cast(pa.int64()), 1).cast(
        pa.timestamp("us", tz="UTC")
    )
    copies = copies.set_column(
        copies.schema.get_field_index("bronze_ingestion_timestamp"), "bronze_ingestion_timestamp", later
    )
    offsets = pa.array(np.arange(first_offset, first_offset + count), pa.int64())
    return copies.set_column(copies.schema.get_field_index("offset"), "offset", offsets)


def chunk_sizes(total: int, chunk: int = CHUNK_ROWS) -> Iterator[tuple[int, int]]:
    """(first row, rows) pieces of `total`."""
    for first in range(0, total, chunk):
        yield first, min(chunk, total - first)


def steps(result: ChildResult) -> str:
    """The Dagster steps' own durations: the rest of the wall time is process start and run set-up."""
    timed = ", ".join(
        f"{step} {took}" for step, took in result.step_seconds().items() if "freshness" not in step
    )
    return f"steps: {timed} (the rest of the wall time is the child's Python/Dagster start-up)"


# --- 1. One Gold hour -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HourPlan:
    """One Gold hour's input: `trades` Silver rows of which `duplicates` repeat an earlier message_id."""

    trades: int
    duplicates: int
    hour: datetime

    @property
    def distinct(self) -> int:
        return self.trades - self.duplicates


def proportional(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`, the rounding remainder on the last part."""
    parts = [total * w // sum(weights) for w in weights[:-1]]
    return [*parts, total - sum(parts)]


def land_silver_hour(plan: HourPlan, seed: int = 1) -> None:
    """Append the hour's Silver rows to both exchanges' tables, chunk by chunk (2/3 Binance, 1/3 Kraken).

    Each chunk of SILVER_FILE_ROWS is one append (one data file, as Silver's IO manager writes them),
    its redeliveries in it.
    """
    from k2_assets.silver.tables import silver_table_spec
    from k2_resources.exchanges import exchange
    from k2_resources.iceberg import IcebergCatalogResource

    rng, catalog = np.random.default_rng(seed), IcebergCatalogResource()
    ingested = plan.hour + timedelta(hours=1)
    distinct = proportional(plan.distinct, [2, 1])
    for venue, rows_total, dups_total in zip(
        VENUES, distinct, proportional(plan.duplicates, distinct), strict=True
    ):
        table = catalog.ensure_table(silver_table_spec(exchange(venue.name)))
        chunks = list(chunk_sizes(rows_total, SILVER_FILE_ROWS))
        for (first, n), dups in zip(chunks, proportional(dups_total, [n for _, n in chunks]), strict=True):
            rows = silver_rows(venue, rng, np.arange(first, first + n), plan.hour, ingested)
            table.append(pa.concat_tables([rows, redelivered(rows, rng, dups, 10**12 + first)]))


def verify_hour(plan: HourPlan, result: ChildResult) -> dict:
    """The child's summary, after checking Gold holds exactly the distinct trades and both checks passed."""
    summary = result.summary()
    if not summary["success"]:
        raise RuntimeError("Gold materialisation failed:\n" + "\n".join(summary["errors"]))
    checks = summary["checks"]
    counts = checks["rows_equal_distinct_silver_trades"]["metadata"]
    output = next(
        entry["metadata"]
        for entry in summary["outputs"] + summary["materializations"]
        if "silver_rows_in_window" in entry["metadata"]
    )
    expected = {
        "Gold rows": (counts["gold_rows"], plan.distinct),
        "Silver rows read": (output["silver_rows_in_window"], plan.trades),
        "duplicates dropped": (output["exact_duplicates_dropped"], plan.duplicates),
    }
    wrong = {k: v for k, v in expected.items() if v[0] != v[1]}
    if (
        wrong
        or not checks["no_duplicate_message_id"]["passed"]
        or not checks["rows_equal_distinct_silver_trades"]["passed"]
    ):
        raise RuntimeError(f"Gold result is wrong (got, expected): {wrong}; checks {checks}")
    return output


def silver_hour_files(hour: datetime) -> list[str]:
    """Local paths of the Silver data files PyIceberg plans for the event hour (both exchanges)."""
    from k2_assets.gold.assets import SilverTrades
    from k2_resources.iceberg import IcebergCatalogResource

    silver = SilverTrades(IcebergCatalogResource(), hour, hour + timedelta(hours=1))
    scans = silver._scans(("message_id",))
    return [task.file.file_path.removeprefix("file://") for scan in scans for task in scan.plan_files()]


def duckdb_alone(spec: dict) -> None:
    """Child side of the baseline: read the files, dedup, write zstd Parquet; print the query's seconds."""
    import duckdb

    from k2_assets.gold.assets import FIRST_INGESTED, LINEAGE_COLUMNS
    from k2_assets.gold.dedup import (
        FIXED_BUILD_SIDE,
        DuckDBConfig,
        first_copies_sql,
        first_orders_sql,
        quoted,
    )
    from k2_resources.trade_schema import V2_FIELD_NAMES

    engine = DuckDBConfig()
    started = time.perf_counter()
    con = duckdb.connect(
        config={
            "memory_limit": engine.duckdb_memory_limit,
            "threads": engine.duckdb_threads,
            "temp_directory": spec["out"] + "/spill",
            "preserve_insertion_order": False,
            "disabled_optimizers": FIXED_BUILD_SIDE,
        }
    )

    def silver(columns: tuple[str, ...]) -> str:
        return (
            f"SELECT {quoted(columns)} FROM read_parquet({spec['files']!r}) "
            f"WHERE timestamp >= {spec['lo']} AND timestamp < {spec['hi']}"
        )

    keys = ("message_id", "timestamp", *LINEAGE_COLUMNS)
    con.execute(f"CREATE TEMP TABLE first_orders AS {first_orders_sql(silver(keys), FIRST_INGESTED)}")
    query = first_copies_sql(silver(V2_FIELD_NAMES + LINEAGE_COLUMNS), "first_orders", FIRST_INGESTED)
    con.execute(f"COPY ({query}) TO '{spec['out']}/gold.parquet' (FORMAT parquet, COMPRESSION zstd)")
    written = con.execute(f"SELECT count(*) FROM '{spec['out']}/gold.parquet'").fetchone()[0]
    print(json.dumps({"query_seconds": time.perf_counter() - started, "rows": written}))


def run_duckdb_alone(home: Path, plan: HourPlan, files: list[str]) -> tuple[ChildResult, float]:
    """The baseline in a child; its result and the query's own seconds, once it wrote the distinct rows."""
    lo = int(plan.hour.timestamp() * 1_000_000)
    with tempfile.TemporaryDirectory(prefix="duckdb-alone-", dir=home) as out:
        spec = {"files": files, "lo": lo, "hi": lo + MICROS_PER_HOUR, "out": out}
        args = [sys.executable, __file__, "--duckdb-alone", json.dumps(spec)]
        result = run_child(args, k2_child_env(home), CHILD_TIMEOUT_SECONDS)
    if result.returncode != 0:
        raise RuntimeError(f"DuckDB baseline failed:\n{result.stderr[-4000:]}")
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    if answer["rows"] != plan.distinct:
        raise RuntimeError(f"DuckDB baseline wrote {answer['rows']:,} rows, not {plan.distinct:,}")
    return result, answer["query_seconds"]


def seconds(took: str) -> float:
    """Dagster's step duration text ("47.62s", "1m54s", "1h2m") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", took))


def gold_step_seconds(result: ChildResult) -> float:
    return sum(seconds(t) for step, t in result.step_seconds().items() if "freshness" not in step)


def bench_gold_hour(home: Path, trades: int, dup_rate: float) -> None:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    plan = HourPlan(trades, round(trades * dup_rate), hour)
    started = time.perf_counter()
    land_silver_hour(plan)
    print(
        f"\n[1] one Gold hour {hour.strftime(HOUR_FORMAT)}: landed {plan.trades:,} Silver rows "
        f"({plan.duplicates:,} redeliveries) in {time.perf_counter() - started:.0f} s"
    )
    files = silver_hour_files(hour)
    before, before_query = run_duckdb_alone(home, plan, files)
    args = dagster_child_args(select=["gold_crypto_trades"], partition=hour.strftime(HOUR_FORMAT))
    result = run_child(args, k2_child_env(home), CHILD_TIMEOUT_SECONDS)
    verify_hour(plan, result)
    after, after_query = run_duckdb_alone(home, plan, files)
    step = gold_step_seconds(result)
    baseline_query = (before_query + after_query) / 2
    baseline_wall = (before.wall_seconds + after.wall_seconds) / 2
    print(
        f"    materialise gold_crypto_trades (dedup + write + both checks), verified: rows in {plan.trades:,}, "
        f"rows out {plan.distinct:,}, duplicates removed {plan.duplicates:,}\n"
        f"    wall {result.wall_seconds:.1f} s, step {step:.1f} s, {plan.trades / step:,.0f} rows/s, "
        f"CPU {result.cpu_seconds:.0f} s, peak RSS {result.peak_rss_mb:,.0f} MB\n"
        f"    {steps(result)}\n"
        f"    baseline DuckDB alone (read_parquet + same dedup SQL + COPY zstd), before / after: "
        f"query {before_query:.1f} / {after_query:.1f} s, wall {before.wall_seconds:.1f} / "
        f"{after.wall_seconds:.1f} s, CPU {before.cpu_seconds:.0f} / {after.cpu_seconds:.0f} s, "
        f"peak RSS {before.peak_rss_mb:,.0f} / {after.peak_rss_mb:,.0f} MB\n"
        f"    ratio Gold step / DuckDB query {step / baseline_query:.2f}x, "
        f"Gold wall / DuckDB wall {result.wall_seconds / baseline_wall:.2f}x"
    )


# --- 2. gold_dedup_job over many hours ----------------------------------------------------------------


@dataclass
class Injected:
    """What was planted in Gold, so the job's result can be checked row for row."""

    rows: int = 0
    # message_ids of the replays (new ids): the job must remove exactly these rows
    replay_ids: list[str] = field(default_factory=list)
    # message_ids copied one hour later: the later copy must go, the first stays
    late_copy_ids: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return len(self.replay_ids) + len(self.late_copy_ids)


def replays(rows: pa.Table, rng: np.random.Generator, count: int) -> pa.Table:
    """Trades of `rows` received again and given a new message_id: same trade, later receive time."""
    copies = rows.take(pa.array(rng.choice(rows.num_rows, size=count, replace=False)))
    copies = copies.set_column(0, "message_id", uuid_strings(rng, count))
    later = pc.add(copies["ingestion_timestamp"], 1_000_000)
    return copies.set_column(
        copies.schema.get_field_index("ingestion_timestamp"), "ingestion_timestamp", later
    )


def late_copies(previous: pa.Table, rng: np.random.Generator, count: int) -> pa.Table:
    """Rows of the previous hour again, same message_id, their trade time one hour later, received later."""
    copies = previous.take(pa.array(rng.choice(previous.num_rows, size=count, replace=False)))
    for name, shift in (("timestamp", MICROS_PER_HOUR), ("ingestion_timestamp", MICROS_PER_HOUR + 1_000_000)):
        column = copies.schema.get_field_index(name)
        copies = copies.set_column(column, name, pc.add(copies[name], shift))
    dates = timestamps(copies["timestamp"].to_numpy()).cast(pa.date32())
    return copies.set_column(copies.schema.get_field_index("exchange_date"), "exchange_date", dates)


def gold_hour_rows(silver: pa.Table, now: datetime) -> pa.Table:
    """Silver-shaped rows as Gold rows, through the asset's own conversion."""
    from k2_assets.gold.assets import to_gold

    return pa.Table.from_batches([to_gold(b, now) for b in silver.to_batches()])


def land_gold_day(
    hours: list[datetime], per_hour: int, dup_rate: float, seed: int = 2, file_rows: int | None = None
) -> Injected:
    """Write each hour of Gold in one atomic commit (data files of `file_rows` rows, the IO manager's
    default if None), planting duplicates; returns what was planted."""
    from k2_assets.gold.tables import GOLD_TABLE_SPEC
    from k2_resources.iceberg import IcebergCatalogResource
    from k2_resources.io_manager import DEFAULT_CHUNK_ROWS, RowScope, replace_rows

    rng, gold = np.random.default_rng(seed), IcebergCatalogResource().ensure_table(GOLD_TABLE_SPEC)
    injected, previous, now = Injected(), None, datetime.now(UTC)
    duplicates = round(per_hour * dup_rate)
    for index, hour in enumerate(hours):
        base = silver_rows(
            VENUES[0], rng, np.arange(index * per_hour, index * per_hour + per_hour - duplicates), hour, hour
        )
        late = duplicates // 5 if previous is not None else 0
        parts = [base, replays(base, rng, duplicates - late)]
        injected.replay_ids += parts[1]["message_id"].to_pylist()
        if late:
            parts.append(late_copies(previous, rng, late))
            injected.late_copy_ids += parts[2]["message_id"].to_pylist()
        rows = gold_hour_rows(pa.concat_tables(parts), now)
        injected.rows += rows.num_rows
        scope = RowScope(hour, hour + timedelta(hours=1))
        replace_rows(
            gold, GOLD_TABLE_SPEC, rows, scope, {"k2.bench": "bench_gold"}, file_rows or DEFAULT_CHUNK_ROWS
        )
        previous = base
    return injected


def verify_dedup(injected: Injected, result: ChildResult) -> int:
    """Gold rows after the job, once Gold and the audit match exactly what was planted."""
    import duckdb

    from k2_assets.gold.tables import DEDUP_AUDIT_TABLE_SPEC, GOLD_TABLE_SPEC
    from k2_resources.iceberg import IcebergCatalogResource

    summary = result.summary()
    if not summary["success"]:
        raise RuntimeError("gold_dedup_job failed:\n" + "\n".join(summary["errors"]))
    catalog = IcebergCatalogResource()
    audit = (
        catalog.load_table(DEDUP_AUDIT_TABLE_SPEC).scan(selected_fields=("message_id", "reason")).to_arrow()
    )
    by_reason = {
        reason: sorted(audit.filter(pc.equal(audit["reason"], reason))["message_id"].to_pylist())
        for reason in ("DUPLICATE_TRADE_KEY", "DUPLICATE_MESSAGE_ID")
    }
    files = [
        t.file.file_path.removeprefix("file://")
        for t in catalog.load_table(GOLD_TABLE_SPEC).scan().plan_files()
    ]
    rows, ids, trades = duckdb.sql(
        "SELECT count(*), count(DISTINCT message_id), count(DISTINCT (exchange, symbol, trade_id)) "
        f"FROM read_parquet({files!r})"
    ).fetchone()
    expected_rows = injected.rows - injected.duplicates
    problems = {
        "audited replays": by_reason["DUPLICATE_TRADE_KEY"] != sorted(injected.replay_ids),
        "audited late copies": by_reason["DUPLICATE_MESSAGE_ID"] != sorted(injected.late_copy_ids),
        f"Gold rows {rows} != {expected_rows}": rows != expected_rows,
        "a message_id or a trade twice": not rows == ids == trades,
    }
    if any(problems.values()):
        raise RuntimeError(f"gold_dedup_job result is wrong: {[k for k, v in problems.items() if v]}")
    return rows


def land_or_load(landed: Path, hours: int, per_hour: int, dup_rate: float) -> tuple[list[datetime], Injected]:
    """The event hours and planted duplicates of the Gold day in K2_HOME `landed`: landed now (and
    recorded in `landed.json`) unless an earlier run left them there with the same shape."""
    record = landed / "landed.json"
    shape = {"hours": hours, "per_hour": per_hour, "dup_rate": dup_rate}
    if record.exists() and (saved := json.loads(record.read_text()))["shape"] == shape:
        injected = Injected(saved["rows"], saved["replay_ids"], saved["late_copy_ids"])
        print(f"\n[2] reusing the Gold day landed in {landed} at {saved['landed_at']}")
        return [datetime.fromisoformat(h) for h in saved["window"]], injected
    current = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    window = [current - timedelta(hours=h) for h in range(hours - 1, -1, -1)]
    started = time.perf_counter()
    injected = land_gold_day(window, per_hour, dup_rate)
    print(f"\n[2] landed in {time.perf_counter() - started:.0f} s")
    saved = {
        "shape": shape,
        "landed_at": datetime.now(UTC).isoformat(),
        "window": [h.isoformat() for h in window],
        "rows": injected.rows,
        "replay_ids": injected.replay_ids,
        "late_copy_ids": injected.late_copy_ids,
    }
    record.write_text(json.dumps(saved))
    return window, injected


def restored(landed: Path) -> Path:
    """`landed` as it was right after landing, for one job run.

    The catalog stores absolute file paths, so every run works in `landed` itself; the untouched
    state waits in `<landed>.pristine` (data files hard-linked: Iceberg never rewrites a file in
    place, it writes new ones and unlinks old ones; the SQLite catalog copied) and is put back
    before each run, so a run that died half-way leaves nothing behind for the next.
    """
    pristine = landed.with_name(landed.name + ".pristine")
    if pristine.exists():
        shutil.rmtree(landed)
        shutil.copytree(pristine, landed, copy_function=link_or_copy)
    else:
        shutil.copytree(landed, pristine, copy_function=link_or_copy)
    return landed


def link_or_copy(source: str, target: str) -> None:
    """Data files are hard-linked (never modified in place); the catalog and anything else copied."""
    if source.endswith(".parquet"):
        os.link(source, target)
    else:
        shutil.copy2(source, target)


def run_dedup_job(home: Path, window: list[datetime], code: Path | None) -> ChildResult:
    """gold_dedup_job in a child over K2_HOME `home`, with this checkout's code or the one at `code`."""
    current = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    # The window ends with the running hour: reach back to the first landed hour, plus one spare
    # hour in case the running hour turns while the job starts.
    lookback = int((current - window[0]) / timedelta(hours=1)) + 2
    config = {"ops": {"find_gold_duplicates": {"config": {"lookback_hours": lookback}}}}
    args = dagster_child_args(job="gold_dedup_job", run_config=config)
    env = k2_child_env(home)
    if code is not None:  # that checkout's bench/_common.py and k2 packages, not this one's
        args[1:3] = [str(code / "bench" / "_common.py")]
        env["PYTHONPATH"] = str(code)
    return run_child(args, env, CHILD_TIMEOUT_SECONDS)


def report_dedup_run(label: str, injected: Injected, result: ChildResult) -> None:
    remaining = verify_dedup(injected, result)
    print(
        f"    {label}: gold_dedup_job (audit + rewrite of every affected hour), verified: rows in "
        f"{injected.rows:,}, rows out {remaining:,}, duplicates removed {injected.rows - remaining:,} "
        "(= planted, each audited once)\n"
        f"    wall {result.wall_seconds:.1f} s, CPU {result.cpu_seconds:.1f} s, "
        f"peak RSS {result.peak_rss_mb:,.0f} MB, load {os.getloadavg()[0]:.2f}\n"
        f"    {steps(result)}"
    )


def bench_dedup_job(
    home: Path,
    hours: int,
    per_hour: int,
    dup_rate: float,
    baseline_code: Path | None = None,
) -> None:
    """The job over the Gold day in `home` (landed unless already there), between two runs of the job
    at `baseline_code` on the same rows when given (same run, each on the same pristine copy)."""
    window, injected = land_or_load(home, hours, per_hour, dup_rate)
    print(
        f"    gold_dedup_job over {hours} event hours x {per_hour:,} Gold rows = {injected.rows:,} rows "
        f"({injected.duplicates:,} duplicates: {len(injected.replay_ids):,} replays under a new message_id, "
        f"{len(injected.late_copy_ids):,} same message_id an hour later)"
    )
    # The baseline runs before and after, so neither side has the warmer page cache or the quieter minute.
    baseline = [("baseline " + str(baseline_code), baseline_code)] if baseline_code else []
    for label, code in [*baseline, ("this checkout", None), *baseline]:
        result = run_dedup_job(restored(home), window, code)
        report_dedup_run(label, injected, result)


@contextmanager
def fresh_home(kept: Path | None = None) -> Iterator[Path]:
    """A K2_HOME (catalog + warehouse) of its own: the two measurements must not see each other's rows.
    `kept` is one that stays after the run (created if missing), else a temporary one."""
    with contextlib.ExitStack() as stack:
        if kept is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="k2-bench-gold-")))
        else:
            home = kept.resolve()
            home.mkdir(parents=True, exist_ok=True)
        os.environ["K2_HOME"] = str(home)
        try:
            yield home
        finally:
            del os.environ["K2_HOME"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=10_000_000, help="Silver rows in the one Gold hour")
    parser.add_argument("--hours", type=int, default=24, help="event hours of Gold for gold_dedup_job")
    parser.add_argument(
        "--trades-per-hour", type=int, default=1_000_000, help="Gold rows per hour for gold_dedup_job"
    )
    parser.add_argument("--dup-rate", type=float, default=0.01, help="share of rows that are duplicates")
    parser.add_argument("--only", choices=("hour", "dedup"), help="run one of the two measurements")
    parser.add_argument(
        "--landed",
        type=Path,
        help="K2_HOME for the dedup job's Gold day: landed there once, reused by later runs of the same shape",
    )
    parser.add_argument(
        "--baseline-code",
        type=Path,
        help="a checkout (e.g. `git archive` of main) whose gold_dedup_job runs first on the same rows",
    )
    parser.add_argument("--duckdb-alone", help=argparse.SUPPRESS)  # the baseline's child side
    args = parser.parse_args()
    if args.duckdb_alone:
        duckdb_alone(json.loads(args.duckdb_alone))
        return
    print(f"bench_gold on {os.cpu_count()} cores, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    if args.only in (None, "hour"):
        with fresh_home() as home:
            bench_gold_hour(home, args.trades, args.dup_rate)
    if args.only in (None, "dedup"):
        with fresh_home(args.landed) as home:
            bench_dedup_job(home, args.hours, args.trades_per_hour, args.dup_rate, args.baseline_code)


if __name__ == "__main__":
    main()
