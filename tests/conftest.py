"""Shared fixtures: a real dev stack (broker + schema registry processes) in a temporary K2_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from k2_resources.settings import KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL, read_env_file


def k2_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without K2 settings, plus K2_HOME=home and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("K2_")}
    return {**env, "K2_HOME": str(home), **extra}


def k2(
    *args: str, home: Path, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the `k2` CLI in a subprocess with K2_HOME=home, as a user would; a failure shows its stderr."""
    env = k2_env(home, **(env or {}))
    done = subprocess.run(
        [sys.executable, "-m", "k2_assets.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"k2 {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done


# Seconds a test gives `k2 devstack up`: the CLI's own default (60 s) is a user's patience on a quiet
# machine; CI runs two test files at once beside JVMs of Spark and Kafka, where a broker's start has
# taken longer than that.
DEVSTACK_UP_SECONDS = 180


def devstack_up(home: Path) -> None:
    """`k2 devstack up` at `home`, with the patience of a loaded CI machine."""
    k2("devstack", "up", "--timeout", str(DEVSTACK_UP_SECONDS), home=home, timeout=DEVSTACK_UP_SECONDS + 60)


@pytest.fixture()
def unreachable_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka and registry addresses that nothing listens on: creating a run resolves resource config,
    and a test that builds runs without running them must not depend on a dev stack."""
    monkeypatch.setenv(KAFKA_BOOTSTRAP_SERVERS, "127.0.0.1:9")
    monkeypatch.setenv(SCHEMA_REGISTRY_URL, "http://127.0.0.1:9")


@pytest.fixture(scope="module")
def devstack_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running dev stack per test module (topics are shared state); its addresses are in devstack.env."""
    home = tmp_path_factory.mktemp("k2home")
    devstack_up(home)
    try:
        yield home
    finally:
        k2("devstack", "down", home=home, check=False)


@pytest.fixture()
def devstack_env(devstack_home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The dev stack's settings exported into this process, K2_HOME included."""
    values = read_env_file(devstack_home / "devstack.env")
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("K2_HOME", str(devstack_home))
    return values


@pytest.fixture()
def fresh_devstack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A dev stack of this test's own (empty topics, own catalog), exported into this process."""
    home = tmp_path / "k2home"
    devstack_up(home)
    for key, value in read_env_file(home / "devstack.env").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("K2_HOME", str(home))
    try:
        yield home
    finally:
        k2("devstack", "down", home=home, check=False)
