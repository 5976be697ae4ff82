"""A Bronze commit stages metadata without PyIceberg's deep copies, and writes the same table state.

Real SQLite catalog and warehouse in a temporary K2_HOME; no broker is needed to commit.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyiceberg.catalog
import pytest
from pyiceberg.table import Table
from pyiceberg.table.update import update_table_metadata

from k2_assets.bronze.ingestion import (
    BronzeCommitter,
    _StagedMetadataTransaction,
    read_stored_offsets,
    shallow_catalog_staging,
    staged_metadata,
    write_data_files,
)
from k2_assets.bronze.tables import MANIFEST_MERGE_COUNT, OFFSETS_TAG, bronze_table_spec
from k2_resources.exchanges import exchange
from k2_resources.iceberg import IcebergCatalogResource


@pytest.fixture()
def bronze_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Table:
    monkeypatch.setenv("K2_HOME", str(tmp_path))
    return IcebergCatalogResource().ensure_table(bronze_table_spec(exchange("binance")))


def rows(table: Table, first_offset: int, count: int) -> pa.Table:
    now = datetime.now(UTC)
    values = {
        "raw_bytes": [b"v%d" % i for i in range(count)],
        "message_key": [b"BTCUSDT"] * count,
        "topic": ["market.crypto.trades.binance"] * count,
        "partition": [0] * count,
        "offset": list(range(first_offset, first_offset + count)),
        "kafka_timestamp": [now] * count,
        "ingestion_timestamp": [now] * count,
        "ingestion_date": [now.date()] * count,
    }
    schema = table.schema().as_arrow()
    return pa.table({f.name: pa.array(values[f.name], f.type) for f in schema}, schema=schema)


def test_staged_metadata_is_pyiceberg_s_without_the_copy(bronze_table: Table) -> None:
    """Same metadata as `update_table_metadata` for an append + tag, sharing the unchanged snapshots."""
    committer = BronzeCommitter(bronze_table, {}, "run-1")
    for k in range(3):
        committer.commit(rows(bronze_table, k * 10, 10), {0: (k + 1) * 10})
    table = committer.table
    tx = _StagedMetadataTransaction(table)
    with tx.update_snapshot(snapshot_properties={"k": "v"}).fast_append() as append:
        for data_file in write_data_files(table.metadata, rows(table, 30, 10), table.io):
            append.append_data_file(data_file)
    base, updates = table.metadata, tx._updates
    assert updates, "the append staged no update"

    ours, theirs = staged_metadata(base, updates), update_table_metadata(base, updates)
    assert json.loads(ours.model_dump_json()) == json.loads(theirs.model_dump_json())
    assert ours.snapshots[0] is base.snapshots[0]  # shared, not copied
    assert theirs.snapshots[0] is not base.snapshots[0]


def test_catalog_staging_is_shallow_only_inside_a_bronze_commit(bronze_table: Table) -> None:
    """Other callers of the catalog's staging get PyIceberg's deep copy, as before."""
    committer = BronzeCommitter(bronze_table, {}, "run-1")
    committer.commit(rows(bronze_table, 0, 5), {0: 5})
    base = committer.table.metadata
    staged_outside = pyiceberg.catalog.update_table_metadata(base, ())
    with shallow_catalog_staging():
        staged_inside = pyiceberg.catalog.update_table_metadata(base, ())
    assert staged_outside.snapshots[0] is not base.snapshots[0]
    assert staged_inside.snapshots[0] is base.snapshots[0]


def test_bronze_commits_keep_rows_offsets_and_tag(bronze_table: Table) -> None:
    """Commits through the shallow path leave a table any reader loads: rows, offsets, tag, history."""
    committer = BronzeCommitter(bronze_table, {}, "run-1")
    for k in range(20):
        committer.commit(rows(bronze_table, k * 7, 7), {0: (k + 1) * 7})
    reloaded = IcebergCatalogResource().load_table(bronze_table_spec(exchange("binance")))
    offsets = reloaded.scan(selected_fields=("offset",)).to_arrow()["offset"].to_pylist()
    assert sorted(offsets) == list(range(140))
    assert read_stored_offsets(reloaded) == {0: 140}
    assert reloaded.metadata.refs[OFFSETS_TAG].snapshot_id == reloaded.current_snapshot().snapshot_id
    assert len(reloaded.metadata.snapshots) == 20
    assert len(reloaded.metadata.metadata_log) == 20  # every earlier version: the create and 19 commits


def test_bronze_commits_merge_manifests_and_keep_every_row_once(bronze_table: Table) -> None:
    """A fast append left one manifest per commit, and every scan plan opened them all (~1 ms each): the
    manifests stay under the merge count however many commits the table keeps, with every row once."""
    committer = BronzeCommitter(bronze_table, {}, "run-1")
    commits = 3 * MANIFEST_MERGE_COUNT + 5
    for k in range(commits):
        committer.commit(rows(bronze_table, k * 3, 3), {0: (k + 1) * 3})
    reloaded = IcebergCatalogResource().load_table(bronze_table_spec(exchange("binance")))
    current = reloaded.current_snapshot()
    assert current is not None
    assert len(current.manifests(reloaded.io)) <= MANIFEST_MERGE_COUNT
    assert len(reloaded.metadata.snapshots) == commits
    assert current.summary.operation.value == "append"
    offsets = reloaded.scan(selected_fields=("offset",)).to_arrow()["offset"].to_pylist()
    assert sorted(offsets) == list(range(commits * 3))
    assert read_stored_offsets(reloaded) == {0: commits * 3}
    assert reloaded.metadata.refs[OFFSETS_TAG].snapshot_id == current.snapshot_id
