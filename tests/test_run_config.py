"""Run config that cannot mean what it says is refused before anything is touched, with a message that
names the setting: through real runs of the real jobs (nothing is reached: they stop first)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from k2_assets.bronze.jobs import BronzeIngestionConfig
from k2_assets.definitions import defs
from k2_resources.exchanges import exchange


@pytest.fixture(autouse=True)
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Placeholder addresses: a refused config must fail before anything connects to them."""
    monkeypatch.setenv("K2_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    monkeypatch.setenv("K2_SCHEMA_REGISTRY_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("K2_HOME", str(tmp_path))


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    failures = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    return "\n".join(e.step_failure_data.error.to_string() for e in failures)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("commit_interval_seconds", 0.0),  # used to mean "the exchange's default", silently
        ("commit_interval_seconds", -10.0),
        ("broker_timeout_seconds", -1.0),
        ("broker_timeout_seconds", 0.0),
        ("max_runtime_seconds", 0.0),
        ("max_batch_records", 0),
    ],
)
def test_nonsensical_ingestion_config_fails_the_run_naming_the_setting(setting: str, value: float) -> None:
    job = defs.resolve_job_def("bronze_binance_ingestion")
    config = {"ops": {"ingest_binance_trades": {"config": {setting: value}}}}
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(run_config=config, instance=instance, raise_on_error=False)
    assert not result.success
    text = failure_text(result)
    assert f"ingestion config {setting} must be positive, not {value}" in text, text[-1500:]


def test_an_unset_commit_interval_is_the_exchanges_and_a_set_one_is_kept() -> None:
    kraken = exchange("kraken")
    assert BronzeIngestionConfig().settings(kraken).commit_interval_seconds == kraken.commit_interval_seconds
    assert BronzeIngestionConfig(commit_interval_seconds=2.5).settings(kraken).commit_interval_seconds == 2.5
