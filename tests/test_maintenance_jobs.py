"""Maintenance with Iceberg's Spark procedures, beside writers that keep committing.

Real Spark (local), real SQLite catalog and files, real BronzeCommitter commits from a second
process, real Dagster runs. Time is compressed where the floors would make a test wait hours:
snapshot expiry is called below its configurable floor, and files meant to be old are given old
modification times.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from k2_assets.bronze.ingestion import read_stored_offsets
from k2_assets.bronze.tables import OFFSETS_TAG
from k2_assets.maintenance.actions import SPLIT_SIZE_SETTING, MaintenanceReport, maintain_table
from k2_assets.maintenance.definitions import maintenance_spark
from k2_assets.maintenance.jobs import MAINTENANCE_CRON, TARGETS, MaintenanceTarget, maintenance_asset_key
from k2_assets.partitions import REFRESH_MINUTES
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.iceberg_maintenance import MaintenancePolicy, referenced_files
from k2_resources.io_manager import RowScope, conform, replace_rows
from tests.maintenance_helpers import BRONZE_SPEC, OffsetCommitter, java_history, sqlite_catalog
from tests.test_maintenance import age_files

OP = "maintenance__bronze_binance_trades"
# Below the floors on purpose (see the module docstring); the grace is Iceberg's own minimum.
COMPRESSED = MaintenancePolicy(retention_days=7, snapshot_max_age_hours=0, orphan_min_age_minutes=24 * 60)
BY_NAME = {t.spec.name: t for t in TARGETS}


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "k2home"
    home.mkdir()
    monkeypatch.setenv("K2_HOME", str(home))
    for key in [k for k in os.environ if k.startswith(("PYICEBERG_CATALOG__K2__", "K2_SPARK_"))]:
        monkeypatch.delenv(key)
    return home


@pytest.fixture()
def spark(home: Path) -> Iterator[object]:
    """A Spark session on the test's catalog; stopped afterwards so the next test gets fresh catalogs."""
    resource = maintenance_spark(sqlite_catalog(home))  # the settings scheduled runs use
    yield resource.spark_session
    resource.spark_session.stop()


def plant_orphan(catalog: IcebergCatalogResource, age: timedelta) -> Path:
    """A data file no commit references (a write that failed), `age` old."""
    location = Path(catalog.load_table(BRONZE_SPEC).location().removeprefix("file://"))
    orphan = location / "data" / f"failed-write-{age.total_seconds():.0f}.parquet"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"PAR1" + os.urandom(1000))
    stamp = (datetime.now(UTC) - age).timestamp()
    os.utime(orphan, (stamp, stamp))
    return orphan


def spread_commits(catalog: IcebergCatalogResource, commits: int, rows: int, days: float) -> dict[str, int]:
    """`commits` Bronze commits whose rows were ingested evenly over the last `days`; rows per date."""
    committer, now, per_day = OffsetCommitter(catalog), datetime.now(UTC), {}
    for i in range(commits):
        when = now - timedelta(days=days) + timedelta(days=days) * i / commits
        committer.commit(rows, when)
        per_day[when.date().isoformat()] = per_day.get(when.date().isoformat(), 0) + rows
    return per_day


def test_maintenance_job_reports_what_it_did_and_refuses_unsafe_settings(home: Path) -> None:
    from k2_assets.definitions import defs

    catalog = sqlite_catalog(home)
    per_day = spread_commits(catalog, 60, 10, days=10)
    expired_day = (datetime.now(UTC) - timedelta(days=7)).date().isoformat()
    old_rows = sum(n for day, n in per_day.items() if day < expired_day)
    young, old = plant_orphan(catalog, timedelta(hours=2)), plant_orphan(catalog, timedelta(hours=30))
    job = defs.resolve_job_def("maintain_bronze_binance_trades")
    assert job.tags["dagster/max_runtime"] and job.tags["k2/maintenance"] == "bronze_binance_trades"

    with dg.DagsterInstance.ephemeral() as instance:
        for config, setting in (
            ({"orphan_min_age_minutes": 60}, "orphan_min_age_minutes"),
            ({"snapshot_max_age_hours": 0.5}, "snapshot_max_age_hours"),
            ({"retention_days": 0}, "retention_days"),
        ):
            refused = job.execute_in_process(
                run_config={"ops": {OP: {"config": config}}}, instance=instance, raise_on_error=False
            )
            cause = next(e for e in refused.all_events if e.is_step_failure).step_failure_data.error.cause
            assert cause.message.split(":", 1)[1].strip().startswith(f"{setting} must"), cause.message
        before = catalog.load_table(BRONZE_SPEC)
        assert before.scan().count() == 600  # nothing was touched
        # Bronze commits merge small manifests (its commit.manifest-merge.* properties): fewer than 60
        manifests = len(before.current_snapshot().manifests(before.io))

        result = job.execute_in_process(instance=instance)
        (event,) = result.asset_materializations_for_node(OP)
    metadata = {key: value.value for key, value in event.metadata.items()}
    numeric = {k: v for k, v in metadata.items() if k != "table"}
    assert all(isinstance(v, int | float) for v in numeric.values())  # plotted by the UI
    assert metadata["deleted_rows"] == old_rows > 0
    assert metadata["rows_after"] == 600 - old_rows
    assert metadata["data_files_before"] == 60 and metadata["rewritten_data_files"] > 0
    assert metadata["data_files_after"] < metadata["data_files_before"]
    assert metadata["manifests_before"] == manifests > 2 and metadata["manifests_after"] <= 2
    assert metadata["orphans_removed"] == 1 and not old.exists() and young.exists()
    assert metadata["snapshots_expired"] == 0  # every snapshot was superseded minutes ago
    assert metadata["duration_seconds"] > 0 and metadata["retention_days"] == 7
    table = catalog.load_table(BRONZE_SPEC)
    assert read_stored_offsets(table) == {0: 600}
    rows = table.scan(selected_fields=("offset",)).to_arrow()
    assert sorted(rows["offset"].to_pylist()) == list(range(old_rows, 600))


