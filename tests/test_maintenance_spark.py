"""Spark on K2's catalog: the settings derived from PyIceberg's, and both clients on one table.

Real Spark (local, Iceberg's runtime from Maven Central), real SQLite and PostgreSQL catalogs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyspark
import pytest

from k2_assets.bronze.ingestion import read_stored_offsets
from k2_assets.maintenance.actions import maintain_table
from k2_assets.maintenance.definitions import maintenance_spark
from k2_assets.maintenance.jobs import TARGETS
from k2_resources.dev.devstack.kafka import free_ports
from k2_resources.engine import EngineResource
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.iceberg_maintenance import MaintenancePolicy
from k2_resources.spark import (
    ICEBERG_AWS_BUNDLE,
    ICEBERG_SPARK_RUNTIME,
    POSTGRESQL_JDBC,
    SHORT_RUN_JAVA_OPTIONS,
    SHORT_RUN_START_HEAP_MIB,
    SQLITE_JDBC,
    YOUNG_GENERATION_MIB,
    IcebergSparkResource,
    SparkConfigError,
    connect_server_args,
    iceberg_spark_config,
)
from tests.maintenance_helpers import BRONZE_SPEC, assert_bronze_complete, commit_batches
from tests.test_tables import postgres_uri  # noqa: F401  (fixture)

MIB = 1024 * 1024


def test_sqlite_catalog_becomes_a_jdbc_catalog_on_the_same_file() -> None:
    config = iceberg_spark_config(
        "k2", {"type": "sql", "uri": "sqlite:////data/k2/catalog.db", "warehouse": "file:///w"}
    )
    assert config["spark.sql.catalog.k2"] == "org.apache.iceberg.spark.SparkCatalog"
    assert config["spark.sql.catalog.k2.type"] == "jdbc"
    assert config["spark.sql.catalog.k2.uri"] == "jdbc:sqlite:/data/k2/catalog.db"
    assert config["spark.sql.catalog.k2.warehouse"] == "file:///w"
    assert config["spark.sql.catalog.k2.jdbc.schema-version"] == "V1"
    assert config["spark.jars.packages"] == f"{ICEBERG_SPARK_RUNTIME},{SQLITE_JDBC},{POSTGRESQL_JDBC}"


def test_postgresql_catalog_keeps_its_credentials_and_s3_settings() -> None:
    config = iceberg_spark_config(
        "lake",
        {
            "type": "sql",
            "uri": "postgresql+psycopg2://k2:p%40ss@db.internal:5433/catalog",
            "warehouse": "s3://bucket/warehouse",
            "s3.endpoint": "http://minio:9000",
        },
    )
    assert config["spark.sql.catalog.lake.uri"] == "jdbc:postgresql://db.internal:5433/catalog"
    assert config["spark.sql.catalog.lake.jdbc.user"] == "k2"
    assert config["spark.sql.catalog.lake.jdbc.password"] == "p@ss"
    assert config["spark.sql.catalog.lake.s3.endpoint"] == "http://minio:9000"
    assert config["spark.sql.catalog.lake.io-impl"] == "org.apache.iceberg.aws.s3.S3FileIO"
    assert config["spark.jars.packages"].split(",") == [
        ICEBERG_SPARK_RUNTIME,
        SQLITE_JDBC,
        POSTGRESQL_JDBC,
        ICEBERG_AWS_BUNDLE,
    ]


def test_rest_catalog_is_passed_through() -> None:
    config = iceberg_spark_config(
        "k2", {"type": "rest", "uri": "https://catalog:8181", "credential": "id:secret"}
    )
    assert config["spark.sql.catalog.k2.type"] == "rest"
    assert config["spark.sql.catalog.k2.uri"] == "https://catalog:8181"
    assert config["spark.sql.catalog.k2.credential"] == "id:secret"
    assert config["spark.jars.packages"] == ICEBERG_SPARK_RUNTIME


@pytest.mark.parametrize(
    ("properties", "named"),
    [
        ({"type": "sql", "uri": "mysql://db/catalog"}, "catalog uri"),
        ({"type": "sql", "uri": "sqlite:///:memory:"}, "catalog uri"),
        ({"type": "glue"}, "(type)"),
    ],
)
def test_unsupported_catalogs_are_refused_naming_the_setting(properties: dict[str, str], named: str) -> None:
    with pytest.raises(SparkConfigError, match=named):
        iceberg_spark_config("k2", properties)


def test_cluster_or_spark_connect_by_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    catalog = IcebergCatalogResource(properties={"type": "sql", "uri": f"sqlite:///{tmp_path}/c.db"})
    assert IcebergSparkResource(iceberg=catalog).full_config()["spark.master"] == "local[*]"
    monkeypatch.setenv("K2_SPARK_MASTER", "spark://spark-master:7077")
    assert IcebergSparkResource(iceberg=catalog).full_config()["spark.master"] == "spark://spark-master:7077"
    monkeypatch.delenv("K2_SPARK_MASTER")
    monkeypatch.setenv("K2_SPARK_REMOTE", "sc://spark-connect:15002")
    connect = IcebergSparkResource(iceberg=catalog).full_config()
    assert connect["spark.remote"] == "sc://spark-connect:15002" and "spark.master" not in connect
    monkeypatch.setenv("K2_SPARK_MASTER", "yarn")
    with pytest.raises(SparkConfigError, match="K2_SPARK_MASTER"):
        IcebergSparkResource(iceberg=catalog).full_config()


def test_short_run_jvm_options_only_on_a_local_maintenance_driver(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Maintenance's JVM options suit a local driver that lives one run; a cluster keeps Spark's defaults."""
    catalog = IcebergCatalogResource(properties={"type": "sql", "uri": f"sqlite:///{tmp_path}/c.db"})
    for master in ("", "local", "local[2]", "local[*]"):
        monkeypatch.setenv("K2_SPARK_MASTER", master)
        config = maintenance_spark(catalog).full_config()
        assert config["spark.driver.extraJavaOptions"] == SHORT_RUN_JAVA_OPTIONS, master
    monkeypatch.setenv("K2_SPARK_MASTER", "spark://spark-master:7077")
    assert "spark.driver.extraJavaOptions" not in maintenance_spark(catalog).full_config()
    monkeypatch.delenv("K2_SPARK_MASTER")
    monkeypatch.setenv("K2_SPARK_REMOTE", "sc://spark-connect:15002")
    assert "spark.driver.extraJavaOptions" not in maintenance_spark(catalog).full_config()
    monkeypatch.delenv("K2_SPARK_REMOTE")
    engine = EngineResource.for_catalog(catalog).spark.full_config()  # long Spark jobs keep C2 and G1
    assert "spark.driver.extraJavaOptions" not in engine and engine["spark.driver.memory"] == "2g"
    explicit = maintenance_spark(catalog, {"spark.driver.extraJavaOptions": "-Xss4m"}).full_config()
    assert explicit["spark.driver.extraJavaOptions"] == "-Xss4m"  # an explicit setting wins


