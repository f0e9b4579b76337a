"""A store path as an OCI 1.1 artifact: what ``banger-build push`` publishes and
substitution reads.

One OCI image manifest per store path, canonical JSON (sorted keys, no
spaces), so every builder of a key pushes the same digest::

    artifactType  application/vnd.banger.rootfs.v1
    config        the store path's manifest.json, its exact bytes
                  (application/vnd.banger.rootfs.manifest.v1+json)
    layers        the bundle (``bundle.py``), application/vnd.banger.rootfs.bundle.v1.tar+zstd,
                  then the staged kernel files, in this order, each titled
                  (org.opencontainers.image.title) with the name it is staged under:
                    vmlinux          application/vnd.banger.kernel.image.v1
                    initrd.img       application/vnd.banger.kernel.initrd.v1
                    modules          application/vnd.banger.kernel.modules.v1.tar
                                     (a directory: ``kernel.write_modules_tar``'s tar)
                    modules.tar      application/vnd.banger.kernel.modules.v1.tar
                    modules.tar.gz, modules.tgz, modules.tar.zst, modules.tar.xz
                                     ...modules.v1.tar+gzip, +zstd, +xz (the file as staged)
                  (the kernel media types are those of ``kernel push`` artifacts)
    annotations   org.opencontainers.image.created  the build's epoch, RFC 3339 UTC
                  dev.banger.store.key              the store key
                  dev.banger.name                   the store path's name
                  dev.banger.arch                   the platform's architecture
                  dev.banger.rootfs.sha256          raw sha256 (hex) of rootfs.ext4
                  dev.banger.manifest.sha256        raw sha256 (hex) of manifest.json
                  dev.banger.bundle.zstd            the zstandard and libzstd versions
                  dev.banger.bundle.params          the bundle's format and zstd parameters

Tags: ``sk-<key>`` (``key_tag``) names the artifact of a key; a human tag may
name it too. Pure functions over bytes; no network. Parsing failures are
``manifest.ManifestError``s, for the boundary to name the reference.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from banger_build.errors import Reason
from banger_build.oci.kernel import LAYERS, TITLE
from banger_build.oci.manifest import (
    MAX_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    ManifestError,
    descriptor,
    media_type_of,
)
from banger_build.oci.reference import Digest

ARTIFACT_TYPE = "application/vnd.banger.rootfs.v1"
CONFIG_TYPE = "application/vnd.banger.rootfs.manifest.v1+json"
BUNDLE_TYPE = "application/vnd.banger.rootfs.bundle.v1.tar+zstd"
_MODULES = LAYERS["modules.tar"]
#: staged kernel file name -> layer media type, in manifest order
KERNEL_TYPES: dict[str, str] = {
    "vmlinux": LAYERS["vmlinux"],
    "initrd.img": LAYERS["initrd.img"],
    "modules": _MODULES,
    "modules.tar": _MODULES,
    "modules.tar.gz": f"{_MODULES}+gzip",
    "modules.tgz": f"{_MODULES}+gzip",
    "modules.tar.zst": f"{_MODULES}+zstd",
    "modules.tar.xz": f"{_MODULES}+xz",
}
#: the bundle, a kernel image, an initrd and one modules layer
MAX_LAYERS = 4

CREATED = "org.opencontainers.image.created"
KEY = "dev.banger.store.key"
NAME = "dev.banger.name"
ARCH = "dev.banger.arch"
ROOTFS_SHA256 = "dev.banger.rootfs.sha256"
MANIFEST_SHA256 = "dev.banger.manifest.sha256"
ZSTD = "dev.banger.bundle.zstd"
ZSTD_PARAMS = "dev.banger.bundle.params"
REQUIRED = (CREATED, KEY, NAME, ARCH, ROOTFS_SHA256, MANIFEST_SHA256, ZSTD, ZSTD_PARAMS)
#: the longest annotation value read back (a name, versions, parameters)
MAX_ANNOTATION = 1024

_KEY = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def key_tag(key: str) -> str:
    """The tag naming the artifact of store key ``key``."""
    return f"sk-{key}"


@dataclass(frozen=True)
class RootfsArtifact:
    digest: Digest
    config: Descriptor  # manifest.json
    bundle: Descriptor
    kernel: dict[str, Descriptor]  # staged name -> layer, in manifest order
    annotations: dict[str, str]

    @property
    def key(self) -> str:
        return self.annotations[KEY]

    @property
    def rootfs_sha256(self) -> str:
        return self.annotations[ROOTFS_SHA256]

    @property
    def manifest_sha256(self) -> str:
        return self.annotations[MANIFEST_SHA256]


def _desc(d: Descriptor, title: str | None = None) -> dict[str, object]:
    out: dict[str, object] = {"mediaType": d.media_type, "digest": str(d.digest), "size": d.size}
    if title is not None:
        out["annotations"] = {TITLE: title}
    return out


def manifest_bytes(
    config: Descriptor,
    bundle: tuple[str, Descriptor],
    kernel: list[tuple[str, Descriptor]],
    annotations: dict[str, str],
) -> bytes:
    """The artifact's manifest, canonical JSON: same inputs, same bytes, same digest.
    ``bundle`` and ``kernel`` are (title, layer) pairs; kernel files in ``KERNEL_TYPES``
    order."""
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": _desc(config),
        "layers": [_desc(bundle[1], bundle[0]), *(_desc(d, name) for name, d in kernel)],
        "annotations": dict(sorted(annotations.items())),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _bad(what: str, reason: Reason = Reason.INVALID_MANIFEST) -> ManifestError:
    return ManifestError(what, reason=reason)


def _annotations(body: dict[str, object]) -> dict[str, str]:
    raw = body.get("annotations")
    if not isinstance(raw, dict):
        raise _bad("the artifact has no annotations")
    found: dict[str, str] = {}
    for name in REQUIRED:
        value = raw.get(name)
        if not isinstance(value, str) or not value or len(value) > MAX_ANNOTATION:
            raise _bad(f"the annotation {name} is missing or malformed")
        found[name] = value
    if not _KEY.fullmatch(found[KEY]):
        raise _bad(f"the annotation {KEY} is not a store key")
    for name in (ROOTFS_SHA256, MANIFEST_SHA256):
        if not _SHA256.fullmatch(found[name]):
            raise _bad(f"the annotation {name} is not a sha256")
    return found


def _title(item: object) -> str | None:
    notes = item.get("annotations") if isinstance(item, dict) else None
    title = notes.get(TITLE) if isinstance(notes, dict) else None
    return title if isinstance(title, str) else None


def parse_rootfs_manifest(digest: Digest, data: bytes) -> RootfsArtifact:
    """Parse verified manifest bytes of a rootfs artifact, strictly; ManifestError
    for anything else (another artifact, an image, a malformed or oversized one)."""
    media_type, body = media_type_of(data, None)
    if media_type != OCI_MANIFEST or body.get("schemaVersion") != 2:
        raise _bad(f"{digest} is a {media_type}, not an OCI image manifest")
    if body.get("artifactType") != ARTIFACT_TYPE:
        raise _bad(
            f"{digest} is not a banger rootfs artifact (artifactType "
            f"{str(body.get('artifactType'))[:100]!r})",
            Reason.UNSUPPORTED_MEDIA_TYPE,
        )
    config = descriptor(body.get("config"), "config")
    if config.media_type != CONFIG_TYPE:
        raise _bad(f"the config media type is {config.media_type[:100]}, not {CONFIG_TYPE}")
    if config.size > MAX_CONFIG:
        raise _bad(
            f"the config is {config.size} bytes, more than the limit of {MAX_CONFIG}",
            Reason.TOO_LARGE,
        )
    raw = body.get("layers")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_LAYERS:
        count = len(raw) if isinstance(raw, list) else "no list of"
        raise _bad(
            f"the artifact has {count} layers, not 1 to {MAX_LAYERS}", Reason.TOO_MANY_LAYERS
        )
    bundle = descriptor(raw[0], "layer 0")
    if bundle.media_type != BUNDLE_TYPE:
        raise _bad(f"layer 0 is a {bundle.media_type[:100]}, not the bundle ({BUNDLE_TYPE})")
    kernel: dict[str, Descriptor] = {}
    for i, item in enumerate(raw[1:], 1):
        layer, title = descriptor(item, f"layer {i}"), _title(item)
        if title not in KERNEL_TYPES or KERNEL_TYPES[title] != layer.media_type:
            raise _bad(f"layer {i} ({layer.media_type[:100]}, {str(title)[:100]!r}) is unknown")
        if title in kernel or (title.startswith("modules") and any(
            n.startswith("modules") for n in kernel
        )):  # fmt: skip
            raise _bad(f"layer {i} repeats a kernel file ({title})")
        kernel[title] = layer
    annotations = _annotations(body)
    if annotations[MANIFEST_SHA256] != config.digest.hex:
        raise _bad(
            f"the config is {config.digest}, the annotations say manifest.json is "
            f"sha256:{annotations[MANIFEST_SHA256]}"
        )
    return RootfsArtifact(digest, config, bundle, kernel, annotations)


__all__ = [
    "ARTIFACT_TYPE",
    "BUNDLE_TYPE",
    "CONFIG_TYPE",
    "KERNEL_TYPES",
    "MAX_LAYERS",
    "RootfsArtifact",
    "key_tag",
    "manifest_bytes",
    "parse_rootfs_manifest",
]
