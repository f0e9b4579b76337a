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

The boundary: each endpoint's attempt turns every ``failure.Failure`` from
below (``transport``, ``auth``, ``blobs``) into the user's error with the
reference, once -- a ``RegistryError`` (with the HTTP status when there was
one), or a ``StoreError`` when the blob cache's own files fail. Credentials
never appear in messages or reprs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

import oras.utils
import requests

from banger_build.errors import InputError, Reason, RegistryError
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
    ) -> None:
        self.cache = cache
        self.options = options or RegistryOptions()
        self.progress = progress
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
    def push_blob(self, ref: Reference, path: Path, digest: Digest, size: int) -> None:
        """Upload ``path`` as blob ``digest`` (skipped when the registry has it)."""

        def op(ep: Endpoint) -> None:
            container = ep.container(ref.repository)
            blob_url = ep.url(container.get_blob_url(str(digest)))
            if ep.exchange("HEAD", blob_url, lambda resp: resp.status_code == 200):
                return

            def location(resp: requests.Response) -> str:
                if resp.status_code not in (200, 201, 202):
                    raise ep.fail(resp, f"starting an upload to {ep.base}")
                return str(ep._get_location(resp, container))

            start = ep.exchange(
                "POST",
                ep.url(container.upload_blob_url()),
                location,
                headers={"Content-Length": "0"},
            )
            if not start:
                raise WireError(
                    f"{ep.base} started an upload without a Location", reason=Reason.PROTOCOL
                )
            try:
                put_url = oras.utils.append_url_params(start, {"digest": str(digest)})
            except ValueError:  # urllib's verdict on the Location the registry sent
                raise WireError(
                    f"{ep.base} sent an invalid upload Location {start[:200]!r}",
                    reason=Reason.PROTOCOL,
                ) from None
            name = digest.short
            with open(path, "rb") as f:
                reader = _ProgressReader(f, size, lambda done: self._report(name, done, size))
                ep.exchange(
                    "PUT",
                    put_url,
                    _ok(ep, f"uploading blob {digest} to {ep.base}", 200, 201, 202),
                    data=reader,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(size),
                    },
                )

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
        self._each(ref, op, push=True)

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
    def push_bytes(self, ref: Reference, data: bytes) -> Digest:
        """Upload a small blob held in memory (skipped when the registry has it):
        HEAD, POST, one PUT of the bytes."""
        digest = Digest(hashlib.sha256(data).hexdigest())

        def op(ep: Endpoint) -> None:
            container = ep.container(ref.repository)
            if ep.exchange(
                "HEAD",
                ep.url(container.get_blob_url(str(digest))),
                lambda resp: resp.status_code == 200,
            ):
                return

            def location(resp: requests.Response) -> str:
                if resp.status_code not in (200, 201, 202):
                    raise ep.fail(resp, f"starting an upload to {ep.base}")
                return str(ep._get_location(resp, container) or "")

            start = ep.exchange(
                "POST",
                ep.url(container.upload_blob_url()),
                location,
                headers={"Content-Length": "0"},
            )
            try:
                put_url = oras.utils.append_url_params(start, {"digest": str(digest)})
            except ValueError:
                put_url = ""
            if not start or not put_url:
                raise WireError(f"{ep.base} sent no valid upload Location", reason=Reason.PROTOCOL)
            ep.exchange(
                "PUT",
                put_url,
                _ok(ep, f"uploading blob {digest} to {ep.base}", 200, 201, 202),
                data=data,
                headers={"Content-Type": "application/octet-stream"},
            )

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
