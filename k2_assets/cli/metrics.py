"""`k2 metrics`: serve K2's health to Prometheus from the Dagster instance and the Iceberg catalog."""

from __future__ import annotations

import argparse
import os
import sys

from k2_resources.metrics import DEFAULT_BIND, DEFAULT_PORT


def cmd_metrics(args: argparse.Namespace) -> int:
    """Serve /metrics until stopped, or with --once print one scrape and exit (runbooks, cron, tests)."""
    import dagster as dg

    from k2_assets.cli.instance import prepare_dagster_home
    from k2_assets.definitions import defs
    from k2_assets.operations.metrics import K2Metrics
    from k2_resources.metrics import build_registry, make_metrics_server, scrape

    if not os.environ.get("DAGSTER_HOME"):  # the instance `k2 dev` and `k2 run` keep in K2_HOME
        prepare_dagster_home()
    with dg.DagsterInstance.get() as instance:
        registry = build_registry(K2Metrics(instance, defs.get_repository_def()).families)
        if args.once:
            sys.stdout.write(scrape(registry))
            return 0
        server = make_metrics_server(registry, args.port, args.bind)
        print(f"k2 metrics on http://{args.bind}:{server.server_port}/metrics", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    metrics = subparsers.add_parser("metrics", help="serve K2's metrics in Prometheus's text format")
    metrics.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0: any free port"
    )
    metrics.add_argument(
        "--bind", default=DEFAULT_BIND, help=f"address to listen on (default {DEFAULT_BIND})"
    )
    metrics.add_argument("--once", action="store_true", help="print one scrape to stdout and exit")
    metrics.set_defaults(func=cmd_metrics)
