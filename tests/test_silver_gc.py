"""The Silver step leaves the objects its process made before it out of the cyclic collector, once.

A fresh interpreter each time: the freeze is per process, and pytest's own process may already have
been frozen by an earlier test's materialisation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FREEZES_ONCE = """
import gc
from k2_assets.silver.assets import freeze_long_lived_objects

assert gc.get_freeze_count() == 0
freeze_long_lived_objects()
frozen = gc.get_freeze_count()
assert frozen > 10_000, frozen  # the imports' objects: Dagster, PyIceberg, K2's definitions
made_after = [[i] for i in range(5_000)]
freeze_long_lived_objects()
assert gc.get_freeze_count() == frozen, (gc.get_freeze_count(), frozen)
gc.collect()
assert all(gc.is_tracked(item) for item in made_after)
print("frozen", frozen)
"""


def test_objects_alive_before_the_first_pass_are_frozen_and_later_passes_freeze_nothing() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", FREEZES_ONCE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("frozen ")
