"""Table maintenance PyIceberg 0.12 lacks: expiry that really frees storage.

PyIceberg's `expire_snapshots` drops snapshots from metadata but deletes no file
(../shared/notes/peers.md). `reclaim_storage` expires snapshots older than a cut-off (branch and tag
heads are protected, which keeps Bronze's offsets snapshot) and then deletes every file under the
table's location that no remaining snapshot or metadata file references. Files younger than
`orphan_min_age` are left alone, because a concurrent writer may have written them for a commit that
has not landed yet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar
from urllib.parse import urlparse

from pyarrow.fs import FileSelector, FileType
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.table import Table

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ReclaimReport:
    expired_snapshots: int
    deleted_files: int
    deleted_bytes: int


def retry_on_conflict(table: Table, action: Callable[[Table], T], attempts: int = 10) -> T:
    """Run a maintenance commit, reloading and retrying when a concurrent commit wins the race.

    Safe for idempotent actions only (a delete by predicate, an expiry by age): a retry recomputes
    the change against the newer table.
    """
    for attempt in range(attempts):
        try:
            return action(table)
        except CommitFailedException:
            if attempt == attempts - 1:
                raise
            table = table.refresh()
    raise AssertionError("unreachable")


def referenced_files(table: Table) -> set[str]:
    """Every file the table's current metadata reaches: data files, manifests, lists, metadata logs."""
    metadata = table.metadata
    files: set[str] = {table.metadata_location}
    files |= {entry.metadata_file for entry in metadata.metadata_log}
    files |= {stat.statistics_path for stat in metadata.statistics}
    for snapshot in metadata.snapshots:
        files.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(table.io):
            files.add(manifest.manifest_path)
            # Only live entries keep a data file: a DELETED entry records a removal, not a use.
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                files.add(entry.data_file.file_path)
    return {_normalise(path) for path in files}


def _normalise(path: str) -> str:
    parsed = urlparse(path)
    return f"{parsed.netloc}{parsed.path}" if parsed.scheme not in ("", "file") else parsed.path


def orphan_files(table: Table, min_age: timedelta) -> list[tuple[str, int]]:
    """(path, size) of files under the table location that nothing references and are old enough."""
    if not isinstance(table.io, PyArrowFileIO):
        log.warning(
            "Orphan-file removal needs PyArrowFileIO; %s uses %s", table.name(), type(table.io).__name__
        )
        return []
    location = urlparse(table.location())
    fs = table.io.fs_by_scheme(location.scheme or "file", location.netloc)
    root = _normalise(table.location())
    keep = referenced_files(table)
    cutoff = datetime.now(UTC) - min_age
    found = []
    for info in fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != FileType.File or info.path in keep:
            continue
        if info.mtime is not None and info.mtime.replace(tzinfo=info.mtime.tzinfo or UTC) > cutoff:
            continue
        found.append((info.path, info.size or 0))
    return found


def reclaim_storage(table: Table, expire_older_than: datetime, orphan_min_age: timedelta) -> ReclaimReport:
    """Expire old snapshots (protecting branch/tag heads), then delete the files nothing references."""
    before = len(table.metadata.snapshots)

    def expire(t: Table) -> Table:
        t.maintenance.expire_snapshots().older_than(expire_older_than).commit()
        return t.refresh()

    table = retry_on_conflict(table, expire)
    orphans = orphan_files(table, orphan_min_age)
    location = urlparse(table.location())
    fs = table.io.fs_by_scheme(location.scheme or "file", location.netloc) if orphans else None
    for path, _ in orphans:
        fs.delete_file(path)
    return ReclaimReport(
        expired_snapshots=before - len(table.metadata.snapshots),
        deleted_files=len(orphans),
        deleted_bytes=sum(size for _, size in orphans),
    )
