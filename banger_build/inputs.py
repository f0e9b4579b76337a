"""Resolve the recipe's local inputs: files read and hashed, templates rendered.

The result, ``Injected`` entries and the kernel's ``Staged`` files
(``entries.py``), is frozen data; the derivation hashes it and the build
writes exactly it. The built-in guest set is plain data (``guest.ENTRIES``):
when the recipe's ``[guest]`` enables it, its entries become entries of the
same three kinds as the recipe's own ``[[files]]``, ``[[templates]]`` and
``[[symlinks]]`` (``entries``), and one loop resolves them all
(``resolve_injected``).

Sources are read through ``sources.py``: checked again against the recipe's
source roots (a symlink may have changed since the recipe was loaded), regular
files only, never blocking. Templates render in one sandboxed, bounded child
(``templating.py``). Every error names the recipe position of its entry.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import lzma
import os
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import zstandard

from banger_build import guest
from banger_build.builtins import Builtin
from banger_build.entries import Injected as Injected
from banger_build.entries import Staged as Staged
from banger_build.entries import Where
from banger_build.errors import InputError, Reason
from banger_build.recipe import GuestSpec, KernelSpec, Recipe
from banger_build.sources import SourceRefused, SourceRoots, hash_regular, open_regular
from banger_build.sources import hash_tree as hash_tree
from banger_build.templating import TemplateJob, render_templates

#: Bytes of one kernel module read (compressed, and again decompressed) to find
#: its ``vermagic=``: modules are KiBs to a few MiB; the bound stops a
#: decompression bomb named ``*.ko.xz``.
MAX_MODULE_BYTES = 64 << 20


@dataclass(frozen=True)
class FileEntry:
    """A file copied into the image from ``src`` (a ``[[files]]`` entry, or the agent)."""

    src: Path
    dest: str
    mode: int | None  # None: 0755 if the source is executable, else 0644
    owner: str
    sha256: str | None  # the recipe's pin
    where: Where  # the src key: problems with the source
    dest_where: Where
    owner_where: Where
    what: str = "file"  # how errors name the source
    hint: str = ""  # added to "does not exist"
    replace: bool = False  # may replace a symlink at ``dest``


@dataclass(frozen=True)
class TemplateEntry:
    """A template rendered into the image (a ``[[templates]]`` entry, or a built-in one)."""

    job: TemplateJob
    dest: str
    mode: int
    owner: str
    dest_where: Where
    owner_where: Where
    replace: bool = False


@dataclass(frozen=True)
class LinkEntry:
    dest: str
    target: str
    owner: str
    dest_where: Where
    owner_where: Where
    replace: bool = False


Entry = FileEntry | TemplateEntry | LinkEntry


def template_context(recipe: Recipe) -> dict[str, Any]:
    """What templates see: the recipe's [vars], plus ``recipe`` facts."""
    context: dict[str, Any] = dict(recipe.vars)
    context.setdefault(
        "recipe",
        {"name": recipe.name, "image": str(recipe.image), "platform": str(recipe.platform)},
    )
    return context


def entries(recipe: Recipe) -> list[Entry]:
    """The recipe's entries, then the built-in guest set's (when ``[guest]`` enables it)."""
    roots = recipe.source_roots
    out: list[Entry] = []
    for f in recipe.files:
        dest_where = f.dest_where or f.where
        out.append(
            FileEntry(
                f.src, f.dest, f.mode, f.owner, f.sha256, f.where, dest_where,
                f.owner_where or dest_where, replace=f.replace,
            )
        )  # fmt: skip
    for t in recipe.templates:
        dest_where = t.dest_where or t.where
        job = template_job(t.src, roots, t.where)
        out.append(
            TemplateEntry(
                job, t.dest, t.mode, t.owner, dest_where, t.owner_where or dest_where, t.replace
            )
        )
    for s in recipe.symlinks:
        out.append(
            LinkEntry(s.dest, s.target, s.owner, s.where, s.owner_where or s.where, s.replace)
        )
    if recipe.guest is not None:
        out.extend(guest_entries(recipe.guest, roots))
    return out


