"""Gold on Spark (K2_ENGINE=spark): the hourly union + dedup and the two-stage dedup job as Spark jobs.

The same rules as the embedded engine (k2_assets/gold/assets.py and jobs.py), expressed as Spark
window functions instead of DuckDB over hash buckets: Spark's shuffle partitions the rows by the dedup
key and spills to disk, which is what the embedded engine's buckets do by hand, so memory per
executor stays bounded whatever the hour's size.

- The hourly asset reads the Silver tables of every exchange at the snapshots the driver pinned
  (`SilverTrades`, so `silver_read_at` means what the late-data sensor expects), drops the rows the
  dedup job removed (`gold_dedup_audit`, by message_id and event hour), keeps per message_id the
  first-ingested copy (ordered by Bronze ingestion time, topic, partition, offset), and writes the
  window as one overwrite-by-filter commit.
- The dedup job's stage 1 finds the copies to remove by message_id and by natural key, audits the new
  ones, and lists the hours still holding an audited row; stage 2 rewrites each such hour without
  them, one commit per hour. The audit remains the plan, as in the embedded job.

The checks are the embedded engine's own, evaluated on what was committed.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
from py4j.protocol import Py4JError
from pyspark.errors import PySparkException

from k2_assets.gold.assets import GOLD_KEY, LINEAGE_COLUMNS, SILVER_READ_AT, SilverTrades
from k2_assets.gold.checks import matches_silver_result, no_duplicates_result
from k2_assets.gold.dedup import DuckDBConfig
from k2_assets.gold.jobs import (
    AUDIT_KEY,
    KEY_COLUMNS,
    RULES,
    GoldDedupConfig,
    lookback_window,
    report_rewritten_hour,
)
from k2_assets.gold.tables import DEDUP_AUDIT_TABLE_SPEC, GOLD_TABLE_SPEC
from k2_assets.partitions import HOUR_KEY_FORMAT, MICROS_PER_HOUR, hour_window, to_micros
from k2_assets.silver.spark_engine import partition_label, spark_where
from k2_assets.silver.tables import silver_table_spec
from k2_resources.crashpoints import crash_point
from k2_resources.engine import (
    ENGINE_METADATA,
    SPARK,
    CommittedWrite,
    EngineResource,
    is_write_conflict,
    read_snapshot,
    replace_scope,
    spark_failures,
    spark_table,
)
from k2_resources.exchanges import EXCHANGES
from k2_resources.iceberg import IcebergCatalogResource, TableSpec
from k2_resources.io_manager import MAX_RECOMPUTES, RowScope, WriteReport, read_scope, write_metadata
from k2_resources.trade_schema import V2_FIELD_NAMES

HOUR = "k2_event_hour"  # event hours since the epoch: with message_id, it names one Gold row
HOUR_KEY_PATTERN = "yyyy-MM-dd-HH:00"  # HOUR_KEY_FORMAT in Spark's datetime pattern language
assert datetime(2026, 1, 2, 3).strftime(HOUR_KEY_FORMAT) == "2026-01-02-03:00"  # the pattern's counterpart


def with_hour(frame: Any) -> Any:
    from pyspark.sql import functions as F

    return frame.withColumn(HOUR, F.expr(f"timestamp div {MICROS_PER_HOUR}"))


def hour_key(column: Any) -> Any:
    """The Dagster hour partition key of an epoch-µs column."""
    from pyspark.sql import functions as F

    return F.date_format(F.timestamp_micros(column), HOUR_KEY_PATTERN)


def in_event_window(frame: Any, start: datetime, end: datetime) -> Any:
    """`event_time_filter` in Spark: exchange_date bounds to prune day partitions, then the trade time."""
    from pyspark.sql import functions as F

    last_day = (end - timedelta(microseconds=1)).date()
    return frame.where(
        (F.col("exchange_date") >= F.lit(start.date()))
        & (F.col("exchange_date") <= F.lit(last_day))
        & (F.col("timestamp") >= F.lit(to_micros(start)))
        & (F.col("timestamp") < F.lit(to_micros(end)))
    )


def current(spark: Any, catalog: str, iceberg: IcebergCatalogResource, spec: TableSpec) -> Any:
    """The table at its current snapshot (pinned now, so later commits do not change what is read)."""
    table = iceberg.ensure_table(spec)
    snapshot = table.current_snapshot()
    if snapshot is None:
        return spark.table(spark_table(catalog, spec)).limit(0)
    return read_snapshot(spark, catalog, spec, snapshot.snapshot_id)


def columns(spark: Any, catalog: str, iceberg: IcebergCatalogResource, spec: TableSpec) -> list[str]:
    """The table's column names as Spark sees them, creating the table first if it does not exist."""
    iceberg.ensure_table(spec)
    return spark.table(spark_table(catalog, spec)).schema.names


