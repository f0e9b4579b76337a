"""A kernel as an OCI artifact: what ``banger-build kernel push`` publishes and
``[kernel] ref`` builds from.

One OCI image manifest (``artifactType`` ``application/vnd.banger.kernel.v1``)
whose config is ``{"version": "<modules version or ''>"}`` and whose layers are
the files, each titled with the name it is staged under::

    vmlinux      application/vnd.banger.kernel.image.v1
    initrd.img   application/vnd.banger.kernel.initrd.v1        (optional)
    modules.tar  application/vnd.banger.kernel.modules.v1.tar   (optional)

``modules.tar`` is a deterministic, uncompressed tar of a ``lib/modules/<version>``
directory: entries relative to it, sorted, root-owned, mtime 0, directories
0755, files 0644, symlinks kept. Same inputs, same bytes, same digest.

Pure functions over files and bytes; no network (and no HTTP stack import).
Manifest and config failures are ``manifest.ManifestError``s, for the
boundary (``source``) to name the reference.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from banger_build.errors import InputError, Reason
from banger_build.flatten import check_name
from banger_build.oci.manifest import (
    OCI_MANIFEST,
    Descriptor,
    ManifestError,
    descriptor,
    media_type_of,
    parse_config,
)
from banger_build.oci.reference import Digest

ARTIFACT_TYPE = "application/vnd.banger.kernel.v1"
CONFIG_TYPE = "application/vnd.banger.kernel.config.v1+json"
TITLE = "org.opencontainers.image.title"
#: staged name -> layer media type, in manifest order
LAYERS: dict[str, str] = {
    "vmlinux": "application/vnd.banger.kernel.image.v1",
    "initrd.img": "application/vnd.banger.kernel.initrd.v1",
    "modules.tar": "application/vnd.banger.kernel.modules.v1.tar",
}


@dataclass(frozen=True)
class KernelArtifact:
    digest: Digest
    config: Descriptor
    files: dict[str, Descriptor]  # staged name -> layer, in manifest order


# -- building ---------------------------------------------------------------------


def _walk(root: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Every entry under ``root`` as (relative POSIX path, entry), sorted, parents first."""
    stack: list[tuple[str, str]] = [("", str(root))]
    while stack:
        prefix, directory = stack.pop()
        entries = sorted(os.scandir(directory), key=lambda e: os.fsencode(e.name))
        subdirs = []
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            yield rel, entry
            if entry.is_dir(follow_symlinks=False):
                subdirs.append((f"{rel}/", entry.path))
        stack.extend(reversed(subdirs))


