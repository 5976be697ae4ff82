"""gold_dedup_job's stage 1 windows only the rows whose key hash repeats: it must find exactly what
windowing every row finds, for both rules, on real DuckDB."""

import duckdb
import numpy as np
import pyarrow as pa

from k2_assets.gold.dedup import later_copies_sql, possible_copies_sql
from k2_assets.gold.jobs import RULES


def key_rows(rows: int, seed: int = 7) -> pa.Table:
    """Gold key columns with ~2 % replays (same trade, new message_id) and ~1 % same message_id again."""
    rng = np.random.default_rng(seed)
    trade_ids = np.arange(rows)
    message_ids = np.array([f"m{i}" for i in range(rows)], dtype=object)
    replayed = rng.choice(rows, rows // 50, replace=False)
    resent = rng.choice(rows, rows // 100, replace=False)
    trade_ids = np.concatenate([trade_ids, trade_ids[replayed], trade_ids[resent]])
    message_ids = np.concatenate(
        [message_ids, np.array([f"r{i}" for i in replayed], dtype=object), message_ids[resent]]
    )
    n = len(trade_ids)
    return pa.table(
        {
            "message_id": pa.array(message_ids, pa.string()),
            "exchange": pa.array(["binance"] * n),
            "symbol": pa.array(np.where(trade_ids % 2 == 0, "BTCUSDT", "ETHUSDT")),
            "trade_id": pa.array(trade_ids.astype(str)),
            "timestamp": pa.array(trade_ids * 1_000 + 1, pa.int64()),
            "ingestion_timestamp": pa.array(np.arange(n, dtype=np.int64)),
        }
    )


def found(con: duckdb.DuckDBPyConnection, relation: str) -> dict[str, list[tuple]]:
    return {
        reason: sorted(
            con.execute(
                f"SELECT message_id, kept_message_id FROM ({later_copies_sql(relation, plan, reason, rank)})"
            ).fetchall()
        )
        for rank, (reason, plan) in enumerate(RULES)
    }


def test_windowing_only_the_possible_copies_finds_what_windowing_every_row_finds() -> None:
    con = duckdb.connect()
    gold = key_rows(20_000)
    con.register("gold", gold)
    con.execute(f"CREATE TABLE candidates AS {possible_copies_sql('gold', [plan for _, plan in RULES])}")
    everything, candidates = found(con, "gold"), found(con, "candidates")
    assert len(everything["DUPLICATE_TRADE_KEY"]) == 20_000 // 50 + 20_000 // 100
    assert len(everything["DUPLICATE_MESSAGE_ID"]) == 20_000 // 100
    assert candidates == everything
    # Far fewer rows go through the windows than the relation holds.
    assert con.execute("SELECT count(*) FROM candidates").fetchone()[0] < gold.num_rows // 10