def audited_keys(
    spark: Any, catalog: str, iceberg: IcebergCatalogResource, start: datetime, end: datetime
) -> Any:
    """(message_id, event hour) of every Gold row the dedup job removed in the window."""
    audit = in_event_window(current(spark, catalog, iceberg, DEDUP_AUDIT_TABLE_SPEC), start, end)
    return with_hour(audit).select("message_id", HOUR).distinct()


# --- The hourly asset ---------------------------------------------------------------------------------


def silver_union(spark: Any, catalog: str, silver: SilverTrades) -> Any:
    """The window's Silver rows of every exchange, at the snapshots `silver` pinned."""
    frames = []
    for exchange in EXCHANGES:
        spec = silver_table_spec(exchange)
        snapshot_id = silver.snapshots.get(spec.name)
        frame = read_snapshot(spark, catalog, spec, snapshot_id)
        if frame is None:
            frame = spark.table(spark_table(catalog, spec)).limit(0)
        frames.append(
            in_event_window(frame, silver.start, silver.end).select(*V2_FIELD_NAMES, *LINEAGE_COLUMNS)
        )
    return functools.reduce(lambda a, b: a.unionByName(b), frames)


def gold_columns(frame: Any, names: list[str], now: datetime) -> Any:
    """Silver columns -> Gold's, in the table's order (`to_gold` of the embedded engine)."""
    from pyspark.sql import functions as F

    days = F.expr(f"{HOUR} div 24")
    derived = {
        "gold_ingestion_timestamp": F.lit(now),
        "exchange_date": F.date_add(F.lit("1970-01-01").cast("date"), days.cast("int")),
        "exchange_hour": (F.col(HOUR) - days * 24).cast("int"),
    }
    return frame.select([derived[n].alias(n) if n in derived else F.col(n) for n in names])


@dataclass(frozen=True)
class GoldInputs:
    """What one computation of a Gold window reads: Silver pinned, and Gold's snapshot pinned before it.

    A Gold commit after `gold_snapshot_id` means another run wrote the window, possibly from a newer
    Silver than `silver`: this computation's commit must then fail and be recomputed (Gold is pinned
    first, so a run that read a newer Silver always committed after the pin).
    """

    silver: SilverTrades
    gold_snapshot_id: int | None

    @classmethod
    def pin(cls, iceberg: IcebergCatalogResource, start: datetime, end: datetime) -> GoldInputs:
        gold = iceberg.ensure_table(GOLD_TABLE_SPEC).current_snapshot()
        return cls(SilverTrades(iceberg, start, end), gold.snapshot_id if gold is not None else None)


@dataclass(frozen=True)
class GoldWrite:
    """A committed Gold window: the commit, the counts it was computed with, what it read, and how
    many computations it took (more than one when a concurrent write of the window won)."""

    report: WriteReport
    stats: Any  # Row(silver_rows, removed, distinct_trades)
    inputs: GoldInputs
    computations: int


def gold_frame(
    spark: Any, catalog: str, iceberg: IcebergCatalogResource, silver: SilverTrades
) -> tuple[Any, Any]:
    """(Gold rows of the window, their counts): Silver's union without audited rows, first copy per id."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    removed = audited_keys(spark, catalog, iceberg, silver.start, silver.end).withColumn(
        "k2_removed", F.lit(1)
    )
    flagged = with_hour(silver_union(spark, catalog, silver)).join(removed, ["message_id", HOUR], "left")
    kept_rows = F.col("k2_removed").isNull()
    (stats,) = flagged.agg(
        F.count(F.lit(1)).alias("silver_rows"),
        F.count("k2_removed").alias("removed"),
        F.countDistinct(F.when(kept_rows, F.col("message_id"))).alias("distinct_trades"),
    ).collect()
    first = Window.partitionBy("message_id").orderBy(*LINEAGE_COLUMNS)
    survivors = flagged.where(kept_rows).withColumn("k2_rank", F.row_number().over(first))
    names = columns(spark, catalog, iceberg, GOLD_TABLE_SPEC)
    return gold_columns(survivors.where(F.col("k2_rank") == 1), names, datetime.now(UTC)), stats


def write_gold_window(
    engine: EngineResource,
    iceberg: IcebergCatalogResource,
    scope: RowScope,
    properties: dict[str, str],
    inputs: GoldInputs | None = None,
) -> GoldWrite:
    """Compute the window `scope` from `inputs` (pinned now by default) and commit it; a commit that
    meets a concurrent write of the window recomputes from the tables' current state, as the embedded
    engine's `replace_rows` does, at most MAX_RECOMPUTES times."""
    assert scope.start is not None and scope.end is not None
    spark, catalog = engine.session, engine.catalog_name
    inputs = inputs or GoldInputs.pin(iceberg, scope.start, scope.end)
    for computation in itertools.count(1):
        gold, stats = gold_frame(spark, catalog, iceberg, inputs.silver)
        try:
            report = replace_scope(
                gold,
                catalog,
                GOLD_TABLE_SPEC,
                scope,
                properties,
                iceberg,
                validate_from=inputs.gold_snapshot_id,
            )
            return GoldWrite(report, stats, inputs, computation)
        except (PySparkException, Py4JError) as err:
            if not is_write_conflict(err) or computation > MAX_RECOMPUTES:
                raise
            dg.get_dagster_logger().warning(
                f"Gold {scope.describe()} met a concurrent write on Spark; recomputing (attempt {computation + 1})"
            )
            inputs = GoldInputs.pin(iceberg, scope.start, scope.end)
    raise AssertionError("unreachable")


