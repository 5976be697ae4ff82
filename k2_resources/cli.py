"""The `k2` command: the embedded dev stack, the exchange simulator, and the pipeline end to end."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each entry is a module with `register(subparsers)`; it adds its sub-commands and sets `func`.
COMMAND_MODULES = (
    "k2_resources.devstack.cli",
    "k2_resources.simulator.cli",
    "k2_resources.feeds.cli",
    "k2_assets.cli",
    "k2_assets.dev",
    "k2_assets.operations.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from k2_resources.settings import load_devstack_env

    load_devstack_env()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
