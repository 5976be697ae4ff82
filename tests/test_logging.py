"""K2_LOG_FORMAT=json: one JSON object per line with run id, asset, partition and exchange; no secrets.

The end-to-end test ingests from the dev stack's SASL listener with a real password in
K2_KAFKA__SASL_PASSWORD, through the `k2 ingest` CLI on a K2_HOME instance (dagster.yaml's
python_logs handler), then looks for the password everywhere K2 writes: the JSON lines, the text
console, every event of the instance's event log (metadata included) and a metrics scrape.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from k2_resources.logs import log_format, redact, secret_values
from k2_resources.settings import LOG_FORMAT
from tests.conftest import k2


def test_a_bad_log_format_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOG_FORMAT.name, "yaml")
    with pytest.raises(ValueError, match=LOG_FORMAT.name):
        log_format()


def test_secret_settings_are_redacted_and_others_kept() -> None:
    environ = {
        "K2_KAFKA__SASL_PASSWORD": "pw-123456",
        "K2_ALERT_WEBHOOK_URL": "http://hook/T0/XYZ",
        "K2_HOME": "/k2",
    }
    secrets = secret_values(environ)
    assert sorted(secrets) == ["http://hook/T0/XYZ", "pw-123456"]
    assert redact("login pw-123456 to http://hook/T0/XYZ in /k2", secrets) == "login *** to *** in /k2"


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no log lines"
    return [json.loads(line) for line in lines]  # every line must be one JSON object


def test_json_logs_carry_run_asset_partition_exchange_and_no_password(
    fresh_devstack: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    from k2_assets.cli.instance import prepare_dagster_home
    from k2_assets.silver.assets import dlq_asset_key, silver_asset_key
    from k2_resources.dev.devstack import kafka as dev_kafka
    from k2_resources.exchanges import exchange
    from tests.pipeline_helpers import materialize, this_hour
    from tests.test_bronze_ingestion import produce_raw
    from tests.test_kafka_broker import _sasl_env

    produce_raw(500)
    password = dev_kafka.sasl_credentials(fresh_devstack).password
    dagster_home = prepare_dagster_home(fresh_devstack)
    env = {**_sasl_env(fresh_devstack, password), "DAGSTER_HOME": str(dagster_home), "K2_LOG_FORMAT": "json"}
    done = k2("ingest", "--exchange", "binance", "--drain", home=fresh_devstack, env=env, timeout=180)
    lines = json_lines(done.stdout)
    assert password not in done.stdout + done.stderr
    run_ids = {line.get("run_id") for line in lines}
    assert len(run_ids) == 1 and None not in run_ids
    assert {line.get("exchange") for line in lines} == {"binance"}
    materialized = [line for line in lines if line.get("event") == "ASSET_MATERIALIZATION"]
    assert materialized and all(line["asset"] == "bronze_binance_trades" for line in materialized)

    # Silver in this process: the partition is in every line of its run.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capfd.readouterr()
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        binance = exchange("binance")
        materialize(
            instance, [silver_asset_key(binance), dlq_asset_key(binance)], this_hour(), raise_on_error=False
        )
        silver_lines = json_lines(capfd.readouterr().out)
        assert all(line.get("partition") == this_hour() for line in silver_lines)
        assert {"silver_binance_trades", "silver_dlq_trades/binance"} <= {
            line.get("asset") for line in silver_lines
        }
        # Run-level lines of an asset run name no exchange (a run may span several); asset lines do.
        assert {line.get("exchange") for line in silver_lines} <= {"binance", None}
        assert all(line.get("exchange") == "binance" for line in silver_lines if "asset" in line)

        # The whole event log, metadata included, holds no password.
        for run in instance.get_runs():
            for entry in instance.all_logs(run.run_id):
                assert password not in json.dumps(dg.serialize_value(entry))
        assert len(instance.get_runs()) == 2
    scrape = k2("metrics", "--once", home=fresh_devstack, env=env).stdout
    assert 'k2_bronze_records_ingested_total{exchange="binance"} 500.0' in scrape and password not in scrape
