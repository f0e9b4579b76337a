"""The content-addressed store: ``<home>/store/<key>-<name>/``.

- Builds happen in ``<home>/tmp`` (same filesystem) and are published by one
  rename; a store path either exists complete, with its manifest.json, or not
  at all.
- Published paths are read-only (files 0444, dirs 0555).
- One lock per key (flock) so two builds of one key never race; the loser of
  a race finds the winner's path and uses it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from banger_build.errors import Reason, StoreError

MANIFEST = "manifest.json"


def default_home() -> Path:
    env = os.environ.get("BANGER_BUILD_HOME")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache) / "banger-build"


class Store:
    def __init__(self, home: Path) -> None:
        self.home = home.absolute()
        self.store = self.home / "store"
        self.tmp = self.home / "tmp"
        self.locks = self.home / "locks"
        self.blobs = self.home / "blobs"
        self.roots = self.home / "gcroots"
        self.meta = self.home / "meta"
        try:
            for d in (self.store, self.tmp, self.locks, self.blobs, self.roots, self.meta):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store at {self.home}: {exc.strerror}") from exc

    def path_for(self, key: str, name: str) -> Path:
        return self.store / f"{key}-{name}"

    def lookup(self, key: str, name: str) -> Path | None:
        path = self.path_for(key, name)
        return path if (path / MANIFEST).is_file() else None

    def in_use(self, key: str) -> bool:
        """Is a build of ``key`` running (its lock held) right now?"""
        path = self.locks / f"{key}.lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    def add_root(self, link: Path) -> None:
        """Register an out-link as a gc root (``gcroots/<hash> -> link``)."""
        link = link.absolute()
        name = hashlib.sha256(os.fsencode(link)).hexdigest()[:32]
        entry = self.roots / name
        if entry.is_symlink() and os.readlink(entry) == str(link):
            return
        set_out_link(entry, link)

    def record(self, path: Path, recipe: Path) -> None:
        """Remember which recipe produced a store path, for ``ls`` (not an input)."""
        info = {"recipe": str(recipe.absolute()), "time": int(time.time())}
        tmp = self.meta / f".{path.name}.{os.getpid()}"
        tmp.write_text(json.dumps(info) + "\n")
        os.replace(tmp, self.meta / f"{path.name}.json")

    @contextmanager
    def lock(self, key: str, on_wait: object = None) -> Iterator[None]:
        path = self.locks / f"{key}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if callable(on_wait):
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def build_dir(self, key: str) -> Iterator[Path]:
        """A private temp dir for one build; always removed afterwards."""
        path = Path(tempfile.mkdtemp(prefix=f"build-{key}-", dir=self.tmp))
        try:
            yield path
        finally:
            remove_tree(path)

    def publish(self, built: Path, key: str, name: str) -> Path:
        """Make ``built`` read-only and rename it into the store."""
        final = self.path_for(key, name)
        make_read_only(built)
        # Moving a directory to a new parent rewrites its '..': it must stay
        # writable until after the rename (for anyone but root).
        os.chmod(built, 0o755)
        try:
            os.rename(built, final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and self.lookup(key, name):
                return final  # someone else published the same key first
            raise StoreError(f"cannot publish {final}: {exc.strerror}") from exc
        os.chmod(final, 0o555)
        return final


def make_read_only(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o444 | (os.stat(p).st_mode & 0o111))
        os.chmod(dirpath, 0o555)


def remove_tree(path: Path) -> None:
    """rm -rf that also removes read-only directories (published or failed builds)."""
    if not path.exists():
        return
    os.chmod(path, stat.S_IRWXU)
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, stat.S_IRWXU)
    shutil.rmtree(path)


def set_out_link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically; never clobber a real file."""
    if link.exists() and not link.is_symlink():
        raise StoreError(
            f"{link} exists and is not a symlink; not replacing it", reason=Reason.OUT_LINK
        )
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    try:
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError as exc:
        raise StoreError(
            f"cannot create out-link {link}: {exc.strerror}", reason=Reason.OUT_LINK
        ) from exc
