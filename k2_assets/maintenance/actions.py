"""One maintenance pass over one table, with Iceberg's own Spark procedures.

In order: merge manifests (`rewrite_manifests`), delete rows past the table's retention (`DELETE
FROM`, partition-aligned, so metadata only), compact closed days (`rewrite_data_files`: the table's
sort order if it has one, else bin packing, to the table's target file size), expire snapshots
superseded longer ago than the policy allows (`expire_snapshots` by id; branch and tag heads, so
Bronze's offsets snapshot, are never candidates, and Iceberg refuses them anyway), then delete
unreferenced files older than the grace (`remove_orphan_files`).

Every procedure commits beside writers that do not stop. A commit that loses the race is retried
here with backoff (Bronze tables have Iceberg's own retries off for their fencing), and each
procedure recomputes its change against the newer table. Writers that meet a maintenance commit
retry too: Bronze's committer sees its stored offsets unchanged (maintenance never moves the tag)
and commits again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlparse

from pyarrow.fs import FileSelector, FileType
from pyiceberg.table import Table

from k2_resources.iceberg import TableSpec
from k2_resources.iceberg_maintenance import COMMIT_ATTEMPTS, MaintenancePolicy, backoff, expirable_snapshots

log = logging.getLogger(__name__)

# Java exceptions that mean "a concurrent commit won": the procedure can simply run again.
CONFLICTS = ("CommitFailedException", "ValidationException")
# Closed days are compacted unless a run says not to: MaintenanceConfig.compact's default too.
COMPACT_BY_DEFAULT = True
# Snapshot ids per expire_snapshots call. Each call lists the files reachable from every snapshot that
# remains, so k calls over N snapshots cost k * N: batches of 1,000 made a 20k-commit history quadratic
# (bench/bench_maintenance.py). Spark parses a 20,000-id array in ~7 s on a loaded machine, so one
# call covers any realistic backlog; the cap only bounds the statement after a months-long outage.
EXPIRE_BATCH = 50_000
# Iceberg's expire action reads the manifest lists of the expired snapshots through the `all_manifests`
# metadata table, filtered by `snapshot_id IN (every expired id)`. That filter rides as the residual in
# every read task, so each Spark partition serializes all the ids: with Iceberg's default split sizing
# (a task weighs the 4 MiB open-file cost, 4-8 tasks per partition) N expired snapshots make N/4-N/8
# partitions of N ids each, quadratic (JFR of a 5k-commit expiry: half the CPU in Java serialization of
# those tasks). For the expiry, splits are sized so that the scan has as many partitions as Spark's
# shuffle (the action's own parallelism for reading manifests): ids serialized per pass ~ partitions * N.
SPLIT_SIZE_SETTING = "spark.sql.iceberg.read.split-size"
ADAPTIVE_SPLIT_SETTING = "spark.sql.iceberg.read.adaptive-split-size.enabled"
DEFAULT_OPEN_FILE_COST = 4 * 1024 * 1024


@dataclass(frozen=True)
class MaintenanceTarget:
    """A table and the date column its rows expire by and closed days are compacted by."""

    spec: TableSpec
    day_column: str


@dataclass
class TableState:
    """What a table costs: live data, snapshots, manifests, metadata, and everything on disk."""

    data_files: int
    data_bytes: int
    rows: int
    snapshots: int
    manifests: int
    metadata_bytes: int
    storage_files: int
    storage_bytes: int


@dataclass
class MaintenanceReport:
    table: str
    before: TableState
    after: TableState | None = None
    deleted_rows: int = 0
    rewritten_data_files: int = 0
    added_data_files: int = 0
    rewritten_manifests: int = 0
    snapshots_expired: int = 0
    orphans_removed: int = 0
    duration_seconds: float = 0.0
    retention_days: int | None = None
    steps: dict[str, float] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """Numeric metadata (the UI plots each key over runs), plus the table's name."""
        assert self.after is not None
        values: dict[str, Any] = {"table": self.table}
        for name, state in (("before", self.before), ("after", self.after)):
            values.update({f"{key}_{name}": value for key, value in vars(state).items()})
        values.update(
            deleted_rows=self.deleted_rows,
            rewritten_data_files=self.rewritten_data_files,
            added_data_files=self.added_data_files,
            rewritten_manifests=self.rewritten_manifests,
            snapshots_expired=self.snapshots_expired,
            orphans_removed=self.orphans_removed,
            duration_seconds=round(self.duration_seconds, 3),
            retention_days=-1 if self.retention_days is None else self.retention_days,
        )
        values.update({f"{step}_seconds": round(seconds, 3) for step, seconds in self.steps.items()})
        return values


