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
(``templating.py``). A file whose bytes come from a registry or a URL
(``ref``, ``url``) is resolved last, by the caller's ``Fetch`` (``resolve``
pins it; its bytes are the blob cache's), so a local problem is said before
any network. Every error names the recipe position of its entry.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from banger_build import guest
from banger_build.builtins import Builtin
from banger_build.entries import Injected as Injected
from banger_build.entries import Staged as Staged
from banger_build.entries import Where
from banger_build.errors import InputError, Reason
from banger_build.kmodules import ModulesTreeError, find_tree
from banger_build.kmodules import modules_version as modules_version
from banger_build.oci.reference import Platform, Reference
from banger_build.recipe import GuestSpec, KernelSpec, Recipe
from banger_build.sources import SourceRefused, SourceRoots, hash_regular
from banger_build.sources import hash_tree as hash_tree
from banger_build.templating import TemplateJob, render_templates


@dataclass(frozen=True)
class FileEntry:
    """A file copied into the image (a ``[[files]]`` entry, or the agent): from ``src``,
    or fetched from ``ref`` (a file artifact) or ``url``."""

    src: Path | None
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
    roots: SourceRoots | None = None  # where the source may lie (None: the recipe's roots)
    ref: Reference | None = None
    url: str | None = None

    @property
    def fetched(self) -> bool:
        """Its bytes come from a registry or a URL (the build's ``Source``)."""
        return self.ref is not None or self.url is not None

    @property
    def origin(self) -> str:
        """Where the bytes come from, for messages."""
        return str(self.ref) if self.ref is not None else self.url or str(self.src)


@dataclass(frozen=True)
class Fetched:
    """A fetched file input as resolving found it (``Fetch`` makes it)."""

    path: Path  # its place in the blob cache (the build downloads it there if missing)
    sha256: str
    executable: bool | None  # None: the source does not say (0644 unless ``mode``)


#: resolves a fetched entry (``FileEntry.fetched``): its digest, pinned, without its bytes
Fetch = Callable[[FileEntry], Fetched]


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
                f.owner_where or dest_where, replace=f.replace, ref=f.ref, url=f.url,
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
        out.extend(guest_entries(recipe.guest, roots, recipe.platform))
    return out


def guest_entries(spec: GuestSpec, roots: SourceRoots, platform: Platform) -> Iterator[Entry]:
    """``guest.ENTRIES`` as entries: the agent from ``[guest] agent`` (else the built-in
    one for ``platform``), each template built in or replaced under ``[guest.templates]``;
    all at the [guest] table's position unless a key of the recipe names them."""
    table = spec.table_where or spec.where
    overrides = {o.name: o for o in spec.templates}
    for e in guest.ENTRIES:
        if isinstance(e, guest.BuiltinFile):
            yield _agent_entry(spec, e, platform)
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


def _agent_entry(spec: GuestSpec, e: guest.BuiltinFile, platform: Platform) -> FileEntry:
    if spec.agent is not None or spec.agent_ref is not None or spec.agent_url is not None:
        return FileEntry(
            spec.agent, e.dest, e.mode, guest.OWNER, spec.agent_sha256, spec.where,
            spec.where, spec.where, what="the guest agent",
            hint=" (build it, or set guest.agents = false)",
            ref=spec.agent_ref, url=spec.agent_url,
        )  # fmt: skip
    try:
        agent = guest.builtin_agent(str(platform), platform.architecture)
    except InputError as exc:
        raise InputError(f"{spec.where}: {exc}", reason=exc.reason) from None
    return FileEntry(
        agent, e.dest, e.mode, guest.OWNER, spec.agent_sha256, spec.where, spec.where,
        spec.where, what=f"the built-in guest agent for {platform}",
        roots=SourceRoots((agent.parent.resolve(),)),
    )  # fmt: skip


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


def resolve_injected(recipe: Recipe, fetch: Fetch | None = None) -> tuple[Injected, ...]:
    """Every entry resolved: files hashed, templates rendered (one batch), links as they
    are, then the fetched files by ``fetch`` (without it they are left out: ``render``).
    Local problems are said before anything is asked of a registry."""
    items = entries(recipe)
    templates = [e for e in items if isinstance(e, TemplateEntry)]
    fetched = [e for e in items if isinstance(e, FileEntry) and e.fetched]
    out: list[Injected] = []
    for e in items:  # files and links first: a missing file is said before any rendering
        if isinstance(e, FileEntry) and not e.fetched:
            digest, executable = _hash_file(e, e.roots or recipe.source_roots)
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
    for e in fetched:
        if fetch is None:
            break
        got = fetch(e)
        if e.sha256 is not None and e.sha256 != got.sha256:
            raise InputError(
                f"{e.where}: {e.origin} has sha256 {got.sha256}, but the recipe pins {e.sha256}",
                reason=Reason.SHA256_MISMATCH,
            )
        mode = e.mode if e.mode is not None else 0o755 if got.executable else 0o644
        out.append(
            Injected(
                e.dest, "file", mode, e.owner, got.sha256, source=got.path,
                where=e.dest_where, owner_where=e.owner_where, replace=e.replace,
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
    assert e.src is not None, "a fetched file is resolved by a Fetch"
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
    kernel: KernelSpec | None,
    roots: SourceRoots | None = None,
    note: Callable[[str], None] | None = None,
) -> tuple[Staged, ...]:
    """The local kernel files, hashed; ``roots``: where they may lie (default: anywhere
    ``load_recipe`` accepted them, i.e. a check against the filesystem root only).
    A modules directory is the modules tree it names (``kmodules.find_tree``); when
    that lies below it, ``note`` is told."""
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
        if name == "modules":
            path = _modules_tree(path, where, roots, note)
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


def _modules_tree(
    path: Path, where: Where, roots: SourceRoots, note: Callable[[str], None] | None
) -> Path:
    """The modules tree directory ``path`` names (itself, or the one below it);
    anything but a directory as it is (a tarball, or a missing path for
    ``_read_input`` to name)."""
    try:
        if not stat.S_ISDIR(os.stat(roots.check(path)).st_mode):
            return path
    except (SourceRefused, OSError):
        return path
    try:
        tree, found_below = find_tree(path)
    except ModulesTreeError as exc:
        raise where.error(exc.message, exc.reason) from None
    if found_below is not None and note is not None:
        note(f"{where.key or 'kernel.modules'}: {found_below}")
    return tree


_TARBALLS = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.xz")


def _tarball_name(path: Path) -> str:
    for suffix in _TARBALLS:
        if path.name.endswith(suffix):
            return "modules" + suffix
    return "modules.tar"
