"""The code location as Dagster loads it: no warnings, no private Dagster imports, and a graph that
changes only on purpose.

The asset graph (keys, deps, partitions, group), the checks (name, asset, blocking), the jobs (name,
selection), the sensors and the schedules (name, cron, default status) are compared against
tests/data/definitions_snapshot.json, so an accidental change to the graph shows in review as a diff of
that file. After an intended change, regenerate it and commit it with the change:

    K2_UPDATE_SNAPSHOT=1 pytest tests/test_definitions.py

The definitions are loaded in a fresh interpreter with `-W error` and without K2_* settings, so the
snapshot does not depend on what this test process imported or exported before.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO_ROOT / "tests" / "data" / "definitions_snapshot.json"
UPDATE_SETTING = "K2_UPDATE_SNAPSHOT"
K2_PACKAGES = ("k2_assets", "k2_resources")


def user_string(key: Any) -> str:
    return key.to_user_string()


def partitions_summary(partitions_def: Any) -> dict | None:
    """The partitions' shape; the start date (K2_PARTITIONS_START, per deployment) is left out."""
    if partitions_def is None:
        return None
    return {
        "type": type(partitions_def).__name__,
        "cron": getattr(partitions_def, "cron_schedule", None),
        "timezone": getattr(partitions_def, "timezone", None),
        "end_offset": getattr(partitions_def, "end_offset", None),
    }


def definitions_snapshot() -> dict:
    """What the snapshot records, read from `k2_assets.definitions` in this process."""
    from k2_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    jobs = {job.name: job for job in defs.resolve_all_job_defs()}

    def selection(job: Any) -> list[str]:
        if job.is_asset_job:
            return sorted(map(user_string, job.asset_layer.selected_asset_keys))
        return sorted(f"op:{node.name}" for node in job.nodes)

    def targets(sensor: Any) -> list[str]:
        names = [target.job_name for target in sensor.targets]
        # An anonymous job (a sensor's asset selection) is named after the sensor: show its assets.
        return sorted(
            n if not n.startswith("__anonymous") else f"assets:{','.join(selection(jobs[n]))}" for n in names
        )

    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=user_string):
        node = graph.get(key)
        assets[user_string(key)] = {
            "deps": sorted(map(user_string, node.parent_keys)),
            "partitions": partitions_summary(node.partitions_def),
            "group": node.group_name,
            "kinds": sorted(node.kinds),
            "materializable": node.is_materializable,
            "automated": node.automation_condition is not None,
        }
    checks = {
        f"{user_string(key.asset_key)}:{key.name}": {"blocking": graph.get(key).blocking}
        for key in sorted(graph.asset_check_keys, key=user_string)
    }
    return {
        "assets": assets,
        "checks": checks,
        "jobs": {name: selection(job) for name, job in sorted(jobs.items()) if not name.startswith("__")},
        "sensors": {
            sensor.name: {
                "default_status": sensor.default_status.value,
                "minimum_interval_seconds": sensor.minimum_interval_seconds,
                "targets": targets(sensor),
            }
            for sensor in sorted(defs.sensors or [], key=lambda s: s.name)
        },
        "schedules": {
            schedule.name: {
                "cron": schedule.cron_schedule,
                "timezone": schedule.execution_timezone,
                "default_status": schedule.default_status.value,
                "job": schedule.job_name,
            }
            for schedule in sorted(defs.schedules or [], key=lambda s: s.name)
        },
    }


def load_in_fresh_interpreter() -> subprocess.CompletedProcess:
    """`python -W error` importing the definitions, with no K2_* settings and an empty K2_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("K2_", "PYTHONWARNINGS"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    code = "import json; from tests.test_definitions import definitions_snapshot; print(json.dumps(definitions_snapshot()))"
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=REPO_ROOT,
        env={**env, "K2_HOME": str(REPO_ROOT / ".k2" / "snapshot-test")},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def loaded() -> subprocess.CompletedProcess:
    return load_in_fresh_interpreter()


def test_definitions_load_without_any_warning(loaded: subprocess.CompletedProcess) -> None:
    """With every warning an error (supersession, beta, preview, deprecation), the location loads."""
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    assert loaded.stderr == "", loaded.stderr[-4000:]


def test_the_graph_matches_the_committed_snapshot(loaded: subprocess.CompletedProcess) -> None:
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    current = json.loads(loaded.stdout)
    text = json.dumps(current, indent=2, sort_keys=True) + "\n"
    if os.environ.get(UPDATE_SETTING) == "1":
        SNAPSHOT.write_text(text)
    assert SNAPSHOT.exists(), f"no snapshot yet: run `{UPDATE_SETTING}=1 pytest {Path(__file__).name}`"
    committed = SNAPSHOT.read_text()
    diff = "".join(
        difflib.unified_diff(
            committed.splitlines(keepends=True),
            text.splitlines(keepends=True),
            fromfile="tests/data/definitions_snapshot.json (committed)",
            tofile="the definitions now",
        )
    )
    assert not diff, (
        f"The definitions differ from the committed snapshot. If the change is intended, run "
        f"`{UPDATE_SETTING}=1 pytest tests/test_definitions.py` and commit the snapshot.\n{diff}"
    )


def private_dagster_imports(path: Path) -> list[str]:
    """`dagster._...` (or `dagster_*._...`) modules that `path` imports: not Dagster's public API."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level == 0
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0].startswith("dagster") and any(part.startswith("_") for part in parts[1:]):
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {name}")
    return found


def test_k2_imports_only_public_dagster_apis() -> None:
    files = [p for package in K2_PACKAGES for p in sorted((REPO_ROOT / package).rglob("*.py"))]
    assert len(files) > 20  # the packages were found
    private = [hit for path in files for hit in private_dagster_imports(path)]
    assert private == [], "\n".join(private)


def test_the_private_import_scan_sees_one() -> None:
    """The scan above would notice a private import (so its empty answer means something)."""
    sample = REPO_ROOT / ".k2" / "private_import_sample.py"
    sample.parent.mkdir(exist_ok=True)
    sample.write_text(
        "from dagster._utils.merger import deep_merge_dicts\nimport dagster._core.storage.tags\n"
    )
    try:
        assert len(private_dagster_imports(sample)) == 2
    finally:
        sample.unlink()
