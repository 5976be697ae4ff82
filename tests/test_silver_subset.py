"""`dagster asset materialize --select silver_binance_trades --partition H` works as typed: the Silver
multi-asset can be subset, and the one pass still writes Silver and the DLQ (conservation holds)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from k2_assets.cli.instance import REPO_ROOT, prepare_dagster_home
from k2_assets.silver.checks import CONSERVATION
from k2_assets.silver.tables import DLQ_TABLE_SPEC, silver_table_spec
from k2_resources.exchanges import exchange
from tests.lakehouse_helpers import lakehouse

HOUR = datetime(2026, 11, 23, 10, tzinfo=UTC)
BINANCE = exchange("binance")


@pytest.mark.parametrize("selected", ["silver_binance_trades", "silver_dlq_trades/binance"])
def test_materialize_one_silver_asset_from_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, selected: str
) -> None:
    with lakehouse(tmp_path / "k2home", monkeypatch) as lake:
        ingested = HOUR + timedelta(minutes=30)
        good = lake.ingest_trades(BINANCE, [ingested - timedelta(seconds=2)] * 60, ingested)
        lake.ingest(BINANCE, [(b"not avro", ingested)], ingested)  # 1 in 61: under the DLQ fail rate
        monkeypatch.setenv("DAGSTER_HOME", "")
        prepare_dagster_home(tmp_path / "k2home")
        command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "k2_assets.definitions"]
        command += ["-a", "defs", "--select", selected, "--partition", "2026-11-23-10:00"]
        done = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

        silver = lake.iceberg.load_table(silver_table_spec(BINANCE)).scan().to_arrow()
        dlq = lake.iceberg.load_table(DLQ_TABLE_SPEC).scan().to_arrow()
        assert sorted(silver["message_id"].to_pylist()) == sorted(good)
        assert dlq.num_rows == 1  # the pass wrote both tables, whichever was asked for
        with dg.DagsterInstance.get() as instance:
            for key in ("silver_binance_trades", "silver_dlq_trades/binance"):
                asset = dg.AssetKey.from_user_string(key)
                assert instance.get_materialized_partitions(asset) == {"2026-11-23-10:00"}, key
            if selected == "silver_binance_trades":
                check = instance.get_latest_asset_check_evaluation_record(
                    dg.AssetCheckKey(dg.AssetKey("silver_binance_trades"), CONSERVATION)
                )
                assert check is not None and check.event.dagster_event.event_specific_data.passed
