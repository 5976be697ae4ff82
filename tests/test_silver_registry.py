"""Only "schema not found" (404 with error code 40403) makes a record's schema id unknown: a wrong base
path, another HTTP service or any other registry error fails the Silver run instead of sending every
record to the DLQ. Real HTTP servers: the dev stack's registry in this process, and a plain one."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from k2_assets.silver.rules import ValidationRules
from k2_assets.silver.transform import RegistryUnusable, WriterSchemas, transform_batches
from k2_resources.dev.devstack.registry import SchemaStore, start_registry_server
from k2_resources.trade_schema import trade_v2_schema_str
from tests.test_silver_transform import BINANCE, NOW, bronze, framed, trade


@pytest.fixture()
def registry_url() -> Iterator[str]:
    server = start_registry_server(SchemaStore())
    try:
        yield server.url
    finally:
        server.shutdown()


class QuietHandler(BaseHTTPRequestHandler):
    """An HTTP handler that answers with `answer` and logs nothing."""

    def answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


class NotARegistry(QuietHandler):
    """Some other HTTP service (or a proxy's error page): 404 with an HTML body."""

    def do_GET(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's naming)
        self.answer(404, b"<html><body>404 Not Found</body></html>", "text/html")


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """The URL of an HTTP server on a free local port answering with `handler`, while in the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture()
def other_service() -> Iterator[str]:
    with serving(NotARegistry) as url:
        yield url


def client(url: str) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": url, "max.retries": 0})


def transform(url: str, values: list[bytes]) -> tuple[int, list[str]]:
    """Silver rows, and the DLQ categories, of one Bronze batch through the registry at `url`."""
    silver_rows, categories = 0, []
    schemas = WriterSchemas(client(url))
    for silver, dlq in transform_batches([bronze(values)], BINANCE, schemas, ValidationRules(), "p", NOW):
        silver_rows += silver.num_rows
        categories += dlq.column("error_category").to_pylist()
    return silver_rows, categories


def test_schema_not_found_is_an_unknown_id_and_a_registered_one_decodes(registry_url: str) -> None:
    schema_id = client(registry_url).register_schema(BINANCE.subject, Schema(trade_v2_schema_str(), "AVRO"))
    unknown = schema_id + 1000
    assert transform(registry_url, [framed(schema_id, trade()), framed(unknown, trade())]) == (
        1,
        ["UNKNOWN_SCHEMA_ID"],
    )


@pytest.mark.parametrize("where", ["wrong_base_path", "other_service"])
def test_any_other_404_fails_the_run_and_names_the_setting(
    registry_url: str, other_service: str, where: str
) -> None:
    url = f"{registry_url}/wrong-prefix" if where == "wrong_base_path" else other_service
    with pytest.raises(RegistryUnusable) as raised:
        transform(url, [framed(1, trade())])
    message = str(raised.value)
    assert "K2_SCHEMA_REGISTRY_URL" in message and "404" in message and "40403" in message


def test_a_client_made_in_the_background_is_awaited_by_the_first_lookup(registry_url: str) -> None:
    schema_id = client(registry_url).register_schema(BINANCE.subject, Schema(trade_v2_schema_str(), "AVRO"))
    started, release, made_in = threading.Event(), threading.Event(), []

    def connect() -> SchemaRegistryClient:
        started.set()
        made_in.append(threading.current_thread())
        assert release.wait(10)
        return client(registry_url)

    schemas = WriterSchemas.connecting(connect)  # returns while connect is still running
    assert started.wait(10) and made_in[0] is not threading.current_thread()
    release.set()
    assert schemas.get(schema_id) is not None and schemas.get(schema_id + 1000) is None


def test_a_client_that_cannot_be_made_fails_the_first_lookup() -> None:
    def connect() -> SchemaRegistryClient:
        return SchemaRegistryClient({"url": "not a url"})

    schemas = WriterSchemas.connecting(connect)
    with pytest.raises(ValueError):
        schemas.get(1)
