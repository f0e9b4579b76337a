"""The image source of a build: manifests, configs and blobs, cache first.

``Source`` is the one place that decides between the blob cache and the
registry: what the cache holds (verified on every read) is used without a
request; only what is missing, or a tag (which may move), is asked of the
registry. The ``remote.Remote`` -- and with it oras, requests and urllib3 --
is created on first need, so a build whose image is pinned and cached
imports no HTTP stack at all.

It is also the boundary for the cache's side: a manifest or config that
cannot be used (``manifest.ManifestError``), a limit (``MAX_MANIFEST``,
``MAX_CONFIG``, ``MAX_LAYERS``, ``MAX_INDEX_DEPTH``) or a failing cache
becomes, once, a ``RegistryError`` (or ``StoreError``) carrying the
reference. The remote's own failures arrive translated by it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger_build.errors import Reason
from banger_build.oci.blobs import BlobCache
from banger_build.oci.failure import Failure
from banger_build.oci.fileartifact import FileArtifact, parse_file_manifest
from banger_build.oci.kernel import KernelArtifact, parse_kernel_config, parse_kernel_manifest
from banger_build.oci.manifest import (
    INDEX_TYPES,
    MAX_CONFIG,
    MAX_INDEX_DEPTH,
    MAX_MANIFEST,
    Descriptor,
    ImageManifest,
    ManifestError,
    check_config_size,
    media_type_of,
    parse_config,
    parse_image_manifest,
    select_platform,
)
from banger_build.oci.options import RegistryOptions
from banger_build.oci.reference import Digest, Platform, Reference

if TYPE_CHECKING:  # imported on first use: oras and requests come with it
    from banger_build.oci.remote import Progress, Remote


class Source:
    """Images, kernel and file artifacts for one build, from ``cache`` or the registry;
    files named by URL, from ``cache`` or their URL."""

    def __init__(
        self,
        cache: BlobCache,
        options: RegistryOptions | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.cache = cache
        self.options = options or RegistryOptions()
        self.progress = progress
        self._remote: Remote | None = None

    def __repr__(self) -> str:
        return f"Source({self.cache!r})"

    @property
    def remote(self) -> Remote:
        """The registry client, created (and the HTTP stack imported) on first use."""
        if self.options.offline:
            raise Failure(
                "not in the blob cache, and --offline forbids asking a registry",
                reason=Reason.OFFLINE,
            )
        if self._remote is None:
            from banger_build.oci.remote import Remote

            self._remote = Remote(self.cache, self.options, self.progress)
        return self._remote

    @contextmanager
    def _boundary(self, ref: Reference) -> Iterator[None]:
        try:
            yield
        except Failure as exc:
            raise exc.error_for(str(ref)) from exc

    # -- names to digests
    def resolve(self, ref: Reference, platform: Platform) -> Digest:
        """The digest of ``ref``'s image manifest for ``platform``.

        A tag is always asked of the registry; a digest is read from the cache
        when it is there. Image indexes are followed to the platform's manifest,
        each one cache first.
        """
        with self._boundary(ref):
            if ref.digest is not None:
                digest, data, header = self._manifest_bytes(ref, ref.digest)
            else:
                assert ref.tag is not None  # a Reference has a tag or a digest
                digest, data, header = self.remote.manifest(ref, ref.tag, None)
            for _ in range(MAX_INDEX_DEPTH):
                media_type, body = media_type_of(data, header)
                if media_type not in INDEX_TYPES:
                    parse_image_manifest(digest, data, header)
                    return digest
                digest, data, header = self._manifest_bytes(
                    ref, select_platform(digest, body, platform)
                )
            raise ManifestError(
                f"image indexes nest more than {MAX_INDEX_DEPTH} deep",
                reason=Reason.INVALID_MANIFEST,
            )

    def digest(self, ref: Reference) -> Digest:
        """The digest of the manifest ``ref`` names: its own digest, else the one its
        tag points to now (asked of the registry). Whatever kind of manifest it is."""
        if ref.digest is not None:
            return ref.digest
        assert ref.tag is not None
        with self._boundary(ref):
            return self.remote.manifest(ref, ref.tag, None)[0]

    # -- images
    def manifest(self, ref: Reference, digest: Digest) -> ImageManifest:
        """The image manifest ``digest`` (at most ``MAX_LAYERS`` layers)."""
        with self._boundary(ref):
            digest, data, header = self._manifest_bytes(ref, digest)
            return parse_image_manifest(digest, data, header)

    def config(self, ref: Reference, manifest: ImageManifest) -> dict[str, Any]:
        """The image's config, a JSON object of at most ``MAX_CONFIG`` bytes."""
        with self._boundary(ref):
            return parse_config(self._config_bytes(ref, manifest.config))

    def blob(self, ref: Reference, desc: Descriptor) -> Path:
        """The path of the verified blob ``desc`` in the cache, downloaded if missing."""
        path = self.cache.get(desc.digest, desc.size)
        if path is not None:
            return path
        with self._boundary(ref):
            if self.options.offline:  # say which blob
                raise Failure(
                    f"{desc.digest} is not in the blob cache (or was damaged there), and "
                    "--offline forbids asking a registry",
                    reason=Reason.OFFLINE,
                )
            return self.remote.blob(ref, desc)

    # -- kernel artifacts
    def kernel(self, ref: Reference, digest: Digest) -> KernelArtifact:
        """The kernel artifact whose manifest is ``digest``."""
        with self._boundary(ref):
            digest, data, _ = self._manifest_bytes(ref, digest)
            return parse_kernel_manifest(digest, data)

    def kernel_version(self, ref: Reference, artifact: KernelArtifact) -> str:
        """The modules version a kernel artifact's config records ('' for none)."""
        with self._boundary(ref):
            return parse_kernel_config(self._config_bytes(ref, artifact.config))

    # -- file artifacts and URLs
    def file(self, ref: Reference, digest: Digest, platform: Platform) -> FileArtifact:
        """The file artifact ``digest`` names: a file artifact's manifest, or an image
        index of them, whose entry for ``platform`` is taken."""
        with self._boundary(ref):
            digest, data, header = self._manifest_bytes(ref, digest)
            media_type, body = media_type_of(data, header)
            if media_type not in INDEX_TYPES:
                return parse_file_manifest(digest, data)
            index = digest
            entry = select_platform(index, body, platform, "file")
            digest, data, _ = self._manifest_bytes(ref, entry)
            return parse_file_manifest(digest, data, index)

    def url(self, url: str, digest: Digest, limit: int) -> Path:
        """The path of the verified blob ``digest`` in the cache, downloaded from ``url``
        (at most ``limit`` bytes) if missing. Errors name the URL."""
        path = self.cache.get(digest)
        if path is not None:
            return path
        try:
            if self.options.offline:
                raise Failure(
                    "not in the blob cache, and --offline forbids downloading it",
                    reason=Reason.OFFLINE,
                )
            from banger_build.oci.url import fetch_url

            return fetch_url(url, digest, self.cache, self.options, limit, self.progress)
        except Failure as exc:
            raise exc.error_for(url) from exc

    # -- cache first
    def _manifest_bytes(self, ref: Reference, digest: Digest) -> tuple[Digest, bytes, str | None]:
        data = self.cache.read(digest, limit=MAX_MANIFEST)
        if data is not None:
            return digest, data, None
        return self.remote.manifest(ref, str(digest), digest)

    def _config_bytes(self, ref: Reference, desc: Descriptor) -> bytes:
        check_config_size(desc)
        data = self.cache.read(desc.digest, desc.size, limit=MAX_CONFIG)
        if data is None:
            self.remote.blob(ref, desc)
            data = self.cache.read(desc.digest, desc.size, limit=MAX_CONFIG)
        if data is None:
            raise Failure(
                f"{desc.digest} vanished from the blob cache {self.cache.root} as it was "
                "downloaded",
                reason=Reason.BLOB_CACHE,
            )
        return data
