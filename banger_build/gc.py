"""Garbage collection of the store, temp dirs, partial downloads and the blob cache.

Roots are the out-links builds made (``<home>/gcroots/*`` point at them); a
store path an out-link points at is kept. A store path is deleted only while
gc holds its key lock itself (so never while a build, a check or a cache hit
of it runs) and after its roots are checked again under that lock.

Then, holding the gc lock exclusively (``Store.gc_guard``), gc removes the
temp dirs and partial downloads (``blobs/tmp/*.part``) no running process
holds, reads the live processes' temp roots, and deletes every blob neither
a temp root nor a remaining store path refers to. Temp roots are read before
the store is listed: a build that publishes in between was alive when its
roots were read, so its blobs are kept either way.

Selection among unrooted paths: all of them by default; ``older_than``
spares recent ones, ``keep_last`` spares the N newest of each name, and
``max_size`` deletes oldest first only until the store fits.

gc never crashes on what it cannot remove: ``GcReport.failures`` names it.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from banger_build.errors import StoreError
from banger_build.fsutil import disk_usage, remove_tree
from banger_build.store import Store, StoreEntry, Substitution, live_temp_roots, try_flock


@dataclass(frozen=True)
class Entry:
    path: Path
    key: str
    name: str
    size: int  # bytes on disk (sparse images count what they use)
    time: float
    recipe: str | None
    origin: str = "unknown"  # "built", "substituted" or "unknown" (``StoreEntry.origin``)
    substituted: Substitution | None = None


@dataclass
class GcReport:
    deleted: list[Entry] = field(default_factory=list)
    kept_rooted: list[Entry] = field(default_factory=list)
    kept_in_use: list[Entry] = field(default_factory=list)
    blobs_deleted: int = 0
    blob_bytes: int = 0
    tmp_deleted: int = 0
    tmp_bytes: int = 0
    #: what could not be removed, as "path: reason"
    failures: list[str] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.deleted) + self.blob_bytes + self.tmp_bytes


def _entry(e: StoreEntry) -> Entry:
    meta = e.meta()
    return Entry(
        e.path, e.key, e.name, e.size(), e.built_at, e.recipe, e.origin(meta), e.substitution(meta)
    )


def entries(store: Store) -> list[Entry]:
    """Every published store path, oldest build first."""
    return [_entry(e) for e in store.entries()]


def rooted(store: Store, *, prune: bool = False) -> set[str]:
    return store.rooted(prune=prune)


def _select(
    report: GcReport,
    all_entries: list[Entry],
    roots: set[str],
    store: Store,
    *,
    older_than: float | None,
    keep_last: int | None,
    max_size: int | None,
) -> list[Entry]:
    now = time.time()
    candidates: list[Entry] = []
    for entry in all_entries:
        if entry.path.name in roots:
            report.kept_rooted.append(entry)
        elif store.in_use(entry.key):
            report.kept_in_use.append(entry)
        elif older_than is None or now - entry.time >= older_than:
            candidates.append(entry)
    if keep_last is not None:
        newest: dict[str, list[Entry]] = {}
        for entry in reversed(candidates):
            newest.setdefault(entry.name, []).append(entry)
        spared = {e.path for group in newest.values() for e in group[:keep_last]}
        candidates = [e for e in candidates if e.path not in spared]
    if max_size is not None:
        total = sum(e.size for e in all_entries)
        chosen = []
        for entry in candidates:  # oldest first
            if total <= max_size:
                break
            chosen.append(entry)
            total -= entry.size
        candidates = chosen
    return candidates


def _delete_path(store: Store, entry: Entry, report: GcReport, *, dry_run: bool) -> None:
    with store.try_key_lock(entry.key) as free:
        if not free:
            report.kept_in_use.append(entry)
            return
        if entry.path.name in store.rooted():  # rooted since we looked
            report.kept_rooted.append(entry)
            return
        if not dry_run:
            report.failures += store.discard(entry.path).failures
            meta = store.entry(entry.path).meta_file
            try:
                if meta is not None:
                    meta.unlink(missing_ok=True)
            except OSError as exc:
                report.failures.append(f"{meta}: {exc.strerror}")
        report.deleted.append(entry)


def _collect_broken(store: Store, report: GcReport, *, dry_run: bool) -> None:
    """Store dirs without a manifest.json (never published whole: left by a tool
    of an older version, or by hand) whose key nobody holds."""
    for path in sorted(store.store.iterdir()):
        try:
            entry = store.entry(path)
        except StoreError:
            continue
        if entry.exists():
            continue
        with store.try_key_lock(entry.key) as free:
            if free and not entry.exists():
                size = disk_usage(path)
                if not dry_run:
                    report.failures += store.discard(path).failures
                report.tmp_deleted += 1
                report.tmp_bytes += size


def _claim(path: Path) -> int | None:
    """An fd holding ``path``'s flock if nobody else holds it (a stale temp dir or
    partial download: ours to remove), else None. Anything that is neither a
    directory nor a regular file (a symlink, a FIFO) is stale by nature: -1."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return -1
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | (os.O_DIRECTORY if stat.S_ISDIR(st.st_mode) else 0))
    except OSError:
        return None  # cannot tell: leave it
    if try_flock(fd):
        return fd
    os.close(fd)
    return None


