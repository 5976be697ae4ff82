"""Every K2 environment setting, declared and read here and nowhere else.

Each `Setting` names its variable, its default, what it does and how a value is checked; the modules
that act on a setting call its `value()`, so a bad value fails naming the setting, and the README's
configuration table is checked against `SETTINGS` (tests/test_settings.py). Settings that Dagster
resolves itself (`dg.EnvVar`: addresses and secrets, so their values never enter run config) are
declared here too, with their names passed to `dg.EnvVar`.

Where K2 keeps local state, and how the embedded dev stack's addresses reach every process:
`k2 devstack up` writes the broker and registry addresses to `$K2_HOME/devstack.env`. Every K2 entry
point (the CLI, the Dagster code location) loads that file into the environment without overriding
what is already set, so the same `dg.EnvVar` settings serve the embedded default and a real cluster.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One environment setting. `choices` (case-insensitive) or `parse` check the text: `parse` turns it
    into the value or raises ValueError saying what it must be ("a positive number"); `value()` adds the
    setting's name and the offending text."""

    name: str
    default: str
    description: str
    parse: Callable[[str], Any] = str
    choices: tuple[str, ...] = ()

    def is_set(self) -> bool:
        return bool(os.environ.get(self.name, "").strip())

    def raw(self) -> str:
        """The text set in the environment (stripped), or the default when unset or empty."""
        return os.environ.get(self.name, "").strip() or self.default

    def value(self) -> Any:
        return self.parsed(self._choice if self.choices else self.parse)

    def _choice(self, raw: str) -> str:
        if raw.lower() not in self.choices:
            raise ValueError(f"one of {', '.join(self.choices)}")
        return raw.lower()

    def parsed(self, parse: Callable[[str], Any]) -> Any:
        """The value as `parse` reads it (for a parser that lives with the fact it checks)."""
        raw = self.raw()
        try:
            return parse(raw)
        except ValueError as err:
            raise ValueError(f"{self.name} must be {err}, not {raw!r}") from None


