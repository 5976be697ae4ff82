"""The embedded dev stack: a librdkafka mock Kafka cluster and a Confluent-compatible Schema Registry.

Neither Kafka nor a Schema Registry can be installed on the development machines, so `k2 devstack up`
starts one detached host process that keeps both alive on 127.0.0.1 and writes their addresses to
`$K2_HOME/devstack.env`. Unmodified Kafka and registry clients in other processes talk to it as they
would to a real cluster, which keeps the pipeline code free of dev-only branches.

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
    """Import `stack` on first use: the host runs as `python -m k2_resources.devstack.stack`, and an
    eager import here would load that module twice (runpy warns about it)."""
    if name in __all__:
        return getattr(importlib.import_module("k2_resources.devstack.stack"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
