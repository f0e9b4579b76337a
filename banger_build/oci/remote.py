"""The registry client: the only module that talks HTTP (through oras and requests).

``RegistryClient`` resolves a reference to a platform image manifest digest,
reads image manifests, and pulls blobs into the ``BlobCache``; it can also
push blobs and manifests. It wraps ``oras.provider.Registry`` (one instance
per endpoint) and covers the defects of oras 0.2.43 that matter here:

- every manifest and blob is verified against its digest (and size) before
  it is used or cached; manifests are kept as the exact bytes that were
  hashed, never re-serialised;
- bearer tokens are cached per ``(realm, service, scope)`` and bound per
  ``(endpoint, repository, pull|push)`` (``registry_auth``), so a second
  repository or a push after a pull gets its own token instead of a 401;
- Basic auth works (``auth_backend="basic"``) with credentials from the
  Docker config file, sent from the first challenge on;
- every request has a timeout (connect 10 s, read ``options.timeout``) and
  a small, bounded number of retries with short backoff on connection
  errors, 429 and 5xx, so a refused connection fails in about a second;
- blobs are streamed in 1 MiB chunks, down and up; nothing is read whole;
- Docker Hub is ``https://registry-1.docker.io`` (references are already
  normalised to ``library/...``).

Endpoints: mirrors configured for a registry host (``registry_config``) are
tried in order, then the host itself; an error names every attempt. Plain
HTTP is allowed only to loopback hosts and hosts listed as insecure; a
plain-HTTP mirror elsewhere is refused (reason ``insecure``).

Manifest parsing is ``banger_build.oci.manifest`` (no network, no oras): a build
whose image is pinned and cached never imports this module.

Every requests/oras exception, and every ``oci.ManifestError`` and
``registry_auth.AuthError``, is translated here, once, into
``RegistryError`` (reasons: ``unreachable``, ``timeout``, ``interrupted``,
``tls``, ``auth``, ``not-found``, ``http-status``, ``digest-mismatch``,
``no-platform``, ``unsupported-media-type``, ``invalid-manifest``,
``insecure``, ``protocol``). Credentials never appear in messages or reprs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import oras.container
import oras.provider
import oras.utils
import requests

from banger_build import __version__
from banger_build.errors import InputError, Reason, RegistryError, StoreError
from banger_build.oci.auth import (
    Auth,
    AuthError,
    Credentials,
    ScopeKey,
    Token,
    docker_config_path,
)
from banger_build.oci.blobs import BlobCache, BlobMismatch
from banger_build.oci.manifest import (
    ACCEPT,
    INDEX_TYPES,
    Descriptor,
    ImageManifest,
    ManifestError,
    cached_manifest,
    media_type_of,
    parse_image_manifest,
    select_platform,
)
from banger_build.oci.options import RegistryOptions, plain_http_allowed
from banger_build.oci.reference import (
    DOCKER_HUB,
    DOCKER_HUB_API,
    Digest,
    Platform,
    Reference,
    ReferenceSyntaxError,
)

# -- limits --------------------------------------------------------------------

CHUNK = 1 << 20
MAX_MANIFEST = 4 << 20  # containerd's limit
MAX_ERROR_BODY = 64 << 10
MAX_INDEX_DEPTH = 4
CONNECT_TIMEOUT = 10.0
BACKOFF = 0.2  # seconds, doubled per retry
MAX_BACKOFF = 2.0
MAX_RETRY_AFTER = 10.0
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
USER_AGENT = f"banger-build/{__version__}"

T = TypeVar("T")


# -- failures inside the module --------------------------------------------------


class _Failure(Exception):
    """A failure found below the boundary; becomes a RegistryError with the reference."""

    def __init__(self, message: str, *, reason: Reason, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.status = status


def _summarise_body(resp: requests.Response) -> str:
    """The registry's ``{"errors": [{code, message}]}``, or the start of the body."""
    try:
        if getattr(resp, "_content_consumed", False):
            raw = resp.content[:MAX_ERROR_BODY]
        else:
            raw = resp.raw.read(MAX_ERROR_BODY, decode_content=True) if resp.raw else b""
    except Exception:
        raw = b""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            parts = []
            for err in errors[:5]:
                if isinstance(err, dict):
                    code, msg = err.get("code"), err.get("message")
                    parts.append(": ".join(str(x) for x in (code, msg) if x))
            if parts:
                return "; ".join(parts)[:500]
        for key in ("details", "error", "message"):
            if isinstance(body.get(key), str):
                return str(body[key])[:500]
    return " ".join(text.split())[:200]


