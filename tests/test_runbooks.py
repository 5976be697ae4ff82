"""Every command on docs/runbooks/ runs against a dev stack, so the runbooks cannot drift from the code.

Each page's ```bash blocks run in order, in one bash per block (`set -euo pipefail`), with the
environment a K2 operator has: K2_HOME and DAGSTER_HOME of a fresh dev stack, its Kafka and registry
addresses, the virtualenv's `k2`, `dagster` and `python` first on PATH, the checkout as working directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from k2_resources.settings import read_env_file

REPO = Path(__file__).resolve().parents[1]
RUNBOOKS = REPO / "docs" / "runbooks"
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```$", re.DOTALL | re.MULTILINE)
INCIDENT_PAGES = [
    "ingestion-fenced.md",
    "kafka-gap.md",
    "dlq-spike.md",
    "registry-or-catalog-down.md",
    "silver-gold-behind.md",
    "maintenance-failed.md",
    "disk-filling.md",
]


def bash_blocks(page: Path) -> list[str]:
    return BASH_BLOCK.findall(page.read_text())


def test_one_page_per_incident_each_with_detection_checks_and_commands() -> None:
    pages = sorted(p.name for p in RUNBOOKS.glob("*.md"))
    assert pages == sorted([*INCIDENT_PAGES, "README.md"])
    index = (RUNBOOKS / "README.md").read_text()
    for name in INCIDENT_PAGES:
        text = (RUNBOOKS / name).read_text()
        assert f"]({name})" in index, f"README.md does not link {name}"
        assert "## Detection" in text and "## What to check" in text, name
        assert bash_blocks(RUNBOOKS / name), f"{name} has no commands"


@pytest.fixture(scope="module")
def operator_env(devstack_home: Path) -> dict[str, str]:
    from k2_assets.cli.instance import prepare_dagster_home

    saved = dict(os.environ)
    try:
        dagster_home = prepare_dagster_home(devstack_home)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("K2_", "DAGSTER_", "PYICEBERG_"))}
    return {
        **env,
        **read_env_file(devstack_home / "devstack.env"),
        "K2_HOME": str(devstack_home),
        "DAGSTER_HOME": str(dagster_home),
        "K2_AUTOMATION": "off",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    }


@pytest.mark.parametrize("page", ["README.md", *INCIDENT_PAGES])
def test_every_runbook_command_runs(page: str, operator_env: dict[str, str]) -> None:
    for block in bash_blocks(RUNBOOKS / page):
        done = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + block],
            env=operator_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=540,
        )
        assert done.returncode == 0, (
            f"{page}:\n{block}\nstdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-4000:]}"
        )
        assert (done.stdout + done.stderr).strip(), f"{page}: a block printed nothing:\n{block}"
