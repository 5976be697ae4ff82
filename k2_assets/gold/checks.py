"""Gold checks: no message_id twice in a partition (blocking), and Gold = distinct valid Silver trades.

The predecessor never verified a Gold row. Both checks here re-read the tables after the write, in
bounded memory (DuckDB counts distinct message_ids out of core), rather than trusting the counts of the
computation that wrote them.
"""

from __future__ import annotations

import dagster as dg

from k2_assets.gold.dedup import DuckDBConfig, connect, register_stream
from k2_resources.io_manager import IcebergStream

NO_DUPLICATES = "no_duplicate_message_id"
MATCHES_SILVER = "rows_equal_distinct_silver_trades"


def gold_check_specs(gold_key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            NO_DUPLICATES,
            asset=gold_key,
            blocking=True,
            description="No message_id appears twice in the partition.",
        ),
        dg.AssetCheckSpec(
            MATCHES_SILVER,
            asset=gold_key,
            description="Gold rows = distinct message_ids among the Silver trades of the event hour, less dedup-job removals.",
        ),
    ]


def no_duplicates_result(
    gold_key: dg.AssetKey, gold: IcebergStream, engine: DuckDBConfig
) -> dg.AssetCheckResult:
    gold.columns = ("message_id",)
    with connect(engine) as con:
        register_stream(con, "gold", gold)
        rows, distinct = con.execute("SELECT count(*), count(DISTINCT message_id) FROM gold").fetchone()
    duplicates = rows - distinct  # the rows a dedup by message_id would remove
    return dg.AssetCheckResult(
        check_name=NO_DUPLICATES,
        asset_key=gold_key,
        passed=duplicates == 0,
        metadata={"duplicate_rows": duplicates, "rows": rows, "snapshot_id": str(gold.snapshot_id)},
    )


def matches_silver_result(gold_key: dg.AssetKey, gold_rows: int, expected: int) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=MATCHES_SILVER,
        asset_key=gold_key,
        passed=gold_rows == expected,
        metadata={
            "gold_rows": gold_rows,
            "distinct_silver_trades": expected,
            "difference": gold_rows - expected,
        },
    )