# A JVM of its own: PySpark keeps one JVM per process, started with the first session's settings.
JVM_PROBE = """
import json, sys
from pathlib import Path
from k2_assets.maintenance.definitions import maintenance_spark
from tests.maintenance_helpers import sqlite_catalog
spark = maintenance_spark(sqlite_catalog(Path(sys.argv[1]))).spark_session
management = spark._jvm.java.lang.management.ManagementFactory
print(json.dumps({
    "arguments": list(management.getRuntimeMXBean().getInputArguments()),
    "collectors": [bean.getName() for bean in management.getGarbageCollectorMXBeans()],
    "pools": {pool.getName(): pool.getUsage().getMax() for pool in management.getMemoryPoolMXBeans()},
    "heap_start": management.getMemoryMXBean().getHeapMemoryUsage().getInit(),
    "rows": spark.sql("SELECT 1 AS one").collect()[0].one,
}))
spark.stop()
"""


def test_maintenance_driver_jvm_runs_with_its_options(tmp_path: Path) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", JVM_PROBE, str(tmp_path)],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    jvm = json.loads(probe.stdout.strip().splitlines()[-1])
    assert set(SHORT_RUN_JAVA_OPTIONS.split()) <= set(jvm["arguments"]), jvm["arguments"]
    assert set(jvm["collectors"]) == {"Copy", "MarkSweepCompact"}  # the serial collector's two generations
    # The heap starts small with a fixed young generation (eden and two survivor spaces), not 1/64 of the
    # machine's memory with a third of it young; the old generation keeps spark.driver.memory's 2g ceiling.
    pools = jvm["pools"]
    assert jvm["heap_start"] == SHORT_RUN_START_HEAP_MIB * MIB
    assert pools["Eden Space"] + 2 * pools["Survivor Space"] == YOUNG_GENERATION_MIB * MIB, pools
    assert pools["Tenured Gen"] > (2048 - YOUNG_GENERATION_MIB - 1) * MIB, pools
    assert jvm["rows"] == 1


