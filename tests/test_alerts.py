"""Alert sensors against a local HTTP receiver, a real Dagster instance and (end to end) the dev stack.

Each notification the sensors send is captured by a tiny http.server; the tests assert what arrived,
that a repeat of the same condition is held back, and that each recovery is announced once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest

from k2_assets.definitions import defs
from k2_resources.alerting import AlertBook, AlertSettings, AlertWebhookResource, Condition, notify

RECEIVED: list[dict] = []


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        RECEIVED.append(json.loads(body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The webhook URL of a receiver in this process; K2_ALERT_WEBHOOK_URL points at it."""
    RECEIVED.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/hook"
    monkeypatch.setenv("K2_ALERT_WEBHOOK_URL", url)
    yield url
    server.shutdown()


def texts() -> list[str]:
    return [m["text"] for m in RECEIVED]


def test_repeats_are_rate_limited_and_recovery_is_announced_once(receiver: str) -> None:
    webhook, book = AlertWebhookResource(url=receiver), AlertBook(None)
    firing = Condition("lag:binance", True, "lag 5000", "http://ui/assets/bronze")
    for now in (0.0, 10.0, 59.0):  # three ticks within the repeat interval: one notification
        book = AlertBook(book.to_cursor())  # through the cursor, as between sensor ticks
        notify(webhook, book, [firing], now, repeat_seconds=60)
    assert len(RECEIVED) == 1 and "K2 ALERT [lag:binance] lag 5000" in texts()[0]
    assert RECEIVED[0]["blocks"][0]["type"] == "section" and "http://ui/assets/bronze" in texts()[0]
    notify(webhook, book, [firing], 61.0, repeat_seconds=60)
    assert "still firing" in texts()[1]
    resolved = Condition("lag:binance", False, "lag 0", "http://ui/assets/bronze")
    for now in (62.0, 63.0):
        notify(webhook, book, [resolved], now, repeat_seconds=60)
    assert len(RECEIVED) == 3 and texts()[2].startswith(":white_check_mark: K2 RESOLVED [lag:binance]")


def test_a_failed_send_stays_due(receiver: str) -> None:
    dead = AlertWebhookResource(url="http://127.0.0.1:9/hook", timeout_seconds=2)
    book = AlertBook(None)
    condition = Condition("run:x", True, "failed", "http://ui/runs/1")
    sent, failed = notify(dead, book, [condition], 0.0, 60)
    assert not sent and failed and failed[0].startswith("firing run:x")
    sent, _ = notify(AlertWebhookResource(url=receiver), book, [condition], 1.0, 60)
    assert sent == ["firing run:x"] and len(RECEIVED) == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [("K2_ALERT_LAG_RECORDS", "-1"), ("K2_ALERT_SILENT_MINUTES", "soon"), ("K2_UI_BASE_URL", "ftp://x")],
)
def test_bad_thresholds_name_the_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        AlertSettings.from_env()


def tick(instance: dg.DagsterInstance, sensor_name: str, cursors: dict[str, str | None]) -> list[str]:
    """One evaluation of an alert sensor, its cursor carried over as the daemon would; new texts."""
    before = len(RECEIVED)
    sensor = defs.get_sensor_def(sensor_name)
    context = dg.build_sensor_context(
        instance=instance,
        cursor=cursors.get(sensor_name),
        repository_def=defs.get_repository_def(),
        resources={"alert_webhook": AlertWebhookResource(url=dg.EnvVar("K2_ALERT_WEBHOOK_URL").get_value())},
    )
    result = sensor(context)
    cursors[sensor_name] = result.cursor
    return texts()[before:]


def ingest(instance: dg.DagsterInstance, **config: object) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def("bronze_binance_ingestion")
    run_config = {"ops": {"ingest_binance_trades": {"config": {"drain": True, **config}}}}
    return job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)


def recreate_topic(topic: str) -> None:
    from confluent_kafka.admin import NewTopic

    from tests.test_kafka_broker import admin

    admin().delete_topics([topic])[topic].result(timeout=30)
    deadline = time.monotonic() + 30
    while True:
        try:
            admin().create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])[topic].result(30)
            return
        except Exception:  # the deletion completes asynchronously
            assert time.monotonic() < deadline
            time.sleep(0.5)


