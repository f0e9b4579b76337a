"""OCI / Docker image manifests: media types, descriptors, parsing, size limits.

Pure functions over bytes that were already verified against their digest;
no network, no cache. Parsing failures raise ``ManifestError`` (a
``failure.Failure``) with a reason (``invalid-manifest``,
``unsupported-media-type``, ``no-platform``, ``too-many-layers``); the
boundary (``source``, ``remote``), which knows the reference, turns it into
a ``RegistryError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from banger_build.errors import Reason
from banger_build.oci.failure import Failure
from banger_build.oci.reference import Digest, Platform, ReferenceSyntaxError

# -- limits --------------------------------------------------------------------

#: bytes of one manifest or index: containerd's limit; real ones are a few KiB
MAX_MANIFEST = 4 << 20
#: bytes of an image (or kernel) config. Real configs are a few KiB, tens with a
#: long history; parsing costs up to ~26 bytes of memory per byte of JSON (a 4 MiB
#: config of empty objects takes ~106 MB, measured), so twice the manifest limit
#: would already cost a fifth of a GiB.
MAX_CONFIG = 4 << 20
#: layers of one image: Docker refuses images deeper than 125 layers and overlayfs
#: snapshotters mount ~128, so nothing runnable elsewhere is refused; a 4 MiB
#: manifest could otherwise list ~25,000 layers, each a download and a flatten pass.
MAX_LAYERS = 256
#: image indexes inside image indexes (one level is normal, two is rare)
MAX_INDEX_DEPTH = 4

# -- media types ---------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
#: the manifest media types a registry may answer with
ACCEPT = f"{OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST}, {DOCKER_LIST}"


# -- data ----------------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: dict[str, Any] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class ImageManifest:
    digest: Digest
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


class ManifestError(Failure):
    """A manifest, index or config that cannot be used (never an HTTP failure)."""


# -- parsing -------------------------------------------------------------------


def media_type_of(data: bytes, header: str | None) -> tuple[str, dict[str, Any]]:
    """The media type of manifest bytes (declared, else the Content-Type ``header``,
    else guessed from the fields) and the parsed JSON object."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ManifestError(
            "the manifest is not valid JSON", reason=Reason.INVALID_MANIFEST
        ) from None
    if not isinstance(body, dict):
        raise ManifestError("the manifest is not a JSON object", reason=Reason.INVALID_MANIFEST)
    if body.get("schemaVersion") == 1:
        raise ManifestError(
            "Docker image manifest schema 1 is not supported (deprecated since 2017; "
            "re-push the image with a current Docker)",
            reason=Reason.UNSUPPORTED_MEDIA_TYPE,
        )
    declared = body.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared, body
    if header:
        mt = header.split(";", 1)[0].strip()
        if mt in DOCKER_SCHEMA1:
            raise ManifestError(
                f"unsupported manifest media type {mt}", reason=Reason.UNSUPPORTED_MEDIA_TYPE
            )
        if mt and mt not in ("application/json", "application/octet-stream", "text/plain"):
            return mt, body
    if "manifests" in body:
        return OCI_INDEX, body
    if "config" in body and "layers" in body:
        return OCI_MANIFEST, body
    raise ManifestError(
        "cannot tell what kind of manifest this is (no mediaType)",
        reason=Reason.UNSUPPORTED_MEDIA_TYPE,
    )