def _status_failure(resp: requests.Response, what: str, hint: str = "") -> _Failure:
    status = resp.status_code
    summary = _summarise_body(resp)
    resp.close()
    suffix = f": {summary}" if summary else ""
    if status == 401:
        return _Failure(
            f"{what}: authentication failed or required{suffix}{hint}",
            reason=Reason.AUTH,
            status=status,
        )
    if status == 403:
        return _Failure(f"{what}: access denied{suffix}{hint}", reason=Reason.AUTH, status=status)
    if status == 404:
        return _Failure(f"{what}: not found{suffix}", reason=Reason.NOT_FOUND, status=status)
    return _Failure(
        f"{what}: unexpected response{suffix}", reason=Reason.HTTP_STATUS, status=status
    )


_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def _why(exc: BaseException) -> str:
    text = str(exc)
    found = _ERRNO_RE.findall(text)
    if found:
        return str(found[-1]).strip().rstrip(".")
    for hint in (
        "Connection refused",
        "Name or service not known",
        "timed out",
        "Connection reset",
        "Connection aborted",
        "IncompleteRead",
        "Read timed out",
    ):
        if hint in text:
            return hint
    return type(exc).__name__


def _request_failure(exc: requests.RequestException, base: str) -> _Failure:
    if isinstance(exc, requests.exceptions.SSLError):
        return _Failure(f"TLS error talking to {base}: {_why(exc)}", reason=Reason.TLS)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return _Failure(f"cannot connect to {base}: timed out", reason=Reason.UNREACHABLE)
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return _Failure(f"{base} stopped responding (read timed out)", reason=Reason.TIMEOUT)
    if isinstance(
        exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)
    ):
        return _Failure(
            f"transfer from {base} was interrupted: {_why(exc)}", reason=Reason.INTERRUPTED
        )
    if isinstance(exc, requests.exceptions.ConnectionError):
        if "Read timed out" in str(exc):  # a timeout while streaming a body
            return _Failure(f"{base} stopped sending (read timed out)", reason=Reason.TIMEOUT)
        return _Failure(f"cannot connect to {base}: {_why(exc)}", reason=Reason.UNREACHABLE)
    return _Failure(f"request to {base} failed: {_why(exc)}", reason=Reason.PROTOCOL)


# -- sending, with bounded retries -------------------------------------------------


def _backoff(attempt: int, resp: requests.Response | None = None) -> float:
    delay = min(BACKOFF * (1 << attempt), MAX_BACKOFF)
    if resp is not None:
        after = str(resp.headers.get("Retry-After", ""))
        if after.isdigit():
            delay = min(float(after), MAX_RETRY_AFTER)
    return delay


def _rewind(data: object, start: int | None) -> None:
    if start is not None:
        data.seek(start)  # type: ignore[attr-defined]


def _send_with_retries(
    session: requests.Session,
    method: str,
    url: str,
    retries: int,
    **kwargs: Any,
) -> requests.Response:
    """One request with bounded retries on connection errors, 429 and 5xx."""
    data: Any = kwargs.get("data")
    start: int | None = None
    if data is not None and hasattr(data, "seek") and hasattr(data, "tell"):
        start = int(data.tell())
    attempt = 0
    while True:
        _rewind(data, start)
        try:
            resp = session.request(method, url, **kwargs)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
            if attempt >= retries:
                raise
            time.sleep(_backoff(attempt))
            attempt += 1
            continue
        if resp.status_code in RETRY_STATUS and attempt < retries:
            delay = _backoff(attempt, resp)
            resp.close()
            time.sleep(delay)
            attempt += 1
            continue
        return resp


