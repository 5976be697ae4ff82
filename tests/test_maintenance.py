"""Bronze retention is safe beside ingestion: the grace race, the linear walk, expiry, validation.

Real SQLite catalog, real files, real BronzeCommitter commits, real Dagster runs; no Kafka needed.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest
from pyiceberg.manifest import ManifestFile

import k2_resources.iceberg_maintenance as maintenance
from k2_assets.bronze.ingestion import FencedError, read_stored_offsets
from k2_assets.bronze.jobs import BronzeRetentionConfig, apply_bronze_retention
from k2_assets.bronze.tables import OFFSETS_TAG
from k2_assets.maintenance.jobs import MaintenanceConfig
from k2_assets.silver.tables import silver_table_spec
from k2_resources.iceberg_maintenance import (
    DEFAULT_SNAPSHOT_MAX_AGE_HOURS,
    MIN_SNAPSHOT_AGE_HOURS,
    SNAPSHOT_MAX_AGE_PROPERTY,
    MaintenanceConfigError,
    MaintenancePolicy,
    expire_snapshots,
    reclaim_storage,
    referenced_files,
)
from tests.maintenance_helpers import (
    BINANCE,
    BRONZE_SPEC,
    CommitterThread,
    OffsetCommitter,
    assert_bronze_complete,
    bronze_rows,
    commit_batches,
    sqlite_catalog,
)

RETENTION_OP = "apply_binance_bronze_retention"


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A K2_HOME of this test's own: the Dagster jobs' default catalog is its SQLite catalog."""
    home = tmp_path / "k2home"
    home.mkdir()
    monkeypatch.setenv("K2_HOME", str(home))
    for key in [k for k in os.environ if k.startswith("PYICEBERG_CATALOG__K2__")]:
        monkeypatch.delenv(key)
    return home


