"""Benchmark: Silver and Gold on Spark (local[2]) against the embedded engine, same input, one run.

One Bronze hour of Binance-like trades (real Confluent-framed V2 Avro, ~1 % unreadable, ~0.5 %
redelivered, ~2 % late trades of the hour before) is written twice, identically, as ingestion writes
it (one Iceberg append per commit), into two fresh SQLite catalogs. For each engine (K2_ENGINE=embedded,
then K2_ENGINE=spark with K2_SPARK_MASTER=local[2]) a child process materialises the Silver hour
(Silver + DLQ + checks), then another the Gold hour (union + dedup + checks), through Dagster exactly
as a run does. Per child: wall time, the Dagster step's own time, CPU of the whole process tree (the
JVM included) by cgroup v2 accounting (`cpu.stat` usage_usec of a cgroup the child starts in), and the
sampled peak RSS of the tree. Both engines must produce the same row counts (checked, reported).

Spark's own event log (SPARK_CONF_DIR/spark-defaults.conf turns it on for these children only) gives
the stage metrics: per stage the tasks, their summed executor time and the longest task, so the split
of the work across tasks is measured, not guessed; task time / job wall time is the parallelism Spark
achieved on the two cores.

    .venv/bin/python bench/bench_engines.py [--records 200000] [--commits 20] [--no-decode]

Prints figures and ratios; asserts nothing. Needs root (cgroups).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import Child, ChildResult, dagster_child_args, framed_trades  # noqa: E402

CGROUP2 = Path("/sys/fs/cgroup/unified")
ENGINES = ("embedded", "spark")
SILVER_KEYS = ["silver_binance_trades", "silver_dlq_trades/binance"]
GOLD_KEYS = ["gold_crypto_trades"]
HOUR_KEY_FORMAT = "%Y-%m-%d-%H:00"
CHILD_TIMEOUT = 3600.0


# --- The input ----------------------------------------------------------------------------------------


def bronze_commits(records: int, commits: int, schema_id: int, hour: datetime, seed: int = 11) -> list[Any]:
    """Bronze rows of one ingestion hour in `commits` appends, as ingestion writes them."""
    import pyarrow as pa

    from k2_assets.bronze.tables import bronze_table_spec
    from k2_resources.exchanges import exchange

    spec, binance, rng = (
        bronze_table_spec(exchange("binance")).arrow_schema,
        exchange("binance"),
        random.Random(seed),
    )
    first, spacing = (
        hour - timedelta(seconds=72),
        timedelta(seconds=3540 / records),
    )  # ~2 % in the hour before
    trades = framed_trades(records, schema_id, first, spacing, seed=seed)
    values = []
    for trade in trades:
        value = trade.value
        if rng.random() < 0.01:
            value = b"\x01" + value[1:]  # not Confluent-framed: BAD_MAGIC_BYTE
        values.append((trade.key, value, trade.timestamp_ms))
        if rng.random() < 0.005:
            values.append((trade.key, value, trade.timestamp_ms))  # redelivered: same record, new offset
    per_commit = -(-len(values) // commits)
    tables, offset = [], 0
    for start in range(0, len(values), per_commit):
        chunk = values[start : start + per_commit]
        last_trade = datetime.fromtimestamp(chunk[-1][2] / 1000, UTC)
        ingested = min(max(last_trade + timedelta(seconds=1), hour), hour + timedelta(minutes=59, seconds=59))
        n = len(chunk)
        tables.append(
            pa.table(
                {
                    "raw_bytes": pa.array([v for _, v, _ in chunk], pa.binary()),
                    "message_key": pa.array([k for k, _, _ in chunk], pa.binary()),
                    "topic": [binance.topic] * n,
                    "partition": pa.array([0] * n, pa.int32()),
                    "offset": pa.array(range(offset, offset + n), pa.int64()),
                    "kafka_timestamp": pa.array(
                        [datetime.fromtimestamp(t / 1000, UTC) for _, _, t in chunk],
                        pa.timestamp("us", tz="UTC"),
                    ),
                    "ingestion_timestamp": pa.array([ingested] * n, pa.timestamp("us", tz="UTC")),
                    "ingestion_date": pa.array([ingested.date()] * n, pa.date32()),
                },
                schema=spec,
            )
        )
        offset += n
    return tables


def write_bronze(home: Path, commits: list[Any]) -> None:
    """The commits into K2_HOME=home's default catalog (the one the children's code location opens)."""
    from k2_assets.bronze.tables import bronze_table_spec
    from k2_resources.exchanges import exchange
    from k2_resources.iceberg import IcebergCatalogResource

    (home / "warehouse").mkdir(parents=True, exist_ok=True)
    properties = {
        "type": "sql",
        "uri": f"sqlite:///{home}/catalog.db",
        "warehouse": f"file://{home}/warehouse",
    }
    table = IcebergCatalogResource(properties=properties).ensure_table(bronze_table_spec(exchange("binance")))
    for rows in commits:
        table.append(rows)


# --- Measured children --------------------------------------------------------------------------------


def cgroup_cpu_seconds(cgroup: Path) -> float:
    for line in (cgroup / "cpu.stat").read_text().splitlines():
        name, value = line.split()
        if name == "usage_usec":
            return int(value) / 1e6
    raise RuntimeError(f"{cgroup}/cpu.stat has no usage_usec")


def run_measured(args: list[str], env: dict[str, str]) -> tuple[ChildResult, float]:
    """The child, started inside a cgroup of its own; (its result, CPU seconds of its whole tree)."""
    cgroup = CGROUP2 / f"k2-bench-engines-{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    try:
        wrapped = ["/bin/sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *args]
        result = Child(wrapped, env).wait(CHILD_TIMEOUT)
        deadline = time.monotonic() + 30  # the JVM may outlive its Python parent by a moment
        while (cgroup / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        return result, cgroup_cpu_seconds(cgroup)
    finally:
        for pid in (cgroup / "cgroup.procs").read_text().split():
            os.kill(int(pid), 9)
        time.sleep(0.5)
        cgroup.rmdir()


def child_env(home: Path, engine: str, registry_url: str, conf_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("K2_") and k != "DAGSTER_HOME"}
    return {
        **env,
        "K2_HOME": str(home),
        "K2_SCHEMA_REGISTRY_URL": registry_url,
        "K2_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",  # nothing here reads Kafka
        "K2_AUTOMATION": "off",
        "K2_ENGINE": engine,
        "K2_SPARK_MASTER": "local[2]",
        "SPARK_CONF_DIR": str(conf_dir),
    }


def spark_conf_dir(scratch: Path, event_dir: Path) -> Path:
    conf = scratch / "spark-conf"
    conf.mkdir()
    event_dir.mkdir()
    (conf / "spark-defaults.conf").write_text(
        f"spark.eventLog.enabled true\nspark.eventLog.dir file://{event_dir}\n"
        # Spark 4 writes rolling, zstd-compressed logs by default: one plain JSON file per application.
        "spark.eventLog.compress false\nspark.eventLog.rolling.enabled false\n"
    )
    return conf


# --- Spark's event log ----------------------------------------------------------------------------------


def stage_metrics(event_dir: Path) -> dict[str, Any]:
    """Per stage of every Spark application logged in `event_dir`: tasks, summed and longest task time,
    records read/written; and the jobs' wall time against the tasks' summed time."""
    stages: dict[tuple[str, int], dict[str, Any]] = {}
    tasks: dict[tuple[str, int], list[float]] = defaultdict(list)
    job_wall = 0.0
    for log in sorted(event_dir.iterdir()):
        starts: dict[int, int] = {}
        for line in log.read_text().splitlines():
            event = json.loads(line)
            kind = event["Event"]
            if kind == "SparkListenerJobStart":
                starts[event["Job ID"]] = event["Submission Time"]
            elif kind == "SparkListenerJobEnd" and event["Job ID"] in starts:
                job_wall += (event["Completion Time"] - starts[event["Job ID"]]) / 1000
            elif kind == "SparkListenerStageCompleted":
                info = event["Stage Info"]
                stages[(log.name, info["Stage ID"])] = {
                    "name": info["Stage Name"].split(" at ")[0],
                    "tasks": info["Number of Tasks"],
                }
            elif kind == "SparkListenerTaskEnd" and event.get("Task Metrics"):
                metrics = event["Task Metrics"]
                key = (log.name, event["Stage ID"])
                tasks[key].append(metrics["Executor Run Time"] / 1000)
                stage = stages.setdefault(key, {"name": "?", "tasks": 0})
                stage["records_in"] = stage.get("records_in", 0) + metrics["Input Metrics"]["Records Read"]
                stage["records_out"] = (
                    stage.get("records_out", 0) + metrics["Output Metrics"]["Records Written"]
                )
    rows = []
    for key, stage in sorted(stages.items()):
        durations = tasks.get(key, [])
        if durations:
            rows.append(
                {**stage, "task_s": sum(durations), "max_task_s": max(durations), "ran": len(durations)}
            )
    return {"stages": rows, "job_wall_s": job_wall, "task_s": sum(r["task_s"] for r in rows)}


# --- Decoding on Spark: spark-avro's from_avro against the embedded decoder in mapInArrow ---------------

# Maven Central has no spark-avro 4.1.4 (pyspark's version here); 4.1.1 is the newest of Spark 4.1.
SPARK_AVRO = "org.apache.spark:spark-avro_2.13:4.1.1"


def decode_child(bronze_path: str, registry: str, schema_id: str) -> None:
    """Child side: decode the same Bronze values on local[2] both ways; print the timings as JSON.

    from_avro gets every advantage: the header is cut off in SQL, one writer schema (V2) is given
    for all rows, and nothing is routed (PERMISSIVE mode yields a null struct for a bad body, with no
    reason). The mapInArrow side is what K2 runs: header, schema id lookup, resolution, validation,
    Silver and DLQ rows with categories.
    """
    from datetime import UTC, datetime

    from confluent_kafka.schema_registry import SchemaRegistryClient
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from pyspark.sql.avro.functions import from_avro
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    from k2_assets.silver.rules import ValidationRules
    from k2_assets.silver.spark_engine import RegistrySnapshot, RouteTask, routed_schema
    from k2_assets.silver.transform import DLQ_ARROW_SCHEMA, SILVER_ARROW_SCHEMA
    from k2_resources.exchanges import exchange
    from k2_resources.trade_schema import trade_v2_schema_str

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.jars.packages", SPARK_AVRO)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "50000")
        .getOrCreate()
    )
    bronze = spark.read.parquet(bronze_path).repartition(2).cache()
    rows = bronze.count()
    timings = {}
    body = F.expr("substring(raw_bytes, 6, length(raw_bytes) - 5)")
    decoded = bronze.select(from_avro(body, trade_v2_schema_str(), {"mode": "PERMISSIVE"}).alias("t"))
    for _ in range(2):  # the first pass warms the JVM and the Python workers
        started = time.perf_counter()
        (nulls,) = decoded.agg(F.count(F.when(F.col("t").isNull(), 1))).collect()[0]
        timings["from_avro"] = time.perf_counter() - started
    schema = routed_schema(from_arrow_schema(SILVER_ARROW_SCHEMA), from_arrow_schema(DLQ_ARROW_SCHEMA))
    snapshot = RegistrySnapshot.fetch(SchemaRegistryClient({"url": registry}), [int(schema_id)])
    task = RouteTask(
        exchange("binance"), snapshot, ValidationRules(), "bench", datetime.now(UTC), to_arrow_schema(schema)
    )
    routed = bronze.mapInArrow(task, schema)
    for _ in range(2):
        started = time.perf_counter()
        (dlq,) = routed.agg(F.count(F.when(F.col("k2_kind") == "dlq", 1))).collect()[0]
        timings["mapInArrow"] = time.perf_counter() - started
    print(
        json.dumps({"rows": rows, "seconds": timings, "from_avro_nulls": nulls, "routed_dlq": dlq}),
        flush=True,
    )
    spark.stop()


def decode_comparison(scratch: Path, commits: list[Any], registry_url: str, schema_id: int) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = scratch / "bronze-values.parquet"
    pq.write_table(pa.concat_tables(commits), path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("K2_")}
    args = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--decode-child",
        str(path),
        registry_url,
        str(schema_id),
    ]
    result, cpu = run_measured(args, env)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-4000:])
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "cpu_s": cpu}


# --- The run --------------------------------------------------------------------------------------------


def summary_rows(result: ChildResult) -> dict[str, Any]:
    summary = result.summary()
    if not summary["success"]:
        raise RuntimeError("run failed:\n" + "\n".join(summary["errors"])[-4000:])
    rows = {m["asset"]: m["metadata"].get("rows") for m in summary["materializations"]}
    for output in summary["outputs"]:
        if "rows" in output["metadata"]:
            rows.setdefault(output["metadata"].get("table", output["step"]), output["metadata"]["rows"])
    engines = {m["metadata"].get("engine") for m in summary["materializations"]} | {
        o["metadata"].get("engine") for o in summary["outputs"] if "engine" in o["metadata"]
    }
    checks = {name: c["passed"] for name, c in summary["checks"].items()}
    return {"rows": rows, "engines": sorted(e for e in engines if e), "checks": checks}


def file_layer_logs(events: Path, layer: str) -> None:
    """Move the Spark event logs written so far (one per application) under events/<layer>/, so the
    stage split is reported per layer."""
    target = events / layer
    target.mkdir(exist_ok=True)
    for log in events.iterdir():
        if log.is_file():
            log.rename(target / log.name)


def measure(engine: str, home: Path, env: dict[str, str], hour: datetime, events: Path) -> dict[str, Any]:
    figures = {}
    for layer, keys in (("silver", SILVER_KEYS), ("gold", GOLD_KEYS)):
        result, cpu = run_measured(
            dagster_child_args(select=keys, partition=hour.strftime(HOUR_KEY_FORMAT)), env
        )
        if engine == "spark":
            file_layer_logs(events, layer)
        steps = result.step_seconds()
        figures[layer] = {
            "wall_s": result.wall_seconds,
            "step": steps,
            "cpu_s": cpu,
            "peak_tree_rss_mb": result.peak_tree_rss_mb,
            **summary_rows(result),
        }
        print(
            f"  {engine:8} {layer:6} wall {result.wall_seconds:6.1f} s, steps {steps}, CPU {cpu:6.1f} s",
            flush=True,
        )
    return figures


DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:([\d.]+)s)?(?:([\d.]+)ms)?$")


def duration_seconds(text: str) -> float:
    """Dagster's step duration ("350ms", "13.5s", "4m35s", "1h2m3s") in seconds."""
    match = DURATION.match(text.strip())
    if not match or not any(match.groups()):
        raise ValueError(f"not a Dagster duration: {text!r}")
    hours, minutes, seconds, millis = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def step_seconds(figures: dict[str, Any]) -> float:
    """The layer's asset step (freshness-check steps left out)."""
    steps = {k: v for k, v in figures["step"].items() if "freshness_check" not in k}
    return sum(duration_seconds(v) for v in steps.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--commits", type=int, default=20)
    parser.add_argument(
        "--no-decode", action="store_true", help="skip the from_avro/mapInArrow decode comparison"
    )
    parser.add_argument("--decode-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decode_child:
        decode_child(*args.decode_child)
        return

    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    from k2_resources.dev.devstack.registry import SchemaStore, start_registry_server
    from k2_resources.exchanges import exchange
    from k2_resources.trade_schema import trade_v2_schema_str

    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    server = start_registry_server(SchemaStore())
    try:
        with SchemaRegistryClient({"url": server.url}) as client:
            schema_id = client.register_schema(
                exchange("binance").subject, Schema(trade_v2_schema_str(), "AVRO")
            )
        commits = bronze_commits(args.records, args.commits, schema_id, hour)
        bronze_rows = sum(t.num_rows for t in commits)
        print(
            f"Bronze: {bronze_rows:,} rows in {len(commits)} commits, ingestion hour {hour:%Y-%m-%d %H:00} UTC"
        )
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
        results = {}
        with tempfile.TemporaryDirectory(prefix="k2-bench-engines-") as tmp:
            scratch = Path(tmp)
            events = scratch / "spark-events"
            conf = spark_conf_dir(scratch, events)
            for engine in ENGINES:
                home = scratch / engine
                write_bronze(home, commits)
                results[engine] = measure(
                    engine, home, child_env(home, engine, server.url, conf), hour, events
                )
            results["spark"]["stages"] = {
                layer: stage_metrics(events / layer) for layer in ("silver", "gold")
            }
            if args.no_decode:
                results["decode"] = {"error": "not run (--no-decode)"}
            else:
                try:
                    results["decode"] = decode_comparison(scratch, commits, server.url, schema_id)
                except (RuntimeError, TimeoutError) as err:  # the engines' figures stand without it
                    results["decode"] = {"error": str(err)[-2000:]}
        report(results, bronze_rows)
    finally:
        server.shutdown()


def report(results: dict[str, Any], bronze_rows: int) -> None:
    embedded, spark = results["embedded"], results["spark"]
    print()
    for layer in ("silver", "gold"):
        same = embedded[layer]["rows"] == spark[layer]["rows"]
        print(
            f"{layer}: rows embedded {embedded[layer]['rows']} / spark {spark[layer]['rows']} -> {'same' if same else 'DIFFERENT'}"
        )
        print(
            f"  engines recorded: embedded {embedded[layer]['engines']}, spark {spark[layer]['engines']}; checks {spark[layer]['checks']}"
        )
    print()
    print(f"{'':8} {'layer':6} {'step s':>8} {'rec/s':>9} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12}")
    for engine in ENGINES:
        for layer in ("silver", "gold"):
            f = results[engine][layer]
            seconds = step_seconds(f)
            print(
                f"{engine:8} {layer:6} {seconds:8.1f} {bronze_rows / seconds:9,.0f} {f['wall_s']:8.1f} "
                f"{f['cpu_s']:8.1f} {f['peak_tree_rss_mb']:12.0f}"
            )
    print()
    for layer in ("silver", "gold"):
        e, s = results["embedded"][layer], results["spark"][layer]
        print(
            f"{layer}: spark/embedded step time {step_seconds(s) / step_seconds(e):.2f}x, "
            f"wall {s['wall_s'] / e['wall_s']:.2f}x, CPU {s['cpu_s'] / e['cpu_s']:.2f}x"
        )
    decode = results["decode"]
    print()
    if "error" in decode:
        print(f"decode comparison failed: {decode['error']}")
    else:
        print(
            f"Decoding {decode['rows']:,} Bronze values on local[2] (warm, second pass): from_avro "
            f"{decode['seconds']['from_avro']:.1f} s ({decode['rows'] / decode['seconds']['from_avro']:,.0f} rec/s), "
            f"embedded decoder in mapInArrow {decode['seconds']['mapInArrow']:.1f} s "
            f"({decode['rows'] / decode['seconds']['mapInArrow']:,.0f} rec/s); from_avro left "
            f"{decode['from_avro_nulls']:,} null structs without a reason, mapInArrow routed "
            f"{decode['routed_dlq']:,} to the DLQ with categories"
        )
    for layer, metrics in spark["stages"].items():
        print_stage_split(layer, metrics)


def print_stage_split(layer: str, metrics: dict[str, Any]) -> None:
    """How one layer's Spark work split into stages and tasks, from its applications' event logs."""
    print()
    print(
        f"Spark {layer}: {len(metrics['stages'])} stages, {metrics['job_wall_s']:.1f} s of job wall time, "
        f"{metrics['task_s']:.1f} s of task time (parallelism {metrics['task_s'] / max(metrics['job_wall_s'], 1e-9):.2f} "
        "on local[2])"
    )
    print(
        f"  {'stage':40} {'tasks':>5} {'task s':>8} {'max task s':>10} {'records in':>11} {'records out':>11}"
    )
    for stage in metrics["stages"]:
        print(
            f"  {stage['name'][:40]:40} {stage['ran']:5} {stage['task_s']:8.1f} {stage['max_task_s']:10.1f} "
            f"{stage.get('records_in', 0):11,} {stage.get('records_out', 0):11,}"
        )


if __name__ == "__main__":
    main()
