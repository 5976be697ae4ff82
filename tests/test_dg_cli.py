"""K2 as Dagster 1.13 users drive it: `dg check defs`, `dg dev` and `dg launch --assets ... --partition ...`.

Against a real dev stack and a DAGSTER_HOME from `prepare_dagster_home` (the fixtures of
test_ci_launch.py): simulated trades are produced and drained into Bronze with `k2 ingest`, then `dg`
(dagster-dg-cli, reading [tool.dg] in pyproject.toml) loads the code location, serves it in the UI, and
materialises one Silver hour, which must hold exactly the trades produced, with its checks passed.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from k2_assets.cli.instance import REPO_ROOT
from k2_resources.exchanges import exchange
from tests.test_ci_launch import (
    DAGSTER_BIN,
    SERVICES_START_TIMEOUT,
    free_port,
    hour_key,
    instance_environment,
    location_loaded,
    produce_and_drain,
    start_service,
    stop_group,
    wait_for,
)

DG = DAGSTER_BIN / "dg"
BINANCE = exchange("binance")
TRADES_PER_EXCHANGE = 200
# Drained within a minute or two: keep clear of the hour's end so one Silver hour holds them all.
LATEST_START_MINUTE = 56


@dataclass
class DgStack:
    env: dict[str, str]
    reports: dict[str, dict]
    ingestion_hour: str


def run_dg(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`dg ARGS` from the repository root, as a user types it there."""
    assert DG.exists(), f"{DG} is missing: dagster-dg-cli is a dependency (make install)"
    return subprocess.run(
        [str(DG), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def wait_out_the_hour_end() -> None:
    now = datetime.now(UTC)
    if now.minute >= LATEST_START_MINUTE:
        next_hour = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1, seconds=5)
        time.sleep((next_hour - now).total_seconds())


@pytest.fixture(scope="module")
def dg_stack(devstack_home: Path) -> Iterator[DgStack]:
    """Trades of the last hours drained into Bronze in this hour; automation off, no daemon needed."""
    with instance_environment(devstack_home, K2_AUTOMATION="off") as env:
        wait_out_the_hour_end()
        before = hour_key(datetime.now(UTC))
        reports = produce_and_drain(devstack_home, TRADES_PER_EXCHANGE, 0.04, "-2h", seed=61)
        after = hour_key(datetime.now(UTC))
        assert before == after, f"Bronze was drained across an hour boundary ({before}, {after})"
        yield DgStack(env, reports, after)


def test_dg_check_defs_loads_the_code_location(dg_stack: DgStack) -> None:
    checked = run_dg("check", "defs", env=dg_stack.env)
    assert checked.returncode == 0, checked.stderr[-4000:]
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr


def test_dg_dev_serves_the_code_location(dg_stack: DgStack, tmp_path: Path) -> None:
    """`dg dev` starts the webserver and daemon on the project; the UI's GraphQL API shows k2 loaded."""
    port = free_port()
    log = tmp_path / "dg-dev.log"
    process = start_service([str(DG), "dev", "--host", "127.0.0.1", "--port", str(port)], dg_stack.env, log)
    try:
        wait_for(lambda: location_loaded(port), SERVICES_START_TIMEOUT, "dg dev to load k2", 2.0)
    except BaseException:
        print(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        stop_group(process)


def silver_message_ids() -> set[str]:
    from k2_assets.silver.tables import silver_table_spec
    from k2_resources.iceberg import IcebergCatalogResource

    table = IcebergCatalogResource().load_table(silver_table_spec(BINANCE))
    return set(table.scan(selected_fields=("message_id",)).to_arrow().column("message_id").to_pylist())


def test_dg_launch_materialises_one_silver_hour(dg_stack: DgStack) -> None:
    from k2_assets.silver.assets import silver_asset_key

    partition = dg_stack.ingestion_hour
    launched = run_dg(
        *("launch", "--assets", "silver_binance_trades", "--partition", partition), env=dg_stack.env
    )
    assert launched.returncode == 0, launched.stderr[-4000:]

    key = silver_asset_key(BINANCE)
    with dg.DagsterInstance.get() as instance:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
        ).records
        assert records, f"no materialisation of {key.to_user_string()} {partition}"
        run = instance.get_run_by_id(records[0].run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags.get("dagster/partition") == partition
        evaluations = [
            entry.dagster_event.event_specific_data
            for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        ]
    conservation = [e for e in evaluations if e.check_name == "bronze_rows_equal_silver_plus_dlq"]
    assert [e.passed for e in conservation] == [True], evaluations

    produced = set(dg_stack.reports[BINANCE.name]["message_ids"]["clean"])
    assert len(produced) == TRADES_PER_EXCHANGE
    assert silver_message_ids() == produced
