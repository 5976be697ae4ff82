"""Named crash points for crash-recovery tests: inert unless K2_CRASH_AT names one.

`K2_CRASH_AT=bronze.after_iceberg_commit:3` makes the process SIGKILL itself the 3rd time it passes
that point, the way a power cut or the OOM killer would stop it: no finally blocks, no flushing. The
exactly-once tests use it to stop ingestion before, during and after the Iceberg commit.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

from k2_resources.settings import CRASH_AT

_passes: Counter[str] = Counter()


def crash_point(name: str) -> None:
    target = CRASH_AT.raw()
    if not target:
        return
    point, _, nth = target.partition(":")
    if point != name:
        return
    _passes[name] += 1
    if _passes[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