def _claim_temp(store: Store) -> list[tuple[Path, int]]:
    """Claim the temp dirs and partial downloads nobody holds (under the gc lock)."""
    claimed = []
    partial = store.blobs / "tmp"
    for directory in (store.tmp, partial):
        if directory.is_dir():
            for path in sorted(directory.iterdir()):
                fd = _claim(path)
                if fd is not None:
                    claimed.append((path, fd))
    return claimed


def _remove_claimed(claimed: list[tuple[Path, int]], report: GcReport, *, dry_run: bool) -> None:
    """Remove what ``_claim_temp`` claimed (its flocks keep everyone else off it)."""
    for path, fd in claimed:
        try:
            size = disk_usage(path)
            if not dry_run:
                removal = remove_tree(path)
                if not removal.ok:
                    report.failures += removal.failures
                    continue
            report.tmp_deleted += 1
            report.tmp_bytes += size
        finally:
            if fd >= 0:
                os.close(fd)


def _collect_blobs(store: Store, report: GcReport, deleted: set[Path], *, dry_run: bool) -> None:
    """Blobs no live temp root and no remaining store path refers to (under the gc lock)."""
    keep = live_temp_roots(store, prune=not dry_run)
    for e in store.entries():
        if e.path not in deleted:
            keep |= e.referenced_blobs()
    blob_dir = store.blobs / "sha256"
    if not blob_dir.is_dir():
        return
    for blob in blob_dir.iterdir():
        name = blob.name
        if name in keep or len(name) != 64 or not all(c in "0123456789abcdef" for c in name):
            continue
        try:
            size = blob.lstat().st_blocks * 512
            if not dry_run:
                blob.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            report.failures.append(f"{blob}: {exc.strerror}")
            continue
        report.blobs_deleted += 1
        report.blob_bytes += size


def collect(
    store: Store,
    *,
    dry_run: bool = False,
    older_than: float | None = None,
    keep_last: int | None = None,
    max_size: int | None = None,
) -> GcReport:
    report = GcReport()
    with store.gc_guard(exclusive=True):  # out-links are rooted under the shared lock
        roots = store.rooted(prune=not dry_run)
    all_entries = entries(store)
    candidates = _select(
        report,
        all_entries,
        roots,
        store,
        older_than=older_than,
        keep_last=keep_last,
        max_size=max_size,
    )
    for entry in candidates:
        _delete_path(store, entry, report, dry_run=dry_run)
    _collect_broken(store, report, dry_run=dry_run)
    with store.gc_guard(exclusive=True):
        claimed = _claim_temp(store)
        try:
            _collect_blobs(store, report, {e.path for e in report.deleted}, dry_run=dry_run)
        except BaseException:
            for _, fd in claimed:
                if fd >= 0:
                    os.close(fd)
            raise
    # the big removals happen without the gc lock: builds need not wait for them
    _remove_claimed(claimed, report, dry_run=dry_run)
    return report
