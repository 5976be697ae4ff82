"""`gold_dedup_job`: find duplicate trades in Gold, audit them, then rewrite only the affected hours.

Stage 1 reads the lookback window of Gold (key columns only) and finds every row that repeats an
earlier-ingested one, by message_id or by the natural key (exchange, symbol, trade_id) — the latter
catches a trade replayed under a new message_id. It appends what it will remove, with the reason and
the copy kept, to `gold_dedup_audit` (rows already audited are not added again). Stage 2 rewrites each
hour that still holds an audited row, one atomic commit per hour. The audit is the plan: a run that
dies between the stages leaves it behind, and the next run's stage 2 completes it, removing each row
once. `dry_run` stops after stage 1 and writes nothing.

Stage 1 runs on DuckDB, out of core under its memory limit, over one read of the window's key columns
(by field id, from the files PyIceberg plans): it groups 64-bit hashes of each rule's key, windows only
the rows whose hash repeats, and takes the hours to rewrite from the same table. Stage 2 streams each
hour through PyIceberg's reader and the IO manager's writer, two hours at a time.
"""

# No `from __future__ import annotations`: Dagster reads op parameter annotations at definition time.

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field
from pyiceberg.table import Table

from k2_assets.gold.assets import GOLD_KEY, event_time_filter, removal_keys, row_keys
from k2_assets.gold.dedup import (
    DedupPlan,
    DuckDBConfig,
    connect,
    later_copies_sql,
    possible_copies_sql,
    register_scans,
)
from k2_assets.gold.tables import DEDUP_AUDIT_TABLE_SPEC, GOLD_TABLE_SPEC
from k2_assets.partitions import (
    HOUR,
    MICROS_PER_HOUR,
    floor_hour,
    from_micros,
    hour_key,
    hour_window,
    to_micros,
)
from k2_resources.crashpoints import crash_point
from k2_resources.engine import EngineResource
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.io_manager import PreparedWrite, RowScope, read_scope, write_files

AUDIT_KEY = dg.AssetKey(DEDUP_AUDIT_TABLE_SPEC.name)
KEY_COLUMNS = (
    "message_id",
    "exchange",
    "symbol",
    "trade_id",
    "timestamp",
    "ingestion_timestamp",
    "exchange_date",
    "exchange_hour",
)
# Earliest ingested copy wins; message_id breaks ties so every run picks the same survivor.
RULES = (
    ("DUPLICATE_MESSAGE_ID", DedupPlan(key=["message_id"], order=["ingestion_timestamp", "timestamp"])),
    (
        "DUPLICATE_TRADE_KEY",
        DedupPlan(key=["exchange", "symbol", "trade_id"], order=["ingestion_timestamp", "message_id"]),
    ),
)

audit_asset = dg.AssetSpec(
    AUDIT_KEY,
    deps=[GOLD_KEY],
    group_name="gold",
    kinds={"iceberg"},
    description=DEDUP_AUDIT_TABLE_SPEC.description,
    metadata={"table": DEDUP_AUDIT_TABLE_SPEC.name},
)


class GoldDedupConfig(DuckDBConfig):
    """Which event hours the dedup job searches, and whether it changes anything."""

    lookback_hours: int = Field(24, gt=0, description="Event hours to search, ending with the running hour.")
    dry_run: bool = Field(False, description="Report what would be removed; change no table.")


# The hours stage 2 writes at once: stage 2 of 24 x 1M rows took 31.0 s on two, 53.5 s on one, at
# the same peak RSS (1,222 / 1,194 MB; tests/test_memory_gold.py 891-892 / 914 MB at 10N).
REWRITE_THREADS = 2


def hour_key_of_micros(micros: int) -> str:
    return hour_key(from_micros(micros))


def lookback_window(hours: int, now: datetime) -> tuple[datetime, datetime]:
    if hours <= 0:
        raise ValueError(f"lookback_hours must be positive, not {hours}")
    end = floor_hour(now) + HOUR
    return end - timedelta(hours=hours), end


@dataclass(frozen=True)
class Findings:
    """What stage 1 read from the window's Gold: the rows to remove, and the hours stage 2 rewrites."""

    found: pa.Table  # every Gold row to remove, once, with its reason and the message_id kept
    # hours holding a found row or a row the audit already names (an earlier run's unfinished stage 2)
    pending_hours: list[str]


