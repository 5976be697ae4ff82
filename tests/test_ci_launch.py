"""K2 launched as a CI pipeline launches it: real dev stack, real `dagster-daemon` and `dagster-webserver`.

A fresh dev stack and a DAGSTER_HOME from `prepare_dagster_home` (SQLite under K2_HOME), automation
off so only what the test submits runs. Simulated trades of the last hours are produced and drained
into Bronze with `k2 ingest`; then `dagster job launch` submits gold_dedup_job with its checked-in run
config and a GraphQL `launchPartitionBackfill` backfills the Silver and Gold hours (both single-run
backfill policies). The test waits through the webserver's GraphQL API, as CI would, and then reads
Gold itself. A run against a dead broker must be reported FAILURE, and not retried.

The process helpers here (free ports, starting and stopping the Dagster services, GraphQL) are shared
by the other tests that need a running instance.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.compute as pc
import pytest

from k2_assets.cli.instance import REPO_ROOT, WORKSPACE_FILE, prepare_dagster_home
from k2_assets.partitions import hour_key
from k2_resources.dev.devstack.kafka import free_ports
from k2_resources.dev.processes import stop_process_group
from k2_resources.exchanges import EXCHANGES
from k2_resources.settings import read_env_file
from tests.conftest import k2, k2_env

T = TypeVar("T")
DAGSTER_BIN = Path(sys.executable).parent
TERMINAL_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}
TERMINAL_BACKFILL_STATUSES = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
SERVICES_START_TIMEOUT = 180.0
RUN_TIMEOUT = 300.0
BACKFILL_TIMEOUT = 420.0
TRADES_PER_EXCHANGE = 300
TRADE_RATE = 0.04  # trades per second of market time: 300 trades span about 2 h 5 min
TRADES_START = "-2h30m"


# --------------------------------------------------------------------------------------------------
# Helpers shared with test_instance.py and test_browser.py
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    return free_ports(1)[0]


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 1.0) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def stop_group(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group `process` leads, then SIGKILL whatever is left after `timeout`."""
    stop_process_group(process.pid, timeout)
    if process.poll() is None:
        process.wait(timeout=10)


def graphql(port: int, query: str, variables: dict[str, Any] | None = None, timeout: float = 60.0) -> dict:
    """One query to the webserver's GraphQL endpoint; GraphQL errors fail the test with their text."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.loads(response.read())
    assert not answer.get("errors"), answer["errors"]
    return answer["data"]


LOCATION_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } }
} } } }
"""


def location_loaded(port: int) -> bool:
    """Whether the webserver answers and has loaded the k2 code location; a load error fails at once."""
    try:
        data = graphql(port, LOCATION_QUERY, timeout=10)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
    entries = data["workspaceOrError"].get("locationEntries") or []
    for entry in entries:
        error = entry["locationOrLoadError"]
        if error and error["__typename"] == "PythonError":
            raise AssertionError(f"code location {entry['name']} failed to load: {error['message']}")
        if entry["name"] == "k2" and entry["loadStatus"] == "LOADED" and error:
            return True
    return False


@dataclass
class DagsterServices:
    """Running `dagster-webserver` (and `dagster-daemon`) on the repo's workspace.yaml."""

    port: int
    processes: list[subprocess.Popen]
    logs: Path

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name} ---\n" + "\n".join(text))
        return "\n".join(parts)


