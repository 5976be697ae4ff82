"""The Dagster instance K2 runs on, tested by what it does, with real processes and a real PostgreSQL.

- `prepare_dagster_home` puts the repo's instance file in $K2_HOME/dagster_home, and the SQLite storage
  follows K2_HOME; the PostgreSQL variant keeps every setting but storage identical, and serves a real
  webserver + daemon from a scratch database (created and dropped per test run).
- The daemon enforces what dagster.yaml promises: one ingestion run per exchange at a time (others
  queue), the `dagster/max_runtime` tag, and run retries for a crashed run worker.
- `k2 dev` brings everything up with automation on (simulated trades reach Bronze through a
  sensor-launched run) and stops everything it started on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psutil
import psycopg2
import pytest
import yaml

from k2_assets.cli.instance import (
    DAEMON_ENVIRONMENT,
    POSTGRES_INSTANCE_FILE,
    REPO_ROOT,
    SQLITE_INSTANCE_FILE,
    prepare_dagster_home,
)
from k2_resources.dev.devstack.kafka import free_ports
from k2_resources.dev.processes import group_members
from k2_resources.settings import POSTGRES_SETTINGS, read_env_file
from tests.conftest import k2, k2_env
from tests.test_ci_launch import (
    DAGSTER_BIN,
    DagsterServices,
    dagster_services,
    free_port,
    graphql,
    instance_environment,
    location_loaded,
    retry_decision,
    start_service,
    stop_group,
    submit_run,
    wait_for,
    wait_for_run,
)

POSTGRES_NAMES = [setting.name for setting in POSTGRES_SETTINGS]

PG_HOST = os.environ.get("K2_TEST_PG_HOST", "127.0.0.1")
PG_PORT = os.environ.get("K2_TEST_PG_PORT", "5432")
PG_USER = os.environ.get("K2_TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("K2_TEST_PG_ADMIN_DB", "test")
ACTIVE = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"}


# --------------------------------------------------------------------------------------------------
# Instance files and prepare_dagster_home
# --------------------------------------------------------------------------------------------------


def settings_without_storage(path: Path) -> dict:
    return {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "storage"}


def test_postgres_variant_differs_from_the_default_only_in_storage() -> None:
    sqlite, postgres = (
        yaml.safe_load(SQLITE_INSTANCE_FILE.read_text()),
        yaml.safe_load(POSTGRES_INSTANCE_FILE.read_text()),
    )
    assert sqlite["storage"] == {"sqlite": {"base_dir": {"env": "K2_HOME"}}}
    postgres_db = postgres["storage"]["postgres"]["postgres_db"]
    from_env = sorted(value["env"] for value in postgres_db.values() if isinstance(value, dict))
    assert from_env == sorted(POSTGRES_NAMES)
    assert postgres_db["scheme"] == "postgresql+psycopg2"
    assert settings_without_storage(SQLITE_INSTANCE_FILE) == settings_without_storage(POSTGRES_INSTANCE_FILE)
    # Limits live in `concurrency:` only; the coordinator carries none (mixing them is a config error).
    assert set(sqlite["run_coordinator"].get("config", {})) <= {"dequeue_interval_seconds"}
    assert "run_queue" not in sqlite


def test_prepare_dagster_home_puts_the_instance_in_k2_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("K2_HOME", "DAGSTER_HOME"):  # prepare_dagster_home exports both: restore them after
        monkeypatch.setenv(name, "unset-by-test")
    homes = [tmp_path / "one", tmp_path / "two"]
    for home in homes:
        dagster_home = prepare_dagster_home(home)
        assert dagster_home == home.resolve() / "dagster_home"
        assert (dagster_home / "dagster.yaml").read_text() == SQLITE_INSTANCE_FILE.read_text()
        assert os.environ["K2_HOME"] == str(home.resolve())
        assert os.environ["DAGSTER_HOME"] == str(dagster_home)
        with dg.DagsterInstance.get() as instance:
            instance.add_run(dg.DagsterRun(job_name=f"probe_{home.name}", run_id=str(uuid.uuid4())))
            assert_instance_settings(instance)
        assert (home / "history" / "runs.db").is_file() and (home / "schedules" / "schedules.db").is_file()
    # Two K2_HOMEs, one identical file: each home's runs stay in its own storage.
    for home in homes:
        monkeypatch.setenv("K2_HOME", str(home))
        with dg.DagsterInstance.from_config(str(home / "dagster_home")) as instance:
            assert [r.job_name for r in instance.get_runs()] == [f"probe_{home.name}"]


def assert_instance_settings(instance: dg.DagsterInstance) -> None:
    """What dagster.yaml promises, as the loaded instance (and so the daemon) sees it."""
    queue = instance.get_concurrency_config().run_queue_config
    assert queue is not None and queue.max_concurrent_runs == 5  # the fifth is maintenance's
    per_value = {"applyLimitPerUniqueValue": True}
    for limit in (
        {"key": "k2/ingestion", "value": per_value, "limit": 1},
        {"key": "dagster/partition", "value": per_value, "limit": 1},  # one run per hour at a time
        {"key": "k2/gold-dedup", "limit": 1},
        {"key": "k2/maintenance", "limit": 1},  # one table maintenance run at a time
    ):
        assert limit in queue.tag_concurrency_limits
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert instance.run_monitoring_enabled
    assert instance.run_monitoring_max_runtime_seconds == 6 * 3600  # runs without a max_runtime tag
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
    assert instance.run_retries_retry_on_asset_or_op_failure is False
    assert instance.telemetry_enabled is False
    # Live cost (bench/README.md): no freshness daemon (K2 has no FreshnessPolicy), monitoring once a minute.
    assert not instance.freshness_enabled and "FRESHNESS_DAEMON" not in instance.get_required_daemon_types()
    assert instance.run_monitoring_poll_interval_seconds == 60
    assert instance.run_coordinator.dequeue_interval_seconds == 10


def test_the_daemon_scans_for_crashed_runs_at_the_interval_k2_exports(tmp_path: Path) -> None:
    """Dagster reads the run retry daemon's interval from the environment when the daemon module is
    imported: a daemon started from the environment `prepare_dagster_home` leaves builds it at 30 s."""
    probe = (
        "from k2_assets.cli.instance import prepare_dagster_home; import sys\n"
        "prepare_dagster_home(sys.argv[1])\n"
        "import dagster as dg; from dagster._daemon.controller import create_daemon_of_type\n"
        "with dg.DagsterInstance.get() as instance:\n"
        "    print(create_daemon_of_type('EVENT_LOG_CONSUMER', instance).interval_seconds)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in DAEMON_ENVIRONMENT}
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "home")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        done.stdout.split()[-1]
        == DAEMON_ENVIRONMENT["DAGSTER_EVENT_LOG_CONSUMER_DAEMON_INTERVAL_SECONDS"]
        == "30"
    )


def test_postgres_home_needs_its_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in POSTGRES_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("K2_HOME", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with pytest.raises(RuntimeError) as raised:
        prepare_dagster_home(tmp_path, postgres=True)
    assert all(name in str(raised.value) for name in POSTGRES_NAMES)
    assert not (tmp_path / "dagster_home" / "dagster.yaml").exists()


# --------------------------------------------------------------------------------------------------
# PostgreSQL: a scratch database per test run
# --------------------------------------------------------------------------------------------------


def pg_connect(database: str) -> psycopg2.extensions.connection:
    """An autocommit connection (CREATE/DROP DATABASE refuse to run in a transaction)."""
    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=database)
    connection.autocommit = True
    return connection


@pytest.fixture()
def scratch_database() -> Iterator[str]:
    """An empty database of this test's own, dropped afterwards whatever happened."""
    name = f"k2_dagster_{uuid.uuid4().hex[:12]}"
    with closing(pg_connect(PG_ADMIN_DB)) as admin, admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with closing(pg_connect(PG_ADMIN_DB)) as admin, admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_settings(devstack_home: Path, database: str) -> dict[str, str]:
    """The dev stack's settings plus the instance's PostgreSQL settings for `database`."""
    return {
        **read_env_file(devstack_home / "devstack.env"),
        "K2_DAGSTER_PG_HOST": PG_HOST,
        "K2_DAGSTER_PG_PORT": PG_PORT,
        "K2_DAGSTER_PG_USER": PG_USER,
        "K2_DAGSTER_PG_PASSWORD": "",
        "K2_DAGSTER_PG_DB": database,
    }


