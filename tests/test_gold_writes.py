"""Two writers of one Gold hour: the one whose commit meets the other's recomputes from the current
Silver instead of failing or committing what it computed before (real SQLite catalog in tmp_path)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from pyiceberg.exceptions import ValidationException

from k2_assets.gold.assets import GoldStream
from k2_assets.gold.tables import GOLD_TABLE_SPEC
from k2_assets.silver.tables import silver_table_spec
from k2_resources.exchanges import EXCHANGES
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.io_manager import RowScope, conform, replace_rows

HOUR = datetime(2026, 11, 23, 10, tzinfo=UTC)
GOLD_SCOPE = RowScope(HOUR, HOUR + timedelta(hours=1))


@pytest.fixture()
def iceberg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> IcebergCatalogResource:
    monkeypatch.setenv("K2_HOME", str(tmp_path))
    return IcebergCatalogResource()


def add_silver_trades(iceberg: IcebergCatalogResource, ids: list[str], ingested: datetime) -> None:
    """Silver rows of event hour HOUR, ingested at `ingested`, added to the Silver hour they land in."""
    spec = silver_table_spec(EXCHANGES[0])
    table = iceberg.ensure_table(spec)
    start = ingested.replace(minute=0, second=0, microsecond=0)
    scope = RowScope(start, start + timedelta(hours=1))
    micros = int((HOUR + timedelta(minutes=30)).timestamp() * 1_000_000)
    new = pa.table(
        {
            "message_id": ids,
            "exchange": ["BINANCE"] * len(ids),
            "timestamp": pa.array([micros] * len(ids), pa.int64()),
            "exchange_date": [HOUR.date()] * len(ids),
            "bronze_ingestion_timestamp": pa.array([ingested] * len(ids), pa.timestamp("us", tz="UTC")),
            "topic": ["t"] * len(ids),
            "partition": pa.array([0] * len(ids), pa.int32()),
            "offset": pa.array(range(len(ids)), pa.int64()),
        }
    )
    existing = (
        table.scan(row_filter=scope.expression(spec, table)).to_arrow() if table.current_snapshot() else None
    )
    rows = conform(new, table.schema().as_arrow())
    combined = pa.concat_tables([existing, rows]) if existing is not None else rows
    replace_rows(table, spec, combined, scope, {})


def gold_ids(iceberg: IcebergCatalogResource) -> list[str]:
    return sorted(iceberg.load_table(GOLD_TABLE_SPEC).scan().to_arrow()["message_id"].to_pylist())


class InterruptedOnce:
    """The stream of a Gold run that, while it is writing, sees another run commit the same hour."""

    def __init__(self, stream: GoldStream, other_write):
        self.stream, self.other_write, self.pending = stream, other_write, True
        self.refreshes = 0

    def __iter__(self) -> Iterator:
        if self.pending:
            self.pending = False
            self.other_write()
        return iter(self.stream)

    def refresh(self) -> None:
        self.refreshes += 1
        self.stream.refresh()


def test_a_gold_write_that_meets_a_newer_concurrent_one_recomputes_and_keeps_the_newest(
    iceberg: IcebergCatalogResource,
) -> None:
    add_silver_trades(iceberg, ["a1", "a2"], HOUR + timedelta(minutes=31))
    gold = iceberg.ensure_table(GOLD_TABLE_SPEC)
    ours = GoldStream(iceberg, GOLD_SCOPE.start, GOLD_SCOPE.end)  # pinned before the late trade

    def other_run() -> None:
        """A late trade lands in Silver and another run writes Gold 10:00 with it, before we commit."""
        add_silver_trades(iceberg, ["late"], HOUR + timedelta(hours=1, minutes=20))
        theirs = GoldStream(iceberg, GOLD_SCOPE.start, GOLD_SCOPE.end)
        replace_rows(iceberg.load_table(GOLD_TABLE_SPEC), GOLD_TABLE_SPEC, theirs, GOLD_SCOPE, {})

    data = InterruptedOnce(ours, other_run)
    report = replace_rows(gold, GOLD_TABLE_SPEC, data, GOLD_SCOPE, {})
    assert data.refreshes == 1
    assert report.rows == 3
    assert gold_ids(iceberg) == ["a1", "a2", "late"]  # not the stale ["a1", "a2"], and nothing twice
    assert ours.output_metadata()["silver_rows_in_window"] == 3


def test_a_write_that_cannot_recompute_fails_on_a_concurrent_commit_and_leaves_the_other(
    iceberg: IcebergCatalogResource,
) -> None:
    add_silver_trades(iceberg, ["a1"], HOUR + timedelta(minutes=31))
    stale = iceberg.ensure_table(GOLD_TABLE_SPEC)
    fresh = GoldStream(iceberg, GOLD_SCOPE.start, GOLD_SCOPE.end)
    replace_rows(iceberg.load_table(GOLD_TABLE_SPEC), GOLD_TABLE_SPEC, fresh, GOLD_SCOPE, {})
    plain = pa.Table.from_batches(list(GoldStream(iceberg, GOLD_SCOPE.start, GOLD_SCOPE.end)))
    with pytest.raises(ValidationException):
        replace_rows(stale, GOLD_TABLE_SPEC, plain, GOLD_SCOPE, {})
    assert gold_ids(iceberg) == ["a1"]
    warehouse = Path(iceberg.resolved_properties()["warehouse"].removeprefix("file://"))
    gold_files = {p.name for p in warehouse.rglob("*.parquet") if "gold" in str(p)}
    live = {Path(t.file.file_path).name for t in iceberg.load_table(GOLD_TABLE_SPEC).scan().plan_files()}
    assert gold_files == live  # the losing write's data files were removed, not left as orphans
