"""Process groups, the unit K2's dev tooling supervises: `k2 dev` runs Dagster in a session of its own,
and Dagster starts its code servers, run workers and step processes inside that group, so "everything
it spawned" is the group, whoever the parent is now."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil


def group_members(pgid: int) -> list[psutil.Process]:
    """Every live (not zombie) process of the process group `pgid`."""
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
    return members


def stop_process_group(pgid: int, timeout: float, *, wait_first: bool = False) -> list[psutil.Process]:
    """End the group: SIGTERM, then SIGKILL what is left after `timeout` (first `timeout` for it to exit
    by itself with `wait_first`). Returns the processes that outlived even SIGKILL."""
    signals = (None, signal.SIGTERM, signal.SIGKILL) if wait_first else (signal.SIGTERM, signal.SIGKILL)
    for sig in signals:
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + timeout
        while group_members(pgid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        else:
            return []
    return group_members(pgid)