def test_alerts_end_to_end_on_the_dev_stack(
    fresh_devstack: Path, receiver: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from k2_assets.silver.assets import dlq_asset_key, silver_asset_key
    from k2_resources.exchanges import exchange
    from tests.pipeline_helpers import materialize, this_hour
    from tests.test_bronze_ingestion import TOPIC, produce_raw

    monkeypatch.setenv("K2_ALERT_LAG_RECORDS", "1000")
    monkeypatch.setenv("K2_UI_BASE_URL", "http://k2.example:3000")
    cursors: dict[str, str | None] = {}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        # Lag: a run that stops after one second with most of a backlog still in Kafka.
        produce_raw(200_000)
        assert ingest(instance, drain=False, max_runtime_seconds=1.0, max_batch_records=500).success
        lag = tick(instance, "k2_ingestion_alert_sensor", cursors)
        assert len(lag) == 1 and "K2 ALERT [lag:binance]" in lag[0], lag
        assert "<http://k2.example:3000/assets/bronze_binance_trades|open in Dagster>" in lag[0]
        assert tick(instance, "k2_ingestion_alert_sensor", cursors) == []  # the same condition: held back
        assert ingest(instance).success  # drained: lag 0
        assert [
            t.split(" [")[0] + " [" + t.split(" [")[1].split("]")[0]
            for t in tick(instance, "k2_ingestion_alert_sensor", cursors)
        ] == [":white_check_mark: K2 RESOLVED [lag:binance"]

        # Silence: no Bronze commit for longer than the threshold; a new commit resolves it.
        monkeypatch.setenv("K2_ALERT_SILENT_MINUTES", "0.05")
        time.sleep(3.5)
        silent = tick(instance, "k2_ingestion_alert_sensor", cursors)
        assert len(silent) == 1 and "K2 ALERT [silent:binance]" in silent[0], silent
        produce_raw(100)
        assert ingest(instance).success
        resolved = tick(instance, "k2_ingestion_alert_sensor", cursors)
        assert len(resolved) == 1 and "K2 RESOLVED [silent:binance]" in resolved[0], resolved
        monkeypatch.setenv("K2_ALERT_SILENT_MINUTES", "60")

        # A recreated topic: the run fails with KafkaGapError, ingestion halts, the run failure is announced.
        recreate_topic(TOPIC)
        produce_raw(300_000)
        gap_run = ingest(instance)
        assert not gap_run.success
        halted = tick(instance, "k2_ingestion_alert_sensor", cursors)
        assert len(halted) == 1 and "K2 ALERT [halted:binance]" in halted[0] and "KafkaGapError" in halted[0]
        assert f"/runs/{gap_run.run_id}" in halted[0]
        failed = tick(instance, "k2_run_failure_alert_sensor", cursors)
        assert len(failed) == 1 and "K2 ALERT [run:bronze_binance_ingestion]" in failed[0], failed
        assert "KafkaGapError" in failed[0] and f"http://k2.example:3000/runs/{gap_run.run_id}" in failed[0]
        assert tick(instance, "k2_run_failure_alert_sensor", cursors) == []
        assert ingest(instance, accept_gaps=True).success  # a person accepted the gap
        recovered = tick(instance, "k2_ingestion_alert_sensor", cursors)
        assert len(recovered) == 1 and "K2 RESOLVED [halted:binance]" in recovered[0], recovered
        again = tick(instance, "k2_run_failure_alert_sensor", cursors)
        assert len(again) == 1 and "K2 RESOLVED [run:bronze_binance_ingestion]" in again[0], again

        # Silver of records that are no Avro at all: all go to the DLQ, the ERROR DLQ-rate check fails.
        binance = exchange("binance")
        keys = [silver_asset_key(binance), dlq_asset_key(binance)]
        assert not materialize(instance, keys, this_hour(), raise_on_error=False).success
        checks = tick(instance, "k2_check_failure_alert_sensor", cursors)
        assert any("K2 ALERT [check:silver_binance_trades:dlq_rate_within_limits:" in t for t in checks), (
            checks
        )
        assert tick(instance, "k2_check_failure_alert_sensor", cursors) == []
    print("\n".join(texts()))
