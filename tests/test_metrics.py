"""`k2 metrics`: scraped over HTTP and parsed with prometheus_client's text-format parser.

The pipeline runs for real on the dev stack (ingestion, a Kafka gap, Silver); the exporter runs as
the `k2 metrics` process a deployment runs; its counters must be the same after it restarts. The
docker/ monitoring files (Prometheus scrape config and alert rules, Grafana dashboards) are checked
against the metric names a scrape really exports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import k2, k2_env

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


@contextmanager
def exporter(env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """`k2 metrics --port 0` in its own process; yields its URL once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "k2_assets.cli", "metrics", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = process.stdout.readline()
        match = re.search(r"(http://\S+/metrics)", line)
        assert match, f"exporter said {line!r}"
        yield match.group(1), process
    finally:
        process.terminate()
        process.wait(timeout=30)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, through Prometheus's own text-format parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


def exported_names(home: Path) -> set[str]:
    """Every sample name a scrape exports (HELP/TYPE lines are there even for families without samples)."""
    text = k2("metrics", "--once", home=home, env={"K2_AUTOMATION": "off"}).stdout
    names = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total"], "summary": ["_count", "_sum"]}.get(family.type, [""])
        names |= {family.name + suffix for suffix in suffixes}
    return names


def test_scrape_of_an_empty_instance_is_valid_text_format(tmp_path: Path) -> None:
    names = exported_names(tmp_path / "k2home")
    for expected in (
        "k2_bronze_records_ingested_total",
        "k2_bronze_bytes_ingested_total",
        "k2_bronze_commit_seconds_count",
        "k2_bronze_consumer_lag_records",
        "k2_bronze_committed_offset",
        "k2_ingestion_halt_events_total",
        "k2_silver_dlq_rate",
        "k2_silver_dlq_category_rows",
        "k2_newest_closed_hour_age_seconds",
        "k2_maintenance_last_run_failed",
        "k2_runs_total",
        "k2_run_last_duration_seconds",
        "k2_kafka_up",
    ):
        assert expected in names


def test_metrics_from_a_real_pipeline_survive_an_exporter_restart(fresh_devstack: Path) -> None:
    from k2_assets.cli.instance import prepare_dagster_home
    from k2_assets.definitions import defs
    from k2_assets.silver.assets import dlq_asset_key, silver_asset_key
    from k2_resources.exchanges import exchange
    from tests.pipeline_helpers import hours_back, materialize, this_hour
    from tests.test_alerts import recreate_topic
    from tests.test_bronze_ingestion import TOPIC, produce_raw

    dagster_home = prepare_dagster_home(fresh_devstack)
    delivered = produce_raw(3_000)
    job = defs.resolve_job_def("bronze_binance_ingestion")

    def ingest(**config: object) -> dg.ExecuteInProcessResult:
        run_config = {"ops": {"ingest_binance_trades": {"config": {"drain": True, **config}}}}
        return job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert ingest(max_batch_records=1_000).success
        binance = exchange("binance")
        # The hour before: closed, its Bronze window empty (every record was ingested this hour).
        assert materialize(
            instance, [silver_asset_key(binance), dlq_asset_key(binance)], hours_back(1)
        ).success
        assert not materialize(
            instance, [silver_asset_key(binance), dlq_asset_key(binance)], this_hour(), raise_on_error=False
        ).success  # opaque records: all in the DLQ, the blocking DLQ-rate check fails the run
        recreate_topic(TOPIC)
        produce_raw(50_000)
        assert not ingest().success  # KafkaGapError

    env = k2_env(fresh_devstack, DAGSTER_HOME=str(dagster_home), K2_AUTOMATION="off")
    env.update({k: v for k, v in os.environ.items() if k.startswith(("K2_KAFKA", "K2_SCHEMA"))})
    scrapes = []
    for _ in range(2):  # the second exporter starts from nothing but the stores
        with exporter(env) as (url, process):
            assert url.startswith("http://127.0.0.1:")
            listening = [
                c.laddr for c in psutil.Process(process.pid).net_connections() if c.status == "LISTEN"
            ]
            assert [address.ip for address in listening] == ["127.0.0.1"]
            with urllib.request.urlopen(url, timeout=60) as response:
                text = response.read().decode()
            scrapes.append(samples(text))
    first, second = scrapes
    counters = {k: v for k, v in first.items() if k[0].endswith(("_total", "_count", "_sum"))}
    assert counters and all(second[k] == v for k, v in counters.items())

    assert value(first, "k2_bronze_records_ingested_total", exchange="binance") == 3_000
    assert value(first, "k2_bronze_bytes_ingested_total", exchange="binance") == 3_000 * 150
    assert value(first, "k2_bronze_commit_seconds_count", exchange="binance") >= 3
    assert value(first, "k2_bronze_commit_seconds_sum", exchange="binance") > 0
    for partition, count in delivered.items():
        p = str(partition)
        assert (
            value(first, "k2_bronze_partition_offsets_ingested_total", exchange="binance", partition=p)
            == count
        )
        assert value(first, "k2_bronze_committed_offset", exchange="binance", partition=p) == count
    assert value(first, "k2_bronze_consumer_lag_records", exchange="binance") == 0  # at its newest commit
    # Asked of Kafka: the recreated topic's 50,000 records are not in Bronze; kraken's empty topic has none.
    assert value(first, "k2_kafka_up") == 1
    binance_lag = [
        value(first, "k2_bronze_partition_lag_records", exchange="binance", partition=str(p))
        for p in range(4)
    ]
    assert sum(binance_lag) == 50_000  # the recreated topic: none of it is in Bronze
    assert [
        value(first, "k2_bronze_partition_lag_records", exchange="kraken", partition=str(p)) for p in range(4)
    ] == [0] * 4
    assert value(first, "k2_ingestion_halt_events_total", exchange="binance", error="KafkaGapError") == 1
    assert value(first, "k2_ingestion_halt_events_total", exchange="binance", error="FencedError") == 0
    assert value(first, "k2_ingestion_halted", exchange="binance") == 1
    assert value(first, "k2_runs_total", job="bronze_binance_ingestion", status="SUCCESS") == 1
    assert value(first, "k2_runs_total", job="bronze_binance_ingestion", status="FAILURE") == 1
    assert value(first, "k2_runs_total", job="__ASSET_JOB", status="FAILURE") == 1
    assert value(first, "k2_run_last_duration_seconds", job="bronze_binance_ingestion") > 0
    hour = this_hour()
    assert value(first, "k2_silver_bronze_rows", exchange="binance", hour=hour) == 3_000
    assert value(first, "k2_silver_rows", exchange="binance", hour=hour) == 0
    assert value(first, "k2_silver_dlq_rows", exchange="binance", hour=hour) == 3_000
    assert value(first, "k2_silver_dlq_rate", exchange="binance", hour=hour) == 1.0
    assert value(first, "k2_silver_bronze_rows", exchange="binance", hour=hours_back(1)) == 0
    assert value(first, "k2_silver_dlq_rate", exchange="binance", hour=hours_back(1)) == 0
    age = value(first, "k2_newest_closed_hour_age_seconds", layer="silver", asset="silver_binance_trades")
    assert 0 <= age <= 3600  # the hour before this one ended less than an hour ago
    assert value(first, "k2_runs_total", job="__ASSET_JOB", status="SUCCESS") == 1
    categories = {
        k[1]: v for k, v in first.items() if k[0] == "k2_silver_dlq_category_rows" and ("hour", hour) in k[1]
    }
    assert sum(categories.values()) == 3_000, categories
    assert (
        value(first, "k2_asset_check_failing", asset="silver_binance_trades", check="dlq_rate_within_limits")
        == 1
    )
    print(text)


