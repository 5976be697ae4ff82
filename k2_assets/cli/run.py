"""`k2 run`: the whole pipeline end to end on whatever stack the environment names.

It produces a few hours of simulated trades for every exchange (with every fault kind at a low
rate), drains Bronze ingestion, materialises Silver for the ingestion hours and Gold for the event
hours through Dagster (single-run backfills of those ranges), runs the dedup job, materialises Gold
again so its checks judge the final table, and prints row counts per layer and every check result.
Runs are recorded in the Dagster instance, so `make dev` shows them afterwards.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dagster as dg

SIMULATED_HOURS = 3
FAULT_RATE = "all=0.0005"


@dataclass
class CheckOutcome:
    asset: str
    check: str
    partitions: str
    passed: bool
    severity: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunLog:
    """What the pipeline's Dagster runs reported."""

    checks: list[CheckOutcome] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)

    def absorb(self, label: str, result: Any, partitions: str) -> None:
        from dagster import DagsterEventType

        if not result.success:
            self.failed_runs.append(label)
            for event in result.all_events:
                if event.is_step_failure:
                    print(event.step_failure_data.error.to_string(), file=sys.stderr)
        for event in result.all_events:
            if event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
                data = event.event_specific_data
                detail = {k: v.value for k, v in data.metadata.items() if not k.startswith("dagster/")}
                self.checks.append(
                    CheckOutcome(
                        data.asset_key.to_user_string(),
                        data.check_name,
                        partitions,
                        data.passed,
                        data.severity.value,
                        detail,
                    )
                )

    def failures(self) -> list[CheckOutcome]:
        return [c for c in self.checks if not c.passed and c.severity == "ERROR"]


def produce_trades(now: datetime) -> dict[str, dict]:
    """Each exchange's `run_trades` (k2_resources/exchanges.py) spread over the simulated hours."""
    from k2_resources.dev.simulator import produce
    from k2_resources.exchanges import EXCHANGES

    reports = {}
    for exchange in EXCHANGES:
        rate = exchange.run_trades / (SIMULATED_HOURS * 3600)
        start = now - timedelta(hours=SIMULATED_HOURS)
        report = produce(exchange, exchange.run_trades, rate=rate, start=start, faults=FAULT_RATE, seed=None)
        reports[exchange.name] = report
        print(f"produced {report['count']} {exchange.name} records from {report['start']} to {report['end']}")
    return reports


def drain_bronze(instance: dg.DagsterInstance, log: RunLog) -> None:
    from k2_assets.definitions import defs
    from k2_resources.exchanges import EXCHANGES

    for exchange in EXCHANGES:
        job = defs.resolve_job_def(f"bronze_{exchange.name}_ingestion")
        config = {"ops": {f"ingest_{exchange.name}_trades": {"config": {"drain": True}}}}
        result = job.execute_in_process(run_config=config, instance=instance, raise_on_error=False)
        log.absorb(job.name, result, "")


def materialize_range(instance: dg.DagsterInstance, log: RunLog, keys: list, first: str, last: str) -> None:
    """One single-run backfill of `keys` over [first, last], as the UI's backfill would launch it."""
    from dagster import AssetKey

    from k2_assets.definitions import defs
    from k2_assets.operations.alerts import RANGE_END_TAG, RANGE_START_TAG

    job = defs.resolve_implicit_global_asset_job_def()
    tags = {RANGE_START_TAG: first, RANGE_END_TAG: last}
    selection = [k if isinstance(k, AssetKey) else AssetKey.from_user_string(k) for k in keys]
    result = job.execute_in_process(
        instance=instance, asset_selection=selection, tags=tags, raise_on_error=False
    )
    log.absorb(
        f"materialize {', '.join(k.to_user_string() for k in selection)} {first}..{last}",
        result,
        f"{first}..{last}",
    )


def run_dedup(instance: dg.DagsterInstance, log: RunLog, lookback_hours: int) -> None:
    from k2_assets.definitions import defs

    job = defs.resolve_job_def("gold_dedup_job")
    config = {"ops": {"find_gold_duplicates": {"config": {"lookback_hours": lookback_hours}}}}
    log.absorb(
        "gold_dedup_job",
        job.execute_in_process(run_config=config, instance=instance, raise_on_error=False),
        "",
    )


def row_counts() -> list[tuple[str, str, int]]:
    from k2_assets.tables import all_table_specs
    from k2_resources.iceberg import IcebergCatalogResource

    catalog = IcebergCatalogResource()
    rows = []
    for spec in all_table_specs():
        table = catalog.ensure_table(spec)
        layer = spec.name.split("_", 1)[0]
        rows.append((layer, spec.identifier, table.scan().count() if table.current_snapshot() else 0))
    return rows


def print_report(log: RunLog) -> None:
    print("\nRows per table")
    for layer, identifier, count in row_counts():
        print(f"  {layer:<7} {identifier:<40} {count:>10}")
    print("\nChecks")
    for c in log.checks:
        verdict = "PASS" if c.passed else ("FAIL" if c.severity == "ERROR" else "WARN")
        print(f"  {verdict}  {c.asset:<28} {c.check:<36} {c.partitions:<36} {c.detail}")
    for label in log.failed_runs:
        print(f"  FAILED RUN  {label}")


def run_pipeline() -> int:
    """The README's main command; returns the process exit code."""
    from k2_assets.cli.instance import prepare_dagster_home
    from k2_resources.dev.devstack import start_devstack
    from k2_resources.settings import load_devstack_env

    info = start_devstack()
    print(f"dev stack: Kafka {info.bootstrap_servers}, Schema Registry {info.registry_url}")
    load_devstack_env()
    dagster_home = prepare_dagster_home()
    print(f"Dagster instance: {dagster_home}")

    import dagster as dg

    from k2_assets.gold.assets import GOLD_KEY
    from k2_assets.partitions import hour_key
    from k2_assets.silver.assets import dlq_asset_key, silver_asset_key
    from k2_resources.exchanges import EXCHANGES

    now = datetime.now(UTC)
    produce_trades(now)
    log = RunLog()
    with dg.DagsterInstance.get() as instance:
        drain_bronze(instance, log)
        ingested = datetime.now(UTC)
        silver_keys = [k for e in EXCHANGES for k in (silver_asset_key(e), dlq_asset_key(e))]
        # The previous hour too: it is the latest complete hour the freshness checks look for.
        materialize_range(instance, log, silver_keys, hour_key(now - timedelta(hours=1)), hour_key(ingested))
        first_event = now - timedelta(hours=SIMULATED_HOURS + 8)  # late trades run hours behind
        materialize_range(instance, log, [GOLD_KEY], hour_key(first_event), hour_key(ingested))
        run_dedup(instance, log, lookback_hours=SIMULATED_HOURS + 10)
        final = RunLog()
        materialize_range(instance, final, [GOLD_KEY], hour_key(first_event), hour_key(ingested))
        log.failed_runs += final.failed_runs
        log.checks = [c for c in log.checks if c.asset != GOLD_KEY.to_user_string()] + final.checks
    print_report(log)
    failed = log.failures()
    if failed or log.failed_runs:
        print(f"\n{len(failed)} checks failed, {len(log.failed_runs)} runs failed", file=sys.stderr)
        return 1
    print(f"\nAll {len(log.checks)} checks passed.")
    return 0