def descriptor(obj: object, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise ManifestError(f"{what} is not a descriptor object", reason=Reason.INVALID_MANIFEST)
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestError(f"{what} has no mediaType", reason=Reason.INVALID_MANIFEST)
    if not isinstance(digest, str):
        raise ManifestError(f"{what} has no digest", reason=Reason.INVALID_MANIFEST)
    try:
        parsed = Digest.parse(digest)
    except ReferenceSyntaxError as exc:
        raise ManifestError(f"{what}: {exc}", reason=Reason.INVALID_MANIFEST) from None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ManifestError(f"{what} has an invalid size {size!r}", reason=Reason.INVALID_MANIFEST)
    platform = obj.get("platform")
    return Descriptor(media_type, parsed, size, platform if isinstance(platform, dict) else None)


def parse_image_manifest(digest: Digest, data: bytes, header: str | None = None) -> ImageManifest:
    """Parse verified image manifest bytes (``header``: the response's Content-Type).

    Raises ManifestError for an index, another kind of artifact, or a
    manifest this builder cannot use.
    """
    media_type, body = media_type_of(data, header)
    if media_type in INDEX_TYPES:
        raise ManifestError(
            f"{digest} is an image index, not an image manifest (resolve it for a platform)",
            reason=Reason.UNSUPPORTED_MEDIA_TYPE,
        )
    if media_type not in MANIFEST_TYPES:
        raise ManifestError(
            f"unsupported manifest media type {media_type}", reason=Reason.UNSUPPORTED_MEDIA_TYPE
        )
    if body.get("schemaVersion") != 2:
        raise ManifestError(
            f"unsupported schemaVersion {body.get('schemaVersion')!r}",
            reason=Reason.INVALID_MANIFEST,
        )
    config = descriptor(body.get("config"), "config")
    if config.media_type not in CONFIG_TYPES:
        raise ManifestError(
            f"config media type {config.media_type} is not an image config "
            "(is this an artifact rather than a container image?)",
            reason=Reason.UNSUPPORTED_MEDIA_TYPE,
        )
    raw_layers = body.get("layers")
    if not isinstance(raw_layers, list):
        raise ManifestError("the manifest has no layers list", reason=Reason.INVALID_MANIFEST)
    if len(raw_layers) > MAX_LAYERS:
        raise ManifestError(
            f"the image has {len(raw_layers)} layers, more than the limit of {MAX_LAYERS}",
            reason=Reason.TOO_MANY_LAYERS,
        )
    layers = tuple(descriptor(item, f"layer {i}") for i, item in enumerate(raw_layers))
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise ManifestError(
                f"layer {i} ({layer.digest}) has unsupported media type {layer.media_type}",
                reason=Reason.UNSUPPORTED_MEDIA_TYPE,
            )
    return ImageManifest(digest, media_type, config, layers)


def platform_text(spec: Mapping[str, object]) -> str:
    """An index entry's platform as ``os/architecture[/variant]``."""
    parts = [str(spec.get("os", "?")), str(spec.get("architecture", "?"))]
    if spec.get("variant"):
        parts.append(str(spec["variant"]))
    return "/".join(parts)


def select_platform(
    index_digest: Digest, body: Mapping[str, Any], platform: Platform, what: str = "image"
) -> Digest:
    """The digest of the first entry of image index ``body`` that matches ``platform``
    (``what`` the entries are, for the error: an image, a file)."""
    entries = body.get("manifests")
    if not isinstance(entries, list):
        raise ManifestError(
            f"image index {index_digest} has no manifests list", reason=Reason.INVALID_MANIFEST
        )
    available: list[str] = []
    for i, entry in enumerate(entries):
        desc = descriptor(entry, f"index entry {i}")
        spec = desc.platform or {}
        if desc.platform is not None:
            text = platform_text(spec)
            if text not in available:
                available.append(text)
        if desc.platform is not None and platform.matches(spec):
            if desc.media_type not in MANIFEST_TYPES | INDEX_TYPES:
                raise ManifestError(
                    f"index entry for {platform} has unsupported media type {desc.media_type}",
                    reason=Reason.UNSUPPORTED_MEDIA_TYPE,
                )
            return desc.digest
    listed = ", ".join(available) if available else "none"
    raise ManifestError(
        f"no {what} for platform {platform} (available: {listed})", reason=Reason.NO_PLATFORM
    )


def check_config_size(config: Descriptor) -> None:
    """Refuse a config descriptor larger than ``MAX_CONFIG`` before it is read."""
    if config.size > MAX_CONFIG:
        raise ManifestError(
            f"the config {config.digest} is {config.size} bytes, more than the limit of "
            f"{MAX_CONFIG} bytes",
            reason=Reason.TOO_LARGE,
        )


def parse_config(data: bytes) -> dict[str, Any]:
    """A config blob's JSON object (the bytes are verified and at most ``MAX_CONFIG``)."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(
            f"the config is not valid JSON: {exc}", reason=Reason.INVALID_CONFIG
        ) from None
    if not isinstance(body, dict):
        raise ManifestError("the config is not a JSON object", reason=Reason.INVALID_CONFIG)
    return body
