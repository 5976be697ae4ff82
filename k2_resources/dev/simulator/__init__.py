"""The exchange simulator behind `k2 produce`: seeded native trades, mapped to V2, faults injected.

`produce(exchange, count, ...)` (in `k2_resources.dev.simulator.producer`, re-exported here) is the entry
point for code and tests; `k2 produce` wraps it. The re-export is lazy because the Schema Registry client
takes most of a second to import, which every `k2` command would otherwise pay.
"""

from __future__ import annotations

from typing import Any

__all__ = ["produce"]


def __getattr__(name: str) -> Any:
    if name == "produce":
        from k2_resources.dev.simulator.producer import produce

        return produce
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
