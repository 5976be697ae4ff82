"""Driving the real pipeline from tests: produce, drain, materialise through Dagster, read tables back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from k2_assets.definitions import defs
from k2_assets.operations.alerts import RANGE_END_TAG, RANGE_START_TAG
from k2_assets.partitions import HOUR_KEY_FORMAT
from k2_resources.exchanges import EXCHANGES
from k2_resources.iceberg import IcebergCatalogResource, TableSpec

# Which DLQ category each simulator fault kind must land in.
FAULT_CATEGORIES = {
    "empty_value": "EMPTY_VALUE",
    "bad_magic": "BAD_MAGIC_BYTE",
    "unknown_schema_id": "UNKNOWN_SCHEMA_ID",
    "truncated_body": "AVRO_DECODE_ERROR",
    "trailing_garbage": "AVRO_DECODE_ERROR",
    "nonpositive_price": "VALIDATION_PRICE",
    "nonpositive_quantity": "VALIDATION_QUANTITY",
    "decimal_overflow": "VALIDATION_DECIMAL_OVERFLOW",
    "side_unknown": "VALIDATION_SIDE",
    "empty_symbol": "VALIDATION_SYMBOL",
    "future_timestamp": "VALIDATION_TIMESTAMP",
    "exchange_mismatch": "VALIDATION_EXCHANGE",
}
# Fault kinds that are valid trades: they must reach Silver.
VALID_KINDS = ("clean", "late_trade", "redelivery", "replay_new_id", "v3_schema")
# Columns stamped with the time of the write: equal across re-runs only by coincidence.
WRITE_TIME_COLUMNS = ("validation_timestamp", "dlq_timestamp", "gold_ingestion_timestamp", "silver_partition")


@contextmanager
def running_stack(home: Path) -> Iterator[Path]:
    """A dev stack of its own at `home`, its settings exported into this process while it runs."""
    from k2_resources.settings import read_env_file
    from tests.conftest import devstack_up, k2

    devstack_up(home)
    patch = pytest.MonkeyPatch()
    try:
        for key, value in {**read_env_file(home / "devstack.env"), "K2_HOME": str(home)}.items():
            patch.setenv(key, value)
        yield home
    finally:
        patch.undo()
        k2("devstack", "down", home=home, check=False)


def hour_key(moment: datetime) -> str:
    return moment.strftime(HOUR_KEY_FORMAT)


def this_hour(now: datetime | None = None) -> str:
    """The hour key of `now` (default: the clock's)."""
    return hour_key(now or datetime.now(UTC))


def hours_back(n: int, now: datetime | None = None) -> str:
    """The hour key `n` hours before `now` (default: the clock's). Tests whose fixture and test bodies must
    agree on the hours pass the fixture's `now`: else an hour boundary between them shifts the window."""
    return hour_key((now or datetime.now(UTC)) - timedelta(hours=n))


def drain(exchange: str, instance: dg.DagsterInstance) -> None:
    job = defs.resolve_job_def(f"bronze_{exchange}_ingestion")
    config = {"ops": {f"ingest_{exchange}_trades": {"config": {"drain": True}}}}
    assert job.execute_in_process(run_config=config, instance=instance).success


def materialize(
    instance: dg.DagsterInstance,
    keys: list[str | dg.AssetKey],
    first: str,
    last: str | None = None,
    **kwargs: Any,
) -> dg.ExecuteInProcessResult:
    """Materialise `keys` over [first, last] in one run (the single-run backfill policy's shape)."""
    job = defs.resolve_implicit_global_asset_job_def()
    selection = [k if isinstance(k, dg.AssetKey) else dg.AssetKey.from_user_string(k) for k in keys]
    tags = {RANGE_START_TAG: first, RANGE_END_TAG: last or first}
    return job.execute_in_process(instance=instance, asset_selection=selection, tags=tags, **kwargs)


SILVER_KEYS = [k for e in EXCHANGES for k in (f"silver_{e.name}_trades", f"silver_dlq_trades/{e.name}")]


def build_silver(instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    """Drain every exchange's Bronze ingestion, then materialise Silver for this hour and the last."""
    for exchange in EXCHANGES:
        drain(exchange.name, instance)
    return materialize(instance, SILVER_KEYS, hours_back(1), this_hour())


def check_results(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], Any]:
    """(asset, check name) -> the check's evaluation."""
    return {
        (
            e.event_specific_data.asset_key.to_user_string(),
            e.event_specific_data.check_name,
        ): e.event_specific_data
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
    }


def run_job(name: str, instance: dg.DagsterInstance, config: dict | None = None) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(name).execute_in_process(run_config=config or {}, instance=instance)


def table_rows(spec: TableSpec) -> pa.Table:
    table = IcebergCatalogResource().ensure_table(spec)
    return table.scan().to_arrow() if table.current_snapshot() else spec.arrow_schema.empty_table()


def comparable(rows: pa.Table, keys: list[str]) -> pa.Table:
    """Rows without write-time columns, sorted by `keys`: equal tables compare equal."""
    keep = [c for c in rows.column_names if c not in WRITE_TIME_COLUMNS]
    return rows.select(keep).sort_by([(k, "ascending") for k in keys])


def column_values(rows: pa.Table, column: str, where: pa.Array | None = None) -> list:
    return (rows.filter(where) if where is not None else rows)[column].to_pylist()


def equal_to(rows: pa.Table, column: str, value: Any) -> pa.Array:
    return pc.equal(rows[column], value)
