"""Garbage collection of the store and the blob cache.

Roots are the out-links builds made (``<home>/gcroots/*`` point at them); a
store path an out-link still points at is kept. A store path whose build
lock is held (a build or check of that key is running) is never touched,
and blobs are only collected when no build is running at all, since a
running build's layers are not referenced by any store path yet.

Selection among unrooted paths: all of them by default; ``older_than``
spares recent ones, ``keep_last`` spares the N newest of each name, and
``max_size`` deletes oldest first only until the store fits.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from banger_build.oci.reference import Digest
from banger_build.store import MANIFEST, Store, remove_tree


@dataclass(frozen=True)
class Entry:
    path: Path
    key: str
    name: str
    size: int  # bytes on disk (sparse images count what they use)
    time: float
    recipe: str | None


@dataclass
class GcReport:
    deleted: list[Entry] = field(default_factory=list)
    kept_rooted: list[Entry] = field(default_factory=list)
    kept_in_use: list[Entry] = field(default_factory=list)
    blobs_deleted: int = 0
    blob_bytes: int = 0
    tmp_deleted: int = 0
    blobs_skipped: bool = False

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.deleted) + self.blob_bytes


def disk_usage(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_blocks * 512
    return total


def entries(store: Store) -> Iterator[Entry]:
    """Every published store path, newest last."""
    found = []
    for path in store.store.iterdir():
        if not (path / MANIFEST).is_file():
            continue
        key, _, name = path.name.partition("-")
        meta_file = store.meta / f"{path.name}.json"
        recipe, when = None, path.stat().st_mtime
        try:
            meta = json.loads(meta_file.read_text())
            recipe, when = meta.get("recipe"), float(meta.get("time", when))
        except (OSError, ValueError):
            pass
        found.append(Entry(path, key, name, disk_usage(path), when, recipe))
    yield from sorted(found, key=lambda e: (e.time, e.path.name))


def rooted(store: Store, *, prune: bool = False) -> set[str]:
    """Names of store paths some live out-link points at. With ``prune``, root
    entries whose out-link is gone or points elsewhere now are deleted."""
    live: set[str] = set()
    for entry in store.roots.iterdir():
        try:
            target = Path(os.readlink(Path(os.readlink(entry))))
        except OSError:
            target = None  # the out-link is gone
        if target is not None and target.parent == store.store:
            live.add(target.name)
        elif prune:
            entry.unlink(missing_ok=True)
    return live


def _referenced_blobs(paths: list[Path]) -> set[str]:
    refs: set[str] = set()
    for path in paths:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            derivation = manifest["derivation"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        image = derivation.get("image", {})
        for digest in (image.get("manifest"), image.get("config")):
            if isinstance(digest, str):
                refs.add(digest)
        for layer in image.get("layers", []):
            refs.add(layer.get("digest", ""))
        # a [kernel] ref artifact: its manifest, config and file blobs
        artifact = manifest.get("kernel_artifact") or {}
        for digest in (artifact.get("manifest"), artifact.get("config")):
            if isinstance(digest, str):
                refs.add(digest)
        if artifact:
            for item in (derivation.get("kernel") or {}).values():
                if isinstance(item, dict) and isinstance(item.get("sha256"), str):
                    refs.add(f"sha256:{item['sha256']}")
    return {d.partition(":")[2] for d in refs if d.startswith("sha256:")}


def collect(
    store: Store,
    *,
    dry_run: bool = False,
    older_than: float | None = None,
    keep_last: int | None = None,
    max_size: int | None = None,
) -> GcReport:
    report = GcReport()
    roots = rooted(store, prune=not dry_run)
    now = time.time()
    candidates: list[Entry] = []
    all_entries = list(entries(store))
    for entry in all_entries:
        if entry.path.name in roots:
            report.kept_rooted.append(entry)
        elif store.in_use(entry.key):
            report.kept_in_use.append(entry)
        elif older_than is not None and now - entry.time < older_than:
            continue
        else:
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
    for entry in candidates:
        if not dry_run:
            remove_tree(entry.path)
            (store.meta / f"{entry.path.name}.json").unlink(missing_ok=True)
        report.deleted.append(entry)

    busy = any(store.in_use(p.name.removesuffix(".lock")) for p in store.locks.glob("*.lock"))
    for tmp in store.tmp.iterdir():  # build dirs are build-<key>-<random>
        key = tmp.name.split("-")[1] if tmp.name.startswith("build-") else ""
        if not (key and store.in_use(key)):
            if not dry_run:
                remove_tree(tmp)
            report.tmp_deleted += 1
    if busy:
        report.blobs_skipped = True
        return report
    deleted = {e.path for e in report.deleted}
    keep = _referenced_blobs([e.path for e in all_entries if e.path not in deleted])
    blob_dir = store.blobs / "sha256"
    if blob_dir.is_dir():
        for blob in blob_dir.iterdir():
            if blob.name in keep:
                continue
            try:
                Digest(blob.name)
            except ValueError:
                continue
            report.blobs_deleted += 1
            report.blob_bytes += blob.stat().st_blocks * 512
            if not dry_run:
                blob.unlink(missing_ok=True)
    return report
