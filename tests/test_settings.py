"""Every environment setting is declared once, in k2_resources/settings.py, read there, checked by name,
and listed in the README's configuration table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from k2_resources.settings import (
    ALERT_LAG_RECORDS,
    AUTOMATION,
    ENGINE,
    FRESHNESS_DELAY_MINUTES,
    LOG_FORMAT,
    PARTITIONS_START,
    SETTINGS,
    UI_BASE_URL,
    Setting,
)

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_MODULE = ROOT / "k2_resources" / "settings.py"
SETTING_NAME = re.compile(r"K2_[A-Z0-9_]*[A-Z0-9]")


def code_files() -> list[Path]:
    return sorted([*(ROOT / "k2_assets").rglob("*.py"), *(ROOT / "k2_resources").rglob("*.py")])


def test_no_module_but_settings_names_a_setting() -> None:
    """A K2_* name as a string anywhere else is a second place a setting is read or defined."""
    found = []
    for path in code_files():
        if path == SETTINGS_MODULE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and SETTING_NAME.fullmatch(node.value)
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value}")
    assert not found, found


def test_names_are_unique_and_each_setting_is_in_the_readme() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    readme = (ROOT / "README.md").read_text()
    configuration = readme[readme.index("## Configuration") :]
    configuration = configuration[: configuration.index("\n## ", 1)]
    assert [n for n in names if f"`{n}`" not in configuration] == []


@pytest.mark.parametrize(
    ("setting", "bad"),
    [
        (AUTOMATION, "maybe"),
        (ENGINE, "duckdb"),
        (LOG_FORMAT, "yaml"),
        (FRESHNESS_DELAY_MINUTES, "60"),
        (ALERT_LAG_RECORDS, "-5"),
        (UI_BASE_URL, "ftp://x"),
    ],
)
def test_a_bad_value_fails_naming_the_setting(
    setting: Setting, bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(setting.name, bad)
    with pytest.raises(ValueError, match=f"{setting.name} must be .*{re.escape(repr(bad))}"):
        setting.value()


def test_unset_or_empty_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENGINE.name, "  ")
    assert ENGINE.value() == "embedded" and not ENGINE.is_set()
    monkeypatch.delenv(FRESHNESS_DELAY_MINUTES.name, raising=False)
    assert FRESHNESS_DELAY_MINUTES.value() == 20
    monkeypatch.setenv(AUTOMATION.name, "OFF")
    assert AUTOMATION.value() == "off"


def test_the_partitions_start_is_parsed_where_hours_are_defined(monkeypatch: pytest.MonkeyPatch) -> None:
    from k2_assets.partitions import partitions_start

    monkeypatch.setenv(PARTITIONS_START.name, "2026-12-01")
    assert partitions_start() == "2026-12-01-00:00"
    monkeypatch.setenv(PARTITIONS_START.name, "yesterday")
    with pytest.raises(ValueError, match=PARTITIONS_START.name):
        partitions_start()
