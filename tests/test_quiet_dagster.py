"""`k2 dev`'s code server, webserver and daemon run through k2_assets/cli/quiet_dagster.py: Dagster's own module as
`__main__`, its arguments passed on, with the pinned Dagster's polling constants slowed down; and each
constant is still read by the Dagster code that polls, when it polls (recheck at any Dagster upgrade)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

from k2_assets.cli.quiet_dagster import SLOWER_POLLING

# The function of the pinned Dagster that reads each constant while it runs (not as a default argument).
READ_BY = {
    ("dagster._grpc.server_watcher", "WATCH_INTERVAL"): "watch_grpc_server_thread",
    (
        "dagster._daemon.controller",
        "RELOAD_WORKSPACE_INTERVAL",
    ): "DagsterDaemonController.check_workspace_freshness",
    ("dagster._daemon.sensor", "MIN_INTERVAL_LOOP_TIME"): "execute_sensor_iteration_loop",
    ("dagster._daemon.asset_daemon", "MIN_INTERVAL_LOOP_SECONDS"): "AssetDaemon.core_loop",
    ("dagster._grpc.server", "CLEANUP_TICK"): "DagsterApiServer._cleanup_thread",
}

PROBE = """
import importlib, json, sys
constants = {f"{m}.{c}": getattr(importlib.import_module(m), c) for m, c in json.loads(sys.argv[1])}
print(json.dumps({"name": __name__, "argv": sys.argv[2:], "constants": constants}))
"""


def test_a_module_runs_as_main_with_its_arguments_and_slower_polling(tmp_path: Path) -> None:
    (tmp_path / "probe_main.py").write_text(PROBE)
    names = json.dumps(list(SLOWER_POLLING))
    done = subprocess.run(
        [sys.executable, "-m", "k2_assets.cli.quiet_dagster", "probe_main", names, "run", "-w", "x.yaml"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["name"] == "__main__"
    assert seen["argv"] == ["run", "-w", "x.yaml"]
    assert seen["constants"] == {f"{m}.{c}": v for (m, c), v in SLOWER_POLLING.items()}
    # Each is slower than Dagster's own value.
    for (module, constant), seconds in SLOWER_POLLING.items():
        assert seconds > getattr(importlib.import_module(module), constant), (module, constant)


def test_each_constant_is_read_where_dagster_polls() -> None:
    assert set(READ_BY) == set(SLOWER_POLLING)
    for (module_name, constant), qualified in READ_BY.items():
        target = importlib.import_module(module_name)
        for part in qualified.split("."):
            target = getattr(target, part)
        source = inspect.getsource(target)
        signature = str(inspect.signature(target))
        assert constant in source and constant not in signature, (module_name, constant, qualified)