# -- one endpoint: an oras Registry with our request handling ----------------------

_REPO_PATH_RE = re.compile(r"^/v2/(?P<name>.+)/(?:manifests|blobs|tags)/")


class _Endpoint(oras.provider.Registry):  # type: ignore[misc]
    """One base URL (mirror or upstream), speaking through oras' Registry.

    ``do_request`` replaces oras' (which has no timeouts, retries for 131 s
    and reuses one token for every scope) with timeouts, bounded retries
    and per-scope bearer tokens / Basic credentials from ``registry_auth.Auth``.
    """

    def __init__(self, base: str, cred_host: str, auth: Auth, options: RegistryOptions) -> None:
        parts = urllib.parse.urlsplit(base)
        super().__init__(
            hostname=parts.netloc, insecure=parts.scheme == "http", auth_backend="basic"
        )
        self.base = base
        self.netloc = parts.netloc
        self.cred_host = cred_host
        self._state = auth
        self._options = options
        self._last_scope: ScopeKey | None = None
        self.session.headers["User-Agent"] = USER_AGENT

    def __repr__(self) -> str:
        return f"<registry endpoint {self.base}>"

    __str__ = __repr__

    def container(self, repository: str) -> oras.container.Container:
        c = oras.container.Container(f"{self.netloc}/{repository}", registry=self.netloc)
        # oras' regex guesses the registry from dots/colons; pin every part.
        namespace, _, name = repository.rpartition("/")
        c.registry, c.namespace, c.repository = self.netloc, namespace or None, name
        return c

    def url(self, path: str) -> str:
        return f"{self.prefix}://{path}"

    def fail(self, resp: requests.Response, what: str) -> _Failure:
        """The failure for an unexpected response, with a credentials hint on 401/403."""
        hint = ""
        if resp.status_code in (401, 403):
            path = docker_config_path(self._options.docker_config)
            if self._state.creds.get(self.cred_host) is not None:
                hint = f" (the credentials for {self.cred_host} in {path} were not accepted)"
            else:
                hint = f" (no credentials for {self.cred_host} in {path})"
        return _status_failure(resp, what, hint)

    def _scope(self, url: str, method: str) -> ScopeKey | None:
        match = _REPO_PATH_RE.match(urllib.parse.urlsplit(url).path)
        if match is None:
            return self._last_scope
        action = "pull" if method in ("GET", "HEAD") else "push"
        self._last_scope = (urllib.parse.unquote(match.group("name")), action)
        return self._last_scope

    def do_request(
        self,
        url: str,
        method: str = "GET",
        data: Any = None,
        headers: dict[str, str] | None = None,
        json: Any = None,
        stream: bool = False,
    ) -> requests.Response:
        base_headers = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
        scope = self._scope(url, method)
        timeout = (min(CONNECT_TIMEOUT, self._options.timeout), self._options.timeout)
        for _ in range(3):  # at most two authentication rounds
            sent = self._state.authorization(self.netloc, self.cred_host, scope)
            request_headers = dict(base_headers)
            if sent is not None:
                request_headers["Authorization"] = sent
            resp = _send_with_retries(
                self.session,
                method,
                url,
                self._options.retries,
                data=data,
                json=json,
                headers=request_headers,
                stream=stream,
                timeout=timeout,
                verify=self._tls_verify,
                allow_redirects=True,
            )
            if resp.status_code != 401:
                return resp
            retry = self._state.answer(
                resp.headers.get("WWW-Authenticate", ""),
                self.netloc,
                self.cred_host,
                scope,
                sent,
                self._fetch_token,
            )
            if not retry:
                return resp
            resp.close()
        return resp

    def _fetch_token(
        self, realm: str, service: str, scope: str, creds: Credentials | None
    ) -> Token:
        """A bearer token from ``realm`` (a ``registry_auth.TokenFetcher``)."""
        netloc = urllib.parse.urlsplit(realm).netloc
        params: list[tuple[str, str]] = []
        if service:
            params.append(("service", service))
        for s in scope.split():
            params.append(("scope", s))
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if creds is not None:
            headers["Authorization"] = creds.basic()
        timeout = (min(CONNECT_TIMEOUT, self._options.timeout), self._options.timeout)
        resp = _send_with_retries(
            self.session,
            "GET",
            realm,
            self._options.retries,
            params=params,
            headers=headers,
            timeout=timeout,
            allow_redirects=True,
        )
        if resp.status_code != 200:
            failure = _status_failure(resp, f"token request to {netloc}")
            who = "with the configured credentials" if creds else "anonymously"
            raise _Failure(
                f"{failure.message} (requested scope {scope!r} {who})",
                reason=Reason.AUTH,
                status=failure.status,
            )
        try:
            data = resp.json()
        except ValueError:
            raise _Failure(
                f"token service {netloc} sent invalid JSON", reason=Reason.AUTH
            ) from None
        return Token.from_response(data, netloc)


