"""Spark with Iceberg's runtime, on the same catalog K2's PyIceberg catalog uses.

PyIceberg 0.12 cannot compact data files, rewrite manifests or delete expired files; Iceberg's own
Spark procedures can (`CALL <catalog>.system.rewrite_data_files(...)` etc.). `IcebergSparkResource`
is dagster-pyspark's `LazyPySparkResource` (no Spark start unless an op asks for the session) whose
Spark configuration is derived from `IcebergCatalogResource`'s properties, so both clients always
point at one catalog:

- PyIceberg `type: sql` on SQLite or PostgreSQL -> Iceberg's `JdbcCatalog` on the same database and
  the same `catalog_name` (both store tables in `iceberg_tables` keyed by catalog name). Both use
  JDBC schema version V1, the layout PyIceberg 0.12 creates (an `iceberg_type` column; rows it
  writes say TABLE), so either side reads the other's tables and views never pass for tables.
- `type: rest` -> Iceberg's REST catalog with the same URI, warehouse and credentials.
- Every other property (`s3.endpoint`, `s3.access-key-id`, ...) is passed to the Spark catalog
  unchanged: Iceberg's Java FileIO reads the same names.

Spark runs `local[*]` by default; `master` (e.g. `spark://host:7077`, `yarn`) or `remote` (Spark
Connect, `sc://host:15002`) select a cluster by configuration alone, from K2_SPARK_MASTER /
K2_SPARK_REMOTE. Jars are resolved the way Spark users do, by `spark.jars.packages` from Maven
Central into the Ivy cache; their versions are pinned here, in one place, matching `pyspark`'s pin in
pyproject.toml. A Spark Connect server resolves its own jars and holds the static settings:
`spark-submit $(connect_server_args(...))` starts one on K2's catalog.
"""

# No `from __future__ import annotations`: Dagster resolves resource field annotations at class creation.

import os
import re
import sys
from typing import Any
from urllib.parse import unquote, urlparse

import dagster as dg
from dagster_pyspark import LazyPySparkResource
from dagster_pyspark.resources import spark_session_from_config
from pydantic import Field
from pyiceberg.catalog import _ENV_CONFIG

from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.settings import SPARK_MASTER, SPARK_REMOTE

# Pinned together: Iceberg's runtime is built per Spark minor version and Scala version.
SPARK_MINOR_VERSION = "4.1"
SCALA_VERSION = "2.13"
ICEBERG_VERSION = "1.12.0"
ICEBERG_SPARK_RUNTIME = (
    f"org.apache.iceberg:iceberg-spark-runtime-{SPARK_MINOR_VERSION}_{SCALA_VERSION}:{ICEBERG_VERSION}"
)
ICEBERG_AWS_BUNDLE = f"org.apache.iceberg:iceberg-aws-bundle:{ICEBERG_VERSION}"
SQLITE_JDBC = "org.xerial:sqlite-jdbc:3.50.3.0"
POSTGRESQL_JDBC = "org.postgresql:postgresql:42.7.8"

# Settings a Spark Connect client cannot change: the Connect server starts with them
# (`connect_server_args`).
SERVER_ONLY = (
    "spark.jars.packages",
    "spark.sql.extensions",
    "spark.driver.memory",
    "spark.pyspark.python",
    "spark.python.daemon.module",
)