def detect(
    iceberg: IcebergCatalogResource,
    start: datetime,
    end: datetime,
    engine: DuckDBConfig,
    already_audited: pa.Table,
) -> Findings:
    """The window's duplicates and the hours to rewrite, from one read of Gold's key columns.

    `already_audited` is the audit's removal keys before this run's audit: its rows still in Gold, with the
    found ones, make the pending hours (found rows lie in Gold's snapshot by definition). Reading the
    key columns a second time for that cost 3.6 s CPU over 24M rows.
    """
    gold = iceberg.ensure_table(GOLD_TABLE_SPEC)
    snapshot = gold.current_snapshot()
    if snapshot is None:
        return Findings(pa.table({}), [])
    scan = gold.scan(
        row_filter=event_time_filter(start, end),
        snapshot_id=snapshot.snapshot_id,
        selected_fields=KEY_COLUMNS,
    )
    with connect(engine) as con:
        window = f'"timestamp" >= {to_micros(start)} AND "timestamp" < {to_micros(end)}'
        register_scans(con, "stream", [scan], window, scan.projection().as_arrow())
        con.execute("CREATE TEMP TABLE gold AS SELECT * FROM stream")
        con.execute(
            f"CREATE TEMP TABLE candidates AS {possible_copies_sql('gold', [plan for _, plan in RULES])}"
        )
        found_sql = " UNION ALL ".join(
            later_copies_sql("candidates", plan, reason, rank) for rank, (reason, plan) in enumerate(RULES)
        )
        # A row found by both rules is audited once, under the first reason.
        found = con.execute(
            f"SELECT * EXCLUDE (reason_rank) FROM ({found_sql}) QUALIFY row_number() OVER "
            f"(PARTITION BY message_id, timestamp // {MICROS_PER_HOUR} ORDER BY reason_rank) = 1"
        ).to_arrow_table()
        hours = {t // MICROS_PER_HOUR for t in pc.unique(found["timestamp"]).to_pylist()}
        if already_audited.num_rows:
            con.register("removed", already_audited)
            hours |= {
                hour
                for (hour,) in con.execute(
                    f"SELECT DISTINCT timestamp // {MICROS_PER_HOUR} FROM gold g SEMI JOIN removed r "
                    f"ON g.message_id = r.message_id AND g.timestamp // {MICROS_PER_HOUR} = r.event_hour"
                ).fetchall()
            }
    return Findings(found, sorted(hour_key_of_micros(h * MICROS_PER_HOUR) for h in hours))


def audited(iceberg: IcebergCatalogResource, start: datetime, end: datetime) -> pa.Table:
    audit = iceberg.ensure_table(DEDUP_AUDIT_TABLE_SPEC)
    if audit.current_snapshot() is None:
        return audit.schema().as_arrow().empty_table()
    return audit.scan(row_filter=event_time_filter(start, end)).to_arrow()


def audit_rows(found: pa.Table, run_id: str, now: datetime) -> pa.Table:
    n = found.num_rows
    return pa.table(
        {
            "message_id": found["message_id"],
            "exchange": found["exchange"],
            "symbol": found["symbol"],
            "trade_id": found["trade_id"],
            "timestamp": found["timestamp"],
            "exchange_date": found["exchange_date"],
            "exchange_hour": found["exchange_hour"],
            "reason": found["reason"],
            "kept_message_id": found["kept_message_id"],
            "dedup_run_id": pa.array([run_id] * n, pa.string()),
            "detected_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        }
    )


@dg.op(out=dg.Out(list), description="Stage 1: find duplicates in the lookback window and audit them.")
def find_gold_duplicates(
    context: dg.OpExecutionContext,
    config: GoldDedupConfig,
    iceberg: IcebergCatalogResource,
    engine: EngineResource,
) -> list:
    # --- engine dispatch: K2_ENGINE=spark runs stage 1 on Spark (k2_assets/gold/spark_engine.py)
    if engine.on_spark:
        from k2_assets.gold.spark_engine import find_duplicates_on_spark

        return find_duplicates_on_spark(context, config, iceberg, engine)
    # --- end engine dispatch
    now = datetime.now(UTC)
    start, end = lookback_window(config.lookback_hours, now)
    already = audited(iceberg, start, end)
    findings = detect(iceberg, start, end, config, removal_keys(already))
    found = findings.found
    new = (
        found.filter(pc.invert(pc.is_in(row_keys(found), value_set=row_keys(already))))
        if found.num_rows
        else found
    )
    by_hour = (
        Counter(
            zip(
                (hour_key_of_micros(t) for t in new["timestamp"].to_pylist()),
                new["reason"].to_pylist(),
                strict=True,
            )
        )
        if new.num_rows
        else Counter()
    )
    report = {f"{hour} {reason}": count for (hour, reason), count in sorted(by_hour.items())}
    context.log.info(
        f"Duplicates found in [{start}, {end}): {found.num_rows} ({new.num_rows} not yet audited): {report}"
    )
    if config.dry_run:
        context.add_output_metadata(
            {
                "dry_run": True,
                "found": found.num_rows,
                "would_audit": new.num_rows,
                "by_hour": dg.MetadataValue.json(report),
            }
        )
        return []
    if new.num_rows:
        audit_table = iceberg.ensure_table(DEDUP_AUDIT_TABLE_SPEC)
        audit_table.append(
            audit_rows(new, context.run_id, now), snapshot_properties={"dagster.run-id": context.run_id}
        )
        context.log_event(
            dg.AssetMaterialization(
                asset_key=AUDIT_KEY,
                metadata={"rows_added": new.num_rows, "by_hour": dg.MetadataValue.json(report)},
            )
        )
    hours = findings.pending_hours
    context.add_output_metadata(
        {"found": found.num_rows, "audited": new.num_rows, "hours_to_rewrite": dg.MetadataValue.json(hours)}
    )
    crash_point("gold.between_dedup_stages")
    return hours


@dg.op(description="Stage 2: rewrite each affected hour without its audited rows, one commit per hour.")
def remove_gold_duplicates(
    context: dg.OpExecutionContext, hours: list, iceberg: IcebergCatalogResource, engine: EngineResource
) -> None:
    # --- engine dispatch: K2_ENGINE=spark runs stage 2 on Spark (k2_assets/gold/spark_engine.py)
    if engine.on_spark:
        from k2_assets.gold.spark_engine import remove_duplicates_on_spark

        return remove_duplicates_on_spark(context, hours, iceberg, engine)
    # --- end engine dispatch
    gold = iceberg.load_table(GOLD_TABLE_SPEC)
    # Each hour's files are written on one of REWRITE_THREADS threads (reading, filtering and Parquet
    # encoding release the GIL) and committed here, in order, one commit per hour.
    with ThreadPoolExecutor(REWRITE_THREADS, thread_name_prefix="gold-rewrite") as pool:
        pending = [(hour, pool.submit(rewrite_hour, iceberg, gold, hour)) for hour in hours]
        try:
            while pending:
                before, prepared = pending[0][1].result()
                hour = pending.pop(0)[0]
                properties = {
                    "dagster.run-id": context.run_id,
                    "dagster.partition-key": hour,
                    "k2.dedup": "stage-2",
                }
                report = prepared.commit(properties)
                report_rewritten_hour(context, hour, before, report.rows, report.snapshot_id)
        except BaseException:
            for _, future in pending:  # not committed: their files must not stay behind
                if not future.cancel() and future.exception() is None:
                    future.result()[1].files.discard()
            raise


def rewrite_hour(iceberg: IcebergCatalogResource, gold: Table, hour: str) -> tuple[int, PreparedWrite]:
    """The hour's Gold rows without its audited ones, written as (uncommitted) files; its rows before."""
    scope = RowScope(*hour_window(hour))
    # Within one hour a message_id names one Gold row (row_keys without the constant hour).
    remove = audited(iceberg, scope.start, scope.end)["message_id"]
    stream = read_scope(gold, GOLD_TABLE_SPEC, scope)
    kept = (b.filter(pc.invert(pc.is_in(b["message_id"], value_set=remove))) for b in stream.batches())
    prepared = write_files(gold, GOLD_TABLE_SPEC, kept, scope)
    # The rows read on the way, not `stream.count()`: that reads the hour's files a second time
    # (Gold's partitions are not its timestamp, so no file's count is known from metadata alone).
    return stream.rows_read, prepared


# One dedup at a time (dagster.yaml limits the tag to one run): two would append the same audit rows.
DEDUP_TAG = "k2/gold-dedup"
# Stage 1 over 24 hours of 10M trades was measured at about half an hour with the hand-written spill;
# twice that is a hung run.
DEDUP_MAX_RUNTIME_SECONDS = 2 * 3600


@dg.job(
    description="Two-stage Gold dedup: audit duplicates, then rewrite only the affected hours.",
    tags={DEDUP_TAG: "gold", "dagster/max_runtime": str(DEDUP_MAX_RUNTIME_SECONDS)},
)
def gold_dedup_job() -> None:
    remove_gold_duplicates(find_gold_duplicates())


def report_rewritten_hour(
    context: dg.OpExecutionContext,
    hour: str,
    rows_before: int,
    rows_after: int,
    snapshot_id: int,
    extra_metadata: dict[str, Any] | None = None,
) -> None:
    """Stage 2's materialisation of one rewritten Gold hour, whichever engine rewrote it."""
    context.log_event(
        dg.AssetMaterialization(
            asset_key=GOLD_KEY,
            partition=hour,
            metadata={
                "rows": rows_after,
                "removed_duplicates": rows_before - rows_after,
                "snapshot_id": str(snapshot_id),
                **(extra_metadata or {}),
            },
            description="gold_dedup_job stage 2",
        )
    )
    context.log.info(f"{hour}: removed {rows_before - rows_after} duplicate rows, {rows_after} remain")
