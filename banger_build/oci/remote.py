"""The registry client: manifests and blobs from a registry, pushes to it.

``Remote`` always asks the network (``source.Source`` decides whether it
needs to): it GETs a manifest by tag or digest and verifies its bytes, streams
a blob into the ``BlobCache`` (temp file, verify, rename), and pushes blobs
and manifests. Every byte is checked against a digest we already trust:
the one asked for, else the ``Docker-Content-Digest`` header of a tag.

For OCI 1.1 referrers (signatures, see ``referrers``) it also pushes small
blobs from memory, pushes a manifest with a ``subject`` (reporting the
registry's ``OCI-Subject`` answer) and asks the referrers API, whose 404
means "no such API" (the tag-schema fallback applies).

Endpoints: mirrors configured for a registry host (``options``) are tried
in order, then the host itself; an error names every attempt. Plain HTTP is
allowed only to loopback hosts and hosts listed as insecure; a plain-HTTP
mirror elsewhere is refused (reason ``insecure``). Docker Hub is
``https://registry-1.docker.io``.

Pushes upload only what the registry lacks (a HEAD first). A blob larger than
``chunk_size`` goes up in chunks (OCI's chunked upload: POST, a PATCH per
chunk with its ``Content-Range``, each to the ``Location`` the previous answer
gave, then a PUT with the digest), streamed from its file; a registry that
refuses the first chunk gets the blob in one PUT instead, and an upload whose
session the registry lost mid-way (a chunk answered 404 or 416, e.g. after
an answer was lost and the chunk sent again) starts over once.

The boundary: each endpoint's attempt turns every ``failure.Failure`` from
below (``transport``, ``auth``, ``blobs``) into the user's error with the
reference, once -- a ``RegistryError`` (with the HTTP status when there was
one), or a ``StoreError`` when the blob cache's own files fail. Credentials
never appear in messages or reprs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar, cast

import oras.utils
import requests

from banger_build.errors import InputError, Reason, RegistryError
from banger_build.fsutil import hash_file
from banger_build.oci.auth import Auth
from banger_build.oci.blobs import BlobCache, BlobMismatch, CacheError
from banger_build.oci.failure import Failure
from banger_build.oci.manifest import ACCEPT, MAX_MANIFEST, OCI_INDEX, Descriptor
from banger_build.oci.options import RegistryOptions, plain_http_allowed
from banger_build.oci.reference import (
    DOCKER_HUB,
    DOCKER_HUB_API,
    Digest,
    Reference,
    ReferenceSyntaxError,
)
from banger_build.oci.transport import Endpoint
from banger_build.oci.wire import CHUNK, WireError

T = TypeVar("T")
#: answers to GET /v2/<repo>/referrers/<digest> from a registry without the API: 404
#: as the spec says (distribution 2.8), or the "unsupported" statuses some proxies give
NO_REFERRERS_API = frozenset({400, 404, 405, 501})
#: (short name, bytes done, bytes in all or None)
Progress = Callable[[str, int, int | None], None]

#: blobs larger than this are uploaded in chunks of this size (ECR wants >= 5 MiB
#: chunks, a proxy in front of a registry may limit a request's body: 32 MiB fits both)
UPLOAD_CHUNK = 32 << 20
#: answers to the first chunk that mean "no chunked uploads here": go monolithic
CHUNKS_REFUSED = frozenset({400, 404, 405, 415, 416, 501})
#: answers to a later chunk that mean the registry lost the session: start over, once
SESSION_LOST = frozenset({404, 416})


class _Window:
    """``size`` bytes of ``f`` from ``start``, as a file (read, seek and tell within
    the window): one chunk's request body, replayable by ``Endpoint.exchange``."""

    def __init__(self, f: IO[bytes], start: int, size: int) -> None:
        self._f = f
        self._start = start
        self._size = size
        self._pos = 0
        f.seek(start)

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._pos
        data = self._f.read(left if n is None or n < 0 else min(n, left))
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        assert whence == 0, "only absolute seeks"
        self._pos = min(max(offset, 0), self._size)
        self._f.seek(self._start + self._pos)
        return self._pos

    def tell(self) -> int:
        return self._pos


