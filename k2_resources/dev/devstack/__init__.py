"""The embedded dev stack: a real Apache Kafka broker (KRaft, one node, from Maven Central's jars) and a
Confluent-compatible Schema Registry, for machines that start no services.

`k2 devstack up` starts both as detached processes on 127.0.0.1 and writes their addresses to
`$K2_HOME/devstack.env`. Unmodified Kafka and registry clients in other processes talk to them as they
would to a real cluster, which keeps the pipeline code free of dev-only branches
(`K2_DEVSTACK_KAFKA=mock` swaps the broker for librdkafka's mock cluster where there is no Java).

In-process use (tests, notebooks): `start_devstack(home)`, `devstack_status(home)`, `stop_devstack(home)`.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DevstackError",
    "DevstackInfo",
    "DevstackStatus",
    "devstack_status",
    "start_devstack",
    "stop_devstack",
]


def __getattr__(name: str) -> Any:
    """Import `stack` on first use: the host runs as `python -m k2_resources.dev.devstack.stack`, and an
    eager import here would load that module twice (runpy warns about it)."""
    if name in __all__:
        return getattr(importlib.import_module("k2_resources.dev.devstack.stack"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