def test_the_scheduled_pass_starts_midway_between_two_refresh_ticks() -> None:
    """The pass's memory (a Spark driver and a run worker) peaks between two refresh runs, not beside one,
    and after the closed hour's completions (:05 Silver, :10 Gold)."""
    minute, hour, *_ = MAINTENANCE_CRON.split()
    assert int(minute) % REFRESH_MINUTES == REFRESH_MINUTES // 2
    assert int(minute) > 10 and hour == "*/3"


def test_the_scheduled_pass_maintains_every_table_in_one_run(home: Path) -> None:
    """One run every 3 hours maintains every table (one Spark driver start per pass, not per table)."""
    from k2_assets.definitions import defs

    schedule = defs.resolve_schedule_def("maintain_all_tables_schedule")
    assert schedule.cron_schedule == MAINTENANCE_CRON
    assert [
        s.name for s in defs.get_repository_def().schedule_defs if s.job_name.startswith("maintain_")
    ] == [schedule.name]
    job = defs.resolve_job_def(schedule.job_name)
    assert job.tags["k2/maintenance"] == "all"  # one maintenance run at a time, whichever (dagster.yaml)
    catalog = sqlite_catalog(home)
    spread_commits(catalog, 30, 10, days=1)
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(instance=instance)
    maintained = {e.asset_key for e in result.get_asset_materialization_events()}
    assert maintained == {maintenance_asset_key(t) for t in TARGETS}
    assert len(TARGETS) == len({t.spec.identifier for t in TARGETS}) == 7
    table = catalog.load_table(BRONZE_SPEC)
    assert table.scan().count() == 300 and read_stored_offsets(table) == {0: 300}
    assert len(table.inspect.data_files()) < 30  # compacted in the pass


@pytest.mark.timeout(1500)  # ~210 s alone; CI runs it beside another worker
def test_thousands_of_commits_maintained_while_another_process_commits(home: Path, spark: object) -> None:
    """Bronze spanning the retention window, maintained beside a second committing process."""
    catalog = sqlite_catalog(home)
    commits = int(os.environ.get("K2_TEST_MAINTENANCE_COMMITS", "2000"))
    per_day = java_history(spark, catalog, 10, commits, 5)
    expired_day = (datetime.now(UTC) - timedelta(days=7)).date().isoformat()
    old_rows = sum(n for day, n in per_day.items() if day < expired_day)
    orphan = plant_orphan(catalog, timedelta(hours=30))

    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.maintenance_helpers", str(home), "600", "5", "1.0"],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)
        assert writer.poll() is None, writer.communicate()

        def maintain() -> MaintenanceReport:
            table = catalog.load_table(BRONZE_SPEC)
            return maintain_table(
                spark, "k2", table, BY_NAME[BRONZE_SPEC.name], COMPRESSED, datetime.now(UTC)
            )

        report = maintain()
        assert writer.poll() is None, writer.communicate()  # it kept committing all along
        # A second pass expires what the first one superseded, while the writer still commits.
        second = maintain()
    finally:
        writer.terminate()
        out, err = writer.communicate(timeout=60)
    assert "FencedError" not in err and "Traceback" not in err.replace("KeyboardInterrupt", ""), err[-2000:]

    print("first pass", report.metadata(), "\nsecond pass", second.metadata(), "\nwriter commits", out)
    table = catalog.load_table(BRONZE_SPEC)
    stored = read_stored_offsets(table)[0]
    assert stored > commits * 5  # the writer's commits landed
    rows = table.scan(selected_fields=("offset",)).to_arrow()  # every file of the table is readable
    offsets = pc.unique(rows["offset"])
    assert rows.num_rows == len(offsets) == stored - old_rows
    assert pc.min(offsets).as_py() == old_rows and pc.max(offsets).as_py() == stored - 1
    assert report.deleted_rows == old_rows and not orphan.exists()
    assert report.snapshots_expired >= commits - 2 and report.before.manifests >= commits
    assert report.after.manifests < report.before.manifests / 10  # what is left: the writer's own appends
    assert second.snapshots_expired > 0 and second.after.snapshots < report.before.snapshots / 4
    assert OFFSETS_TAG in table.metadata.refs
    assert spark.conf.get(SPLIT_SIZE_SETTING, None) is None  # the expiry's split sizing stayed in the expiry