def test_walk_longer_than_the_grace_beside_a_committer_deletes_nothing_live(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review #1: the walk outlasts the grace while ingestion commits; Bronze must stay readable."""
    catalog = sqlite_catalog(home)
    commit_batches(catalog, 20, 50)
    walk_seconds, grace = 3.0, timedelta(seconds=1)
    walk = maintenance.referenced_files

    def slow_walk(table):
        time.sleep(walk_seconds)  # what a walk over days of snapshots costs, compressed
        return walk(table)

    monkeypatch.setattr(maintenance, "referenced_files", slow_walk)
    committer = CommitterThread(home, rows=10, pause_seconds=0.05)
    committer.start()
    try:
        time.sleep(0.5)
        table = catalog.load_table(BRONZE_SPEC)
        report = reclaim_storage(table, datetime.now(UTC) - timedelta(hours=1), grace)
        commits_during_walk = committer.commits
        time.sleep(0.5)  # commits after the deletions must still find what they build on
    finally:
        committer.stop()
    assert committer.error is None, repr(committer.error)
    assert commits_during_walk >= 10  # the race really ran: many commits while the walk went on
    rows = assert_bronze_complete(sqlite_catalog(home))
    assert rows == 20 * 50 + 10 * committer.commits
    assert report.expired_snapshots == 0


def test_walk_reads_each_distinct_manifest_once(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review #2: N fast appends share manifests; the walk must not re-read them per snapshot."""
    commit_batches(sqlite_catalog(home), 60, 5)
    table = sqlite_catalog(home).load_table(BRONZE_SPEC)
    distinct = {m.manifest_path for s in table.metadata.snapshots for m in s.manifests(table.io)}
    reads: list[str] = []
    fetch = ManifestFile.fetch_manifest_entry

    def counting_fetch(self, io, discard_deleted=True):
        reads.append(self.manifest_path)
        return fetch(self, io, discard_deleted=discard_deleted)

    monkeypatch.setattr(ManifestFile, "fetch_manifest_entry", counting_fetch)
    files = referenced_files(table)
    assert len(distinct) >= 60
    assert sorted(reads) == sorted(distinct)  # once each, not 60 * 61 / 2 reads
    assert {p.removeprefix("file://") for p in distinct} <= files


def test_expiry_keeps_the_offsets_snapshot_and_heads(home: Path) -> None:
    catalog = sqlite_catalog(home)
    commit_batches(catalog, 5, 10)
    table = catalog.load_table(BRONZE_SPEC)
    tagged = table.metadata.refs[OFFSETS_TAG].snapshot_id
    # A non-ingestion commit (an older run's rows, another partition): main moves past the tag.
    table.append(bronze_rows(0, 5, datetime.now(UTC) - timedelta(days=10), partition=1))
    table = catalog.load_table(BRONZE_SPEC)
    assert table.current_snapshot().snapshot_id != tagged
    expired = expire_snapshots(table, datetime.now(UTC) + timedelta(seconds=1))
    table = catalog.load_table(BRONZE_SPEC)
    assert expired == 4
    assert {s.snapshot_id for s in table.metadata.snapshots} == {tagged, table.current_snapshot().snapshot_id}
    assert read_stored_offsets(table) == {0: 50}


def test_ingestion_commit_meeting_a_maintenance_commit_retries_without_fencing(home: Path) -> None:
    """A stale committer whose table moved under it by maintenance commits; another writer fences it."""
    catalog = sqlite_catalog(home)
    committer = OffsetCommitter(catalog)
    committer.commit(10)
    maintainer = sqlite_catalog(home).load_table(BRONZE_SPEC)
    maintainer.append(bronze_rows(0, 5, datetime.now(UTC) - timedelta(days=10), partition=1))
    maintainer.delete(
        "ingestion_date < '2001-01-01' or partition = 1", snapshot_properties={"k2.retention": "rows"}
    )
    expire_snapshots(maintainer.refresh(), datetime.now(UTC) + timedelta(seconds=1))
    committer.commit(10)  # met the maintenance commits: retried, not fenced
    assert read_stored_offsets(sqlite_catalog(home).load_table(BRONZE_SPEC)) == {0: 20}
    assert_bronze_complete(sqlite_catalog(home))

    OffsetCommitter(sqlite_catalog(home), run_id="other-run").commit(5)
    with pytest.raises(FencedError):
        committer.commit(10)
    assert_bronze_complete(sqlite_catalog(home))


def retention_run(instance: dg.DagsterInstance, **config: float | int) -> dg.ExecuteInProcessResult:
    from k2_assets.definitions import defs

    job = defs.resolve_job_def("bronze_binance_retention")
    run_config = {"ops": {RETENTION_OP: {"config": config}}}
    return job.execute_in_process(run_config=run_config, instance=instance, raise_on_error=False)


def age_files(root: Path, by: timedelta) -> None:
    """Make every file under root look `by` older, as files written that long ago are."""
    stamp = (datetime.now(UTC) - by).timestamp()
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (stamp, stamp))


def test_retention_job_deletes_old_rows_and_reclaims_their_files(home: Path) -> None:
    """Replaces tests/test_bronze_ingestion.py's version, which used settings now refused."""
    catalog = sqlite_catalog(home)
    commit_batches(catalog, 3, 1000)
    table = catalog.load_table(BRONZE_SPEC)
    offsets_before = read_stored_offsets(table)
    # Rows ingested ten days ago (another partition), appended the way an older run would have.
    old_day = datetime.now(UTC) - timedelta(days=10)
    table.append(bronze_rows(0, 500, old_day, partition=1))
    assert table.scan().count() == 3_500

    with dg.DagsterInstance.ephemeral() as instance:
        result = retention_run(instance, retention_days=7)
        assert result.success
        (materialization,) = result.asset_materializations_for_node(RETENTION_OP)
    assert materialization.metadata["deleted_rows"].value == 500
    rows = catalog.load_table(BRONZE_SPEC).scan().to_arrow()
    assert rows.num_rows == 3_000
    assert pc.min(rows["ingestion_date"]).as_py() > (old_day + timedelta(days=1)).date()

    # Hours later (time compressed below the configurable floors): every snapshot but the heads
    # expires, and files written long enough ago that nothing references any more are deleted.
    table = catalog.load_table(BRONZE_SPEC)
    location = Path(table.location().removeprefix("file://"))
    age_files(location, timedelta(hours=2))
    reclaimed = apply_bronze_retention(table, MaintenancePolicy(7, 0, 30), datetime.now(UTC))
    assert reclaimed["deleted_files"] > 0 and reclaimed["expired_snapshots"] == 3
    table = catalog.load_table(BRONZE_SPEC)
    assert OFFSETS_TAG in table.metadata.refs
    assert read_stored_offsets(table) == offsets_before
    assert len(table.metadata.snapshots) <= 2  # main head and the offsets tag
    on_disk = {str(p) for p in location.rglob("*") if p.is_file()}
    assert on_disk == referenced_files(table)
    live_data_files = {task.file.file_path.removeprefix("file://") for task in table.scan().plan_files()}
    assert {p for p in on_disk if p.endswith(".parquet")} == live_data_files
    assert_bronze_complete(catalog)


@pytest.mark.parametrize(
    ("config", "setting"),
    [
        ({"retention_days": 0}, "retention_days"),
        ({"retention_days": -3}, "retention_days"),
        ({"orphan_min_age_minutes": 0}, "orphan_min_age_minutes"),
        ({"orphan_min_age_minutes": 29}, "orphan_min_age_minutes"),
        ({"orphan_min_age_minutes": -60}, "orphan_min_age_minutes"),
        ({"snapshot_max_age_hours": -1}, "snapshot_max_age_hours"),
        ({"snapshot_max_age_hours": 0.5}, "snapshot_max_age_hours"),
    ],
)
def test_destructive_retention_config_is_refused_naming_the_setting(
    home: Path, config: dict[str, float], setting: str
) -> None:
    """Review #11: such a run would delete every row, or files a write in flight still needs."""
    catalog = sqlite_catalog(home)
    commit_batches(catalog, 2, 10, when=datetime.now(UTC) - timedelta(days=2))
    snapshots = len(catalog.load_table(BRONZE_SPEC).metadata.snapshots)
    with dg.DagsterInstance.ephemeral() as instance:
        result = retention_run(instance, **config)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    cause = failure.step_failure_data.error.cause
    assert cause.cls_name == "MaintenanceConfigError"
    assert cause.message.split(":")[1].strip().startswith(f"{setting} must")
    table = catalog.load_table(BRONZE_SPEC)
    assert table.scan().count() == 20
    assert len(table.metadata.snapshots) == snapshots


def test_snapshot_age_is_the_tables_unless_a_run_sets_it(home: Path) -> None:
    """Bronze declares Iceberg's own max-snapshot-age property at the floor (each commit rewrites
    metadata that grows with every snapshot kept); a table without it keeps the default; a run's
    setting wins; a property under the floor is refused naming the property."""
    catalog = sqlite_catalog(home)
    commit_batches(catalog, 2, 10)
    bronze = catalog.load_table(BRONZE_SPEC)
    assert bronze.properties[SNAPSHOT_MAX_AGE_PROPERTY] == "3600000"
    assert (
        BronzeRetentionConfig().policy(BINANCE, bronze).snapshot_max_age_hours == MIN_SNAPSHOT_AGE_HOURS == 1
    )
    assert MaintenanceConfig().policy(bronze).snapshot_max_age_hours == 1
    assert MaintenanceConfig(snapshot_max_age_hours=3).policy(bronze).snapshot_max_age_hours == 3
    assert BronzeRetentionConfig(snapshot_max_age_hours=3).policy(BINANCE, bronze).snapshot_max_age_hours == 3
    silver = catalog.ensure_table(silver_table_spec(BINANCE))
    assert SNAPSHOT_MAX_AGE_PROPERTY not in silver.properties
    assert MaintenanceConfig().policy(silver).snapshot_max_age_hours == DEFAULT_SNAPSHOT_MAX_AGE_HOURS == 6
    with bronze.transaction() as tx:
        tx.set_properties({SNAPSHOT_MAX_AGE_PROPERTY: "1800000"})  # half an hour
    with pytest.raises(
        MaintenanceConfigError, match=f"property {SNAPSHOT_MAX_AGE_PROPERTY} must be at least 1"
    ):
        MaintenanceConfig().policy(catalog.load_table(BRONZE_SPEC))


def test_committer_is_not_fenced_by_retention_beside_it(home: Path) -> None:
    """Retention commits (row delete, expiry) while a committer keeps going: neither is fenced."""
    catalog = sqlite_catalog(home)
    commit_batches(catalog, 5, 100, when=datetime.now(UTC) - timedelta(days=9))
    commit_batches(catalog, 5, 100)
    # A commit every second: ten times Binance's interval. A writer that never pauses would starve any
    # optimistic writer's retry (Iceberg's commits are optimistic), which is not what this test is about.
    committer = CommitterThread(home, rows=10, pause_seconds=1.0)
    committer.start()
    try:
        time.sleep(1.5)
        reclaimed = apply_bronze_retention(
            catalog.load_table(BRONZE_SPEC), MaintenancePolicy(7, 0, 30), datetime.now(UTC)
        )
    finally:
        committer.stop()
    assert reclaimed["deleted_rows"] == 500 and reclaimed["expired_snapshots"] > 0
    assert committer.error is None, repr(committer.error)
    assert committer.commits > 0
    table = catalog.load_table(BRONZE_SPEC)
    rows = table.scan(selected_fields=("offset",)).to_arrow()
    # The old days' 500 records are gone; everything committed since is there exactly once.
    assert rows.num_rows == read_stored_offsets(table)[0] - 500
    assert pc.min(rows["offset"]).as_py() == 500
    assert pc.count_distinct(rows["offset"]).as_py() == rows.num_rows