def _info(name: str, kind: bytes, mode: int, size: int = 0, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, target
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def write_modules_tar(modules: Path, out: IO[bytes]) -> None:
    """Write the deterministic tar of directory ``modules`` to ``out`` (streamed)."""
    if not modules.is_dir():
        raise InputError(f"{modules}: kernel modules must be a directory", reason=Reason.IO)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel, entry in _walk(modules):
            if entry.is_symlink():
                tar.addfile(_info(rel, tarfile.SYMTYPE, 0o777, target=os.readlink(entry.path)))
            elif entry.is_dir(follow_symlinks=False):
                tar.addfile(_info(rel, tarfile.DIRTYPE, 0o755))
            elif entry.is_file(follow_symlinks=False):
                size = entry.stat(follow_symlinks=False).st_size
                with open(entry.path, "rb") as f:
                    tar.addfile(_info(rel, tarfile.REGTYPE, 0o644, size), f)
            else:
                raise InputError(
                    f"{entry.path}: not a file, directory or symlink", reason=Reason.IO
                )


def config_bytes(version: str) -> bytes:
    return json.dumps({"version": version}, sort_keys=True, separators=(",", ":")).encode()


def manifest_bytes(config: Descriptor, files: list[tuple[str, Descriptor]]) -> bytes:
    """The artifact's OCI image manifest, canonical JSON (same inputs, same digest)."""

    def desc(d: Descriptor, title: str | None = None) -> dict[str, object]:
        out: dict[str, object] = {
            "mediaType": d.media_type,
            "digest": str(d.digest),
            "size": d.size,
        }
        if title is not None:
            out["annotations"] = {TITLE: title}
        return out

    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": desc(config),
        "layers": [desc(d, name) for name, d in files],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# -- reading ----------------------------------------------------------------------


def parse_kernel_manifest(digest: Digest, data: bytes) -> KernelArtifact:
    """Parse verified manifest bytes of a kernel artifact; ManifestError otherwise."""
    media_type, body = media_type_of(data, None)
    if media_type != OCI_MANIFEST:
        raise ManifestError(
            f"{digest} is a {media_type}, not a kernel artifact (push one with "
            "`banger-build kernel push`)",
            reason=Reason.UNSUPPORTED_MEDIA_TYPE,
        )
    config = descriptor(body.get("config"), "config")
    if body.get("artifactType") != ARTIFACT_TYPE and config.media_type != CONFIG_TYPE:
        raise ManifestError(
            f"{digest} is not a kernel artifact (artifactType "
            f"{body.get('artifactType')!r}, config {config.media_type})",
            reason=Reason.UNSUPPORTED_MEDIA_TYPE,
        )
    raw = body.get("layers")
    if not isinstance(raw, list):
        raise ManifestError("the manifest has no layers list", reason=Reason.INVALID_MANIFEST)
    by_type = {mt: name for name, mt in LAYERS.items()}
    files: dict[str, Descriptor] = {}
    for i, item in enumerate(raw):
        layer = descriptor(item, f"layer {i}")
        name = by_type.get(layer.media_type)
        if name is None:
            raise ManifestError(
                f"layer {i} ({layer.digest}) has unknown media type {layer.media_type}",
                reason=Reason.UNSUPPORTED_MEDIA_TYPE,
            )
        if name in files:
            raise ManifestError(
                f"the artifact has two {name} layers", reason=Reason.INVALID_MANIFEST
            )
        files[name] = layer
    if "vmlinux" not in files:
        raise ManifestError(
            "the artifact has no kernel image layer", reason=Reason.INVALID_MANIFEST
        )
    return KernelArtifact(digest, config, files)


def parse_kernel_config(data: bytes) -> str:
    """The modules version a kernel artifact's config records ('' for none)."""
    version = parse_config(data).get("version", "")
    if not isinstance(version, str):
        raise ManifestError("the kernel config has no version string", reason=Reason.INVALID_CONFIG)
    return version


def modules_tar_is_tree(tar_path: Path) -> bool:
    """Whether a modules tar holds a modules tree: ``modules.order`` (a file) or
    ``kernel/`` at its top (``kmodules.is_tree``). Reads the headers only."""
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if (name == "modules.order" and member.isreg()) or (
                    name.rstrip("/") == "kernel" and member.isdir()
                ):
                    return True
    except (tarfile.TarError, OSError) as exc:
        raise InputError(
            f"{tar_path}: not a readable tar: {exc}", reason=Reason.INVALID_MODULES
        ) from None
    return False


def extract_modules(tar_path: Path, dest: Path) -> None:
    """Unpack a modules tar into the new directory ``dest``: only files, directories
    and symlinks, no absolute or ``..`` names, nothing through a symlink."""
    dest.mkdir()
    links: set[PurePosixPath] = set()
    with tarfile.open(tar_path, mode="r:") as tar:
        for member in tar:
            name = PurePosixPath(member.name)
            if (
                name.is_absolute()
                or not name.parts
                or name.parts == (".",)
                or check_name(name.as_posix(), member.name) is not None
            ):
                raise InputError(
                    f"{tar_path}: unsafe entry {member.name!r}", reason=Reason.INVALID_MODULES
                )
            if any(parent in links for parent in name.parents):
                raise InputError(
                    f"{tar_path}: {member.name!r} lies under a symlink",
                    reason=Reason.INVALID_MODULES,
                )
            target = dest / name
            if member.issym():
                os.symlink(member.linkname, target)
                links.add(name)
            elif member.isdir():
                target.mkdir(mode=0o755, exist_ok=True)
            elif member.isreg():
                src = tar.extractfile(member)
                assert src is not None
                with src, open(target, "xb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                os.chmod(target, 0o644)
            else:
                raise InputError(
                    f"{tar_path}: {member.name!r} is not a file, directory or symlink",
                    reason=Reason.INVALID_MODULES,
                )


__all__ = [
    "ARTIFACT_TYPE",
    "CONFIG_TYPE",
    "LAYERS",
    "KernelArtifact",
    "config_bytes",
    "extract_modules",
    "modules_tar_is_tree",
    "manifest_bytes",
    "parse_kernel_manifest",
    "parse_kernel_config",
    "write_modules_tar",
]