def refresh(catalog: IcebergCatalogResource, target: MaintenanceTarget, hour: datetime, cycle: int) -> None:
    """One automation refresh of the running hour, as each layer writes it (Bronze only appends)."""
    spec = target.spec
    if spec.name.startswith("bronze"):
        OffsetCommitter(catalog, spec=spec).commit(100)
        return
    moment, n = hour + timedelta(minutes=cycle % 60), 200
    values = {
        "timestamp": pa.array([int(moment.timestamp() * 1e6)] * n, pa.int64()),
        "bronze_ingestion_timestamp": pa.array([moment] * n, pa.timestamp("us", tz="UTC")),
        "exchange": pa.array(["binance"] * n),
        "exchange_date": pa.array([moment.date()] * n, pa.date32()),
        "exchange_hour": pa.array([moment.hour] * n, pa.int32()),
        "dlq_date": pa.array([moment.date()] * n, pa.date32()),
        "message_id": pa.array([f"m{cycle}-{i}" for i in range(n)]),
    }
    table = catalog.ensure_table(spec)
    schema = table.schema().as_arrow()
    data = conform(pa.table({k: v for k, v in values.items() if k in schema.names}), schema)
    if spec.time_column is None:  # the dedup audit only ever appends
        table.append(data.slice(0, 5))
        return
    scope = RowScope(hour, hour + timedelta(hours=1), "binance" if spec.slice_column else None)
    replace_rows(table, spec, data, scope, {"k2.test-cycle": str(cycle)})


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_snapshots_and_bytes_stay_bounded_over_refresh_cycles(home: Path, spark: object, name: str) -> None:
    """Past the metadata versions a table keeps, maintenance holds every table's footprint level."""
    target, catalog = BY_NAME[name], sqlite_catalog(home)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    policy = MaintenancePolicy(None, 0, 24 * 60)  # expiry below its floor: time compressed
    reports: list[MaintenanceReport] = []
    for round_ in range(4):
        for cycle in range(8):
            refresh(catalog, target, hour, 8 * round_ + cycle)
        table = catalog.ensure_table(target.spec)
        location = Path(table.location().removeprefix("file://"))
        age_files(location, timedelta(hours=25))  # the round's files were written a day ago
        reports.append(maintain_table(spark, "k2", table, target, policy, datetime.now(UTC)))
        # Nothing the table no longer references stays on disk: replaced files, lists, manifests.
        # Hadoop's local file system writes a hidden `.<name>.crc` beside each file Spark writes; Iceberg
        # skips hidden files (they are not table files), and they stay when PyIceberg deletes the file.
        on_disk = {str(p) for p in location.rglob("*") if p.is_file() and not p.name.endswith(".crc")}
        assert on_disk <= referenced_files(table.refresh()), sorted(on_disk - referenced_files(table))[:5]
    for report in reports:
        assert report.before.snapshots >= 8
        assert report.after.snapshots <= 6  # this pass's own commits and the heads
    overhead = [r.after.storage_bytes - r.after.data_bytes for r in reports]
    first, last = reports[0].after, reports[-1].after
    if name.startswith("bronze"):  # append-only: today's files stay until the day is compacted
        assert last.data_files == first.data_files + 24 and last.rows == 3200
    elif target.spec.time_column is not None:  # the running hour is replaced: live data constant
        assert last.data_files == first.data_files and last.rows == first.rows == 200
    # Old metadata versions are capped (write.metadata.previous-versions-max): level by the third round.
    assert overhead[-1] <= 1.25 * overhead[2] + 64 * 1024, overhead
