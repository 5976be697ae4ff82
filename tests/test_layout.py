"""The README's map ("Where things are") names every module of both packages, under its folder."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("k2_resources", "k2_assets")


def readme_map() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Where things are") :]
    return section[section.index("```\n") + 4 : section.index("\n```", section.index("```\n") + 4)]


def entries(block: str, indent: int) -> dict[str, str]:
    """name -> its text (its line and the continuation lines indented deeper), for lines at `indent`."""
    out: dict[str, str] = {}
    name = None
    for line in block.splitlines():
        start = len(line) - len(line.lstrip())
        if start == indent and line.strip():
            name = line.split()[0]
            out[name] = line
        elif name and start > indent:
            out[name] += "\n" + line
        else:
            name = None
    return out


def test_every_module_is_on_the_map() -> None:
    top = entries(readme_map(), 0)
    missing = []
    for package in PACKAGES:
        text = top[f"{package}/"]
        inner = entries("\n".join(text.splitlines()[1:]), 2)
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT / package)
            if path.name in ("__init__.py", "__main__.py") and relative.parent.name != "cli":
                continue
            if len(relative.parts) == 1:
                described = any(re.search(rf"\b{re.escape(path.name)}\b", entry) for entry in inner.values())
            else:
                described = path.name in inner.get(f"{relative.parts[0]}/", "")
            if not described:
                missing.append(f"{package}/{relative}")
    assert missing == [], missing
