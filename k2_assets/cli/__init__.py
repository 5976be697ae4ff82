"""The `k2` command, one module per group of sub-commands.

- `devstack`: the embedded dev stack (Kafka broker + Schema Registry), `k2 devstack up|down|status|install`
- `produce`: the exchange simulator into Kafka
- `feed`: a live exchange feed into Kafka
- `jobs`: `k2 run` (the pipeline end to end, `run.py`), `k2 ingest`, `k2 job`
- `dev`: `k2 dev`, Dagster's UI and daemon on the dev stack with the simulator streaming
- `metrics`: K2's metrics in Prometheus's text format
- `instance`: the Dagster instance these commands prepare under K2_HOME
"""

from __future__ import annotations

import argparse
import sys

from k2_assets.cli import dev, devstack, feed, jobs, metrics, produce
from k2_resources.settings import load_devstack_env

COMMAND_MODULES = (devstack, produce, feed, jobs, dev, metrics)  # each adds its sub-commands and sets `func`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2", description="K2: Kafka -> Iceberg, Bronze -> Silver -> Gold.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    load_devstack_env()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