class _SessionLost(Exception):
    """The registry no longer knows the upload session (a chunk answered 404 or 416)."""


class _ProgressReader:
    """A file wrapper streamed as a request body, reporting bytes sent (per MiB).

    It has ``read`` but no ``__iter__``, so requests and http.client send it
    in small blocks with the Content-Length we give, never reading it whole.
    """

    def __init__(self, f: IO[bytes], size: int, report: Callable[[int], None]) -> None:
        self._f = f
        self._size = size
        self._report = report
        self._done = 0
        self._reported = -1

    def read(self, n: int = -1) -> bytes:
        chunk = self._f.read(min(n, CHUNK) if n and n > 0 else CHUNK)
        self._done += len(chunk)
        if self._done - self._reported >= CHUNK or (not chunk and self._reported < self._done):
            self._reported = self._done
            self._report(self._done)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = self._f.seek(offset, whence)
        self._done = pos
        self._reported = -1
        return pos

    def tell(self) -> int:
        return self._f.tell()

    def __len__(self) -> int:
        return self._size


def _ok(ep: Endpoint, what: str, *statuses: int) -> Callable[[requests.Response], None]:
    def check(resp: requests.Response) -> None:
        if resp.status_code not in statuses:
            raise ep.fail(resp, what)

    return check


class Remote:
    """Pull (and push) images, verifying every byte, through mirrors and oras."""

    def __init__(
        self,
        cache: BlobCache,
        options: RegistryOptions | None = None,
        progress: Progress | None = None,
        *,
        chunk_size: int = UPLOAD_CHUNK,
    ) -> None:
        self.cache = cache
        self.options = options or RegistryOptions()
        self.progress = progress
        self.chunk_size = max(1, chunk_size)
        self._auth = Auth(self.options)
        self._endpoints: dict[tuple[str, str], Endpoint] = {}

    def __repr__(self) -> str:
        return f"Remote({self.cache!r})"

    # -- endpoints
    @staticmethod
    def upstream_url(host: str, insecure: frozenset[str] = frozenset()) -> str:
        if host == DOCKER_HUB:
            return f"https://{DOCKER_HUB_API}"
        scheme = "http" if plain_http_allowed(host, insecure) else "https"
        return f"{scheme}://{host}"

    def endpoint_urls(self, ref: Reference, *, push: bool = False) -> list[str]:
        """Base URLs tried for ``ref``, in order (mirrors, then the registry)."""
        urls = [] if push else list(self.options.mirrors.get(ref.registry, ()))
        for url in urls:
            netloc = urllib.parse.urlsplit(url).netloc
            if url.startswith("http://") and not plain_http_allowed(netloc, self.options.insecure):
                raise RegistryError(
                    f"refusing plain HTTP to mirror {url}: only loopback hosts and insecure "
                    f"registries may use http:// (add --insecure-registry {netloc} to allow it)",
                    reference=str(ref),
                    reason=Reason.INSECURE,
                )
        if self.options.mirror_only and not push:
            if not urls:
                raise RegistryError(
                    f"--mirror-only: no mirror is configured for {ref.registry} "
                    f"(--mirror {ref.registry}=URL)",
                    reference=str(ref),
                    reason=Reason.NO_MIRROR,
                )
            return urls
        upstream = self.upstream_url(ref.registry, self.options.insecure)
        if upstream not in urls:
            urls.append(upstream)
        return urls

    def _endpoint(self, base: str, ref: Reference) -> Endpoint:
        is_upstream = base == self.upstream_url(ref.registry, self.options.insecure)
        cred_host = ref.registry if is_upstream else urllib.parse.urlsplit(base).netloc
        key = (base, cred_host)
        ep = self._endpoints.get(key)
        if ep is None:
            ep = Endpoint(base, cred_host, self._auth, self.options)
            self._endpoints[key] = ep
        return ep

    def _attempt(self, ref: Reference, base: str, op: Callable[[Endpoint], T]) -> T:
        """Run ``op`` on one endpoint: the boundary, where failures get the reference."""
        try:
            return op(self._endpoint(base, ref))
        except BlobMismatch as exc:
            raise RegistryError(
                f"{base} served content that does not match its digest: {exc.message}",
                reference=str(ref),
                reason=exc.reason,
            ) from exc
        except Failure as exc:
            raise exc.error_for(str(ref)) from exc

    def _each(self, ref: Reference, op: Callable[[Endpoint], T], *, push: bool = False) -> T:
        """Try ``op`` on each endpoint in order; an error names every attempt."""
        errors: list[tuple[str, RegistryError]] = []
        for base in self.endpoint_urls(ref, push=push):
            try:
                return self._attempt(ref, base, op)
            except RegistryError as exc:
                errors.append((base, exc))
        if len(errors) == 1:
            raise errors[0][1]
        prefix = f"{ref}: "
        lines = []
        for base, error in errors:
            lines.append(f"  {base}: {str(error).removeprefix(prefix)}")
        last = errors[-1][1]
        raise RegistryError(
            f"every endpoint failed ({len(errors)} tried):\n" + "\n".join(lines),
            reference=str(ref),
            status=last.status,
            reason=last.reason,
        ) from last

    def _report(self, name: str, done: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(name, done, total)

    # -- manifests
    def manifest(
        self,
        ref: Reference,
        target: str,
        expect: Digest | None,
        *,
        limit: int = MAX_MANIFEST,
        upstream: bool = False,
    ) -> tuple[Digest, bytes, str | None]:
        """GET the manifest ``target`` (a tag or a digest) of ``ref``'s repository.

        The bytes (at most ``limit``) are verified against ``expect``, else
        against the ``Docker-Content-Digest`` header when there is one, and
        kept in the cache as they were hashed. Returns their digest, the
        bytes and the response's Content-Type. ``upstream``: ask the registry
        itself, never a mirror (a read before a write).
        """

        def op(ep: Endpoint) -> tuple[Digest, bytes, str | None]:
            url = ep.url(ep.container(ref.repository).manifest_url(target))
            what = f"GET manifest {target} from {ep.base}"

            def handle(resp: requests.Response) -> tuple[bytes, str, str | None]:
                if resp.status_code != 200:
                    raise ep.fail(resp, what)
                data = ep.read(resp, limit, f"manifest {target}")
                header = str(resp.headers.get("Docker-Content-Digest", "")).strip()
                return data, header, resp.headers.get("Content-Type")

            data, header, content_type = ep.exchange("GET", url, handle, headers={"Accept": ACCEPT})
            actual = Digest(hashlib.sha256(data).hexdigest())
            wanted = expect
            if wanted is None and header.startswith("sha256:"):
                try:
                    wanted = Digest.parse(header)
                except ReferenceSyntaxError:
                    raise WireError(
                        f"invalid Docker-Content-Digest header {header!r}", reason=Reason.PROTOCOL
                    ) from None
            if wanted is not None and actual != wanted:
                raise BlobMismatch(wanted, actual, len(data))
            self.cache.put_bytes(actual, data)
            return actual, data, content_type

        return self._each(ref, op, push=upstream)

    def manifest_digest(self, ref: Reference, target: str) -> Digest | None:
        """The digest of manifest ``target`` (a tag) in ``ref``'s repository, from a
        HEAD (no body), or None when the registry has no such manifest. Only the
        registry's claim: fetch by this digest to trust the content. A registry that
        sends no valid ``Docker-Content-Digest`` on HEAD is asked with a GET, whose
        bytes are hashed. The registry itself is asked, never a mirror."""

        def op(ep: Endpoint) -> tuple[bool, str]:
            url = ep.url(ep.container(ref.repository).manifest_url(target))

            def handle(resp: requests.Response) -> tuple[bool, str]:
                if resp.status_code == 404:
                    return False, ""
                if resp.status_code != 200:
                    raise ep.fail(resp, f"HEAD manifest {target} on {ep.base}")
                return True, str(resp.headers.get("Docker-Content-Digest", "")).strip()

            return ep.exchange("HEAD", url, handle, headers={"Accept": ACCEPT})

        found, header = self._each(ref, op, push=True)
        if not found:
            return None
        try:
            return Digest.parse(header)
        except ReferenceSyntaxError:
            pushed = Reference(ref.registry, ref.repository, target)
            return self._each(ref, lambda ep: self._get_digest(ep, pushed, target), push=True)

    def _get_digest(self, ep: Endpoint, ref: Reference, target: str) -> Digest:
        url = ep.url(ep.container(ref.repository).manifest_url(target))

        def handle(resp: requests.Response) -> bytes:
            if resp.status_code != 200:
                raise ep.fail(resp, f"GET manifest {target} from {ep.base}")
            return ep.read(resp, MAX_MANIFEST, f"manifest {target}")

        data = ep.exchange("GET", url, handle, headers={"Accept": ACCEPT})
        return Digest(hashlib.sha256(data).hexdigest())

    # -- blobs
    def blob(self, ref: Reference, desc: Descriptor) -> Path:
        """Download ``desc`` into the cache (verified) and return its path there."""
        name = desc.digest.short

        def op(ep: Endpoint) -> Path:
            url = ep.url(ep.container(ref.repository).get_blob_url(str(desc.digest)))

            def handle(resp: requests.Response) -> Path:
                if resp.status_code != 200:
                    raise ep.fail(resp, f"GET blob {desc.digest} from {ep.base}")
                length = str(resp.headers.get("Content-Length", ""))
                if length.isdigit() and int(length) != desc.size:
                    raise WireError(
                        f"blob {desc.digest} is {length} bytes on {ep.base}, "
                        f"the manifest says {desc.size}",
                        reason=Reason.DIGEST_MISMATCH,
                    )
                self._report(name, 0, desc.size)

                def chunks() -> Iterator[bytes]:
                    done = 0
                    for chunk in ep.body(resp):
                        done += len(chunk)
                        self._report(name, done, desc.size)
                        yield chunk

                return self.cache.put_stream(desc.digest, chunks(), desc.size)

            return ep.exchange("GET", url, handle)

        return self._each(ref, op)

    # -- push
    def push_blob(self, ref: Reference, path: Path, digest: Digest, size: int) -> bool:
        """Upload ``path`` as blob ``digest`` unless the registry has it (HEAD first);
        True when it was uploaded. Chunked past ``chunk_size`` (see the module)."""

        def op(ep: Endpoint) -> bool:
            container = ep.container(ref.repository)
            if self._has_blob(ep, container, digest):
                return False
            with open(path, "rb") as f:
                self._upload(ep, container, f, digest, size)
            return True

        try:
            actual = os.stat(path).st_size
        except OSError as exc:
            raise InputError(
                f"cannot push {path}: {exc.strerror}", reason=Reason.MISSING_INPUT
            ) from exc
        if actual != size:
            raise InputError(
                f"cannot push {path}: it has {actual} bytes, expected {size}",
                reason=Reason.BLOB_SIZE,
            )
        return self._each(ref, op, push=True)

    @staticmethod
    def _has_blob(ep: Endpoint, container: oras.container.Container, digest: Digest) -> bool:
        """HEAD of the blob: does the registry have it already?"""
        url = ep.url(container.get_blob_url(str(digest)))
        return bool(ep.exchange("HEAD", url, lambda resp: resp.status_code == 200))

    def _upload(
        self,
        ep: Endpoint,
        container: oras.container.Container,
        f: IO[bytes],
        digest: Digest,
        size: int,
    ) -> None:
        """Upload ``size`` bytes of ``f`` as blob ``digest``: in chunks past
        ``chunk_size`` (once more from the start if the session is lost, one PUT if
        chunks are refused), else in one PUT."""
        if size > self.chunk_size:
            for attempt in (1, 2):
                try:
                    if self._upload_chunks(ep, container, f, digest, size):
                        return
                    break  # chunks refused: one PUT
                except _SessionLost as lost:
                    if attempt == 2:
                        raise WireError(
                            f"{ep.base} lost the upload of blob {digest} twice ({lost})",
                            reason=Reason.PROTOCOL,
                        ) from None
        self._upload_whole(ep, container, f, digest, size)

    def _start_upload(self, ep: Endpoint, container: oras.container.Container) -> str:
        def location(resp: requests.Response) -> str:
            if resp.status_code not in (200, 201, 202):
                raise ep.fail(resp, f"starting an upload to {ep.base}")
            return self._location(ep, resp, container)

        return ep.exchange(
            "POST", ep.url(container.upload_blob_url()), location, headers={"Content-Length": "0"}
        )

    @staticmethod
    def _location(ep: Endpoint, resp: requests.Response, container: object) -> str:
        where = str(ep._get_location(resp, container))
        if not where:
            raise WireError(
                f"{ep.base} answered an upload request without a Location",
                reason=Reason.PROTOCOL,
            )
        return where

    @staticmethod
    def _with_digest(ep: Endpoint, location: str, digest: Digest) -> str:
        try:
            return str(oras.utils.append_url_params(location, {"digest": str(digest)}))
        except ValueError:  # urllib's verdict on the Location the registry sent
            raise WireError(
                f"{ep.base} sent an invalid upload Location {location[:200]!r}",
                reason=Reason.PROTOCOL,
            ) from None

    def _upload_whole(
        self,
        ep: Endpoint,
        container: oras.container.Container,
        f: IO[bytes],
        digest: Digest,
        size: int,
    ) -> None:
        """POST, then one streamed PUT of the whole blob."""
        put_url = self._with_digest(ep, self._start_upload(ep, container), digest)
        name = digest.short
        f.seek(0)
        reader = _ProgressReader(f, size, lambda done: self._report(name, done, size))
        ep.exchange(
            "PUT",
            put_url,
            _ok(ep, f"uploading blob {digest} to {ep.base}", 200, 201, 202),
            data=reader,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )

    def _upload_chunks(
        self,
        ep: Endpoint,
        container: oras.container.Container,
        f: IO[bytes],
        digest: Digest,
        size: int,
    ) -> bool:
        """POST, a PATCH per chunk, PUT with the digest: True when done, False when the
        registry refused the first chunk (nothing of the blob is stored then)."""
        location: str | None = self._start_upload(ep, container)
        offset = 0
        while offset < size and location is not None:
            n = min(self.chunk_size, size - offset)
            location = self._patch(ep, container, location, f, digest, size, offset, n)
            offset += n
        if location is None:
            return False
        ep.exchange(
            "PUT",
            self._with_digest(ep, location, digest),
            _ok(ep, f"completing the upload of blob {digest} to {ep.base}", 201, 204),
            headers={"Content-Length": "0"},
        )
        return True

    def _patch(
        self,
        ep: Endpoint,
        container: oras.container.Container,
        location: str,
        f: IO[bytes],
        digest: Digest,
        size: int,
        offset: int,
        n: int,
    ) -> str | None:
        """PATCH bytes ``offset`` to ``offset + n - 1``; the next Location, or None
        when this first chunk was refused."""
        last = offset + n - 1
        what = f"uploading bytes {offset}-{last} of blob {digest} to {ep.base}"

        def handle(resp: requests.Response) -> str | None:
            if resp.status_code == 202:
                held = str(resp.headers.get("Range", "")).strip()
                if held and held not in (f"0-{last}", f"bytes=0-{last}"):
                    raise WireError(
                        f"{ep.base} holds bytes {held[:40]} of blob {digest} after the chunk "
                        f"ending at byte {last}",
                        reason=Reason.PROTOCOL,
                    )
                return self._location(ep, resp, container)
            if offset == 0 and resp.status_code in CHUNKS_REFUSED:
                return None
            if offset > 0 and resp.status_code in SESSION_LOST:
                raise _SessionLost(f"HTTP {resp.status_code} for bytes {offset}-{last}")
            raise ep.fail(resp, what)

        name = digest.short
        body = _ProgressReader(
            cast(IO[bytes], _Window(f, offset, n)),
            n,
            lambda sent: self._report(name, offset + sent, size),
        )
        return ep.exchange(
            "PATCH",
            location,
            handle,
            data=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(n),
                "Content-Range": f"{offset}-{last}",
            },
        )

    def push_manifest(self, ref: Reference, data: bytes, media_type: str) -> Digest:
        """PUT manifest bytes under ``ref``'s tag (or digest); return their digest."""
        return self._put_manifest(ref, data, media_type)[0]

    def _put_manifest(
        self, ref: Reference, data: bytes, media_type: str
    ) -> tuple[Digest, str | None]:
        """PUT a manifest; its digest and the response's ``OCI-Subject`` header."""
        digest = Digest(hashlib.sha256(data).hexdigest())
        if ref.digest is not None and ref.tag is None and ref.digest != digest:
            raise RegistryError(
                f"manifest bytes hash to {digest}, not {ref.digest}",
                reference=str(ref),
                reason=Reason.DIGEST_MISMATCH,
            )
        target = ref.tag if ref.tag is not None else str(digest)

        def op(ep: Endpoint) -> tuple[Digest, str | None]:
            url = ep.url(ep.container(ref.repository).manifest_url(target))

            def handle(resp: requests.Response) -> tuple[str, str | None]:
                if resp.status_code not in (200, 201, 202):
                    raise ep.fail(resp, f"PUT manifest {target} to {ep.base}")
                subject = resp.headers.get("OCI-Subject")
                return str(resp.headers.get("Docker-Content-Digest", "")).strip(), subject

            header, subject = ep.exchange(
                "PUT", url, handle, data=data, headers={"Content-Type": media_type}
            )
            if header.startswith("sha256:") and header != str(digest):
                raise WireError(
                    f"{ep.base} stored the manifest as {header}, expected {digest}",
                    reason=Reason.DIGEST_MISMATCH,
                )
            return digest, subject

        result = self._each(ref, op, push=True)
        with contextlib.suppress(CacheError):  # the cache is a convenience here
            self.cache.put_bytes(digest, data)
        return result

    # -- referrers (OCI 1.1)
    def push_file(self, ref: Reference, path: Path, media_type: str) -> Descriptor:
        """Upload the file ``path`` as a blob (skipped when the registry has it); return
        its descriptor, typed ``media_type``."""
        hexdigest, size = hash_file(path)
        desc = Descriptor(media_type, Digest(hexdigest), size)
        self.push_blob(ref, path, desc.digest, size)
        return desc

    def push_bytes(self, ref: Reference, data: bytes) -> Digest:
        """Upload a small blob held in memory (skipped when the registry has it), the
        way ``push_blob`` uploads a file; return its digest."""
        digest = Digest(hashlib.sha256(data).hexdigest())

        def op(ep: Endpoint) -> None:
            container = ep.container(ref.repository)
            if not self._has_blob(ep, container, digest):
                self._upload(ep, container, io.BytesIO(data), digest, len(data))

        self._each(ref, op, push=True)
        return digest

    def push_referrer(self, ref: Reference, data: bytes, media_type: str) -> tuple[Digest, bool]:
        """PUT a manifest that has a ``subject`` by its digest. Also says whether the
        registry answered ``OCI-Subject``: then it keeps the referrers API up to date
        itself and the tag-schema fallback index is not needed."""
        digest = Digest(hashlib.sha256(data).hexdigest())
        pushed, subject = self._put_manifest(
            Reference(ref.registry, ref.repository, None, digest), data, media_type
        )
        return pushed, bool(subject)

    def referrers(self, ref: Reference, subject: Digest, limit: int) -> bytes | None:
        """GET ``/v2/<repo>/referrers/<subject>``: the image index the registry keeps
        of the manifests whose ``subject`` is ``subject`` (at most ``limit`` bytes), or
        None when the registry has no referrers API (404, distribution 2.8's ``404 page
        not found``; see ``NO_REFERRERS_API``): the tag-schema fallback applies. The index
        is not content-addressed: callers verify each manifest it lists."""

        def op(ep: Endpoint) -> bytes | None:
            container = ep.container(ref.repository)
            url = ep.url(f"{container.registry}/v2/{container.api_prefix}/referrers/{subject}")
            what = f"GET referrers of {subject.short} from {ep.base}"

            def handle(resp: requests.Response) -> bytes | None:
                if resp.status_code in NO_REFERRERS_API:
                    return None
                if resp.status_code != 200:
                    raise ep.fail(resp, what)
                return ep.read(resp, limit, f"the referrers of {subject.short}")

            return ep.exchange("GET", url, handle, headers={"Accept": OCI_INDEX})

        return self._each(ref, op)
