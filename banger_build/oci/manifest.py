"""OCI / Docker image manifests: media types, descriptors and parsing.

Pure functions over bytes that were already verified against their digest;
no network. ``cached_manifest`` reads a manifest from the ``BlobCache``, so a
build whose image is pinned and cached needs neither the registry client nor
its HTTP stack (``banger_build.oci.remote`` imports oras and requests; this
module must not).

Parsing failures raise ``ManifestError`` with a ``RegistryError`` reason
(``invalid-manifest``, ``unsupported-media-type``, ``no-platform``); the
caller, who knows the reference, turns it into a ``RegistryError`` with
``error_for``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from banger_build.errors import Reason, RegistryError
from banger_build.oci.blobs import BlobCache
from banger_build.oci.reference import Digest, Platform, ReferenceSyntaxError

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


class ManifestError(Exception):
    """A manifest or index that cannot be used. ``reason`` is a RegistryError reason."""

    status: int | None = None  # never an HTTP failure; shaped like the registry's failures

    def __init__(self, message: str, *, reason: Reason) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason

    def error_for(self, reference: str) -> RegistryError:
        """This failure as the ``RegistryError`` for ``reference``."""
        return RegistryError(self.message, reference=reference, reason=self.reason)


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


def _descriptor(obj: object, what: str) -> Descriptor:
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
    config = _descriptor(body.get("config"), "config")
    if config.media_type not in CONFIG_TYPES:
        raise ManifestError(
            f"config media type {config.media_type} is not an image config "
            "(is this an artifact rather than a container image?)",
            reason=Reason.UNSUPPORTED_MEDIA_TYPE,
        )
    raw_layers = body.get("layers")
    if not isinstance(raw_layers, list):
        raise ManifestError("the manifest has no layers list", reason=Reason.INVALID_MANIFEST)
    layers = tuple(_descriptor(item, f"layer {i}") for i, item in enumerate(raw_layers))
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


def select_platform(index_digest: Digest, body: Mapping[str, Any], platform: Platform) -> Digest:
    """The digest of the first entry of image index ``body`` that matches ``platform``."""
    entries = body.get("manifests")
    if not isinstance(entries, list):
        raise ManifestError(
            f"image index {index_digest} has no manifests list", reason=Reason.INVALID_MANIFEST
        )
    available: list[str] = []
    for i, entry in enumerate(entries):
        desc = _descriptor(entry, f"index entry {i}")
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
        f"no image for platform {platform} (available: {listed})", reason=Reason.NO_PLATFORM
    )


# -- the cache -------------------------------------------------------------------


def cached_manifest(cache: BlobCache, digest: Digest) -> ImageManifest | None:
    """The image manifest ``digest`` from the blob cache (verified), or None if absent.

    No network. Raises ManifestError when the cached bytes are not a usable
    image manifest.
    """
    path = cache.get(digest)
    if path is None:
        return None
    return parse_image_manifest(digest, path.read_bytes())