def table_state(table: Table) -> TableState:
    """The table's footprint now (summary totals for live data; a listing for what is on disk)."""
    table.refresh()
    current = table.current_snapshot()
    # Summary.get ignores its default (a missing key reads as None): use the plain dict.
    summary = current.summary.additional_properties if current is not None and current.summary else {}
    location = urlparse(table.location())
    fs = table.io.fs_by_scheme(location.scheme or "file", location.netloc)
    root = f"{location.netloc}{location.path}" if location.scheme not in ("", "file") else location.path
    files = [
        info
        for info in fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
        if info.type == FileType.File
    ]
    return TableState(
        data_files=int(summary.get("total-data-files", 0)),
        data_bytes=int(summary.get("total-files-size", 0)),
        rows=int(summary.get("total-records", 0)),
        snapshots=len(table.metadata.snapshots),
        manifests=len(current.manifests(table.io)) if current is not None else 0,
        metadata_bytes=len(table.io.new_input(table.metadata_location)),
        storage_files=len(files),
        storage_bytes=sum(info.size or 0 for info in files),
    )


def call(spark: Any, statement: str, attempts: int = COMMIT_ATTEMPTS) -> list[Any]:
    """Run a maintenance statement, again after a lost commit race (its change is recomputed)."""
    for attempt in range(attempts):
        try:
            return spark.sql(statement).collect()
        except Exception as err:
            if attempt == attempts - 1 or not any(name in str(err) for name in CONFLICTS):
                raise
            log.info("Maintenance statement met a concurrent commit; retrying: %s", statement[:120])
            backoff(attempt)
    raise AssertionError("unreachable")


def expiry_split_size(snapshots: int, partitions: int, open_file_cost: int) -> int:
    """Split size (bytes) that packs `snapshots` manifest-list read tasks into `partitions` splits."""
    return max(1, math.ceil(snapshots / max(1, partitions))) * open_file_cost


@contextmanager
def session_settings(spark: Any, settings: dict[str, str]) -> Iterator[None]:
    """Spark SQL settings for one statement; the session's own values come back afterwards."""
    previous = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