@pytest.fixture()
def spark_resource(catalog: IcebergCatalogResource) -> Iterator[IcebergSparkResource]:
    """A Spark session of this test's own (its JDBC driver is a static setting), stopped afterwards."""
    resource = IcebergSparkResource(iceberg=catalog)
    yield resource
    resource.spark_session.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> IcebergCatalogResource:
    (tmp_path / "warehouse").mkdir()
    uri = (
        f"sqlite:///{tmp_path}/catalog.db"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_uri")
    )
    return IcebergCatalogResource(
        catalog_name=f"k2{uuid.uuid4().hex[:8]}",
        properties={"type": "sql", "uri": uri, "warehouse": f"file://{tmp_path}/warehouse"},
    )


def test_spark_reads_and_compacts_what_pyiceberg_wrote(
    catalog: IcebergCatalogResource, spark_resource: IcebergSparkResource
) -> None:
    next_offset = commit_batches(catalog, 12, 50)
    spark = spark_resource.spark_session
    name = f"{catalog.catalog_name}.{BRONZE_SPEC.identifier}"
    assert spark.sql(f"SELECT count(*) AS n FROM {name}").collect()[0].n == next_offset == 600
    (result,) = spark.sql(
        f"CALL {catalog.catalog_name}.system.rewrite_data_files(table => '{name}', "
        "options => map('min-input-files', '2'))"
    ).collect()
    assert result.rewritten_data_files_count == 12 and result.added_data_files_count == 1
    # PyIceberg reads Spark's snapshot back: same rows, offsets tag untouched, one data file.
    table = catalog.load_table(BRONZE_SPEC)
    assert table.current_snapshot().summary.operation.value == "replace"
    assert read_stored_offsets(table) == {0: 600}
    assert len(list(table.scan().plan_files())) == 1
    assert_bronze_complete(catalog)
    # ...and PyIceberg keeps committing on top of it.
    assert commit_batches(catalog, 1, 50) == 650
    assert spark.sql(f"SELECT count(*) AS n FROM {name}").collect()[0].n == 650


def test_maintenance_through_spark_connect_by_configuration_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Spark Connect server on K2's catalog (connect_server_args); the client is K2_SPARK_REMOTE only."""
    catalog = IcebergCatalogResource(
        properties={
            "type": "sql",
            "uri": f"sqlite:///{tmp_path}/catalog.db",
            "warehouse": f"file://{tmp_path}/w",
        }
    )
    (tmp_path / "w").mkdir()
    commit_batches(catalog, 10, 10, when=datetime.now(UTC) - timedelta(days=9))
    commit_batches(catalog, 10, 10)
    port = free_ports(1)[0]
    spark_home = Path(pyspark.__file__).parent
    server = subprocess.Popen(
        [
            str(spark_home / "bin" / "spark-submit"),
            *connect_server_args("k2", catalog.resolved_properties(), port, "local[2]"),
        ],
        env={**os.environ, "SPARK_HOME": str(spark_home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, server, timeout=180)
        monkeypatch.setenv("K2_SPARK_REMOTE", f"sc://127.0.0.1:{port}")
        # pyspark marks the whole process as Spark Connect (SPARK_CONNECT_MODE_ENABLED=1) when a Connect
        # session starts; set through monkeypatch, it is removed again after this test, so the
        # classic-Spark tests that run next in this process (and the Dagster processes they start) stay classic.
        monkeypatch.setenv("SPARK_CONNECT_MODE_ENABLED", "1")
        resource = IcebergSparkResource(iceberg=catalog)
        spark = resource.spark_session
        assert type(spark).__module__.startswith("pyspark.sql.connect")
        target = next(t for t in TARGETS if t.spec.name == BRONZE_SPEC.name)
        policy = MaintenancePolicy(7, 0, 24 * 60)  # expiry below its floor: time compressed
        report = maintain_table(
            spark, "k2", catalog.load_table(BRONZE_SPEC), target, policy, datetime.now(UTC)
        )
        spark.stop()
    finally:
        server.terminate()
        server.wait(60)
    assert report.deleted_rows == 100 and report.snapshots_expired == 19
    assert report.after.snapshots <= 3 and report.after.manifests == 1
    table = catalog.load_table(BRONZE_SPEC)
    assert read_stored_offsets(table) == {0: 200}
    assert sorted(table.scan(selected_fields=("offset",)).to_arrow()["offset"].to_pylist()) == list(
        range(100, 200)
    )


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the Spark Connect server exited with {process.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Spark Connect server not listening on {port} after {timeout} s")
