"""One file as an OCI artifact: what ``banger-build file push`` publishes and a
recipe's ``[[files]] ref`` (or ``[guest] agent_ref``) builds from.

One OCI image manifest (``artifactType`` ``application/vnd.banger.file.v1``)
with the OCI empty config (``{}``) and one layer, the file's bytes as they are::

    layer   application/vnd.banger.file.content.v1
            annotations: org.opencontainers.image.title  the file's name
                         vnd.banger.file.mode            "0755" or "0644" (git's modes)

The layer's digest is the sha256 of the file: what the derivation holds for a
file input, whether it comes from ``src``, ``ref`` or ``url``. A manifest
without our artifactType is taken too when it is plainly one file (one layer,
a config that is not an image config, as ``oras push FILE`` makes); its mode
is then what the recipe says (else 0644).

Several platforms (the guest agent per architecture) are an OCI image index
of such manifests, each entry with its platform, under one tag: ``file push
--platform`` adds or replaces the entry of its platform (``merge_index``),
and a recipe takes the entry of its own platform.

Pure functions over bytes; no network. Failures are ``manifest.ManifestError``s,
for the boundary (``source``) to name the reference.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from banger_build.errors import Reason
from banger_build.oci.manifest import (
    CONFIG_TYPES,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ManifestError,
    descriptor,
    media_type_of,
    platform_text,
)
from banger_build.oci.reference import Digest, Platform

ARTIFACT_TYPE = "application/vnd.banger.file.v1"
LAYER_TYPE = "application/vnd.banger.file.content.v1"
#: OCI 1.1's empty descriptor: the config of an artifact that needs none
EMPTY_CONFIG_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
TITLE = "org.opencontainers.image.title"
MODE = "vnd.banger.file.mode"
MODES = {"0755": True, "0644": False}  # annotation -> executable
#: a file's name in the artifact: one path component (what it is called, not where it goes)
MAX_NAME = 255


@dataclass(frozen=True)
class FileArtifact:
    """The file a manifest holds: its layer (digest = the file's sha256, size)."""

    digest: Digest  # the manifest's
    layer: Descriptor
    name: str  # the title annotation ('' if none)
    executable: bool | None  # from the mode annotation; None: the artifact does not say
    index: Digest | None = None  # the image index it was selected from, if any


def check_name(name: str) -> str | None:
    """What is wrong with ``name`` as a file's name in an artifact, or None."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        return f"invalid file name {name!r} (one path component)"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        return f"file name is longer than {MAX_NAME} bytes"
    return None


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _desc(d: Descriptor) -> dict[str, Any]:
    return {"mediaType": d.media_type, "digest": str(d.digest), "size": d.size}


def empty_config() -> Descriptor:
    digest = Digest(hashlib.sha256(EMPTY_CONFIG).hexdigest())
    return Descriptor(EMPTY_CONFIG_TYPE, digest, len(EMPTY_CONFIG))


def manifest_bytes(layer: Descriptor, name: str, executable: bool) -> bytes:
    """The artifact's manifest, canonical JSON (the same file, name and mode: the same
    digest, wherever and whenever it is pushed)."""
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": _desc(empty_config()),
        "layers": [
            {
                **_desc(layer),
                "annotations": {TITLE: name, MODE: "0755" if executable else "0644"},
            }
        ],
    }
    return _canonical(body)


def index_entry(digest: Digest, size: int, platform: Platform) -> dict[str, Any]:
    spec: dict[str, Any] = {"os": platform.os, "architecture": platform.architecture}
    if platform.variant:
        spec["variant"] = platform.variant
    return {
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "digest": str(digest),
        "size": size,
        "platform": spec,
    }


def merge_index(current: bytes | None, entry: dict[str, Any]) -> bytes:
    """The image index ``current`` (None: none yet) with ``entry`` in place of the
    entry of its platform; entries sorted by platform, canonical JSON."""
    entries: list[dict[str, Any]] = []
    if current is not None:
        media_type, body = media_type_of(current, None)
        if media_type not in INDEX_TYPES:
            raise ManifestError(
                "the tag names a single artifact, not an index of platforms",
                reason=Reason.UNSUPPORTED_MEDIA_TYPE,
            )
        raw = body.get("manifests")
        if not isinstance(raw, list):
            raise ManifestError("the index has no manifests list", reason=Reason.INVALID_MANIFEST)
        for i, item in enumerate(raw):
            desc = descriptor(item, f"index entry {i}")
            if desc.platform is None:
                raise ManifestError(
                    f"index entry {i} ({desc.digest}) has no platform",
                    reason=Reason.INVALID_MANIFEST,
                )
            assert isinstance(item, dict)
            entries.append(item)
    new = platform_text(entry["platform"])
    kept = [e for e in entries if platform_text(e["platform"]) != new]
    merged = sorted([*kept, entry], key=lambda e: platform_text(e["platform"]))
    return _canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": merged})


def parse_file_manifest(digest: Digest, data: bytes, index: Digest | None = None) -> FileArtifact:
    """Parse verified manifest bytes of a file artifact; ManifestError otherwise."""
    media_type, body = media_type_of(data, None)
    hint = "push one with `banger-build file push`"
    if media_type != OCI_MANIFEST:
        raise ManifestError(
            f"{digest} is a {media_type}, not a file artifact ({hint})",
            reason=Reason.UNSUPPORTED_MEDIA_TYPE,
        )
    config = descriptor(body.get("config"), "config")
    raw = body.get("layers")
    if not isinstance(raw, list):
        raise ManifestError("the manifest has no layers list", reason=Reason.INVALID_MANIFEST)
    ours = body.get("artifactType") == ARTIFACT_TYPE
    if not ours and (config.media_type in CONFIG_TYPES or len(raw) != 1):
        kind = "a container image" if config.media_type in CONFIG_TYPES else f"{len(raw)} files"
        raise ManifestError(
            f"{digest} is not a file artifact (artifactType {body.get('artifactType')!r}, "
            f"{kind}; {hint})",
            reason=Reason.UNSUPPORTED_MEDIA_TYPE,
        )
    if len(raw) != 1:
        raise ManifestError(
            f"the file artifact has {len(raw)} layers, not one", reason=Reason.INVALID_MANIFEST
        )
    layer = descriptor(raw[0], "layer 0")
    if ours and layer.media_type != LAYER_TYPE:
        raise ManifestError(
            f"layer 0 ({layer.digest}) has media type {layer.media_type}, not {LAYER_TYPE}",
            reason=Reason.UNSUPPORTED_MEDIA_TYPE,
        )
    notes = raw[0].get("annotations") if isinstance(raw[0], dict) else None
    notes = notes if isinstance(notes, dict) else {}
    name = notes.get(TITLE, "")
    name = name if isinstance(name, str) else ""
    mode = notes.get(MODE)
    if mode is not None and mode not in MODES:
        raise ManifestError(
            f"layer 0 has mode {mode!r}: expected one of {', '.join(MODES)}",
            reason=Reason.INVALID_MANIFEST,
        )
    executable = MODES[mode] if isinstance(mode, str) else None
    return FileArtifact(digest, layer, name, executable, index)


__all__ = [
    "ARTIFACT_TYPE",
    "EMPTY_CONFIG",
    "EMPTY_CONFIG_TYPE",
    "LAYER_TYPE",
    "FileArtifact",
    "check_name",
    "empty_config",
    "index_entry",
    "manifest_bytes",
    "merge_index",
    "parse_file_manifest",
]
