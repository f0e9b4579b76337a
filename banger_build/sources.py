"""Where a recipe's sources may come from, and reading them without surprises.

A recipe is data: it names files to put into an image, and those must be the
project's own files, never the build host's. Every source (``[[files]]``,
``[[templates]]``, ``[guest] agent``, ``[guest.templates]``, ``[kernel]``
path, initrd and modules, and a template's ``{% include %}``) must resolve,
symlinks followed, inside one of the *source roots*:

* the recipe's project: the nearest directory at or above the recipe's own
  holding ``.git`` (a directory or, in a worktree, a file), else the recipe's
  directory;
* directories the user allows explicitly (``--allow-source DIR``,
  ``BuildOptions.source_roots``).

``/proc``, ``/sys`` and ``/dev`` are never sources, whatever the roots say
(``/proc/self/environ`` is a regular file holding the builder's environment).

Reading goes through ``open_regular``: the path is stat'ed before it is
opened and must be a regular file (a FIFO or a device would block or never
end), it is opened with ``O_NONBLOCK | O_NOFOLLOW``, and the open file must be
the one that was stat'ed. Errors are ``SourceRefused`` with a reason; the
caller puts the recipe position in front.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from banger_build.errors import Reason

#: The directory that makes a directory a project root.
PROJECT_MARKER = ".git"
#: Never a source, whatever the roots: the kernel's views of the build host.
FORBIDDEN: tuple[Path, ...] = (Path("/proc"), Path("/sys"), Path("/dev"))
CHUNK = 1 << 20


class SourceRefused(Exception):
    """A source path that may not, or cannot, be read.

    ``message`` names the path; ``detail`` is the same without it ("does not
    exist", "is a FIFO, not a regular file"; for reason ``io`` the system's
    words), for callers that name the file themselves.
    """

    def __init__(self, message: str, reason: Reason, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.detail = detail or message


def project_root(recipe: Path) -> Path:
    """The nearest directory at or above ``recipe``'s holding ``.git``, else its directory."""
    start = Path(os.path.realpath(Path(recipe).parent))
    for directory in (start, *start.parents):
        if os.path.lexists(directory / PROJECT_MARKER):
            return directory
    return start


@dataclass(frozen=True)
class SourceRoots:
    """The directories sources must lie in (resolved), the project's first."""

    roots: tuple[Path, ...]

    @classmethod
    def for_recipe(cls, recipe: Path, allowed: Iterable[Path] = ()) -> SourceRoots:
        extra = tuple(Path(os.path.realpath(p)) for p in allowed)
        return cls((project_root(recipe), *extra))

    def describe(self) -> str:
        project, *extra = self.roots
        text = f"the recipe's project {project}"
        if extra:
            text += " or an allowed directory (" + ", ".join(map(str, extra)) + ")"
        return text

    def check(self, path: Path) -> Path:
        """``path`` resolved, if it may be a source; else ``SourceRefused``.

        It need not exist yet: a missing source is reported when it is read.
        """
        try:
            resolved = Path(os.path.realpath(path))
        except ValueError as exc:  # a NUL in the path
            raise SourceRefused(f"{str(path)!r}: {exc}", Reason.IO, str(exc)) from None
        try:
            st: os.stat_result | None = os.lstat(resolved)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _loop(path) from None
            st = None  # missing, or unreadable: said when it is read
        if st is not None and stat.S_ISLNK(st.st_mode):  # realpath stops at a loop
            raise _loop(path)
        shown = str(path) if resolved == Path(path) else f"{path} (that is, {resolved})"
        for bad in FORBIDDEN:
            if resolved.is_relative_to(bad):
                raise SourceRefused(
                    f"{shown} is on {bad}: the build host's {bad} is never a source",
                    Reason.SOURCE_NOT_ALLOWED,
                )
        if st is not None and st.st_dev in _special_devs():  # a bind mount of one elsewhere
            raise SourceRefused(
                f"{shown} is on a mount of /proc, /sys or /dev: never a source",
                Reason.SOURCE_NOT_ALLOWED,
            )
        if not any(resolved.is_relative_to(root) for root in self.roots):
            raise SourceRefused(
                f"{shown} is outside {self.describe()}: sources must lie inside it "
                "(allow another directory with --allow-source DIR)",
                Reason.SOURCE_NOT_ALLOWED,
            )
        return resolved


def _loop(path: Path) -> SourceRefused:
    return SourceRefused(f"{path} is a symlink loop", Reason.SYMLINK_LOOP)