DEFAULT_MASTER = "local[*]"
# JVM options for a local driver that lives for one short run (a maintenance pass: a minute of Iceberg
# procedures on small metadata). Measured per run (bench/bench_maintenance_run.py, bench/README.md):
# C1 only (no C2 compiles of code that runs for seconds) cut the run's CPU by a third; the serial
# collector (no parallel GC threads, a heap that grows only as far as the live data needs) cut its
# memory by ~0.4 GiB. The price is on long passes: a 20,000-snapshot catch-up pass took ~27 % more CPU
# (C1's code is slower; measured with a 1 GiB heap). Only on a local master: a cluster's driver and
# executors keep Spark's defaults.
# The heap is kept near the live data: it starts at SHORT_RUN_START_HEAP_MIB (the JVM's default is 1/64 of
# the machine's memory: 384 MiB here) with a fixed YOUNG_GENERATION_MIB young generation, and grows (or
# shrinks) after a full collection only as far as 10-30 % free. With the defaults the old generation
# filled with promoted garbage up to its starting size before any full collection: the scheduled pass over
# every table, compacting a closed day, kept 77-98 MiB live in a ~370 MiB heap. Measured
# (bench/bench_maintenance_run.py, session 10, bench/README.md): that pass's driver 698 -> 520 MiB anon at
# its peak, a small table's 516 -> 489 MiB, for 6-19 % more CPU per pass (+1.4-6.3 CPU-s: more
# collections) and ~31 % more on a 20,000-snapshot catch-up (99 against 76 CPU-s, one pass each). The
# ceiling stays spark.driver.memory (2g): a long catch-up or a large compaction grows the heap as it needs.
# The rest of the driver is no heap and no setting shrinks it: ~150 MiB of class metadata (~24,000
# classes), ~36 MiB of symbols, ~30-42 MiB of compiled code, 15-40 MiB of thread stacks.
SHORT_RUN_START_HEAP_MIB = 64
YOUNG_GENERATION_MIB = 24
SHORT_RUN_HEAP_OPTIONS = f"-Xms{SHORT_RUN_START_HEAP_MIB}m -Xmn{YOUNG_GENERATION_MIB}m -XX:MinHeapFreeRatio=10 -XX:MaxHeapFreeRatio=30"
SHORT_RUN_JAVA_OPTIONS = f"-XX:TieredStopAtLevel=1 -XX:+UseSerialGC {SHORT_RUN_HEAP_OPTIONS}"
# Shuffle partitions: on a local master, this many per core (AQE coalesces them further to what the data
# needs); on a cluster, whose size K2 cannot see, Spark's own default.
SHUFFLE_PARTITIONS_PER_LOCAL_CORE = 2
LOCAL_MASTER = re.compile(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?")

# PyIceberg properties that mean something else (or nothing) to Iceberg's Java catalogs.
_TRANSLATED = {"type", "uri", "py-io-impl", "echo", "pool_pre_ping", "init_catalog_tables"}


def local_cores(master: str) -> int | None:
    """The cores a local master runs tasks on (`local`, `local[N]`, `local[*]`, `local[N,F]`); None for
    a cluster master."""
    matched = LOCAL_MASTER.fullmatch(master.strip())
    if matched is None:
        return None
    cores = matched.group(1)
    if cores is None:
        return 1
    return os.cpu_count() or 1 if cores == "*" else int(cores)


def shuffle_settings(master: str) -> dict[str, str]:
    """Shuffle partitions for `master`: Spark's 200 per shuffle on a 2-core local run is 200 tasks of
    a few rows each (scheduling, not work); a cluster keeps Spark's default."""
    cores = local_cores(master)
    if cores is None:
        return {}
    return {"spark.sql.shuffle.partitions": str(SHUFFLE_PARTITIONS_PER_LOCAL_CORE * cores)}


class SparkConfigError(ValueError):
    """The catalog or Spark settings cannot be mapped to Spark; the message names the setting."""


def jdbc_settings(uri: str) -> dict[str, str]:
    """The JDBC URL and credentials for a PyIceberg SQL catalog's SQLAlchemy URI."""
    parsed = urlparse(uri)
    dialect = parsed.scheme.split("+")[0]
    if dialect == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if not path or path == ":memory:":
            raise SparkConfigError(f"Spark cannot share an in-memory SQLite catalog (catalog uri {uri!r})")
        return {"uri": f"jdbc:sqlite:{path}"}
    if dialect in ("postgresql", "postgres"):
        port = f":{parsed.port}" if parsed.port else ""
        settings = {"uri": f"jdbc:postgresql://{parsed.hostname}{port}{parsed.path}"}
        if parsed.username:
            settings["jdbc.user"] = unquote(parsed.username)
        if parsed.password:
            settings["jdbc.password"] = unquote(parsed.password)
        return settings
    raise SparkConfigError(
        f"The catalog uri {uri!r} uses {dialect!r}: Spark maintenance supports SQL catalogs on SQLite or "
        "PostgreSQL, and REST catalogs"
    )


def catalog_settings(properties: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(Iceberg Spark catalog properties, extra jars) for PyIceberg catalog properties."""
    kind = properties.get("type", "rest" if properties.get("uri", "").startswith("http") else "sql")
    passed = {k: v for k, v in properties.items() if k not in _TRANSLATED}
    if kind == "sql":
        jdbc = jdbc_settings(properties.get("uri", ""))
        settings = {**passed, "type": "jdbc", "jdbc.schema-version": "V1", **jdbc}
        # Both drivers: jars are fixed when a process starts its JVM, whichever catalog it meets first.
        jars = [SQLITE_JDBC, POSTGRESQL_JDBC]
    elif kind == "rest":
        settings, jars = {**passed, "type": "rest", "uri": properties["uri"]}, []
    else:
        raise SparkConfigError(f"Catalog type {kind!r} is not supported for Spark maintenance (type)")
    if any(k.startswith("s3.") for k in properties) or properties.get("warehouse", "").startswith("s3"):
        settings.setdefault("io-impl", "org.apache.iceberg.aws.s3.S3FileIO")
        jars.append(ICEBERG_AWS_BUNDLE)
    return settings, jars


def spark_packages(properties: dict[str, str]) -> str:
    """The `spark.jars.packages` value for a catalog: Iceberg's runtime plus its driver jars."""
    return ",".join([ICEBERG_SPARK_RUNTIME, *catalog_settings(properties)[1]])


def iceberg_spark_config(catalog_name: str, properties: dict[str, str]) -> dict[str, str]:
    """Spark settings that register the catalog `catalog_name` exactly as PyIceberg sees it."""
    settings, _ = catalog_settings(properties)
    prefix = f"spark.sql.catalog.{catalog_name}"
    return {
        "spark.sql.extensions": "org.apache.iceberg.spark.extensions.IcebergSparkSessionExtensions",
        "spark.jars.packages": spark_packages(properties),
        prefix: "org.apache.iceberg.spark.SparkCatalog",
        # Writers commit beside maintenance all the time: always act on the table's current metadata.
        f"{prefix}.cache-enabled": "false",
        **{f"{prefix}.{key}": value for key, value in settings.items()},
    }


def connect_server_args(catalog_name: str, properties: dict[str, str], port: int, master: str) -> list[str]:
    """`spark-submit` arguments of a Spark Connect server that serves K2's catalog to K2_SPARK_REMOTE."""
    config = iceberg_spark_config(catalog_name, properties)
    args = ["--class", "org.apache.spark.sql.connect.service.SparkConnectServer"]
    args += ["--packages", config.pop("spark.jars.packages"), "--master", master]
    for key, value in {**config, "spark.connect.grpc.binding.port": str(port)}.items():
        args += ["--conf", f"{key}={value}"]
    return [*args, "spark-internal"]


def discard_stopped_context() -> None:
    """Forget a SparkContext the JVM has stopped on its own (Spark stops it when it gives up on an
    unreachable master): PySpark still holds it as the active context, so the process's next session
    would be built on it and fail ("Cannot call methods on a stopped SparkContext")."""
    from pyspark import SparkContext

    context = SparkContext._active_spark_context
    if context is not None and context._jsc is not None and context._jsc.sc().isStopped():
        context.stop()


class IcebergSparkResource(LazyPySparkResource):
    """A lazily started SparkSession whose Iceberg catalog is K2's catalog (see the module docstring).

    `spark_config` entries override the derived ones (e.g. `spark.driver.memory`).
    """

    iceberg: dg.ResourceDependency[IcebergCatalogResource]
    master: str = Field(default="", description=f"empty: {SPARK_MASTER.name}, else {DEFAULT_MASTER}")
    remote: str = Field(default="", description=f"Spark Connect address; empty: {SPARK_REMOTE.name}")
    app_name: str = "k2-maintenance"
    local_java_options: str = Field(
        default="",
        description="spark.driver.extraJavaOptions on a local master only (e.g. SHORT_RUN_JAVA_OPTIONS); "
        "a cluster keeps Spark's defaults",
    )
    spark_config: dict[str, Any] = {}

    def where(self) -> dict[str, str]:
        """`spark.master` or `spark.remote`, from the resource's config, else the environment (read when
        the session is built, not at import): a deployment sets K2_SPARK_MASTER or K2_SPARK_REMOTE."""
        master = self.master or SPARK_MASTER.value()
        remote = self.remote or SPARK_REMOTE.value()
        if remote and master:
            raise SparkConfigError(
                f"Set either {SPARK_MASTER.name} ({master}) or {SPARK_REMOTE.name} ({remote}), not both"
            )
        return {"spark.remote": remote} if remote else {"spark.master": master or DEFAULT_MASTER}

    @property
    def catalog_name(self) -> str:
        return self.iceberg.catalog_name

    def catalog_properties(self) -> dict[str, str]:
        """The catalog's properties as PyIceberg loads them: its configuration from the environment
        (PYICEBERG_CATALOG__<NAME>__*, .pyiceberg.yaml) under the resource's own properties."""
        configured = _ENV_CONFIG.get_catalog_config(self.catalog_name) or {}
        return {**{k: str(v) for k, v in configured.items()}, **self.iceberg.resolved_properties()}

    def full_config(self) -> dict[str, Any]:
        """Everything the session is built with: master or remote, the catalog, then overrides."""
        where = self.where()
        remote = "spark.remote" in where
        base = {
            **where,
            "spark.app.name": self.app_name,
            # Python tasks (the engine's mapInArrow) run K2's own interpreter (K2's image on a cluster).
            "spark.pyspark.python": sys.executable,
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",  # progress bars would fill the runs' logs
            "spark.sql.session.timeZone": "UTC",
            # Expiry and orphan removal hold a table's file lists in the driver (local mode: all of Spark).
            "spark.driver.memory": "2g",
            # Adaptive execution coalesces small shuffle partitions and picks join strategies at run time.
            "spark.sql.adaptive.enabled": "true",
            **({} if remote else shuffle_settings(where["spark.master"])),
            **({} if remote else self.local_driver_settings(where["spark.master"])),
            **iceberg_spark_config(self.catalog_name, self.catalog_properties()),
        }
        config = {**base, **self.spark_config}
        if remote:  # the Connect server holds these; a client setting them fails the session
            config = {k: v for k, v in config.items() if k not in SERVER_ONLY}
        return config

    def local_driver_settings(self, master: str) -> dict[str, str]:
        """`local_java_options` as the driver's JVM options when `master` is local; nothing for a cluster."""
        if not self.local_java_options or local_cores(master) is None:
            return {}
        return {"spark.driver.extraJavaOptions": self.local_java_options}

    def _init_session(self) -> None:
        if self._spark_session is None:
            if "spark.remote" not in self.where():
                # PySpark starts local Python workers with $PYSPARK_PYTHON (default: python3 on the PATH).
                os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
                discard_stopped_context()
            self._spark_session = spark_session_from_config(self.full_config())

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Stop the session a run started (dagster-pyspark leaves it running)."""
        if self._spark_session is not None:
            self._spark_session.stop()
            self._spark_session = None
