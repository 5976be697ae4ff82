"""Where K2 keeps local state, and how the embedded dev stack's addresses reach every process.

`k2 devstack up` writes the broker and registry addresses to `$K2_HOME/devstack.env`. Every K2 entry
point (the CLI, the Dagster code location) loads that file into the environment without overriding
what is already set, so the same `dg.EnvVar` settings serve the embedded default and a real cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

KAFKA_BOOTSTRAP_SERVERS = "K2_KAFKA_BOOTSTRAP_SERVERS"
SCHEMA_REGISTRY_URL = "K2_SCHEMA_REGISTRY_URL"
# Any client property, by environment variable: K2_KAFKA__SASL_MECHANISMS=PLAIN -> `sasl.mechanisms`,
# K2_SCHEMA_REGISTRY__BASIC_AUTH_USER_INFO=user:pw -> `basic.auth.user.info` (librdkafka's and the
# registry client's property names are lower-case words joined by dots, so `_` maps to `.`).
KAFKA_CLIENT_PREFIX = "K2_KAFKA__"
SCHEMA_REGISTRY_CLIENT_PREFIX = "K2_SCHEMA_REGISTRY__"
# Properties whose values are never shown: in Dagster they stay EnvVar references, in logs they're masked.
SECRET_WORDS = ("password", "secret", "user.info", "key", "token")


def k2_home() -> Path:
    """The folder for local state (`K2_HOME`, default `./.k2`), created on first use."""
    home = Path(os.environ.get("K2_HOME") or ".k2").resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def devstack_env_path() -> Path:
    return k2_home() / "devstack.env"


def read_env_file(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines; blank lines and # comments are skipped."""
    if not path.exists():
        return {}
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def load_devstack_env() -> dict[str, str]:
    """Export the dev stack's addresses unless the environment already names a real cluster."""
    loaded = {}
    for key, value in read_env_file(devstack_env_path()).items():
        if key not in os.environ:
            os.environ[key] = value
            loaded[key] = value
    return loaded


def client_property_variables(prefix: str) -> dict[str, str]:
    """Client property -> the environment variable that sets it, for every variable with `prefix`."""
    return {
        name[len(prefix) :].lower().replace("_", "."): name
        for name in sorted(os.environ)
        if name.startswith(prefix) and len(name) > len(prefix)
    }


def client_properties(prefix: str) -> dict[str, str]:
    """The client properties the environment sets (for CLI clients outside Dagster resources)."""
    return {prop: os.environ[name] for prop, name in client_property_variables(prefix).items()}


def is_secret_property(prop: str) -> bool:
    return any(word in prop for word in SECRET_WORDS)


def require_setting(name: str) -> str:
    """The value of a required setting, or an error that names it and says how to set it."""
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(
            f"Setting {name} is not set: export it, or run `k2 devstack up` to start the embedded "
            f"stack, which writes it to {devstack_env_path()}."
        )
    return value