def gold_on_spark(
    context: dg.AssetExecutionContext,
    config: DuckDBConfig,
    engine: EngineResource,
    iceberg: IcebergCatalogResource,
) -> Iterator[Any]:
    """`gold_crypto_trades`'s events (output, checks) with the window computed and written by Spark."""
    window = context.partition_time_window
    scope = RowScope(window.start, window.end)
    label = partition_label(context)
    properties = {
        "dagster.run-id": context.run_id,
        "dagster.asset-key": GOLD_KEY.to_user_string(),
        "dagster.partition-key": label,
    }
    with spark_failures(f"Gold {label}"):
        written = write_gold_window(engine, iceberg, scope, properties)
    report, stats, silver = written.report, written.stats, written.inputs.silver
    after_audit = stats.silver_rows - stats.removed
    metadata = {
        **write_metadata(report, GOLD_TABLE_SPEC, scope, None),
        "silver_rows_in_window": stats.silver_rows,
        "exact_duplicates_dropped": after_audit - report.rows,
        "removed_by_dedup_job": stats.removed,
        "silver_snapshots": dg.MetadataValue.json({k: str(v) for k, v in silver.snapshots.items()}),
        SILVER_READ_AT: dg.MetadataValue.timestamp(silver.read_at),
        ENGINE_METADATA: SPARK,
        "spark_master": spark_where(engine),
    }
    yield dg.Output(CommittedWrite(metadata))
    committed = read_scope(iceberg.load_table(GOLD_TABLE_SPEC), GOLD_TABLE_SPEC, scope)
    yield no_duplicates_result(GOLD_KEY, committed, config)  # the embedded check, on DuckDB
    yield matches_silver_result(GOLD_KEY, committed.count(), stats.distinct_trades)


# --- The dedup job ------------------------------------------------------------------------------------