def start_service(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start one service from the repo root, in a process group of its own (so it can be stopped whole)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


@contextmanager
def dagster_services(env: dict[str, str], logs: Path, daemon: bool = True) -> Iterator[DagsterServices]:
    """Webserver (and daemon) as CI starts them; always stopped, with their run workers, on exit."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    workspace = str(WORKSPACE_FILE)
    processes = [
        start_service(
            [str(DAGSTER_BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", workspace],
            env,
            logs / "webserver.log",
        )
    ]
    if daemon:
        daemon_command = [str(DAGSTER_BIN / "dagster-daemon"), "run", "-w", workspace]
        processes.append(start_service(daemon_command, env, logs / "daemon.log"))
    services = DagsterServices(port, processes, logs)
    try:
        wait_for(lambda: location_loaded(port), SERVICES_START_TIMEOUT, "the webserver to load k2", 2.0)
        yield services
    except BaseException:
        print(services.log_tail(), file=sys.stderr)
        raise
    finally:
        for process in processes:
            stop_group(process)


def submit_run(port: int, job: str, run_config: dict, tags: dict[str, str] | None = None) -> str:
    """Submit a run through the public GraphQL client, as a CI script would; returns its id."""
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=60)
    return client.submit_job_execution(job, run_config=run_config, tags=tags or {})


def run_status(port: int, run_id: str) -> str:
    from dagster_graphql import DagsterGraphQLClient

    return DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=60).get_run_status(run_id).value


def wait_for_run(port: int, run_id: str, timeout: float = RUN_TIMEOUT) -> str:
    """The run's final status, polled through the GraphQL client until it is terminal."""

    def finished() -> str | None:
        status = run_status(port, run_id)
        return status if status in TERMINAL_RUN_STATUSES else None

    return wait_for(finished, timeout, f"run {run_id} to finish", 2.0)


def run_failure_text(run_id: str) -> str:
    """Every error the run logged, from the instance (DAGSTER_HOME): the diagnosis when it failed."""
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        texts = []
        for entry in instance.all_logs(run_id):
            event = entry.dagster_event
            if event is not None and event.event_type_value == "STEP_FAILURE":
                texts.append(event.step_failure_data.error.to_string())
            elif event is not None and event.event_type_value == "PIPELINE_FAILURE":
                texts.append(entry.user_message)
        return "\n".join(texts)


def retry_decision(instance: Any, run_id: str) -> str | None:
    """The `dagster/will_retry` tag Dagster sets on a failed run once it has applied run_retries."""
    return instance.get_run_by_id(run_id).tags.get("dagster/will_retry")


def hours_between(start: datetime, end: datetime) -> list[str]:
    """Hour partition keys from start's hour to end's hour, both included."""
    hour = start.replace(minute=0, second=0, microsecond=0)
    keys = []
    while hour <= end:
        keys.append(hour_key(hour))
        hour += timedelta(hours=1)
    return keys


def produce_and_drain(home: Path, count: int, rate: float, start: str, seed: int) -> dict[str, dict]:
    """Simulated trades onto every exchange's topic, drained into Bronze by `k2 ingest`: the reports."""
    reports = {}
    for offset, exchange in enumerate(EXCHANGES):
        produced = k2(
            "produce",
            "--exchange",
            exchange.name,
            "--count",
            str(count),
            "--rate",
            str(rate),
            "--start",
            start,
            "--seed",
            str(seed + offset),
            home=home,
        )
        reports[exchange.name] = json.loads(produced.stdout)
    for exchange in EXCHANGES:
        drained = k2("ingest", "--exchange", exchange.name, "--drain", home=home, check=False, timeout=300)
        assert drained.returncode == 0, drained.stderr[-3000:]
    return reports


@contextmanager
def instance_environment(home: Path, **extra: str) -> Iterator[dict[str, str]]:
    """This process pointed at `home`'s dev stack and instance; the environment the services get."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**read_env_file(home / "devstack.env"), **extra}.items():
            patch.setenv(key, value)
        patch.setenv("K2_HOME", str(home))
        patch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
        prepare_dagster_home(home)
        yield k2_env(home, **extra)


# --------------------------------------------------------------------------------------------------
# run_config/: one checked-in run config per job that is not per exchange, valid for it; a per-exchange
# job runs with its defaults (run_config/README.md), so adding an exchange adds no file
# --------------------------------------------------------------------------------------------------

RUN_CONFIG_DIR = REPO_ROOT / "run_config"


def user_jobs(defs: Any) -> list[str]:
    """The jobs an operator launches (Dagster's implicit `__...` asset jobs excluded)."""
    return sorted(j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__"))


@pytest.fixture()
def k2_definitions(unreachable_addresses: None) -> Any:
    """The code location's Definitions; resource settings get placeholders (nothing is contacted)."""
    from k2_assets.definitions import defs

    return defs


def per_exchange(job: str) -> bool:
    return any(re.search(rf"(^|_){e.name}_", job) for e in EXCHANGES)


def test_every_job_not_per_exchange_has_exactly_one_run_config(k2_definitions: Any) -> None:
    configs = sorted(p.stem for p in RUN_CONFIG_DIR.glob("*.yaml"))
    assert configs == [j for j in user_jobs(k2_definitions) if not per_exchange(j)]


def test_every_per_exchange_job_runs_with_its_defaults(k2_definitions: Any) -> None:
    import dagster as dg

    jobs = [j for j in user_jobs(k2_definitions) if per_exchange(j)]
    assert len(jobs) == 5 * len(EXCHANGES), jobs
    for name in jobs:
        assert dg.validate_run_config(k2_definitions.resolve_job_def(name), {})["ops"], name


@pytest.mark.parametrize("path", sorted(RUN_CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_run_config_validates_against_its_job(k2_definitions: Any, path: Path) -> None:
    import dagster as dg
    import yaml

    job = k2_definitions.resolve_job_def(path.stem)
    resolved = dg.validate_run_config(job, yaml.safe_load(path.read_text()))
    assert set(resolved["ops"]) >= set(yaml.safe_load(path.read_text())["ops"])


def test_an_invalid_run_config_is_refused(k2_definitions: Any) -> None:
    import dagster as dg

    job = k2_definitions.resolve_job_def("gold_dedup_job")
    bad = {"ops": {"find_gold_duplicates": {"config": {"lookback_hours": "a day"}}}}
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.validate_run_config(job, bad)


# --------------------------------------------------------------------------------------------------
# The CI launch
# --------------------------------------------------------------------------------------------------


@dataclass
class CiStack:
    home: Path
    env: dict[str, str]
    services: DagsterServices
    reports: dict[str, dict]


@pytest.fixture(scope="module")
def ci_stack(devstack_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CiStack]:
    """Trades of the last hours in Bronze, and a running webserver + daemon with automation off."""
    with instance_environment(devstack_home, K2_AUTOMATION="off") as env:
        reports = produce_and_drain(devstack_home, TRADES_PER_EXCHANGE, TRADE_RATE, TRADES_START, seed=41)
        logs = tmp_path_factory.mktemp("ci-logs")
        with dagster_services(env, logs) as services:
            yield CiStack(devstack_home, env, services, reports)


def launch_job_with_cli(stack: CiStack, job: str) -> str:
    """`dagster job launch` with the job's checked-in run config; the run id is chosen here."""
    run_id = str(uuid.uuid4())
    command = [
        str(DAGSTER_BIN / "dagster"),
        *("job", "launch", "-w", "workspace.yaml", "-j", job),
        *("-c", f"run_config/{job}.yaml", "--run-id", run_id),
    ]
    launched = subprocess.run(
        command, cwd=REPO_ROOT, env=stack.env, capture_output=True, text=True, timeout=180
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    return run_id


BACKFILL_MUTATION = """
mutation Backfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}
"""

BACKFILL_QUERY = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status numPartitions error { message } runs { runId status jobName } }
    ... on PythonError { message }
  }
}
"""


def silver_and_gold_keys() -> list[list[str]]:
    from k2_assets.gold.assets import GOLD_KEY
    from k2_assets.silver.assets import dlq_asset_key, silver_asset_key

    keys = [k for e in EXCHANGES for k in (silver_asset_key(e), dlq_asset_key(e))] + [GOLD_KEY]
    return [list(key.path) for key in keys]


def launch_backfill(port: int, partitions: list[str]) -> str:
    """An asset backfill of Silver (and its DLQ slices) and Gold over `partitions`, via GraphQL."""
    params = {
        "assetSelection": [{"path": path} for path in silver_and_gold_keys()],
        "partitionNames": partitions,
        "title": "CI backfill of Silver and Gold",
    }
    result = graphql(port, BACKFILL_MUTATION, {"params": params})["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return result["backfillId"]


def wait_for_backfill(port: int, backfill_id: str, timeout: float = BACKFILL_TIMEOUT) -> dict:
    def finished() -> dict | None:
        backfill = graphql(port, BACKFILL_QUERY, {"id": backfill_id})["partitionBackfillOrError"]
        assert backfill["__typename"] == "PartitionBackfill", backfill
        return backfill if backfill["status"] in TERMINAL_BACKFILL_STATUSES else None

    return wait_for(finished, timeout, f"backfill {backfill_id} to finish", 3.0)


def gold_rows_by_hour(home: Path) -> dict[str, set[str]]:
    """Gold's message_ids per event hour, read from the Iceberg table under K2_HOME."""
    from k2_assets.gold.tables import GOLD_TABLE_SPEC
    from k2_resources.iceberg import IcebergCatalogResource

    table = IcebergCatalogResource().load_table(GOLD_TABLE_SPEC)
    rows = table.scan(selected_fields=("message_id", "timestamp")).to_arrow()
    hours = pc.divide(rows.column("timestamp"), 3_600_000_000).to_pylist()
    by_hour: dict[str, set[str]] = {}
    for message_id, hour in zip(rows.column("message_id").to_pylist(), hours, strict=True):
        moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(hours=hour)
        by_hour.setdefault(hour_key(moment), set()).add(message_id)
    return by_hour


def test_job_launch_and_silver_gold_backfill_succeed(ci_stack: CiStack) -> None:
    reports = ci_stack.reports
    first_trade = min(datetime.fromisoformat(r["start"]) for r in reports.values())
    last_trade = max(datetime.fromisoformat(r["end"]) for r in reports.values())
    trade_hours = hours_between(first_trade, last_trade)
    # Silver partitions are Bronze ingestion hours (just now); Gold partitions are trade hours.
    partitions = hours_between(first_trade, datetime.now(UTC))

    dedup_run = launch_job_with_cli(ci_stack, "gold_dedup_job")
    backfill_id = launch_backfill(ci_stack.services.port, partitions)

    backfill = wait_for_backfill(ci_stack.services.port, backfill_id)
    dedup_status = wait_for_run(ci_stack.services.port, dedup_run)
    failures = {
        r["runId"]: run_failure_text(r["runId"]) for r in backfill["runs"] if r["status"] != "SUCCESS"
    }
    assert backfill["status"] == "COMPLETED_SUCCESS", (backfill, failures)
    assert backfill["runs"] and all(r["status"] == "SUCCESS" for r in backfill["runs"]), backfill
    assert dedup_status == "SUCCESS", run_failure_text(dedup_run)

    gold = gold_rows_by_hour(ci_stack.home)
    produced = {m for r in reports.values() for m in r["message_ids"]["clean"]}
    assert len(produced) == TRADES_PER_EXCHANGE * len(EXCHANGES)
    assert sorted(gold) == trade_hours, f"Gold hours {sorted(gold)} != trade hours {trade_hours}"
    assert set().union(*gold.values()) == produced
    assert sum(len(ids) for ids in gold.values()) == len(produced)


def test_run_against_a_dead_broker_is_reported_failure_and_not_retried(ci_stack: CiStack) -> None:
    import dagster as dg

    dead_broker = f"127.0.0.1:{free_port()}"
    run_config = {
        "ops": {"ingest_binance_trades": {"config": {"drain": True, "broker_timeout_seconds": 3.0}}},
        "resources": {"kafka": {"config": {"bootstrap_servers": dead_broker}}},
    }
    run_id = submit_run(ci_stack.services.port, "bronze_binance_ingestion", run_config)

    assert wait_for_run(ci_stack.services.port, run_id) == "FAILURE"
    assert dead_broker in run_failure_text(run_id)
    with dg.DagsterInstance.get() as instance:
        decision = wait_for(lambda: retry_decision(instance, run_id), 60, "the decision on a retry")
        assert decision == "false", instance.get_run_by_id(run_id).tags
        time.sleep(10)  # a retry would be launched within a daemon tick or two
        retries = instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/parent_run_id": run_id}))
        assert retries == [], [r.dagster_run.run_id for r in retries]
