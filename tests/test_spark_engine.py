"""K2_ENGINE=spark: Silver and Gold as Spark jobs (local[2]) launched as an operator launches them.

A real Schema Registry (served from this process), a real SQLite catalog, Bronze rows written as
ingestion writes them (valid trades, a late one, a redelivered one, unreadable values), and a real
`dagster-daemon` + `dagster-webserver`: `dagster job launch` submits one Silver hour, then a Gold
range backfill (a single run over two hours); both must run on Spark (the `engine` metadata and the
`k2.engine` snapshot summary say so) and leave the tables the pipeline's rules require. A Spark job
that fails (a Bronze data file gone) must fail the step at once with the driver's error.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pyiceberg.partitioning import PartitionSpec

from k2_assets.cli.instance import REPO_ROOT, prepare_dagster_home
from k2_assets.gold.tables import GOLD_TABLE_SPEC
from k2_assets.partitions import hour_key as key
from k2_assets.silver.tables import DLQ_TABLE_SPEC, silver_table_spec
from k2_resources.engine import ENGINE_SPARK_CONFIG, EngineResource
from k2_resources.exchanges import exchange
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.io_manager import RowScope
from k2_resources.settings import ENGINE
from k2_resources.spark import IcebergSparkResource
from tests.conftest import k2_env
from tests.lakehouse_helpers import Lakehouse, hour_of, lakehouse
from tests.test_ci_launch import DAGSTER_BIN, dagster_services, free_port, run_failure_text, wait_for_run

BINANCE = exchange("binance")
SPARK_ENV = {"K2_ENGINE": "spark", "K2_SPARK_MASTER": "local[2]", "K2_AUTOMATION": "off"}
RUN_TIMEOUT = 1500.0  # a run on Spark pays a JVM start and Iceberg's runtime; the machine is shared


def test_the_engine_setting_is_read_when_used_and_checked_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    catalog = IcebergCatalogResource(properties={"type": "sql", "uri": f"sqlite:///{tmp_path}/c.db"})
    engine = EngineResource.for_catalog(catalog)  # built once, as the code location builds it
    monkeypatch.delenv(ENGINE.name, raising=False)
    assert engine.choice == "embedded" and not engine.on_spark
    monkeypatch.setenv(ENGINE.name, "Spark")
    assert engine.choice == "spark" and engine.on_spark
    monkeypatch.setenv(ENGINE.name, "duckdb")
    with pytest.raises(ValueError, match=ENGINE.name):
        _ = engine.on_spark
    assert EngineResource(engine="spark", spark=engine.spark).on_spark  # run config wins over the setting


@dataclass
class BronzeHour:
    """What was written to Bronze for one ingestion hour of binance."""

    hour: datetime
    late_ids: list[str]  # trades of the hour before, ingested in this one
    on_time_ids: list[str]
    redelivered_id: str  # one on-time trade written twice (two offsets)
    unreadable: int


def write_bronze_hour(lake: Lakehouse, hour: datetime) -> BronzeHour:
    late = lake.ingest_trades(
        BINANCE, [hour - timedelta(minutes=20 - i) for i in range(10)], hour + timedelta(minutes=1)
    )
    traded = [hour + timedelta(minutes=2, seconds=i) for i in range(60)]
    records = [lake.trade(BINANCE, t) for t in traded]
    values = [(lake.framed(BINANCE, r), r["timestamp"]) for r in records]
    lake.ingest(BINANCE, values + [values[0]], hour + timedelta(minutes=5))  # values[0] redelivered
    lake.ingest(BINANCE, [(b"\x07not-avro", hour), (b"", hour)], hour + timedelta(minutes=6))
    return BronzeHour(hour, late, [r["message_id"] for r in records], records[0]["message_id"], 2)


@dataclass
class Deployment:
    home: Path
    env: dict[str, str]
    port: int
    bronze: BronzeHour


@pytest.fixture(scope="module")
def spark_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Bronze for one closed hour, and a webserver + daemon whose code location has K2_ENGINE=spark."""
    home = tmp_path_factory.mktemp("k2-spark-engine")
    with pytest.MonkeyPatch.context() as patch, lakehouse(home, patch) as lake:
        bronze = write_bronze_hour(lake, hour_of(datetime.now(UTC)) - timedelta(hours=3))
        patch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
        prepare_dagster_home(home)

        settings = {k: os.environ[k] for k in ("K2_SCHEMA_REGISTRY_URL", "K2_KAFKA_BOOTSTRAP_SERVERS")}
        env = k2_env(home, DAGSTER_HOME=str(home / "dagster_home"), **settings, **SPARK_ENV)
        with dagster_services(env, tmp_path_factory.mktemp("spark-engine-logs")) as services:
            yield Deployment(home, env, services.port, bronze)


