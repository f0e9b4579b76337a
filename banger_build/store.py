"""The content-addressed store: ``<home>/store/<key>-<name>/``, and what keeps it safe.

    <home>/store/<key>-<name>/   published outputs, read-only (files 0444, dirs 0555)
    <home>/meta/<entry>.json     which recipe built an entry, and when (not an input);
                                 for a substituted one, where from and who signed it
    <home>/tmp/                  private temp dirs of running commands (builds, pushes)
    <home>/locks/<key>.lock      one flock per key
    <home>/gcroots/<hash>        symlinks to out-links (``./result``): gc roots
    <home>/temproots/<pid>.<n>   blobs a running process reads or writes: temp roots
    <home>/gc.lock               gc holds it exclusively while it collects temp dirs,
                                 partial downloads and blobs; others hold it shared
                                 only for an instant, to register what they use

Rules that make gc safe beside any number of builds (Nix's, adapted):

- A build of a key holds the key lock exclusively; a cache hit and a check
  hold it shared. An out-link (and its gc root) is made before the key lock
  is released, so a path is rooted before anyone can see it unprotected. gc
  deletes a store path only while it holds that path's key lock itself, and
  checks the roots again under it.
- A process registers every blob it is about to read or write as a temp
  root (``TempRoots``), so gc never deletes a blob a running build needs.
- Temp dirs are created under the shared gc lock and flocked for the life of
  their command: gc removes only the ones nobody holds.
- Builds are published by one rename after everything in them is fsynced:
  a store path either exists complete, with its manifest.json, or not at all.

``StoreEntry`` alone reads and writes the files of an entry (manifest.json and
its meta record).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger_build.errors import Reason, StoreError, host_error
from banger_build.fsutil import (
    Removal,
    disk_usage,
    fsync_dir,
    fsync_tree,
    make_read_only,
    remove_tree,
)

MANIFEST = "manifest.json"
#: the meta record's key of a substituted path (``substitute``; read by ``ls``, ``show``,
#: ``verify``): ``{"source": REF@DIGEST, "signer": KEY-NAME or "", "signatures": [...]}``
META_SUBSTITUTED = "substituted"
#: the longest source or signer name read back from a meta record
MAX_ORIGIN_TEXT = 1024
_KEY_HEX = frozenset("0123456789abcdef")


def default_home() -> Path:
    env = os.environ.get("BANGER_BUILD_HOME")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache) / "banger-build"


# -- locks --------------------------------------------------------------------------


@contextlib.contextmanager
def flocked(
    path: Path, *, shared: bool = False, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """Hold an flock on ``path`` (created if missing); ``on_wait`` runs if we must wait."""
    fd = _open_lock(path)
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def _open_lock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(
            f"cannot open the lock file {path}: {exc.strerror}", reason=Reason.IO
        ) from exc


def try_flock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` if nobody holds one (True), else False."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


# -- store entries --------------------------------------------------------------------


@dataclass(frozen=True)
class Substitution:
    """Where a substituted store path came from, as its meta record says."""

    source: str  # REGISTRY/REPO@sha256:... of the artifact
    signer: str  # the trusted key's name; "" when it was accepted unsigned


@dataclass(frozen=True)
class StoreEntry:
    """One store path: ``<key>-<name>``, its manifest.json and its meta record."""

    path: Path
    key: str
    name: str
    meta_file: Path | None  # None: a store path outside this store (copied, another home)

    @classmethod
    def at(cls, path: Path) -> StoreEntry:
        """The entry in directory ``path``, wherever it lies (read-only use)."""
        key, _, name = path.name.partition("-")
        return cls(path, key, name, None)

    @property
    def manifest_file(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_file.is_file()

    def manifest(self) -> dict[str, Any]:
        """The parsed manifest.json; StoreError if it is missing or not a JSON object."""
        try:
            data = json.loads(self.manifest_file.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else f"not valid JSON ({exc})"
            raise StoreError(
                f"{self.path} is not a store path: cannot read {MANIFEST}: {why}",
                reason=Reason.NOT_A_STORE_PATH,
            ) from exc
        if not isinstance(data, dict):
            raise StoreError(
                f"{self.manifest_file} is not a JSON object", reason=Reason.NOT_A_STORE_PATH
            )
        return data

    def derivation(self) -> dict[str, Any]:
        derivation = self.manifest().get("derivation")
        if not isinstance(derivation, dict):
            raise StoreError(
                f"{self.manifest_file} has no derivation", reason=Reason.NOT_A_STORE_PATH
            )
        return derivation

    def meta(self) -> dict[str, Any]:
        """``{"recipe": path, "time": seconds}`` as recorded at build time ({} if unknown)."""
        if self.meta_file is None:
            return {}
        try:
            data = json.loads(self.meta_file.read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def recipe(self) -> str | None:
        recipe = self.meta().get("recipe")
        return recipe if isinstance(recipe, str) else None

    def substitution(self, meta: dict[str, Any] | None = None) -> Substitution | None:
        """Where the path was substituted from (None: not substituted), from ``meta``
        (default: this entry's meta record)."""
        record = (self.meta() if meta is None else meta).get(META_SUBSTITUTED)
        if not isinstance(record, dict):
            return None
        source, signer = record.get("source"), record.get("signer")
        return Substitution(
            source[:MAX_ORIGIN_TEXT] if isinstance(source, str) else "",
            signer[:MAX_ORIGIN_TEXT] if isinstance(signer, str) else "",
        )

    def origin(self, meta: dict[str, Any] | None = None) -> str:
        """``substituted``, ``built`` (here, from a recipe) or ``unknown`` (no record:
        a copied path, or a meta record that could not be written)."""
        meta = self.meta() if meta is None else meta
        if self.substitution(meta) is not None:
            return "substituted"
        return "built" if isinstance(meta.get("recipe"), str) else "unknown"

    @property
    def built_at(self) -> float:
        when = self.meta().get("time")
        if isinstance(when, (int, float)):
            return float(when)
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def size(self) -> int:
        return disk_usage(self.path)

    def referenced_blobs(self) -> set[str]:
        """Hex digests of the registry blobs this entry was built from (image, kernel
        artifact, fetched files): gc keeps them while the entry lives, so it rebuilds
        offline."""
        try:
            manifest = self.manifest()
        except StoreError:
            return set()
        derivation = manifest.get("derivation")
        derivation = derivation if isinstance(derivation, dict) else {}
        refs: list[object] = []
        # the blobs it was fetched from: manifest.json's "image" (older entries: the
        # derivation's); the config from the derivation
        for image in (manifest.get("image"), derivation.get("image")):
            if isinstance(image, dict):
                refs += [image.get("manifest"), image.get("config")]
                layers = image.get("layers")
                if isinstance(layers, list):
                    refs += [layer.get("digest") for layer in layers if isinstance(layer, dict)]
        fetched = manifest.get("fetched_files")
        if isinstance(fetched, list):  # [[files]] ref/url inputs: their artifacts and bytes
            for item in fetched:
                if isinstance(item, dict):
                    refs += [item.get("sha256"), item.get("manifest"), item.get("index")]
        artifact = manifest.get("kernel_artifact")
        if isinstance(artifact, dict) and artifact:
            refs += [artifact.get("manifest"), artifact.get("config")]
            kernel = derivation.get("kernel")
            if isinstance(kernel, dict):
                refs += [
                    f"sha256:{item['sha256']}"
                    for item in kernel.values()
                    if isinstance(item, dict) and isinstance(item.get("sha256"), str)
                ]
        return {
            ref.partition(":")[2]
            for ref in refs
            if isinstance(ref, str) and ref.startswith("sha256:")
        }

    def write_meta(self, recipe: Path, *, substituted: dict[str, Any] | None = None) -> bool:
        """Record the recipe and time (for ``ls``; not an input), and where a
        substituted path came from: best effort, False when it could not be written."""
        assert self.meta_file is not None, "only entries of a store have meta records"
        info: dict[str, Any] = {"recipe": str(recipe.absolute()), "time": int(time.time())}
        if substituted is not None:
            info[META_SUBSTITUTED] = substituted
        tmp = self.meta_file.with_name(f".{self.meta_file.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(info) + "\n")
            os.replace(tmp, self.meta_file)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        return True


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write an entry's manifest.json into the build's output dir (before publish)."""
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (out / MANIFEST).write_text(text, encoding="utf-8")


# -- temp roots -------------------------------------------------------------------------


class TempRoots:
    """The blobs this process uses, in ``<home>/temproots/<pid>.<random>``.

    The file is created on first use and flocked until the process exits; gc
    keeps every blob listed in a file someone holds and deletes the files of
    dead processes. Each addition is made under the shared gc lock, so gc
    (holding it exclusively) never reads a half-written list.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._fd: int | None = None
        self._added: set[str] = set()

    def add(self, hex_digest: str) -> None:
        if hex_digest in self._added:
            return
        with self._store.gc_guard():
            if self._fd is None:
                self._fd = self._create()
            line = hex_digest.encode("ascii") + b"\n"
            written = 0
            while written < len(line):  # a short write would merge two digests
                written += os.write(self._fd, line[written:])
        self._added.add(hex_digest)

    def guard(self) -> contextlib.AbstractContextManager[None]:
        return self._store.gc_guard()

    def _create(self) -> int:
        directory = self._store.temproots
        directory.mkdir(exist_ok=True)
        fd, _ = tempfile.mkstemp(prefix=f"{os.getpid()}.", dir=directory)
        os.set_inheritable(fd, False)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # gc deletes the file once nobody holds it
            self._fd = None
            self._added.clear()


def live_temp_roots(store: Store, *, prune: bool) -> set[str]:
    """Blobs listed by live processes; with ``prune``, dead processes' lists are
    deleted. Call under the exclusive gc lock."""
    live: set[str] = set()
    if not store.temproots.is_dir():
        return live
    for path in store.temproots.iterdir():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if try_flock(fd):
                if prune:
                    with contextlib.suppress(OSError):
                        path.unlink()
                continue
            with os.fdopen(os.dup(fd), "rb") as f:
                live.update(line.strip().decode("ascii", "replace") for line in f if line.strip())
        finally:
            os.close(fd)
    return live


# -- the store ------------------------------------------------------------------------------


class Store:
    def __init__(self, home: Path) -> None:
        try:
            home.mkdir(parents=True, exist_ok=True)
            # One spelling of the home for every path we record (out-links, roots):
            # a symlinked $HOME elsewhere must not make gc think nothing is rooted.
            self.home = home.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise StoreError(f"cannot use the store at {home}: {why}", reason=Reason.IO) from exc
        self.store = self.home / "store"
        self.tmp = self.home / "tmp"
        self.locks = self.home / "locks"
        self.blobs = self.home / "blobs"
        self.roots = self.home / "gcroots"
        self.meta = self.home / "meta"
        self.temproots = self.home / "temproots"
        self.gc_lock = self.home / "gc.lock"
        try:
            for d in (self.store, self.tmp, self.locks, self.blobs, self.roots, self.meta):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the store at {self.home}: {exc.strerror}", reason=Reason.IO
            ) from exc
        self._temp_roots: TempRoots | None = None

    # -- entries
    def path_for(self, key: str, name: str) -> Path:
        return self.store / f"{key}-{name}"

    def entry(self, path: Path) -> StoreEntry:
        """The entry a path in the store names (``<key>-<name>``), published or not."""
        key, sep, name = path.name.partition("-")
        if not sep or len(key) != 32 or not set(key) <= _KEY_HEX or not name:
            raise StoreError(
                f"{path} is not a store path (expected <key>-<name>)",
                reason=Reason.NOT_A_STORE_PATH,
            )
        return StoreEntry(self.store / path.name, key, name, self.meta / f"{path.name}.json")

    def entry_of(self, path: Path) -> StoreEntry:
        """The entry behind a user's path argument (``./result`` or a store path)."""
        try:
            real = path.resolve(strict=True)
        except OSError as exc:
            raise StoreError(
                f"{path}: {exc.strerror or exc}", reason=Reason.NOT_A_STORE_PATH
            ) from exc
        entry = self.entry(real)
        if real != entry.path or not entry.exists():
            raise StoreError(
                f"{path} is not a path in the store at {self.store}",
                reason=Reason.NOT_A_STORE_PATH,
            )
        return entry

    def lookup(self, key: str, name: str) -> Path | None:
        path = self.path_for(key, name)
        return path if (path / MANIFEST).is_file() else None

    def entries(self) -> list[StoreEntry]:
        """Every published entry, oldest build first."""
        found = []
        for path in self.store.iterdir():
            try:
                entry = self.entry(path)
            except StoreError:
                continue
            if entry.exists():
                found.append(entry)
        return sorted(found, key=lambda e: (e.built_at, e.path.name))

    def record(self, path: Path, recipe: Path) -> bool:
        """Remember which recipe produced a store path, for ``ls`` (not an input)."""
        return self.entry(path).write_meta(recipe)

    # -- locks and roots
    def key_lock(
        self, key: str, *, shared: bool = False, on_wait: Callable[[], None] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """The lock of ``key``: exclusive to build it, shared to use or check it."""
        return flocked(self.locks / f"{key}.lock", shared=shared, on_wait=on_wait)

    @contextlib.contextmanager
    def try_key_lock(self, key: str) -> Iterator[bool]:
        """Hold ``key``'s lock exclusively if nobody holds it (yields True), else False."""
        fd = _open_lock(self.locks / f"{key}.lock")
        try:
            yield try_flock(fd)
        finally:
            os.close(fd)

    def in_use(self, key: str) -> bool:
        """Is a build, check or cache hit of ``key`` holding its lock right now?"""
        with self.try_key_lock(key) as free:
            return not free

    def gc_guard(self, *, exclusive: bool = False) -> contextlib.AbstractContextManager[None]:
        """Shared: register something gc must see (a temp root, a temp dir).
        Exclusive: gc collecting temp dirs, partial downloads and blobs."""
        return flocked(self.gc_lock, shared=not exclusive)

    @property
    def temp_roots(self) -> TempRoots:
        if self._temp_roots is None:
            self._temp_roots = TempRoots(self)
        return self._temp_roots

    def add_root(self, link: Path) -> None:
        """Register an out-link as a gc root (``gcroots/<hash> -> link``)."""
        link = link.absolute()
        name = hashlib.sha256(os.fsencode(link)).hexdigest()[:32]
        entry = self.roots / name
        with contextlib.suppress(OSError):
            if os.readlink(entry) == str(link):
                return
        set_out_link(entry, link)

    def rooted(self, *, prune: bool = False) -> set[str]:
        """Names of entries some live out-link points at. With ``prune``, root
        records whose out-link is gone or points elsewhere now are deleted."""
        live: set[str] = set()
        for record in self.roots.iterdir():
            try:
                link = Path(os.readlink(record))
                target = link.parent.resolve() / os.readlink(link)
            except (OSError, RuntimeError):
                target = None  # the out-link is gone
            if target is not None and target.parent.resolve() == self.store:
                live.add(target.name)
            elif prune:
                with contextlib.suppress(OSError):
                    record.unlink()
        return live

    # -- building
    @contextlib.contextmanager
    def temp_dir(self, purpose: str) -> Iterator[Path]:
        """A private dir under ``<home>/tmp``, flocked while in use, always removed.

        Created under the shared gc lock: gc (exclusive) sees it only once
        it is locked, so it never removes a live one.
        """
        with self.gc_guard():
            try:
                path = Path(tempfile.mkdtemp(prefix=f"{purpose}-", dir=self.tmp))
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise host_error(f"create a temp dir in {self.tmp}", exc) from exc
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            try:
                remove_tree(path)  # what it cannot remove, gc collects once we let go
            finally:
                os.close(fd)

    def build_dir(self, key: str) -> contextlib.AbstractContextManager[Path]:
        return self.temp_dir(f"build-{key}")

    def publish(self, built: Path, key: str, name: str) -> Path:
        """fsync ``built``, make it read-only and rename it into the store."""
        final = self.path_for(key, name)
        if os.path.lexists(final) and self.lookup(key, name) is None:
            self.discard(final)  # a leftover without its manifest (we hold the key lock)
        try:
            make_read_only(built)
            fsync_tree(built)
            # Moving a directory to a new parent rewrites its '..': it must stay
            # writable until after the rename (for anyone but root).
            os.chmod(built, 0o755)
        except OSError as exc:
            raise host_error("publish", exc) from exc
        try:
            os.rename(built, final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and self.lookup(key, name):
                return final  # someone else published the same key first
            raise StoreError(f"cannot publish {final}: {exc.strerror}", reason=Reason.IO) from exc
        with contextlib.suppress(OSError):
            os.chmod(final, 0o555)
        fsync_dir(self.store)
        return final

    def discard(self, path: Path) -> Removal:
        """Take a store path out of the store in one rename (into ``tmp``), then
        remove it: an interrupted removal never leaves a path that looks built
        with files missing. The caller holds the path's key lock; what cannot
        be removed stays in ``tmp``, where gc collects it later."""
        aside = self.tmp / f"gc-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.chmod(path, 0o755)  # its '..' changes: writable until moved (for non-root)
            os.rename(path, aside)
        except FileNotFoundError:
            return Removal()
        except OSError as exc:
            return Removal([f"{path}: {exc.strerror}"])
        return remove_tree(aside)


def set_out_link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically, making its missing parent directories
    (``-o out/debian``, as ``mkdir -p``); never clobber a real file."""
    if link.exists() and not link.is_symlink():
        raise StoreError(
            f"{link} exists and is not a symlink; not replacing it", reason=Reason.OUT_LINK
        )
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError as exc:
        raise StoreError(
            f"cannot create out-link {link}: {exc.strerror}", reason=Reason.OUT_LINK
        ) from exc