# -- the client ------------------------------------------------------------------


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


class RegistryClient:
    """Pull (and push) images, verifying every byte, through mirrors and oras."""

    def __init__(
        self,
        cache: BlobCache,
        options: RegistryOptions | None = None,
        progress: Callable[[str, int, int | None], None] | None = None,
    ) -> None:
        self.cache = cache
        self.options = options or RegistryOptions()
        self.progress = progress
        self._auth = Auth(self.options)
        self._endpoints: dict[tuple[str, str], _Endpoint] = {}

    def __repr__(self) -> str:
        return f"RegistryClient({self.cache!r})"

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

    def _endpoint(self, base: str, ref: Reference) -> _Endpoint:
        is_upstream = base == self.upstream_url(ref.registry, self.options.insecure)
        cred_host = ref.registry if is_upstream else urllib.parse.urlsplit(base).netloc
        key = (base, cred_host)
        ep = self._endpoints.get(key)
        if ep is None:
            ep = _Endpoint(base, cred_host, self._auth, self.options)
            self._endpoints[key] = ep
        return ep

    def _attempt(self, ref: Reference, base: str, op: Callable[[_Endpoint], T]) -> T:
        """Run ``op`` on one endpoint, translating every foreign exception."""
        try:
            return op(self._endpoint(base, ref))
        except (_Failure, AuthError) as exc:
            raise RegistryError(
                exc.message, reference=str(ref), status=exc.status, reason=exc.reason
            ) from exc
        except BlobMismatch as exc:
            raise RegistryError(
                f"{base} served content that does not match its digest: {exc}",
                reference=str(ref),
                reason=Reason.DIGEST_MISMATCH,
            ) from exc
        except requests.RequestException as exc:
            failure = _request_failure(exc, base)
            raise RegistryError(failure.message, reference=str(ref), reason=failure.reason) from exc
        except OSError as exc:  # the local cache, not the network
            raise StoreError(
                f"blob cache {self.cache.root}: {exc}", reason=Reason.BLOB_CACHE
            ) from exc
        except (ValueError, KeyError, TypeError) as exc:  # from inside oras
            raise RegistryError(
                f"unexpected response from {base}: {exc}",
                reference=str(ref),
                reason=Reason.PROTOCOL,
            ) from exc

    def _each(self, ref: Reference, op: Callable[[_Endpoint], T], *, push: bool = False) -> T:
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

    # -- manifests
    def _fetch_manifest(
        self, ep: _Endpoint, ref: Reference, target: str, expect: Digest | None
    ) -> tuple[Digest, bytes, str | None]:
        url = ep.url(ep.container(ref.repository).manifest_url(target))
        resp = ep.do_request(url, "GET", headers={"Accept": ACCEPT}, stream=True)
        with resp:
            if resp.status_code != 200:
                raise ep.fail(resp, f"GET manifest {target} from {ep.base}")
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > MAX_MANIFEST:
                raise _Failure(
                    f"manifest {target} is too large ({length} bytes)",
                    reason=Reason.INVALID_MANIFEST,
                )
            buf = bytearray()
            for chunk in resp.iter_content(64 << 10):
                buf += chunk
                if len(buf) > MAX_MANIFEST:
                    raise _Failure(
                        f"manifest {target} is larger than {MAX_MANIFEST} bytes",
                        reason=Reason.INVALID_MANIFEST,
                    )
            data = bytes(buf)
            header_digest = resp.headers.get("Docker-Content-Digest", "").strip()
            content_type = resp.headers.get("Content-Type")
        actual = Digest(hashlib.sha256(data).hexdigest())
        wanted = expect
        if wanted is None and header_digest.startswith("sha256:"):
            try:
                wanted = Digest.parse(header_digest)
            except ReferenceSyntaxError:
                raise _Failure(
                    f"invalid Docker-Content-Digest header {header_digest!r}",
                    reason=Reason.PROTOCOL,
                ) from None
        if wanted is not None and actual != wanted:
            raise BlobMismatch(wanted, actual, len(data))
        self.cache.put_bytes(actual, data)
        return actual, data, content_type

    def _manifest_bytes(
        self, ref: Reference, digest: Digest | None, tag: str | None
    ) -> tuple[Digest, bytes, str | None]:
        """Manifest bytes by digest (cache first, no network) or by tag (network)."""
        if digest is not None:
            cached = self.cache.get(digest)
            if cached is not None:
                return digest, cached.read_bytes(), None
            target = str(digest)
        else:
            assert tag is not None
            target = tag
        return self._download_manifest(ref, target, digest)

    def _download_manifest(
        self, ref: Reference, target: str, expect: Digest | None
    ) -> tuple[Digest, bytes, str | None]:
        return self._each(ref, lambda ep: self._fetch_manifest(ep, ref, target, expect))

    def resolve(self, ref: Reference, platform: Platform) -> Digest:
        """The digest of ``ref``'s image manifest for ``platform``.

        Follows an image index / manifest list to the platform's manifest.
        Every manifest read is verified and stored in the blob cache.
        """
        digest, data, header = self._manifest_bytes(ref, ref.digest, ref.tag)
        for _ in range(MAX_INDEX_DEPTH):
            try:
                media_type, body = media_type_of(data, header)
                if media_type not in INDEX_TYPES:
                    parse_image_manifest(digest, data, header)
                    return digest
                digest = select_platform(digest, body, platform)
            except ManifestError as exc:
                raise exc.error_for(str(ref)) from exc
            digest, data, header = self._manifest_bytes(ref, digest, None)
        raise RegistryError(
            "image indexes nest too deeply", reference=str(ref), reason=Reason.INVALID_MANIFEST
        )

    def raw_manifest(self, ref: Reference, digest: Digest | None = None) -> tuple[Digest, bytes]:
        """Any manifest's verified bytes: by ``digest`` (cache first, no network),
        else by ``ref``'s digest or tag. No parsing: the caller knows what it expects."""
        wanted = digest or ref.digest
        digest, data, _ = self._manifest_bytes(ref, wanted, None if wanted else ref.tag)
        return digest, data

    def manifest(self, ref: Reference, digest: Digest) -> ImageManifest:
        """The image manifest ``digest`` (from the cache without network when present)."""
        try:
            cached = cached_manifest(self.cache, digest)
            if cached is not None:
                return cached
            digest, data, header = self._download_manifest(ref, str(digest), digest)
            return parse_image_manifest(digest, data, header)
        except ManifestError as exc:
            raise exc.error_for(str(ref)) from exc

    # -- blobs
    def _report(self, name: str, done: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(name, done, total)

    def _download(self, ep: _Endpoint, ref: Reference, desc: Descriptor) -> Path:
        name = desc.digest.short
        attempt = 0
        while True:
            try:
                return self._download_once(ep, ref, desc, name)
            except (
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ConnectionError,
                requests.exceptions.ReadTimeout,
            ):
                if attempt >= self.options.retries:
                    raise
                time.sleep(_backoff(attempt))
                attempt += 1

    def _download_once(self, ep: _Endpoint, ref: Reference, desc: Descriptor, name: str) -> Path:
        container = ep.container(ref.repository)
        resp = ep.get_blob(container, str(desc.digest), stream=True)
        with resp:
            if resp.status_code != 200:
                raise ep.fail(resp, f"GET blob {desc.digest} from {ep.base}")
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) != desc.size:
                raise _Failure(
                    f"blob {desc.digest} is {length} bytes on {ep.base}, "
                    f"the manifest says {desc.size}",
                    reason=Reason.DIGEST_MISMATCH,
                )
            self._report(name, 0, desc.size)

            def chunks() -> Iterator[bytes]:
                done = 0
                for chunk in resp.iter_content(CHUNK):
                    done += len(chunk)
                    self._report(name, done, desc.size)
                    yield chunk

            return self.cache.put_stream(desc.digest, chunks(), desc.size)

    def blob(self, ref: Reference, desc: Descriptor) -> Path:
        """The verified blob's path in the cache, downloading it if needed."""
        cached = self.cache.get(desc.digest, desc.size)
        if cached is not None:
            return cached
        return self._each(ref, lambda ep: self._download(ep, ref, desc))

    # -- push
    def push_blob(self, ref: Reference, path: Path, digest: Digest, size: int) -> None:
        """Upload ``path`` as blob ``digest`` (skipped when the registry has it)."""

        def op(ep: _Endpoint) -> None:
            container = ep.container(ref.repository)
            if ep.blob_exists({"digest": str(digest), "size": size}, container):
                return
            resp = ep.do_request(
                ep.url(container.upload_blob_url()),
                "POST",
                headers={"Content-Length": "0"},
            )
            with resp:
                if resp.status_code not in (200, 201, 202):
                    raise ep.fail(resp, f"starting an upload to {ep.base}")
                location = ep._get_location(resp, container)
            if not location:
                raise _Failure(
                    f"{ep.base} started an upload without a Location", reason=Reason.PROTOCOL
                )
            put_url = oras.utils.append_url_params(location, {"digest": str(digest)})
            name = digest.short
            with open(path, "rb") as f:
                reader = _ProgressReader(f, size, lambda done: self._report(name, done, size))
                resp = ep.do_request(
                    put_url,
                    "PUT",
                    data=reader,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(size),
                    },
                )
            with resp:
                if resp.status_code not in (200, 201, 202):
                    raise ep.fail(resp, f"uploading blob {digest} to {ep.base}")

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
        digest = Digest(hashlib.sha256(data).hexdigest())
        if ref.digest is not None and ref.tag is None and ref.digest != digest:
            raise RegistryError(
                f"manifest bytes hash to {digest}, not {ref.digest}",
                reference=str(ref),
                reason=Reason.DIGEST_MISMATCH,
            )
        target = ref.tag if ref.tag is not None else str(digest)

        def op(ep: _Endpoint) -> Digest:
            url = ep.url(ep.container(ref.repository).manifest_url(target))
            resp = ep.do_request(url, "PUT", data=data, headers={"Content-Type": media_type})
            with resp:
                if resp.status_code not in (200, 201, 202):
                    raise ep.fail(resp, f"PUT manifest {target} to {ep.base}")
                header = resp.headers.get("Docker-Content-Digest", "").strip()
            if header.startswith("sha256:") and header != str(digest):
                raise _Failure(
                    f"{ep.base} stored the manifest as {header}, expected {digest}",
                    reason=Reason.DIGEST_MISMATCH,
                )
            return digest

        result = self._each(ref, op, push=True)
        with contextlib.suppress(OSError):  # the cache is a convenience here
            self.cache.put_bytes(digest, data)
        return result