class TableMaintenance:
    """The procedures of one pass over one table, in the order `run` applies them."""

    def __init__(self, spark: Any, catalog_name: str, table: Table, target: MaintenanceTarget):
        self.spark, self.catalog_name, self.table, self.target = spark, catalog_name, table, target
        self.name = f"{catalog_name}.{target.spec.identifier}"

    def procedure(self, name: str, arguments: str) -> list[Any]:
        return call(self.spark, f"CALL {self.catalog_name}.system.{name}(table => '{self.name}'{arguments})")

    def delete_rows_before(self, day: date) -> int:
        """Delete rows of days before `day`; returns the rows the delete's own snapshots removed."""
        started_ms = int(time.time() * 1000) - 1
        call(self.spark, f"DELETE FROM {self.name} WHERE {self.target.day_column} < DATE '{day.isoformat()}'")
        app_id = self.spark.conf.get("spark.app.id")
        self.table.refresh()
        return sum(
            int(s.summary.additional_properties.get("deleted-records", 0))
            for s in self.table.metadata.snapshots
            if s.timestamp_ms >= started_ms
            and s.summary is not None
            and s.summary.additional_properties.get("spark.app.id") == app_id
            and s.summary.operation.value in ("delete", "overwrite")
        )

    def compact_before(self, day: date) -> tuple[int, int]:
        """Compact the files of closed days (before `day`): (files rewritten, files added)."""
        self.table.refresh()
        sort = "sort" if self.table.sort_order().fields else "binpack"
        target_size = self.table.properties.get("write.target-file-size-bytes", str(512 * 1024 * 1024))
        # One commit: partial-progress commits race each other, and Bronze has Iceberg's retries off.
        options = f"map('target-file-size-bytes', '{target_size}', 'min-input-files', '2')"
        where = f"{self.target.day_column} < '{day.isoformat()}'"
        (row,) = self.procedure(
            "rewrite_data_files", f", strategy => '{sort}', where => \"{where}\", options => {options}"
        )
        return row.rewritten_data_files_count, row.added_data_files_count

    def rewrite_manifests(self) -> int:
        (row,) = self.procedure("rewrite_manifests", "")
        return row.rewritten_manifests_count

    def expire_snapshots(self, superseded_before: datetime) -> int:
        """Expire, by id, the snapshots superseded before the cut-off; returns how many went."""
        self.table.refresh()
        ids = expirable_snapshots(self.table.metadata, superseded_before)
        with session_settings(self.spark, self.expiry_scan_settings()):
            for start in range(0, len(ids), EXPIRE_BATCH):
                batch = ",".join(str(i) for i in ids[start : start + EXPIRE_BATCH])
                # older_than at the epoch: only the listed snapshots go, none by Iceberg's default age.
                self.procedure(
                    "expire_snapshots",
                    f", older_than => TIMESTAMP '1970-01-01 00:00:01', snapshot_ids => array({batch})",
                )
        self.table.refresh()
        return len(set(ids) - {s.snapshot_id for s in self.table.metadata.snapshots})

    def expiry_scan_settings(self) -> dict[str, str]:
        """Split sizing for the expire action's metadata scans (see SPLIT_SIZE_SETTING): fixed partitions."""
        partitions = int(self.spark.conf.get("spark.sql.shuffle.partitions", "200"))
        open_file_cost = int(self.table.properties.get("read.split.open-file-cost", DEFAULT_OPEN_FILE_COST))
        split_size = expiry_split_size(len(self.table.metadata.snapshots), partitions, open_file_cost)
        return {SPLIT_SIZE_SETTING: str(split_size), ADAPTIVE_SPLIT_SETTING: "false"}

    def remove_orphans(self, older_than: datetime) -> int:
        stamp = older_than.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        return len(self.procedure("remove_orphan_files", f", older_than => TIMESTAMP '{stamp}'"))


def maintain_table(
    spark: Any,
    catalog_name: str,
    table: Table,
    target: MaintenanceTarget,
    policy: MaintenancePolicy,
    now: datetime,
    compact: bool = COMPACT_BY_DEFAULT,
) -> MaintenanceReport:
    """One maintenance pass (see the module docstring); `policy` must already be validated."""
    started = time.monotonic()
    # The orphan cut-off is fixed before anything is listed or loaded (review-2026-12 #1).
    orphans_older_than = now - policy.orphan_min_age
    report = MaintenanceReport(table=target.spec.identifier, before=table_state(table))
    report.retention_days = policy.retention_days
    work = TableMaintenance(spark, catalog_name, table, target)

    def step(name: str, action: Any) -> Any:
        begun = time.monotonic()
        result = action()
        report.steps[name] = time.monotonic() - begun
        return result

    # Manifests first: a delete or compaction rewrites manifests inside its commit, so thousands of
    # one-file manifests (Bronze's appends) would keep its commit window open longer than the gap
    # between two ingestion commits, and it would lose every race.
    report.rewritten_manifests = step("manifests", work.rewrite_manifests)
    expire_rows_before = policy.rows_expire_before(now)
    if expire_rows_before is not None:
        report.deleted_rows = step("retention", lambda: work.delete_rows_before(expire_rows_before.date()))
    if compact:
        report.rewritten_data_files, report.added_data_files = step(
            "compaction", lambda: work.compact_before(now.date())
        )
    report.snapshots_expired = step(
        "expiry", lambda: work.expire_snapshots(policy.snapshots_expire_before(now))
    )
    report.orphans_removed = step("orphans", lambda: work.remove_orphans(orphans_older_than))
    report.after = table_state(table)
    report.duration_seconds = time.monotonic() - started
    return report