# --- docker/: Prometheus, its alert rules and Grafana's dashboards against the exported names ---

PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "increase",
    "irate",
    "delta",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "time",
    "absent",
    "histogram_quantile",
    "topk",
    "bottomk",
    "clamp_min",
    "clamp_max",
    "sort",
    "sort_desc",
    "label_replace",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "sum_over_time",
    "vector",
    "scalar",
    "timestamp",
    "inf",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: identifiers outside {...} label matchers, [..] ranges, strings."""
    stripped = re.sub(r'"[^"]*"', '""', expr)
    stripped = re.sub(r"\{[^}]*\}", "", stripped)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped))
    return {n for n in names if n.lower() not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]?", n)}


def assert_promql_structure(expr: str) -> None:
    """The checks promtool would fail first: balanced brackets, no empty expression, a known metric."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            assert stack and stack.pop() == pairs[char], f"unbalanced {char!r} in {expr!r}"
    assert not stack and expr.strip(), f"unbalanced or empty: {expr!r}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    return exported_names(tmp_path_factory.mktemp("k2home"))


def test_prometheus_scrapes_the_exporter_and_loads_the_rules() -> None:
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "k2-metrics:9308" in targets
    assert config["rule_files"] == ["/etc/prometheus/k2-alerts.yml"]
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    command = compose["services"]["k2-metrics"]["command"]
    assert command[:2] == ["k2", "metrics"] and "--bind" in command and "9308" in command


def test_alert_rules_parse_and_read_exported_metrics(exported: set[str]) -> None:
    rules = yaml.safe_load((DOCKER / "prometheus" / "k2-alerts.yml").read_text())
    alerts = {r["alert"]: r for group in rules["groups"] for r in group["rules"]}
    # One rule per webhook alert of k2_assets/operations/alerts.py.
    assert set(alerts) == {
        "K2RunFailed",
        "K2ErrorCheckFailed",
        "K2IngestionHalted",
        "K2ConsumerLagHigh",
        "K2ExchangeSilent",
    }
    for name, rule in alerts.items():
        assert_promql_structure(rule["expr"])
        names = promql_metric_names(rule["expr"])
        assert names and names <= exported, f"{name}: {names - exported} are not exported"
        assert rule["labels"]["severity"] in ("page", "ticket") and rule["annotations"]["summary"]


def test_dashboards_are_json_and_query_exported_metrics(exported: set[str]) -> None:
    dashboards = sorted((DOCKER / "grafana" / "dashboards").glob("*.json"))
    assert [d.stem for d in dashboards] == ["gold-freshness", "ingestion", "maintenance", "silver-quality"]
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
        assert exprs, path.name
        for expr in exprs:
            assert_promql_structure(expr)
            names = promql_metric_names(expr)
            assert names and names <= exported, f"{path.name}: {names - exported} are not exported"
    provisioning = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "k2.yml").read_text())
    assert provisioning["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