def launch(deployment: Deployment, op: str, tags: dict[str, str]) -> str:
    """`dagster job launch` of the asset job's `op` for the partition(s) in `tags`; its run id."""
    run_id = str(uuid.uuid4())
    command = [
        str(DAGSTER_BIN / "dagster"),
        *("job", "launch", "-w", "workspace.yaml", "-j", "__ASSET_JOB", "-o", op),
        *("--tags", json.dumps(tags), "--run-id", run_id),
    ]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=deployment.env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return run_id


def materialisations(deployment: Deployment, run_id: str) -> dict[tuple[str, str | None], dict]:
    """(asset key, partition) -> metadata of every materialisation the run recorded."""
    with dg.DagsterInstance.from_config(str(deployment.home / "dagster_home")) as instance:
        records = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        found = {}
        for record in records:
            event = record.dagster_event.event_specific_data.materialization
            found[(event.asset_key.to_user_string(), event.partition)] = {
                k: getattr(v, "value", v) for k, v in event.metadata.items()
            }
        return found


def succeeded(deployment: Deployment, run_id: str) -> None:
    status = wait_for_run(deployment.port, run_id, timeout=RUN_TIMEOUT)
    assert status == "SUCCESS", run_failure_text(run_id)


def snapshot_summaries(catalog: IcebergCatalogResource, spec, run_id: str) -> list[dict[str, str]]:
    table = catalog.load_table(spec)
    summaries = [s.summary.additional_properties for s in table.snapshots() if s.summary]
    return [s for s in summaries if s.get("dagster.run-id") == run_id]


