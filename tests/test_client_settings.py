"""Secured Kafka and Schema Registry clients by environment only, with secrets kept out of config.

`K2_KAFKA__<PROPERTY>` and `K2_SCHEMA_REGISTRY__<PROPERTY>` set any client property; the resources hold
them as `dg.EnvVar` references, so Dagster's run config and UI show the variable's name, never its
value. The registry client is checked against a real HTTP server that records what it is sent.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest

from k2_assets.resources import build_resources
from k2_resources.kafka import masked

SECRET = "pa55-w0rd-never-shown"


@pytest.fixture()
def secured_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K2_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    monkeypatch.setenv("K2_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("K2_KAFKA__SASL_MECHANISMS", "SCRAM-SHA-512")
    monkeypatch.setenv("K2_KAFKA__SASL_USERNAME", "k2")
    monkeypatch.setenv("K2_KAFKA__SASL_PASSWORD", SECRET)
    monkeypatch.setenv("K2_KAFKA__CLIENT_ID", "k2-bronze")
    monkeypatch.setenv("K2_SCHEMA_REGISTRY__BASIC_AUTH_USER_INFO", f"k2:{SECRET}")


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        _Recorder.seen.append({"path": self.path, "authorization": self.headers.get("Authorization", "")})
        body = json.dumps(["market.crypto.trades.binance-value"]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def registry_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("K2_SCHEMA_REGISTRY_URL", url)
    _Recorder.seen.clear()
    try:
        yield url
    finally:
        server.shutdown()


def test_every_kafka_property_comes_from_the_environment_as_a_reference(secured_env: None) -> None:
    kafka = build_resources()["kafka"]
    assert kafka.client_config == {
        "client.id": dg.EnvVar("K2_KAFKA__CLIENT_ID"),
        "sasl.mechanisms": dg.EnvVar("K2_KAFKA__SASL_MECHANISMS"),
        "sasl.password": dg.EnvVar("K2_KAFKA__SASL_PASSWORD"),
        "sasl.username": dg.EnvVar("K2_KAFKA__SASL_USERNAME"),
        "security.protocol": dg.EnvVar("K2_KAFKA__SECURITY_PROTOCOL"),
    }
    # What Dagster records as the resource's config names variables, not values.
    assert SECRET not in json.dumps(kafka._get_non_default_public_field_values(), default=str)


def test_resolved_settings_reach_the_clients_and_logs_mask_them(secured_env: None, registry_url: str) -> None:
    seen: dict[str, object] = {}

    @dg.asset
    def probe(kafka: dg.ConfigurableResource, schema_registry: dg.ConfigurableResource) -> None:
        config = kafka.base_config()
        seen["kafka"] = {k: v for k, v in config.items() if k != "error_cb"}
        seen["masked"] = masked(seen["kafka"])
        seen["subjects"] = schema_registry.client().get_subjects()

    resources = build_resources()
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [probe],
            resources={"kafka": resources["kafka"], "schema_registry": resources["schema_registry"]},
            instance=instance,
        )
        assert result.success
        logged = " ".join(str(record) for record in instance.all_logs(result.run_id))
    assert seen["kafka"]["sasl.password"] == SECRET
    assert seen["kafka"]["security.protocol"] == "SASL_SSL" and seen["kafka"]["client.id"] == "k2-bronze"
    assert seen["masked"]["sasl.password"] == "***" and seen["masked"]["sasl.username"] == "k2"
    assert seen["subjects"] == ["market.crypto.trades.binance-value"]
    expected = "Basic " + base64.b64encode(f"k2:{SECRET}".encode()).decode()
    assert _Recorder.seen and all(r["authorization"] == expected for r in _Recorder.seen)
    assert SECRET not in logged
