"""Process groups, the unit K2's dev tooling supervises: `k2 dev` runs Dagster in a session of its own,
and Dagster starts its code servers, run workers and step processes inside that group, so "everything
it spawned" is the group, whoever the parent is now."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable

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


def wait_until_listening(
    host: str, port: int, deadline: float, alive: Callable[[], bool], poll_seconds: float = 0.05
) -> bool:
    """Until a child process just started accepts TCP connections on host:port: True. False as soon as
    `alive()` is false (a process that exited never will), TimeoutError once `deadline` (a
    `time.monotonic()` value) has passed. A plain socket probe: no client logs "connection refused"
    while the process starts."""
    while alive():
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return True
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listened on {host}:{port}")
        time.sleep(poll_seconds)
    return False