def guest_entries(spec: GuestSpec, roots: SourceRoots) -> Iterator[Entry]:
    """``guest.ENTRIES`` as entries: the agent from ``[guest] agent``, each template
    built in or replaced under ``[guest.templates]``; all at the [guest] table's position
    unless a key of the recipe names them."""
    table = spec.table_where or spec.where
    overrides = {o.name: o for o in spec.templates}
    for e in guest.ENTRIES:
        if isinstance(e, guest.BuiltinFile):
            yield FileEntry(
                spec.agent, e.dest, e.mode, guest.OWNER, spec.agent_sha256, spec.where,
                spec.where, spec.where, what="the guest agent",
                hint=" (build it, or set guest.agents = false)",
            )  # fmt: skip
        elif isinstance(e, guest.BuiltinTemplate):
            override = overrides.get(e.name)
            if override is None:
                job = TemplateJob(f"built-in template {e.name}", builtin=_builtin(e.name))
                yield TemplateEntry(job, e.dest, e.mode, guest.OWNER, table, table)
            else:
                job = template_job(override.src, roots, override.where)
                yield TemplateEntry(job, e.dest, e.mode, guest.OWNER, override.where, table)
        else:
            yield LinkEntry(e.dest, e.target, guest.OWNER, table, table)


def template_job(src: Path | Builtin, roots: SourceRoots, where: Where) -> TemplateJob:
    """A recipe's template: a file of its project, or a built-in one (``builtin:NAME``)."""
    if isinstance(src, Builtin):
        return TemplateJob(str(src), builtin=src.file(), prefix=f"{where}: ")
    return TemplateJob(str(src), path=src, roots=roots, prefix=f"{where}: ")


def _builtin(name: str) -> Traversable:
    src = guest.builtin_template(name)
    if not src.is_file():
        raise InputError(
            f"built-in template {name}: {src} is missing (the installation is incomplete)",
            reason=Reason.GUEST_TEMPLATES_MISSING,
        )
    return src


def resolve_injected(recipe: Recipe) -> tuple[Injected, ...]:
    """Every entry resolved: files hashed, templates rendered (one batch), links as they are."""
    items = entries(recipe)
    templates = [e for e in items if isinstance(e, TemplateEntry)]
    out: list[Injected] = []
    for e in items:  # files and links first: a missing file is said before any rendering
        if isinstance(e, FileEntry):
            digest, executable = _hash_file(e, recipe.source_roots)
            mode = e.mode if e.mode is not None else 0o755 if executable else 0o644
            out.append(
                Injected(
                    e.dest, "file", mode, e.owner, digest, source=e.src,
                    where=e.dest_where, owner_where=e.owner_where, replace=e.replace,
                )
            )  # fmt: skip
        elif isinstance(e, LinkEntry):
            digest = hashlib.sha256(e.target.encode()).hexdigest()
            out.append(
                Injected(
                    e.dest, "symlink", 0o777, e.owner, digest, target=e.target,
                    where=e.dest_where, owner_where=e.owner_where, replace=e.replace,
                )
            )  # fmt: skip
    rendered = render_templates([t.job for t in templates], template_context(recipe))
    for t, data in zip(templates, rendered, strict=True):
        out.append(
            Injected(
                t.dest, "template", t.mode, t.owner, hashlib.sha256(data).hexdigest(), data=data,
                where=t.dest_where, owner_where=t.owner_where, replace=t.replace,
            )
        )  # fmt: skip
    out.sort(key=lambda i: i.dest.encode())
    for a, b in itertools.pairwise(out):
        if a.dest == b.dest:  # load_recipe refuses this; a Recipe built by hand may not
            where = b.where or a.where
            raise InputError(
                f"{where}: {a.dest} is written twice" if where else f"{a.dest}: written twice",
                reason=Reason.DUPLICATE_DEST,
            )
    return tuple(out)


def _hash_file(e: FileEntry, roots: SourceRoots) -> tuple[str, bool]:
    """The source's sha256, and whether its owner may execute it (git's one mode bit)."""
    try:
        src = roots.check(e.src)  # again: a symlink on the way may have changed
        digest, _ = hash_regular(src, e.what)
        executable = bool(os.stat(src).st_mode & stat.S_IXUSR)
    except SourceRefused as exc:
        hint = e.hint if exc.reason == Reason.MISSING_INPUT else ""
        raise InputError(f"{e.where}: {exc.message}{hint}", reason=exc.reason) from None
    if e.sha256 is not None and e.sha256 != digest:
        raise InputError(
            f"{e.where}: {e.src} has sha256 {digest}, but the recipe pins {e.sha256}",
            reason=Reason.SHA256_MISMATCH,
        )
    return digest, executable