def test_postgres_instance_serves_webserver_and_daemon(
    devstack_home: Path, scratch_database: str, tmp_path: Path
) -> None:
    home = tmp_path / "k2home"
    settings = postgres_settings(devstack_home, scratch_database)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**settings, "K2_HOME": "", "DAGSTER_HOME": ""}.items():
            patch.setenv(key, value)
        dagster_home = prepare_dagster_home(home, postgres=True)
        assert (dagster_home / "dagster.yaml").read_text() == POSTGRES_INSTANCE_FILE.read_text()
        with dg.DagsterInstance.get() as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert_instance_settings(instance)
        env = k2_env(home, K2_AUTOMATION="off", **settings)
        with dagster_services(env, tmp_path / "logs") as services:
            run_id = submit_run(services.port, "gold_dedup_job", {})
            assert wait_for_run(services.port, run_id) == "SUCCESS"
    with closing(pg_connect(scratch_database)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
        assert cursor.fetchall() == [("SUCCESS",)]
        cursor.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", (run_id,))
        assert cursor.fetchone()[0] > 5


# --------------------------------------------------------------------------------------------------
# PostgreSQL + a code server of its own (the Docker topology): a killed code server
# --------------------------------------------------------------------------------------------------

START_SENSOR = """
mutation($name: String!) { startSensor(sensorSelector: {repositoryLocationName: "k2",
  repositoryName: "__repository__", sensorName: $name}) { __typename } }
"""


def start_code_server(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`dagster code-server start`, as docker/Dockerfile runs `k2-code`: it executes the runs."""
    command = [str(DAGSTER_BIN / "dagster"), "code-server", "start", "-h", "127.0.0.1", "-p", str(port)]
    command += ["-m", "k2_assets.definitions", "-a", "defs", "--location-name", "k2"]
    return start_service(command, env, log)


def code_server_serving(port: int) -> bool:
    """The health check docker-compose.yml gives `k2-code`."""
    command = [str(DAGSTER_BIN / "dagster"), "api", "grpc-health-check", "-p", str(port)]
    return subprocess.run(command, capture_output=True, timeout=60).returncode == 0


@contextmanager
def grpc_topology(env: dict[str, str], logs: Path) -> Iterator[tuple[int, int, list[subprocess.Popen]]]:
    """Code server + webserver + daemon on a gRPC workspace: (webserver port, code port, processes)."""
    logs.mkdir(parents=True, exist_ok=True)
    code_port, web_port = free_ports(2)
    workspace = logs / "workspace.yaml"
    workspace.write_text(
        yaml.safe_dump(
            {"load_from": [{"grpc_server": {"host": "127.0.0.1", "port": code_port, "location_name": "k2"}}]}
        )
    )
    processes = [start_code_server(code_port, env, logs / "code-1.log")]
    wait_for(lambda: code_server_serving(code_port), 180, "the code server to serve", 2.0)
    web = [
        str(DAGSTER_BIN / "dagster-webserver"),
        "-h",
        "127.0.0.1",
        "-p",
        str(web_port),
        "-w",
        str(workspace),
    ]
    processes.append(start_service(web, env, logs / "webserver.log"))
    processes.append(
        start_service(
            [str(DAGSTER_BIN / "dagster-daemon"), "run", "-w", str(workspace)], env, logs / "daemon.log"
        )
    )
    try:
        wait_for(lambda: location_loaded(web_port), 180, "the webserver to load k2 from the code server", 2.0)
        yield web_port, code_port, processes
    except BaseException:
        for log in sorted(logs.glob("*.log")):
            print(
                f"--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]),
                file=sys.stderr,
            )
        raise
    finally:
        for process in processes:
            stop_group(process)


def ingestion_runs(instance: dg.DagsterInstance, exchange: str) -> list[dg.DagsterRun]:
    return [
        r.dagster_run
        for r in instance.get_run_records(filters=dg.RunsFilter(tags={"k2/ingestion": exchange}))
    ]


def test_a_killed_code_server_fails_its_runs_and_ingestion_resumes(
    devstack_home: Path, scratch_database: str, tmp_path: Path
) -> None:
    """kill -9 of the code server (what an upgrade or an OOM does to `k2-code`) with two ingestion runs in
    flight: both are failed within a bound, their slots free up, and ingestion resumes by itself."""
    home = tmp_path / "k2home"
    settings = postgres_settings(devstack_home, scratch_database)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**settings, "K2_HOME": "", "DAGSTER_HOME": ""}.items():
            patch.setenv(key, value)
        prepare_dagster_home(home, postgres=True)
        env = k2_env(home, K2_AUTOMATION="off", **settings)
        with (
            grpc_topology(env, tmp_path / "logs") as (port, code_port, processes),
            dg.DagsterInstance.get() as instance,
        ):
            graphql(port, START_SENSOR, {"name": "bronze_binance_ingestion_sensor"})
            kraken = submit_run(port, "bronze_kraken_ingestion", ingestion_config("kraken", False, 900))
            binance = wait_for(lambda: ingestion_runs(instance, "binance"), 120, "the sensor's binance run")[
                0
            ]
            for run_id in (kraken, binance.run_id):
                wait_for(lambda r=run_id: run_worker_pid(instance, r), 180, f"run {run_id} to start its step")

            kill_tree(processes[0].pid)  # the code server, its run workers with it
            killed_at = time.monotonic()
            processes[0] = start_code_server(code_port, env, tmp_path / "logs" / "code-2.log")

            def both_failed() -> bool:
                statuses = {instance.get_run_by_id(r).status for r in (kraken, binance.run_id)}
                return statuses == {dg.DagsterRunStatus.FAILURE}

            wait_for(both_failed, 300, "the orphaned runs to be failed", 5.0)
            failed_within = time.monotonic() - killed_at
            texts = "\n".join(event_texts(instance, kraken))
            assert "worker process" in texts and "no longer exists" in texts, texts[-2000:]

            def resumed() -> dg.DagsterRun | None:
                later = [r for r in ingestion_runs(instance, "binance") if r.run_id != binance.run_id]
                return next((r for r in later if r.status == dg.DagsterRunStatus.STARTED), None)

            again = wait_for(resumed, 300, "a new binance ingestion run to be started", 5.0)
            assert again.tags.get("k2/ingestion") == "binance"
            assert wait_for(
                lambda: run_worker_pid(instance, again.run_id), 120, "the new run's step to start"
            )
            print(
                f"orphaned runs failed {failed_within:.0f} s after the kill; binance resumed in {again.run_id}"
            )
    assert failed_within < 300


# --------------------------------------------------------------------------------------------------
# k2 dev
# --------------------------------------------------------------------------------------------------

SENSORS_QUERY = """
{ sensorsOrError(repositorySelector: {repositoryLocationName: "k2", repositoryName: "__repository__"}) {
    __typename ... on Sensors { results { name sensorState { status } } } } }
"""


def sensor_states(port: int) -> dict[str, str]:
    results = graphql(port, SENSORS_QUERY)["sensorsOrError"]["results"]
    return {s["name"]: s["sensorState"]["status"] for s in results}


def bronze_rows(home: Path) -> int:
    from k2_assets.bronze.tables import bronze_table_spec
    from k2_resources.exchanges import exchange
    from k2_resources.iceberg import IcebergCatalogResource

    properties = {
        "type": "sql",
        "uri": f"sqlite:///{home}/catalog.db",
        "warehouse": f"file://{home}/warehouse",
    }
    try:
        table = IcebergCatalogResource(properties=properties).load_table(
            bronze_table_spec(exchange("binance"))
        )
    except Exception:  # the table appears with the ingestion run's first commit
        return 0
    return table.scan().count()


# `k2 dev`'s Dagster children: the code server, webserver and daemon, each through
# k2_assets/cli/quiet_dagster.py (`python -m k2_assets.cli.quiet_dagster <module> ...`).
QUIET = ["-m", "k2_assets.cli.quiet_dagster"]
DAGSTER_MODULES = ["dagster", "dagster._daemon", "dagster_webserver"]


def dagster_module(cmdline: list[str]) -> str | None:
    """The Dagster module a `k2 dev` child runs through quiet_dagster, None for any other child."""
    return cmdline[3] if cmdline[1:3] == QUIET else None


def still_running(process: subprocess.Popen, what: str) -> bool:
    """True while `process` runs; an exit fails the wait at once instead of at its timeout."""
    if process.poll() is not None:
        raise AssertionError(f"{what} exited with {process.returncode} before it was ready")
    return True


def test_k2_dev_streams_into_bronze_and_stops_everything(tmp_path: Path) -> None:
    home, port = tmp_path / "k2home", free_port()
    log = tmp_path / "k2dev.log"
    env = k2_env(home)
    with log.open("ab") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "k2_assets.cli", "dev", "--port", str(port), "--rate", "50"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: still_running(dev, "k2 dev") and location_loaded(port), 300, "k2 dev's webserver", 2.0
        )
        states = sensor_states(port)
        assert states["bronze_binance_ingestion_sensor"] == "RUNNING", states
        assert states["k2_automation_sensor"] == "RUNNING", states
        children = psutil.Process(dev.pid).children()
        simulators = [p for p in children if "produce" in p.cmdline()]
        dagster = [p for p in children if dagster_module(p.cmdline())]
        assert len(simulators) == 2, [p.cmdline() for p in children]
        # One code server, served directly (no `dagster dev`, no `code-server start` proxy), a webserver and
        # a daemon, each with Dagster's polling slowed down.
        assert sorted(dagster_module(p.cmdline()) for p in dagster) == DAGSTER_MODULES, [
            p.cmdline() for p in children
        ]
        code_server = next(p for p in dagster if dagster_module(p.cmdline()) == "dagster")
        assert code_server.cmdline()[4:6] == ["api", "grpc"], code_server.cmdline()
        wait_for(lambda: bronze_rows(home), 300, "simulated trades in Bronze via the sensor's run", 5.0)

        dev.send_signal(signal.SIGTERM)
        assert dev.wait(timeout=180) == 0
        assert not group_members(dev.pid), group_members(dev.pid)
        for process in dagster:
            assert not group_members(process.pid), (process.cmdline(), group_members(process.pid))
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in simulators)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("K2_HOME", str(home))
            with dg.DagsterInstance.from_config(str(home / "dagster_home")) as instance:
                active = [r.status.value for r in instance.get_runs() if r.status.value in ACTIVE]
        assert active == []
    except BaseException:
        print(log.read_text(errors="replace")[-6000:], file=sys.stderr)
        raise
    finally:
        if dev.poll() is None:
            stop_group(dev)
        k2("devstack", "down", home=home, check=False)


# --------------------------------------------------------------------------------------------------
# What the daemon enforces (SQLite instance, automation off)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services(devstack_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterServices]:
    logs = tmp_path_factory.mktemp("instance-logs")
    with (
        instance_environment(devstack_home, K2_AUTOMATION="off") as env,
        dagster_services(env, logs) as running,
    ):
        yield running


def ingestion_config(exchange: str, drain: bool, max_runtime_seconds: float = 3600.0) -> dict:
    config = {"drain": drain, "max_runtime_seconds": max_runtime_seconds, "commit_interval_seconds": 2.0}
    return {"ops": {f"ingest_{exchange}_trades": {"config": config}}}


@dataclass
class RunTimes:
    status: str
    start: float | None
    end: float | None


def run_times(instance: dg.DagsterInstance, run_id: str) -> RunTimes:
    record = instance.get_run_record_by_id(run_id)
    assert record is not None, run_id
    return RunTimes(record.dagster_run.status.value, record.start_time, record.end_time)


def watch_until_finished(
    instance: dg.DagsterInstance, run_ids: dict[str, str], timeout: float
) -> list[dict[str, str]]:
    """Sample every run's status once a second until none is active; the samples, in order."""
    samples: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sample = {name: run_times(instance, run_id).status for name, run_id in run_ids.items()}
        samples.append(sample)
        if not ACTIVE & set(sample.values()):
            return samples
        time.sleep(1.0)
    raise AssertionError(f"runs still active after {timeout:.0f} s: {samples[-1]}")


def test_one_ingestion_run_per_exchange_and_max_runtime(services: DagsterServices) -> None:
    """Two binance runs queue behind each other; a kraken run starts beside them and is stopped by
    run monitoring at its `dagster/max_runtime`, far before its own 300 s limit."""
    port = services.port
    run_ids = {
        "binance_a": submit_run(port, "bronze_binance_ingestion", ingestion_config("binance", False, 20))
    }
    wait_for(lambda: run_status_is(run_ids["binance_a"], "STARTED"), 120, "the first binance run to start")
    run_ids["binance_b"] = submit_run(port, "bronze_binance_ingestion", ingestion_config("binance", True))
    run_ids["kraken"] = submit_run(
        port,
        "bronze_kraken_ingestion",
        ingestion_config("kraken", False, 300),
        tags={"dagster/max_runtime": "10", "dagster/max_retries": "0"},
    )
    with dg.DagsterInstance.get() as instance:
        samples = watch_until_finished(instance, run_ids, 240)
        times = {name: run_times(instance, run_id) for name, run_id in run_ids.items()}
        kraken_run = instance.get_run_by_id(run_ids["kraken"])
        kraken_logs = "\n".join(event_texts(instance, run_ids["kraken"]))

    a, b, kraken = times["binance_a"], times["binance_b"], times["kraken"]
    assert (a.status, b.status) == ("SUCCESS", "SUCCESS"), times
    assert any(s["binance_a"] == "STARTED" and s["binance_b"] == "QUEUED" for s in samples), samples
    assert b.start >= a.end, "the second binance run started before the first ended"
    # Dequeued (STARTING or later) while binance_a ran: the run's own start, a new process, can take
    # longer than binance_a's whole run on a loaded machine, so start times would not show the limit.
    assert any(
        s["binance_a"] == "STARTED" and s["kraken"] not in ("QUEUED", "NOT_STARTED") for s in samples
    ), "the kraken run waited for binance: the limit is not per exchange"
    assert kraken.status == "FAILURE", times
    assert "Exceeded maximum runtime of 10 seconds" in kraken_logs, kraken_logs[-2000:]
    assert kraken.end - kraken.start < 120, kraken
    assert kraken_run.tags.get("dagster/will_retry") != "true"


def event_texts(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The run's log lines, with the messages Dagster's own events carry (run failure, cancellation)."""
    texts = []
    for entry in instance.all_logs(run_id):
        texts.append(entry.user_message)
        if entry.dagster_event is not None and entry.dagster_event.message:
            texts.append(entry.dagster_event.message)
    return texts


def run_status_is(run_id: str, status: str) -> bool:
    with dg.DagsterInstance.get() as instance:
        return run_times(instance, run_id).status == status


def run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid of the run's worker process, as its RUN_START event recorded it (once the step runs)."""
    logs = instance.all_logs(run_id)
    started = any(e.dagster_event and e.dagster_event.event_type_value == "STEP_START" for e in logs)
    for entry in logs:
        event = entry.dagster_event
        if started and event is not None and event.event_type_value == "PIPELINE_START":
            return event.pid
    return None


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants at once, as the OOM killer or a lost machine would."""
    parent = psutil.Process(pid)
    processes = [parent, *parent.children(recursive=True)]
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=10)


def test_crashed_run_worker_is_retried(services: DagsterServices) -> None:
    """A run whose worker is killed fails as a crash, not a step failure, so run_retries re-executes it."""
    config = ingestion_config("binance", False, 10)
    run_id = submit_run(services.port, "bronze_binance_ingestion", config)
    with dg.DagsterInstance.get() as instance:
        pid = wait_for(lambda: run_worker_pid(instance, run_id), 120, "the run's step to start")
        kill_tree(pid)
        assert wait_for_run(services.port, run_id, 120) == "FAILURE"
        assert wait_for(lambda: retry_decision(instance, run_id), 60, "the retry decision") == "true"
        retry = wait_for(lambda: retry_of(instance, run_id), 120, "the retry run to be launched")
        assert retry.tags.get("k2/ingestion") == "binance"
        assert wait_for_run(services.port, retry.run_id, 180) == "SUCCESS"


def retry_of(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRun | None:
    records = instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/parent_run_id": run_id}))
    return records[0].dagster_run if records else None
