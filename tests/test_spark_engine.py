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
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest

from k2_assets.gold.tables import GOLD_TABLE_SPEC
from k2_assets.instance import REPO_ROOT, prepare_dagster_home
from k2_assets.partitions import HOUR_KEY_FORMAT
from k2_assets.silver.tables import DLQ_TABLE_SPEC, silver_table_spec
from k2_resources.engine import ENGINE_SETTING, EngineResource, engine_from_environment
from k2_resources.exchanges import exchange
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.spark import IcebergSparkResource
from tests.conftest import k2_env
from tests.lakehouse_helpers import Lakehouse, hour_of, lakehouse
from tests.test_ci_launch import DAGSTER_BIN, dagster_services, free_port, run_failure_text, wait_for_run

BINANCE = exchange("binance")
SPARK_ENV = {"K2_ENGINE": "spark", "K2_SPARK_MASTER": "local[2]", "K2_AUTOMATION": "off"}
RUN_TIMEOUT = 1500.0  # a run on Spark pays a JVM start and Iceberg's runtime; the machine is shared


def key(moment: datetime) -> str:
    return moment.strftime(HOUR_KEY_FORMAT)


def test_the_engine_setting_is_checked_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENGINE_SETTING, raising=False)
    assert engine_from_environment() == "embedded"
    monkeypatch.setenv(ENGINE_SETTING, "Spark")
    assert engine_from_environment() == "spark"
    monkeypatch.setenv(ENGINE_SETTING, "duckdb")
    with pytest.raises(ValueError, match=ENGINE_SETTING):
        engine_from_environment()


@dataclass
class BronzeHour:
    """What was written to Bronze for one ingestion hour of binance."""

    hour: datetime
    late_ids: list[str]  # trades of the hour before, ingested in this one
    on_time_ids: list[str]
    redelivered_id: str  # one on-time trade written twice (two offsets)
    unreadable: int


def write_bronze_hour(lake: Lakehouse, hour: datetime) -> BronzeHour:
    late = lake.ingest_trades(BINANCE, [hour - timedelta(minutes=20 - i) for i in range(10)], hour + timedelta(minutes=1))
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
        import os

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
    done = subprocess.run(command, cwd=REPO_ROOT, env=deployment.env, capture_output=True, text=True, timeout=900)
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
    late = gold.filter(pc.is_in(gold["message_id"], value_set=__import__("pyarrow").array(bronze.late_ids)))
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
        return {r.dagster_event.event_specific_data.check_name: r.dagster_event.event_specific_data.passed for r in records}


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
