"""Resolve the recipe's local inputs: files read and hashed, templates rendered.

The result, ``Injected`` entries and the kernel's ``Staged`` files, is frozen
data; the derivation hashes it and the build writes exactly it. The built-in
guest set (``banger_build.guest``), when the recipe's ``[guest]`` enables it,
is part of ``resolve_injected``: its files are entries like the recipe's own.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import lzma
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from banger_build.errors import InputError, Reason
from banger_build.fsutil import hash_file
from banger_build.guest import resolve_guest
from banger_build.recipe import KernelSpec, Recipe, Where
from banger_build.templates import render_template


@dataclass(frozen=True)
class Injected:
    """One path the recipe puts into the image, root-owned unless it says otherwise."""

    dest: str
    kind: str  # "file" | "template" | "symlink"
    mode: int
    owner: str
    sha256: str  # of the bytes written (or of the link target)
    source: Path | None = None  # file inputs: copied from here
    data: bytes | None = None  # templates: the rendered bytes
    target: str = ""  # symlinks

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dest": self.dest, "kind": self.kind, "owner": self.owner}
        if self.kind == "symlink":
            out["target"] = self.target
        else:
            out["mode"] = f"{self.mode:04o}"
            out["sha256"] = self.sha256
        return out


@dataclass(frozen=True)
class Staged:
    """A file or directory staged beside rootfs.ext4 (kernel, initrd, modules)."""

    name: str
    source: Path
    sha256: str
    size: int


def hash_tree(root: Path) -> tuple[str, int]:
    """A digest of a directory: sorted relative paths, types, modes, contents."""
    sha = hashlib.sha256()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = os.fsencode(path.relative_to(root))
            st = path.lstat()
            sha.update(b"%s\0%o\0" % (rel, st.st_mode))
            if stat.S_ISLNK(st.st_mode):
                sha.update(os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                digest, size = hash_file(path)
                sha.update(digest.encode())
                total += size
            sha.update(b"\0")
    return sha.hexdigest(), total


def _read_input(path: Path, where: Where, what: str) -> tuple[str, int]:
    try:
        if path.is_dir():
            return hash_tree(path)
        return hash_file(path)
    except FileNotFoundError:
        raise InputError(
            f"{where}: {what} {path} does not exist", reason=Reason.MISSING_INPUT
        ) from None
    except OSError as exc:
        raise InputError(
            f"{where}: cannot read {what} {path}: {exc.strerror}", reason=Reason.IO
        ) from exc


def template_context(recipe: Recipe) -> dict[str, Any]:
    """What templates see: the recipe's [vars], plus ``recipe`` facts."""
    context: dict[str, Any] = dict(recipe.vars)
    context.setdefault(
        "recipe",
        {"name": recipe.name, "image": str(recipe.image), "platform": str(recipe.platform)},
    )
    return context


def resolve_injected(recipe: Recipe) -> tuple[Injected, ...]:
    out: list[Injected] = []
    for f in recipe.files:
        digest, _ = _read_input(f.src, f.where, "file")
        if f.src.is_dir():
            raise InputError(f"{f.where}: {f.src} is a directory, not a file", reason=Reason.IO)
        if f.sha256 is not None and f.sha256 != digest:
            raise InputError(
                f"{f.where}: {f.src} has sha256 {digest}, but the recipe pins {f.sha256}",
                reason=Reason.SHA256_MISMATCH,
            )
        out.append(Injected(f.dest, "file", f.mode, f.owner, digest, source=f.src))
    context = template_context(recipe)
    for t in recipe.templates:
        if not t.src.is_file():
            raise InputError(
                f"{t.where}: template {t.src} does not exist", reason=Reason.MISSING_INPUT
            )
        data = render_template(t.src, context, label=str(t.src))
        digest = hashlib.sha256(data).hexdigest()
        out.append(Injected(t.dest, "template", t.mode, t.owner, digest, data=data))
    for s in recipe.symlinks:
        digest = hashlib.sha256(s.target.encode()).hexdigest()
        out.append(Injected(s.dest, "symlink", 0o777, s.owner, digest, target=s.target))
    if recipe.guest is not None:
        out.extend(resolve_guest(recipe.guest, context))
    out.sort(key=lambda i: i.dest.encode())
    for a, b in itertools.pairwise(out):
        if a.dest == b.dest:  # load_recipe refuses this; a Recipe built by hand may not
            raise InputError(f"{a.dest}: written twice", reason=Reason.DUPLICATE_DEST)
    return tuple(out)


def resolve_kernel(kernel: KernelSpec | None) -> tuple[Staged, ...]:
    if kernel is None:
        return ()
    out = []
    for name, path in (
        ("vmlinux", kernel.path),
        ("initrd.img", kernel.initrd),
        ("modules", kernel.modules),
    ):
        if path is None:
            continue
        digest, size = _read_input(path, kernel.where, f"kernel {name}")
        if name == "modules" and not path.is_dir():
            if kernel.install_modules:
                raise InputError(
                    f"{kernel.where}: install_modules needs kernel.modules to be a "
                    f"lib/modules/<version> directory, not {path.name}",
                    reason=Reason.MODULES_NOT_A_DIRECTORY,
                )
            name = _tarball_name(path)
        out.append(Staged(name, path, digest, size))
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
    for ko in sorted(modules.rglob("*.ko*")):
        data = ko.read_bytes()
        if ko.suffix == ".xz":
            data = lzma.decompress(data)
        elif ko.suffix == ".zst":
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        elif ko.suffix == ".gz":
            data = gzip.decompress(data)
        found = re.search(rb"vermagic=(\S+)", data)
        if found:
            return found.group(1).decode("ascii", "replace")
    raise InputError(
        f"{modules}: cannot tell the kernel version (name the directory after it, "
        "e.g. lib/modules/6.1.0-13-amd64)",
        reason=Reason.MODULES_VERSION,
    )
