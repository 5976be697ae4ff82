"""The code location loads without PySpark: only a run that builds a Spark session imports it.

Every run worker and the code server import the definitions; importing PySpark (through dagster-pyspark)
cost each ~0.25 CPU-s and ~9 MB RSS at start (bench/README.md, Live cost, session 9).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys
from k2_assets.definitions import defs
defs.get_repository_def()
spark = defs.resources["spark"]
print("pyspark" in sys.modules, type(spark).__name__, spark._spark_session is None)
"""


def test_the_definitions_load_without_pyspark(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("K2_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=REPO_ROOT,
        env={**env, "K2_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["False", "IcebergSparkResource", "True"]
