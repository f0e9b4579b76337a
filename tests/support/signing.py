"""Store paths and rootfs artifacts for the signature tests.

``make_entry`` writes a consistent store path into a home without building
(its manifest.json's derivation hashes to its key, its outputs are the files'
digests), with the meta record of a path built here. ``push_rootfs`` pushes
it as a rootfs artifact as ``push`` does (``oci.rootfs.manifest_bytes``:
``artifactType`` ``application/vnd.banger.rootfs.v1``, manifest.json as the
config, the bundle -- zstd of a tar of manifest.json then rootfs.ext4, or the
bytes a test gives -- and the kernel files as layers, the annotations from
manifest.json) through ``Remote.push_blob``/``push_manifest``, and returns the
artifact manifest's descriptor: what ``sign_and_attach`` signs.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import zstandard

from banger_build.derivation import KEY_CHARS, canonical_json
from banger_build.fsutil import make_read_only
from banger_build.oci import rootfs as artifact
from banger_build.oci.kernel import write_modules_tar
from banger_build.oci.manifest import OCI_MANIFEST, Descriptor
from banger_build.oci.reference import Digest, Reference
from banger_build.oci.remote import Remote
from banger_build.sources import hash_tree
from banger_build.store import Store, StoreEntry, write_manifest

IMAGE_DIGEST = "sha256:" + "ab" * 32


def make_entry(
    home: Path,
    name: str = "tiny-v1",
    *,
    rootfs: bytes = b"\x00ext4 image " * 1000,
    kernel: dict[str, bytes] | None = None,
    modules: dict[str, bytes] | None = None,
    kernel_artifact: dict[str, str] | None = None,
    built_here: bool = True,
    epoch: int = 1_700_000_000,
) -> StoreEntry:
    """A published store path (read-only, like the store's) holding ``rootfs``, the
    ``kernel`` files and a ``modules`` directory (relative path -> bytes), as a build of
    a recipe would leave it."""
    kernel = kernel or {}
    modules_digest = None
    if modules is not None:
        staging = home / "modules-source"
        for rel, data in modules.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
        modules_digest = hash_tree(staging)
    derivation: dict[str, Any] = {
        "format": 1,
        "output_format": 3,
        "name": name,
        "platform": "linux/amd64",
        "image": {"manifest": IMAGE_DIGEST, "config": "sha256:" + "cd" * 32, "layers": []},
        "kernel": {
            n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
            for n, d in sorted(kernel.items())
        },
        "files": [],
        "size": "auto",
        "epoch": epoch,
    }
    key = hashlib.sha256(canonical_json(derivation)).hexdigest()[:KEY_CHARS]
    store = Store(home)
    path = store.path_for(key, name)
    path.mkdir()
    files = {"rootfs.ext4": rootfs, **kernel}
    for file_name, data in files.items():
        (path / file_name).write_bytes(data)
    if modules is not None:
        shutil.copytree(home / "modules-source", path / "modules")
    manifest: dict[str, Any] = {
        "format": 1,
        "name": name,
        "key": key,
        "image": {"reference": "registry.example/base/debian:bookworm", "platform": "linux/amd64"},
        "derivation": derivation,
        "outputs": {
            n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
            for n, d in sorted(files.items())
        },
        "tools": {"banger-build": "0.1.0"},
    }
    if modules_digest is not None:
        manifest["outputs"]["modules"] = {"sha256": modules_digest[0], "size": modules_digest[1]}
        derivation["kernel"]["modules"] = manifest["outputs"]["modules"]
        key = hashlib.sha256(canonical_json(derivation)).hexdigest()[:KEY_CHARS]
        manifest["key"] = key
        path = path.rename(store.path_for(key, name))
    if kernel_artifact:
        manifest["kernel_artifact"] = kernel_artifact
    write_manifest(path, manifest)
    make_read_only(path)
    entry = store.entry(path)
    if built_here:
        store.record(path, home / "recipe.toml")
    return entry


def bundle_bytes(entry: StoreEntry) -> bytes:
    """The imagecat bundle of ``entry``: zstd of a PAX tar of manifest.json, rootfs.ext4."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("manifest.json", "rootfs.ext4"):
            data = (entry.path / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor(level=3).compress(raw.getvalue())


def _push(remote: Remote, ref: Reference, data: bytes, directory: Path, media: str) -> Descriptor:
    digest = Digest(hashlib.sha256(data).hexdigest())
    path = directory / digest.hex
    path.write_bytes(data)
    remote.push_blob(ref, path, digest, len(data))
    return Descriptor(media, digest, len(data))


def artifact_manifest(
    entry: StoreEntry, config: Descriptor, bundle: Descriptor, files: dict[str, Descriptor]
) -> bytes:
    """The artifact manifest ``push`` would write for ``entry`` with these blobs."""
    outputs = entry.manifest()["outputs"]
    annotations = {
        artifact.CREATED: "2023-11-14T22:13:20Z",
        artifact.KEY: entry.key,
        artifact.NAME: entry.name,
        artifact.ARCH: "amd64",
        artifact.ROOTFS_SHA256: outputs["rootfs.ext4"]["sha256"],
        artifact.MANIFEST_SHA256: config.digest.hex,
        artifact.ZSTD: f"zstandard {zstandard.__version__}",
        artifact.ZSTD_PARAMS: "test bundle: zstd level 3",
    }
    kernel = [(n, files[n]) for n in artifact.KERNEL_TYPES if n in files]
    return artifact.manifest_bytes(
        config, (f"{entry.name}-{entry.key}.tar.zst", bundle), kernel, annotations
    )


def push_rootfs(
    remote: Remote, ref: Reference, entry: StoreEntry, scratch: Path, *, bundle: bytes | None = None
) -> Descriptor:
    """Push ``entry`` as a rootfs artifact under ``ref`` (its tag); its manifest's descriptor."""
    scratch.mkdir(parents=True, exist_ok=True)
    config = _push(remote, ref, (entry.path / "manifest.json").read_bytes(), scratch,
                   artifact.CONFIG_TYPE)  # fmt: skip
    layer = _push(remote, ref, bundle if bundle is not None else bundle_bytes(entry), scratch,
                  artifact.BUNDLE_TYPE)  # fmt: skip
    files = {}
    for n in sorted(os.listdir(entry.path)):
        if n in ("manifest.json", "rootfs.ext4"):
            continue
        if n == "modules":
            tar = io.BytesIO()
            write_modules_tar(entry.path / n, tar)
            data = tar.getvalue()
        else:
            data = (entry.path / n).read_bytes()
        files[n] = _push(remote, ref, data, scratch, artifact.KERNEL_TYPES[n])
    data = artifact_manifest(entry, config, layer, files)
    digest = remote.push_manifest(ref, data, OCI_MANIFEST)
    return Descriptor(OCI_MANIFEST, digest, len(data))
