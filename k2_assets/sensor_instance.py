"""One Dagster instance per code-server process for K2's sensors, instead of one per evaluation.

Dagster gives each sensor evaluation a new `DagsterInstance` built from the instance ref the daemon
sends. Building one opens each SQLite storage and checks its schema revision, which loads Alembic's
migration scripts from disk: py-spy of a live `k2 dev` at rest (bench/README.md, "Live cost",
session 10) found that to be most of what the code server spends evaluating sensors, about five times
a minute. The instance is the same every time (the ref names one DAGSTER_HOME), so it is built once per
ref and kept for the life of the process, as the daemon keeps its own.
"""

from __future__ import annotations

import threading

import dagster as dg

_instances: dict[str, dg.DagsterInstance] = {}
_lock = threading.Lock()


def sensor_instance(context: dg.SensorEvaluationContext) -> dg.DagsterInstance:
    """The instance of `context`'s ref, built on this process's first evaluation and reused after it.

    A context built with an instance (tests, `build_sensor_context(instance=...)`) keeps its own."""
    ref = context.instance_ref
    if ref is None:
        return context.instance
    key = repr(ref)  # a tuple of the storages' classes and config: equal refs, equal text
    with _lock:
        if key not in _instances:
            _instances[key] = dg.DagsterInstance.from_ref(ref)
        return _instances[key]