def positive_number(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError("a positive number")
    return value


def minutes_within_an_hour(raw: str) -> int:
    if not raw.isdigit() or not 0 <= int(raw) <= 59:
        raise ValueError("a whole number of minutes from 0 to 59")
    return int(raw)


def http_url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ValueError("an http:// or https:// URL")
    return raw.rstrip("/")


HOME = Setting("K2_HOME", ".k2", "local state: dev stack, catalog, warehouse, Dagster instance")
KAFKA_BOOTSTRAP = Setting(
    "K2_KAFKA_BOOTSTRAP_SERVERS", "", "Kafka bootstrap servers (written by `k2 devstack up` to devstack.env)"
)
SCHEMA_REGISTRY = Setting("K2_SCHEMA_REGISTRY_URL", "", "Confluent-compatible Schema Registry URL")
AUTOMATION = Setting("K2_AUTOMATION", "on", "default state of sensors and schedules", choices=("on", "off"))
# Recent on purpose: hours before the first ingestion would only ever show as missing in the UI.
PARTITIONS_START = Setting(
    "K2_PARTITIONS_START", "2026-11-01-00:00", "first hourly partition, UTC `YYYY-MM-DD[-HH:00]`"
)
FRESHNESS_DELAY_MINUTES = Setting(
    "K2_FRESHNESS_DELAY_MINUTES",
    "20",
    "minutes after an hour closes by which its Silver and Gold partitions must exist",
    minutes_within_an_hour,
)
ENGINE = Setting("K2_ENGINE", "embedded", "the engine of Silver and Gold", choices=("embedded", "spark"))
SPARK_MASTER = Setting("K2_SPARK_MASTER", "", "Spark master of the Spark resources (default `local[*]`)")
SPARK_REMOTE = Setting("K2_SPARK_REMOTE", "", "Spark Connect address, instead of a master")
ALERT_WEBHOOK_URL = Setting("K2_ALERT_WEBHOOK_URL", "", "Slack-compatible incoming webhook (a secret)")
UI_BASE_URL = Setting("K2_UI_BASE_URL", "http://127.0.0.1:3000", "the Dagster UI alerts link to", http_url)
ALERT_LAG_RECORDS = Setting(
    "K2_ALERT_LAG_RECORDS", "100000", "consumer lag that raises an alert", positive_number
)
ALERT_SILENT_MINUTES = Setting(
    "K2_ALERT_SILENT_MINUTES", "15", "minutes without a Bronze commit that raise an alert", positive_number
)
ALERT_REPEAT_MINUTES = Setting(
    "K2_ALERT_REPEAT_MINUTES", "60", "minutes before an unresolved alert is repeated", positive_number
)
LOG_FORMAT = Setting(
    "K2_LOG_FORMAT", "text", "run logs as text or one JSON object per line", choices=("text", "json")
)
DEVSTACK_KAFKA = Setting(
    "K2_DEVSTACK_KAFKA",
    "apache",
    "the dev stack's Kafka: a real broker or librdkafka's mock",
    choices=("apache", "mock"),
)
KAFKA_JARS = Setting("K2_KAFKA_JARS", "", "a folder of Kafka jars for the dev broker, instead of Maven's")
CRASH_AT = Setting("K2_CRASH_AT", "", "tests only: `point[:n]` makes the process SIGKILL itself there")
POSTGRES_SETTINGS = tuple(
    Setting(
        f"K2_DAGSTER_PG_{part}", "", f"Dagster on PostgreSQL ({what}), read by deploy/dagster-postgres.yaml"
    )
    for part, what in (
        ("HOST", "host"),
        ("PORT", "port"),
        ("USER", "user"),
        ("PASSWORD", "password"),
        ("DB", "database"),
    )
)
SETTINGS: tuple[Setting, ...] = (
    HOME,
    KAFKA_BOOTSTRAP,
    SCHEMA_REGISTRY,
    AUTOMATION,
    PARTITIONS_START,
    FRESHNESS_DELAY_MINUTES,
    ENGINE,
    SPARK_MASTER,
    SPARK_REMOTE,
    ALERT_WEBHOOK_URL,
    UI_BASE_URL,
    ALERT_LAG_RECORDS,
    ALERT_SILENT_MINUTES,
    ALERT_REPEAT_MINUTES,
    LOG_FORMAT,
    DEVSTACK_KAFKA,
    KAFKA_JARS,
    CRASH_AT,
    *POSTGRES_SETTINGS,
)

KAFKA_BOOTSTRAP_SERVERS = KAFKA_BOOTSTRAP.name
SCHEMA_REGISTRY_URL = SCHEMA_REGISTRY.name
# Any client property, by environment variable: K2_KAFKA__SASL_MECHANISMS=PLAIN -> `sasl.mechanisms`,
# K2_SCHEMA_REGISTRY__BASIC_AUTH_USER_INFO=user:pw -> `basic.auth.user.info` (librdkafka's and the
# registry client's property names are lower-case words joined by dots, so `_` maps to `.`).
KAFKA_CLIENT_PREFIX = "K2_KAFKA__"
SCHEMA_REGISTRY_CLIENT_PREFIX = "K2_SCHEMA_REGISTRY__"
# Properties whose values are never shown: in Dagster they stay EnvVar references, in logs they're masked.
SECRET_WORDS = ("password", "secret", "user.info", "key", "token")


def k2_home() -> Path:
    """The folder for local state (`K2_HOME`, default `./.k2`), created on first use."""
    home = Path(HOME.raw()).resolve()
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
    value = os.environ.get(name)  # a `Setting`'s name (dg.EnvVar settings have no default)
    if not value:
        raise RuntimeError(
            f"Setting {name} is not set: export it, or run `k2 devstack up` to start the embedded "
            f"stack, which writes it to {devstack_env_path()}."
        )
    return value