@pytest.mark.spark_e2e
@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_a_silver_hour_then_a_gold_range_backfill_run_on_spark_through_dagster_job_launch(
    spark_deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    bronze, hour = spark_deployment.bronze, spark_deployment.bronze.hour
    monkeypatch.setenv("K2_HOME", str(spark_deployment.home))
    catalog = IcebergCatalogResource()

    silver_run = launch(spark_deployment, "silver_binance", {"dagster/partition": key(hour)})
    succeeded(spark_deployment, silver_run)
    recorded = materialisations(spark_deployment, silver_run)
    silver_meta = recorded[("silver_binance_trades", key(hour))]
    dlq_meta = recorded[("silver_dlq_trades/binance", key(hour))]
    assert silver_meta["engine"] == dlq_meta["engine"] == "spark"
    valid = len(bronze.late_ids) + len(bronze.on_time_ids) + 1  # the redelivery is a valid Silver row
    assert silver_meta["rows"] == valid and dlq_meta["rows"] == bronze.unreadable
    assert silver_meta["event_hours"] == {key(hour - timedelta(hours=1)): 10, key(hour): 61}
    assert dlq_meta["dlq_bad_magic_byte"] == 1 and dlq_meta["dlq_empty_value"] == 1
    silver = catalog.load_table(silver_table_spec(BINANCE)).scan().to_arrow()
    assert silver.num_rows == valid
    dlq = catalog.load_table(DLQ_TABLE_SPEC).scan().to_arrow()
    assert sorted(dlq["error_category"].to_pylist()) == ["BAD_MAGIC_BYTE", "EMPTY_VALUE"]
    assert set(dlq["silver_partition"].to_pylist()) == {key(hour)}
    for spec in (silver_table_spec(BINANCE), DLQ_TABLE_SPEC):
        (summary,) = snapshot_summaries(catalog, spec, silver_run)  # one atomic overwrite per table
        assert summary["dagster.partition-key"] == key(hour) and summary["k2.engine"] == "spark"

    first, last = hour - timedelta(hours=1), hour
    gold_tags = {
        "dagster/asset_partition_range_start": key(first),
        "dagster/asset_partition_range_end": key(last),
    }
    gold_run = launch(spark_deployment, "gold_crypto_trades", gold_tags)
    succeeded(spark_deployment, gold_run)
    recorded = materialisations(spark_deployment, gold_run)
    assert {p for (k, p) in recorded if k == "gold_crypto_trades"} == {key(first), key(last)}
    gold_meta = recorded[("gold_crypto_trades", key(last))]
    assert gold_meta["engine"] == "spark" and gold_meta["exact_duplicates_dropped"] == 1
    gold = catalog.load_table(GOLD_TABLE_SPEC).scan().to_arrow()
    assert sorted(gold["message_id"].to_pylist()) == sorted(bronze.late_ids + bronze.on_time_ids)
    late = gold.filter(pc.is_in(gold["message_id"], value_set=pa.array(bronze.late_ids)))
    assert set(late["exchange_hour"].to_pylist()) == {first.hour}
    (summary,) = snapshot_summaries(catalog, GOLD_TABLE_SPEC, gold_run)  # one commit for the range
    assert json.loads(summary["dagster.partition-key"]) == [key(first), key(last)]
    checks = gold_check_evaluations(spark_deployment, gold_run)
    assert checks == {"no_duplicate_message_id": True, "rows_equal_distinct_silver_trades": True}

    # Re-running the Silver hour on Spark leaves the tables as one run did (idempotent).
    again = launch(spark_deployment, "silver_binance", {"dagster/partition": key(hour)})
    succeeded(spark_deployment, again)
    rerun = catalog.load_table(silver_table_spec(BINANCE)).scan().to_arrow()
    columns = ["topic", "partition", "offset", "message_id", "price", "quantity"]
    assert rerun.select(columns).sort_by("offset").equals(silver.select(columns).sort_by("offset"))
    assert catalog.load_table(DLQ_TABLE_SPEC).scan().to_arrow().num_rows == bronze.unreadable


def gold_check_evaluations(deployment: Deployment, run_id: str) -> dict[str, bool]:
    with dg.DagsterInstance.from_config(str(deployment.home / "dagster_home")) as instance:
        records = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        return {
            r.dagster_event.event_specific_data.check_name: r.dagster_event.event_specific_data.passed
            for r in records
        }


@pytest.mark.timeout(900)
def test_a_spark_that_cannot_run_fails_the_step_with_the_drivers_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster master nobody answers at: Spark gives up registering (its own bounded retries) and
    the step fails with Spark's error, instead of the run waiting for executors forever."""
    from k2_assets.resources import build_resources
    from k2_assets.silver.assets import silver_assets

    with lakehouse(tmp_path, monkeypatch) as lake:
        hour = hour_of(datetime.now(UTC)) - timedelta(hours=2)
        lake.ingest_trades(BINANCE, [hour + timedelta(minutes=1)] * 20, hour + timedelta(minutes=2))
        resources = build_resources()
        port = free_port()
        master = f"spark://127.0.0.1:{port}"
        spark = IcebergSparkResource(iceberg=resources["iceberg"], master=master, app_name="k2-test")
        resources["engine"] = EngineResource(engine="spark", spark=spark)
        silver = next(a for a in silver_assets if a.op.name == "silver_binance")
        started = time.monotonic()
        result = dg.materialize([silver], resources=resources, partition_key=key(hour), raise_on_error=False)
        elapsed = time.monotonic() - started
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    error = failure.step_failure_data.user_failure_data
    assert error is not None, failure.step_failure_data.error
    assert error.description.startswith(f"Silver of binance {key(hour)} failed on Spark"), error.description
    assert error.metadata["engine"].value == "spark"
    # The root cause (a refused connection, or the context Spark stopped when it gave up on the
    # master), not Py4J's wrapper line; the metadata holds the error chain without the JVM's frames.
    assert "An error occurred while calling" not in error.description, error.description
    assert "Exception" in error.description, error.description
    assert "\tat " not in error.metadata["spark_error"].value
    assert elapsed < 600, elapsed
    assert lake.iceberg.load_table(silver_table_spec(BINANCE)).current_snapshot() is None  # nothing written


@pytest.mark.timeout(900)
def test_a_gold_write_on_spark_that_meets_a_concurrent_one_recomputes_and_keeps_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the embedded engine (tests/test_gold_writes.py): a Gold hour whose commit meets another run's
    commit of the same hour, computed from a newer Silver, is recomputed, not failed nor committed stale."""
    from k2_assets.gold.assets import GoldStream
    from k2_assets.gold.spark_engine import GoldInputs, write_gold_window
    from k2_resources.io_manager import replace_rows
    from tests.test_gold_writes import GOLD_SCOPE, HOUR, add_silver_trades, gold_ids

    monkeypatch.setenv("K2_HOME", str(tmp_path))
    iceberg = IcebergCatalogResource()
    add_silver_trades(iceberg, ["a1", "a2"], HOUR + timedelta(minutes=31))
    spark = IcebergSparkResource(
        iceberg=iceberg, master="local[2]", app_name="k2-test", spark_config=ENGINE_SPARK_CONFIG
    )
    engine = EngineResource(engine="spark", spark=spark)
    ours = GoldInputs.pin(iceberg, GOLD_SCOPE.start, GOLD_SCOPE.end)  # this run reads Silver: a1, a2
    # Another run: a late trade lands in Silver and that run writes Gold 10:00 with it, before ours commits.
    add_silver_trades(iceberg, ["late"], HOUR + timedelta(hours=1, minutes=20))
    theirs = GoldStream(iceberg, GOLD_SCOPE.start, GOLD_SCOPE.end)
    replace_rows(iceberg.load_table(GOLD_TABLE_SPEC), GOLD_TABLE_SPEC, theirs, GOLD_SCOPE, {})
    try:
        written = write_gold_window(engine, iceberg, GOLD_SCOPE, {"dagster.run-id": "ours"}, ours)
        again = write_gold_window(engine, iceberg, GOLD_SCOPE, {"dagster.run-id": "again"})
    finally:
        spark.teardown_after_execution(dg.build_init_resource_context())
    assert written.computations == 2  # the first computation's commit lost to theirs
    assert written.report.rows == 3 and written.stats.silver_rows == 3
    assert written.inputs.gold_snapshot_id is not None  # recomputed from the Gold their run left
    assert again.computations == 1 and again.report.rows == 3  # no concurrent write, no recompute
    assert gold_ids(iceberg) == ["a1", "a2", "late"]  # not the stale ["a1", "a2"], and nothing twice


def test_local_spark_sizes_its_shuffles_by_its_cores_and_a_cluster_keeps_sparks_default(
    tmp_path: Path,
) -> None:
    """Spark's 200 shuffle partitions on local[2] are 200 tasks of a few rows each per shuffle."""
    catalog = IcebergCatalogResource(properties={"type": "sql", "uri": f"sqlite:///{tmp_path}/c.db"})

    def shuffles(**where: str) -> str | None:
        return (
            IcebergSparkResource(iceberg=catalog, **where).full_config().get("spark.sql.shuffle.partitions")
        )

    assert shuffles(master="local[2]") == "4" and shuffles(master="local") == "2"
    assert shuffles(master="local[*]") == str(2 * (os.cpu_count() or 1))
    assert shuffles(master="spark://spark-master:7077") is None  # Spark's default, coalesced by AQE
    connect = IcebergSparkResource(
        iceberg=catalog, remote="sc://spark-connect:15002", spark_config=ENGINE_SPARK_CONFIG
    )
    assert "spark.python.daemon.module" not in connect.full_config()  # the Connect server's setting


def compact(iceberg: IcebergCatalogResource, spec) -> None:
    """Rewrite the table as compaction leaves a closed day: one data file per day partition."""
    table = iceberg.load_table(spec)
    table.overwrite(table.scan().to_arrow())


def data_files(iceberg: IcebergCatalogResource, spec) -> int:
    return len(list(iceberg.load_table(spec).scan().plan_files()))


def rows_by_hour(iceberg: IcebergCatalogResource, spec) -> dict[str, list[tuple]]:
    rows = iceberg.load_table(spec).scan().to_arrow()
    found: dict[str, list[tuple]] = {}
    for moment, offset, value in zip(
        rows["bronze_ingestion_timestamp"].to_pylist(),
        rows["offset"].to_pylist(),
        rows["error_category" if "error_category" in rows.column_names else "message_id"].to_pylist(),
        strict=True,
    ):
        found.setdefault(key(hour_of(moment)), []).append((offset, value))
    return {hour: sorted(values) for hour, values in found.items()}


@pytest.mark.timeout(900)
def test_a_silver_hour_compacted_with_other_hours_is_rewritten_on_spark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silver and DLQ files holding two ingestion hours (as compaction leaves a closed day): re-running
    one hour on Spark rewrites it in one commit per table and leaves the other hour's rows as they were,
    where Iceberg's overwrite-by-filter alone refuses a file only partly in the hour."""
    from k2_assets.resources import build_resources
    from k2_assets.silver.assets import silver_assets

    first = hour_of(datetime.now(UTC) - timedelta(days=1)).replace(hour=10)
    second = first + timedelta(hours=1)
    with lakehouse(tmp_path, monkeypatch) as lake:
        for hour in (first, second):
            lake.ingest_trades(
                BINANCE,
                [hour + timedelta(minutes=1, seconds=i) for i in range(30)],
                hour + timedelta(minutes=2),
            )
            lake.ingest(BINANCE, [(b"\x07not-avro", hour)], hour + timedelta(minutes=3))
        resources = build_resources()  # the embedded engine builds both hours
        silver = next(a for a in silver_assets if a.op.name == "silver_binance")
        for hour in (first, second):
            assert dg.materialize([silver], resources=resources, partition_key=key(hour)).success
        specs = (silver_table_spec(BINANCE), DLQ_TABLE_SPEC)
        for spec in specs:
            compact(lake.iceberg, spec)
            assert data_files(lake.iceberg, spec) == 1  # both hours in one file
        before = {spec.name: rows_by_hour(lake.iceberg, spec) for spec in specs}
        assert len(before[specs[0].name][key(first)]) == 30 and len(before[specs[1].name][key(second)]) == 1
        spark = IcebergSparkResource(
            iceberg=resources["iceberg"],
            master="local[2]",
            app_name="k2-test",
            spark_config=ENGINE_SPARK_CONFIG,
        )
        resources["engine"] = EngineResource(engine="spark", spark=spark)
        result = dg.materialize([silver], resources=resources, partition_key=key(first), raise_on_error=False)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        metadata = {
            m.asset_key.to_user_string(): {k: getattr(v, "value", v) for k, v in m.metadata.items()}
            for m in result.asset_materializations_for_node("silver_binance")
        }
        assert (
            metadata["silver_binance_trades"]["rows"] == 30
            and metadata["silver_binance_trades"]["engine"] == "spark"
        )
        assert metadata["silver_dlq_trades/binance"]["rows"] == 1
        for spec in specs:
            assert rows_by_hour(lake.iceberg, spec) == before[spec.name]  # the hour rewritten, the other kept
            (summary,) = snapshot_summaries(lake.iceberg, spec, result.run_id)  # one commit per table
            assert summary["k2.engine"] == "spark" and summary["dagster.partition-key"] == key(first)


def test_the_overwrite_filter_widens_to_whole_files_and_drops_a_slice_a_file_mixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Iceberg's overwrite-by-filter drops whole files only: the Spark engine widens its filter to the
    time bounds (whole seconds) of each file it touches, and to every slice when a file mixes them (a
    DLQ laid out without its exchange partition, so one file can hold two exchanges)."""
    import dataclasses

    from k2_resources.engine import whole_file_scope

    monkeypatch.setenv("K2_HOME", str(tmp_path))
    iceberg = IcebergCatalogResource()
    spec = dataclasses.replace(DLQ_TABLE_SPEC, name="dlq_one_file_per_append", partition_spec=PartitionSpec())
    schema = iceberg.ensure_table(spec).schema().as_arrow()

    def append(moments: list[datetime], exchanges: list[str]) -> None:
        columns = {f.name: pa.nulls(len(moments), f.type) for f in schema}
        columns["bronze_ingestion_timestamp"] = pa.array(
            moments, schema.field("bronze_ingestion_timestamp").type
        )
        columns["exchange"] = pa.array(exchanges, pa.string())
        iceberg.load_table(spec).append(pa.table(columns, schema=schema))

    ten = datetime(2026, 12, 5, 10, tzinfo=UTC)
    hour = RowScope(ten, ten + timedelta(hours=1), "binance")
    append(
        [ten + timedelta(minutes=5), ten + timedelta(hours=1, minutes=7, seconds=3, microseconds=5)],
        ["binance"] * 2,
    )
    append([ten + timedelta(hours=1, minutes=30), ten + timedelta(hours=3)], ["kraken"] * 2)  # not touched
    table = iceberg.load_table(spec)
    assert whole_file_scope(table, spec, hour) == RowScope(
        ten, ten + timedelta(minutes=67, seconds=4), "binance"
    )
    later = RowScope(ten + timedelta(hours=4), ten + timedelta(hours=5), "binance")
    assert whole_file_scope(table, spec, later) == later  # no file touched: the scope itself
    append([ten + timedelta(minutes=50), ten + timedelta(hours=2, minutes=59)], ["binance", "kraken"])
    table = iceberg.load_table(spec)
    # The mixed file widens to 12:59:01 and every slice, which reaches the kraken file: to 13:00:01.
    assert whole_file_scope(table, spec, hour) == RowScope(ten, ten + timedelta(hours=3, seconds=1), None)