def detect(spark: Any, catalog: str, iceberg: IcebergCatalogResource, start: datetime, end: datetime) -> Any:
    """Every Gold row to remove in the window, once (under the first rule that finds it), with its
    reason and the message_id kept: the embedded `detect`."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    gold = with_hour(
        in_event_window(current(spark, catalog, iceberg, GOLD_TABLE_SPEC), start, end).select(*KEY_COLUMNS)
    )
    found = []
    for index, (reason, plan) in enumerate(RULES):
        window = Window.partitionBy(*plan.key).orderBy(*plan.order)
        # Only keys that repeat are windowed: duplicates are rare, so the sort sees a few rows.
        repeated = gold.groupBy(*plan.key).count().where(F.col("count") > 1).drop("count")
        ranked = gold.join(repeated, list(plan.key), "left_semi").withColumn(
            "k2_rank", F.row_number().over(window)
        )
        ranked = ranked.withColumn("kept_message_id", F.first("message_id").over(window))
        losers = ranked.where(F.col("k2_rank") > 1).drop("k2_rank")
        found.append(losers.withColumn("reason", F.lit(reason)).withColumn("k2_rule", F.lit(index)))
    both = found[0].unionByName(found[1])
    once = Window.partitionBy("message_id", HOUR).orderBy("k2_rule")
    return (
        both.withColumn("k2_rank", F.row_number().over(once))
        .where(F.col("k2_rank") == 1)
        .drop("k2_rank", "k2_rule")
    )


def audit_frame(new: Any, names: list[str], run_id: str, now: datetime) -> Any:
    from pyspark.sql import functions as F

    stamped = {"dedup_run_id": F.lit(run_id), "detected_at": F.lit(now)}
    return new.select([stamped[n].alias(n) if n in stamped else F.col(n) for n in names])


def find_duplicates_on_spark(
    context: dg.OpExecutionContext,
    config: GoldDedupConfig,
    iceberg: IcebergCatalogResource,
    engine: EngineResource,
) -> list:
    """Stage 1 of gold_dedup_job on Spark; the same log, metadata, audit rows and hours as embedded."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    now = datetime.now(UTC)
    start, end = lookback_window(config.lookback_hours, now)
    with spark_failures("gold_dedup_job stage 1"):
        spark, catalog = engine.session, engine.catalog_name
        found = detect(spark, catalog, iceberg, start, end).persist(StorageLevel.DISK_ONLY)
        try:
            new = found.join(
                audited_keys(spark, catalog, iceberg, start, end), ["message_id", HOUR], "left_anti"
            )
            groups = new.groupBy(hour_key(F.col("timestamp")).alias("hour"), "reason").count().collect()
            report = {
                f"{r.hour} {r.reason}": r["count"] for r in sorted(groups, key=lambda r: (r.hour, r.reason))
            }
            found_rows, new_rows = found.count(), sum(report.values())
            context.log.info(
                f"Duplicates found in [{start}, {end}): {found_rows} ({new_rows} not yet audited): {report}"
            )
            if config.dry_run:
                context.add_output_metadata(
                    {
                        "dry_run": True,
                        "found": found_rows,
                        "would_audit": new_rows,
                        "by_hour": dg.MetadataValue.json(report),
                        ENGINE_METADATA: SPARK,
                    }
                )
                return []
            if new_rows:
                names = columns(spark, catalog, iceberg, DEDUP_AUDIT_TABLE_SPEC)
                writer = audit_frame(new, names, context.run_id, now).writeTo(
                    spark_table(catalog, DEDUP_AUDIT_TABLE_SPEC)
                )
                writer.option("snapshot-property.dagster.run-id", context.run_id).option(
                    "snapshot-property.k2.engine", SPARK
                ).append()
                context.log_event(
                    dg.AssetMaterialization(
                        asset_key=AUDIT_KEY,
                        metadata={
                            "rows_added": new_rows,
                            "by_hour": dg.MetadataValue.json(report),
                            ENGINE_METADATA: SPARK,
                        },
                    )
                )
        finally:
            found.unpersist()
        hours = pending_hours(spark, catalog, iceberg, start, end)
    context.add_output_metadata(
        {
            "found": found_rows,
            "audited": new_rows,
            "hours_to_rewrite": dg.MetadataValue.json(hours),
            ENGINE_METADATA: SPARK,
        }
    )
    crash_point("gold.between_dedup_stages")
    return hours


def pending_hours(
    spark: Any, catalog: str, iceberg: IcebergCatalogResource, start: datetime, end: datetime
) -> list[str]:
    """Hours where a row the audit says to remove is still in Gold."""
    from pyspark.sql import functions as F

    audit = audited_keys(spark, catalog, iceberg, start, end)
    gold = with_hour(current(spark, catalog, iceberg, GOLD_TABLE_SPEC)).select(
        "message_id", HOUR, "timestamp"
    )
    still = gold.join(audit, ["message_id", HOUR], "left_semi")
    return sorted(
        r.hour for r in still.select(hour_key(F.col("timestamp")).alias("hour")).distinct().collect()
    )


def remove_duplicates_on_spark(
    context: dg.OpExecutionContext, hours: list, iceberg: IcebergCatalogResource, engine: EngineResource
) -> None:
    """Stage 2 of gold_dedup_job on Spark: each hour rewritten without its audited rows, one commit each."""
    catalog = engine.catalog_name
    for hour in hours:
        start, end = hour_window(hour)
        scope = RowScope(start, end)
        with spark_failures(f"gold_dedup_job stage 2, hour {hour}"):
            spark = engine.session
            rows = with_hour(in_event_window(current(spark, catalog, iceberg, GOLD_TABLE_SPEC), start, end))
            before = rows.count()
            kept = rows.join(
                audited_keys(spark, catalog, iceberg, start, end), ["message_id", HOUR], "left_anti"
            )
            names = columns(spark, catalog, iceberg, GOLD_TABLE_SPEC)
            properties = {
                "dagster.run-id": context.run_id,
                "dagster.partition-key": hour,
                "k2.dedup": "stage-2",
            }
            report = replace_scope(kept.select(*names), catalog, GOLD_TABLE_SPEC, scope, properties, iceberg)
        report_rewritten_hour(
            context, hour, before, report.rows, report.snapshot_id, {ENGINE_METADATA: SPARK}
        )