@cache
def _special_devs() -> frozenset[int]:
    """The devices of /proc, /sys and /dev when they are mounts of their own, so a
    bind mount of one elsewhere is refused too (a /dev that is a plain directory of
    the root filesystem shares its device with everything: it is left out)."""
    try:
        root = os.stat("/").st_dev
    except OSError:
        return frozenset()
    devs = set()
    for path in FORBIDDEN:
        try:
            dev = os.stat(path).st_dev
        except OSError:
            continue
        if dev != root:
            devs.add(dev)
    return frozenset(devs)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def refused_os_error(exc: OSError, path: Path, what: str) -> SourceRefused:
    """An ``OSError`` met reading source ``path`` (a ``what``), as a refusal."""
    if isinstance(exc, FileNotFoundError):
        return SourceRefused(
            f"{what} {path} does not exist", Reason.MISSING_INPUT, "does not exist"
        )
    if exc.errno == errno.ELOOP:
        detail = "is a symlink loop (or became a symlink since it was checked)"
        return SourceRefused(f"{what} {path} {detail}", Reason.SYMLINK_LOOP, detail)
    detail = exc.strerror or str(exc)
    return SourceRefused(f"cannot read {what} {path}: {detail}", Reason.IO, detail)


def check_regular(st: os.stat_result, path: Path, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        detail = f"is {_kind(st.st_mode)}, not a regular file"
        if stat.S_ISDIR(st.st_mode):
            detail = "is a directory, not a file"
        raise SourceRefused(f"{what} {path} {detail}", Reason.NOT_A_REGULAR_FILE, detail)
    if st.st_dev in _special_devs():
        detail = "is on /proc, /sys or /dev, never a source"
        raise SourceRefused(f"{what} {path} {detail}", Reason.SOURCE_NOT_ALLOWED, detail)


def open_regular(path: Path, what: str = "file") -> int:
    """A read-only descriptor of regular file ``path``; never blocks, never follows a
    final symlink. ``SourceRefused`` for anything else."""
    try:
        before = os.stat(path)
        check_regular(before, path, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise refused_os_error(exc, path, what) from exc
    except ValueError as exc:  # a NUL in the path
        raise SourceRefused(f"cannot read {what} {path}: {exc}", Reason.IO, str(exc)) from exc
    try:
        st = os.fstat(fd)
        check_regular(st, path, what)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            detail = "changed while it was being opened"
            raise SourceRefused(f"{what} {path} {detail}", Reason.IO, detail)
        os.set_blocking(fd, True)  # a regular file: reads never wait on a writer
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, limit: int, what: str = "file") -> bytes:
    """All of regular file ``path``; ``SourceRefused`` (too-large) past ``limit`` bytes."""
    fd = open_regular(path, what)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise refused_os_error(exc, path, what) from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        detail = f"is larger than {limit} bytes"
        raise SourceRefused(f"{what} {path} {detail}", Reason.TOO_LARGE, detail)
    return data


def hash_regular(path: Path, what: str = "file") -> tuple[str, int]:
    """sha256 hex digest and size of regular file ``path``, read in constant memory."""
    fd = open_regular(path, what)
    sha = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise refused_os_error(exc, path, what) from exc
    finally:
        os.close(fd)
    return sha.hexdigest(), size


def hash_tree(root: Path) -> tuple[str, int]:
    """A digest of a directory: sorted relative paths, types, modes, contents.

    Depth first in name order, without recursion (a deep tree is no
    ``RecursionError``); symlinks are hashed as their targets and never
    followed; only regular files are opened (a FIFO inside is hashed by its
    mode, never read).
    """
    sha = hashlib.sha256()
    total = 0
    stack: list[Path] = [root]
    while stack:
        directory = stack.pop()
        names = sorted(os.listdir(directory))
        subdirs: list[Path] = []
        for name in names:
            path = directory / name
            rel = os.fsencode(path.relative_to(root))
            st = path.lstat()
            sha.update(b"%s\0%o\0" % (rel, st.st_mode))
            if stat.S_ISLNK(st.st_mode):
                sha.update(os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                digest, size = hash_regular(path)
                sha.update(digest.encode())
                total += size
            elif stat.S_ISDIR(st.st_mode):
                subdirs.append(path)
            sha.update(b"\0")
        stack.extend(reversed(subdirs))
    return sha.hexdigest(), total
