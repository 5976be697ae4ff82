"""`k2` sub-commands that run K2's Dagster jobs in-process: handy for CI, tests and one-off drains."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, get_args

if TYPE_CHECKING:
    import dagster as dg
    from pydantic.fields import FieldInfo


def dagster_instance() -> dg.DagsterInstance:
    """The instance named by DAGSTER_HOME, or a throwaway one when none is configured."""
    import dagster as dg  # imported here: every `k2` command builds this parser, few need Dagster

    return dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()


def ingestion_fields() -> dict[str, FieldInfo]:
    """Bronze ingestion's tunables, each of which `k2 ingest` has a flag for."""
    from k2_assets.bronze.ingestion import BronzeIngestionConfig

    return dict(BronzeIngestionConfig.model_fields)


def flag(name: str) -> str:
    """The CLI flag of a config field: max_batch_records -> --max-batch-records."""
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, fields: dict[str, FieldInfo]) -> None:
    """One flag per config field, typed, with the field's description, bounds and default as help.

    Flags default to None (a bool to False) so that an unset flag leaves the field out of the run
    config and the Config's own default applies: the CLI never restates a default.
    """
    from k2_assets.tunables import describe_field

    for name, info in fields.items():
        if info.annotation is bool:
            parser.add_argument(flag(name), action="store_true", help=describe_field(info))
            continue
        scalar = next(t for t in (int, float, str) if t in (info.annotation, *get_args(info.annotation)))
        parser.add_argument(flag(name), type=scalar, help=describe_field(info))


def ingestion_run_config(exchange: str, args: argparse.Namespace) -> dict:
    """The run config of the flags given: fields whose flag was not set are left to the Config."""
    config = {
        name: getattr(args, name) for name in ingestion_fields() if getattr(args, name) not in (None, False)
    }
    return {"ops": {f"ingest_{exchange}_trades": {"config": config}}}


def execute(job_name: str, run_config: dict) -> int:
    """Run a job of the code location in this process; print step errors; exit code 1 on failure."""
    from k2_assets.definitions import defs

    job = defs.resolve_job_def(job_name)
    with dagster_instance() as instance:
        result = job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                print(event.step_failure_data.error.to_string(), file=sys.stderr)
        return 1
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Run `bronze_<exchange>_ingestion` in this process; exit 1 when the run fails."""
    from k2_resources.exchanges import exchange

    name = exchange(args.exchange).name
    return execute(f"bronze_{name}_ingestion", ingestion_run_config(name, args))


def cmd_job(args: argparse.Namespace) -> int:
    """Run any job with run config from YAML files (merged in order), as `dagster job execute` would."""
    import dagster as dg

    config = dg.config_from_files(args.config) if args.config else {}
    return execute(args.job, dict(config))


def cmd_run(args: argparse.Namespace) -> int:
    from k2_assets.cli.run import run_pipeline

    return run_pipeline()


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run the whole pipeline end to end and print counts and checks")
    run.set_defaults(func=cmd_run)
    ingest = subparsers.add_parser("ingest", help="run one exchange's Bronze ingestion job in this process")
    ingest.add_argument("--exchange", required=True)
    add_config_flags(ingest, ingestion_fields())
    ingest.set_defaults(func=cmd_ingest)

    job = subparsers.add_parser("job", help="run any K2 job in this process with run config files")
    job.add_argument("job", help="job name, e.g. gold_dedup_job")
    job.add_argument("-c", "--config", action="append", help="run config YAML (repeatable, merged in order)")
    job.set_defaults(func=cmd_job)