# -- the kernel ---------------------------------------------------------------------


def _read_input(
    path: Path, where: Where, what: str, roots: SourceRoots, *, tree_ok: bool
) -> tuple[str, int]:
    """sha256 and size of a regular file, or (``tree_ok``) of a directory tree."""
    try:
        path = roots.check(path)
        if tree_ok and stat.S_ISDIR(os.stat(path).st_mode):
            return hash_tree(path)
        return hash_regular(path, what)
    except SourceRefused as exc:
        raise InputError(f"{where}: {exc.message}", reason=exc.reason) from None
    except FileNotFoundError:
        raise InputError(
            f"{where}: {what} {path} does not exist", reason=Reason.MISSING_INPUT
        ) from None
    except OSError as exc:
        raise InputError(
            f"{where}: cannot read {what} {path}: {exc.strerror or exc}", reason=Reason.IO
        ) from exc


def resolve_kernel(
    kernel: KernelSpec | None, roots: SourceRoots | None = None
) -> tuple[Staged, ...]:
    """The local kernel files, hashed; ``roots``: where they may lie (default: anywhere
    ``load_recipe`` accepted them, i.e. a check against the filesystem root only)."""
    if kernel is None:
        return ()
    roots = roots or SourceRoots((Path("/"),))
    out = []
    for name, path, key_where in (
        ("vmlinux", kernel.path, kernel.path_where),
        ("initrd.img", kernel.initrd, kernel.initrd_where),
        ("modules", kernel.modules, kernel.modules_where),
    ):
        if path is None:
            continue
        where = key_where or kernel.where
        digest, size = _read_input(path, where, f"kernel {name}", roots, tree_ok=name == "modules")
        if name == "modules" and not path.is_dir():
            if kernel.install_modules:
                raise InputError(
                    f"{where}: install_modules needs kernel.modules to be a "
                    f"lib/modules/<version> directory, not {path.name}",
                    reason=Reason.MODULES_NOT_A_DIRECTORY,
                )
            name = _tarball_name(path)
        out.append(Staged(name, path, digest, size, where))
    return tuple(out)


_TARBALLS = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.xz")


def _tarball_name(path: Path) -> str:
    for suffix in _TARBALLS:
        if path.name.endswith(suffix):
            return "modules" + suffix
    return "modules.tar"


_VERSION_NAME = re.compile(r"\d+\.\d+[\w.+~-]*")


def modules_version(modules: Path) -> str:
    """The kernel version a ``lib/modules/<version>`` tree is for: its name when
    that looks like a version, else the ``vermagic=`` of one of its modules."""
    if _VERSION_NAME.fullmatch(modules.name):
        return modules.name
    for ko in _module_files(modules):
        found = re.search(rb"vermagic=(\S+)", _module_bytes(ko))
        if found:
            return found.group(1).decode("ascii", "replace")
    raise InputError(
        f"{modules}: cannot tell the kernel version (name the directory after it, "
        "e.g. lib/modules/6.1.0-13-amd64)",
        reason=Reason.MODULES_VERSION,
    )


def _module_files(root: Path) -> list[Path]:
    """Regular files named ``*.ko*`` under ``root``, sorted; symlinks never followed."""
    found: list[Path] = []
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            scan = list(os.scandir(directory))
        except OSError:
            continue
        for entry in scan:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False) and ".ko" in entry.name:  # *.ko*
                found.append(Path(entry.path))
    return sorted(found)


def _module_bytes(ko: Path) -> bytes:
    """Up to ``MAX_MODULE_BYTES`` of a module, decompressed (b"" when unreadable)."""
    try:
        fd = open_regular(ko, "kernel module")
    except SourceRefused:
        return b""
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_MODULE_BYTES)
        if ko.suffix == ".xz":
            return lzma.LZMADecompressor().decompress(data, max_length=MAX_MODULE_BYTES)
        if ko.suffix == ".gz":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, MAX_MODULE_BYTES)
        if ko.suffix == ".zst":
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
            out: bytes = reader.read(MAX_MODULE_BYTES)
            return out
        return data
    except (OSError, lzma.LZMAError, zlib.error, zstandard.ZstdError):
        return b""
