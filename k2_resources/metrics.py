"""Serving K2's health in Prometheus's text format over HTTP (`k2 metrics`).

Nothing is counted in this process: at every scrape a collector derives each value from where K2
keeps its facts (the Dagster instance's event log and run storage, and the Iceberg catalog), so a
restarted exporter reports the same counters as the one before it. What is derived lives in
k2_assets/operations/metrics.py; this module only adapts it to prometheus_client and serves it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

DEFAULT_BIND = "127.0.0.1"  # metrics say much about a deployment: not on every interface unless asked
DEFAULT_PORT = 9308


class DerivedCollector(Collector):
    """Calls `collect_families` at each scrape: every family comes fresh from the stores."""

    def __init__(self, collect_families: Callable[[], Iterable[Metric]]) -> None:
        self.collect_families = collect_families

    def collect(self) -> Iterator[Metric]:
        yield from self.collect_families()


def build_registry(collect_families: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DerivedCollector(collect_families))
    return registry


def scrape(registry: CollectorRegistry) -> str:
    """One scrape's text, as Prometheus would receive it."""
    return generate_latest(registry).decode()


class QuietHandler(WSGIRequestHandler):
    """No access-log line per scrape (one every 15 s would drown the exporter's own messages)."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def make_metrics_server(registry: CollectorRegistry, port: int, bind: str = DEFAULT_BIND) -> WSGIServer:
    """An HTTP server answering /metrics (any path) from `registry`; the caller runs serve_forever()."""
    return make_server(bind, port, make_wsgi_app(registry), handler_class=QuietHandler)
