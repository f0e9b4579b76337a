"""One registry endpoint over HTTP, through oras and requests.

``Endpoint`` is an ``oras.provider.Registry`` (its session, URL layout and
upload ``Location`` handling) whose every request goes through
``Endpoint.exchange``, which covers what oras 0.2.43 lacks (the bounded
mechanics are ``wire``'s):

- one retry loop per request with one total bound (``options.retries``,
  a ``wire.Budget``) for every transient cause together: a refused or reset
  connection, 408/429/5xx, a cut or stalled body, and the token request the
  request needed; the time of one attempt is bounded by ``CONNECT_TIMEOUT``,
  the response headers' deadline and each read's timeout (``options.timeout``,
  at most ``options.low_speed_time``), and the body's low-speed rule;
- every body streamed and bounded: a caller's limit for manifests,
  ``MAX_TOKEN_BODY`` for tokens, ``wire.MAX_ERROR_BODY`` for error bodies;
- per-scope bearer tokens and Basic credentials (``auth.Auth``), at most
  ``MAX_AUTH_ROUNDS`` answers to a 401; a 401 from a host a redirect led to
  is not answered (requests strips credentials on a cross-host redirect, and
  the message says so).

Failures are ``wire.WireError``s and ``auth.AuthError``s; ``remote`` turns
them into ``RegistryError``s with the reference.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import oras.container
import oras.provider
import requests

from banger_build import __version__
from banger_build.errors import Reason
from banger_build.oci.auth import Auth, AuthError, Credentials, ScopeKey, Token, docker_config_path
from banger_build.oci.options import RegistryOptions
from banger_build.oci.wire import (
    RETRY_STATUS,
    Adapter,
    Budget,
    Meter,
    WireError,
    content_length,
    headers_within,
    iter_body,
    origin_of,
    send_failure,
    summarise,
    where,
)

# -- limits --------------------------------------------------------------------

CONNECT_TIMEOUT = 10.0  # seconds for a TCP (and TLS) connection
MAX_TOKEN_BODY = 1 << 20  # bytes of a token service's answer (real ones: a few KiB)
MAX_AUTH_ROUNDS = 2  # 401 -> credentials/token -> resend, at most this often
USER_AGENT = f"banger-build/{__version__}"

T = TypeVar("T")


# -- one endpoint ----------------------------------------------------------------------

_REPO_PATH_RE = re.compile(r"^/v2/(?P<name>.+)/(?:manifests|blobs|tags|referrers)/")


def _tell(data: object) -> int | None:
    if data is not None and hasattr(data, "seek") and hasattr(data, "tell"):
        return int(data.tell())
    return None


def _rewind(data: object, start: int | None) -> None:
    if start is not None:
        data.seek(start)  # type: ignore[attr-defined]


class Endpoint(oras.provider.Registry):  # type: ignore[misc]
    """One base URL (a mirror or the registry), speaking through oras' Registry."""

    def __init__(self, base: str, cred_host: str, auth: Auth, options: RegistryOptions) -> None:
        parts = urllib.parse.urlsplit(base)
        super().__init__(
            hostname=parts.netloc, insecure=parts.scheme == "http", auth_backend="basic"
        )
        self.base = base
        self.netloc = parts.netloc
        self.cred_host = cred_host
        self.options = options
        self._state = auth
        self._last_scope: ScopeKey | None = None
        #: each read, and the response headers as a whole
        self.read_timeout = min(options.timeout, options.low_speed_time)
        self.session.headers["User-Agent"] = USER_AGENT
        adapter = Adapter()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def __repr__(self) -> str:
        return f"<registry endpoint {self.base}>"

    __str__ = __repr__

    # -- URLs
    def container(self, repository: str) -> oras.container.Container:
        c = oras.container.Container(f"{self.netloc}/{repository}", registry=self.netloc)
        # oras' regex guesses the registry from dots/colons; pin every part.
        namespace, _, name = repository.rpartition("/")
        c.registry, c.namespace, c.repository = self.netloc, namespace or None, name
        return c

    def url(self, path: str) -> str:
        return f"{self.prefix}://{path}"

    # -- bodies and failures
    def meter(self, resp: requests.Response) -> Meter:
        return Meter(
            where(resp.url, self.base), self.options.low_speed, self.options.low_speed_time
        )

    def body(self, resp: requests.Response) -> Iterator[bytes]:
        return iter_body(resp, self.meter(resp))

    def read(self, resp: requests.Response, limit: int, what: str) -> bytes:
        """A whole (small) body, refused past ``limit`` bytes (reason ``too-large``)."""
        length = content_length(resp)
        if length is not None and length > limit:
            raise WireError(
                f"{what} is {length} bytes, more than the limit of {limit}",
                reason=Reason.TOO_LARGE,
            )
        buf = bytearray()
        for chunk in self.body(resp):
            buf += chunk
            if len(buf) > limit:
                raise WireError(
                    f"{what} is larger than the limit of {limit} bytes", reason=Reason.TOO_LARGE
                )
        return bytes(buf)

    def fail(self, resp: requests.Response, what: str) -> WireError:
        """The failure for an unexpected status, saying whose credentials went where."""
        final = urllib.parse.urlsplit(resp.url).netloc
        redirected = bool(resp.history) and final != self.netloc
        if redirected:
            what += f" (redirected to {origin_of(resp.url)})"
        hint = ""
        if resp.status_code in (401, 403):
            path = docker_config_path(self.options.docker_config)
            if redirected:
                hint = (
                    f" (the credentials for {self.cred_host} were not sent to {final}: "
                    "credentials never follow a redirect to another host)"
                )
            elif self._state.creds.get(self.cred_host) is not None:
                hint = f" (the credentials for {self.cred_host} in {path} were not accepted)"
            else:
                hint = f" (no credentials for {self.cred_host} in {path})"
        return self.status_failure(resp, what, hint)

    def status_failure(self, resp: requests.Response, what: str, hint: str = "") -> WireError:
        """The failure for an unexpected status, with the body's own explanation."""
        status = resp.status_code
        summary = summarise(
            resp, where(resp.url, self.base), self.options.low_speed, self.read_timeout
        )
        suffix = f": {summary}" if summary else ""
        if status == 401:
            message, reason = f"{what}: authentication failed or required", Reason.AUTH
        elif status == 403:
            message, reason = f"{what}: access denied", Reason.AUTH
        elif status == 404:
            message, reason = f"{what}: not found", Reason.NOT_FOUND
        else:
            message, reason = f"{what}: unexpected response", Reason.HTTP_STATUS
        return WireError(f"{message}{suffix}{hint}", reason=reason, status=status)

    # -- requests
    def do_request(self, *args: Any, **kwargs: Any) -> requests.Response:
        """oras' own requests have no timeouts or bounds: every request goes
        through ``exchange`` instead."""
        raise NotImplementedError("use Endpoint.exchange")

    def exchange(
        self,
        method: str,
        url: str,
        handle: Callable[[requests.Response], T],
        *,
        headers: dict[str, str] | None = None,
        data: Any = None,
        params: list[tuple[str, str]] | None = None,
        budget: Budget | None = None,
        authenticate: bool = True,
    ) -> T:
        """Send one request and return what ``handle`` makes of its response.

        The one retry loop: a transient failure -- sending, a retryable status,
        or a ``WireError`` from ``handle`` (a cut or stalled body) -- is tried
        again while ``budget`` lasts, if the request body can be replayed.
        """
        budget = budget or Budget(self.options.retries)
        origin = origin_of(url)
        start = _tell(data)
        replayable = data is None or isinstance(data, bytes) or start is not None
        while True:
            try:
                resp = self._send(method, url, headers, data, start, params, budget, authenticate)
                if resp.status_code in RETRY_STATUS and replayable and budget.left:
                    resp.close()
                    budget.retry(resp)
                    continue
                with resp:
                    return handle(resp)
            except requests.RequestException as exc:
                failure = send_failure(exc, origin)
                if not (failure.transient and replayable and budget.retry()):
                    raise failure from exc
            except WireError as exc:
                if not (exc.transient and replayable and budget.retry()):
                    raise

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None,
        data: Any,
        start: int | None,
        params: list[tuple[str, str]] | None,
        budget: Budget,
        authenticate: bool,
    ) -> requests.Response:
        """One attempt, with at most ``MAX_AUTH_ROUNDS`` answers to a 401."""
        base_headers = dict(headers or {})
        scope = None
        if authenticate:
            base_headers = {k: v for k, v in base_headers.items() if k.lower() != "authorization"}
            scope = self._scope(url, method)
        timeout = (min(CONNECT_TIMEOUT, self.options.timeout), self.read_timeout)
        rounds = 0
        while True:
            request_headers = dict(base_headers)
            sent = None
            if authenticate:
                sent = self._state.authorization(self.netloc, self.cred_host, scope)
                if sent is not None:
                    request_headers["Authorization"] = sent
            _rewind(data, start)
            with headers_within(self.read_timeout):
                resp: requests.Response = self.session.request(
                    method,
                    url,
                    data=data,
                    params=params,
                    headers=request_headers,
                    stream=True,
                    timeout=timeout,
                    verify=self._tls_verify,
                    allow_redirects=True,
                )
            if not authenticate or resp.status_code != 401 or rounds >= MAX_AUTH_ROUNDS:
                return resp
            if urllib.parse.urlsplit(resp.url).netloc != self.netloc:
                return resp  # another host's challenge (after a redirect) is not ours to answer
            try:
                retry = self._state.answer(
                    resp.headers.get("WWW-Authenticate", ""),
                    self.netloc,
                    self.cred_host,
                    scope,
                    sent,
                    lambda realm, service, sc, creds: self._token(
                        realm, service, sc, creds, budget
                    ),
                )
            except BaseException:
                resp.close()
                raise
            if not retry:
                return resp
            resp.close()
            rounds += 1

    def _scope(self, url: str, method: str) -> ScopeKey | None:
        match = _REPO_PATH_RE.match(urllib.parse.urlsplit(url).path)
        if match is None:
            return self._last_scope
        action = "pull" if method in ("GET", "HEAD") else "push"
        self._last_scope = (urllib.parse.unquote(match.group("name")), action)
        return self._last_scope

    def _token(
        self, realm: str, service: str, scope: str, creds: Credentials | None, budget: Budget
    ) -> Token:
        """A bearer token from ``realm`` (an ``auth.TokenFetcher``), within the
        retries of the request that needed it."""
        netloc = urllib.parse.urlsplit(realm).netloc
        params: list[tuple[str, str]] = []
        if service:
            params.append(("service", service))
        for s in scope.split():
            params.append(("scope", s))
        headers = {"Accept": "application/json"}
        if creds is not None:
            headers["Authorization"] = creds.basic()

        def handle(resp: requests.Response) -> Token:
            if resp.status_code != 200:
                who = "with the configured credentials" if creds else "anonymously"
                failure = self.status_failure(
                    resp, f"token request to {netloc}", f" (requested scope {scope!r} {who})"
                )
                raise AuthError(failure.message, status=failure.status)
            data = self.read(resp, MAX_TOKEN_BODY, f"the answer of token service {netloc}")
            try:
                body = json.loads(data)
            except (ValueError, UnicodeDecodeError):
                raise AuthError(f"token service {netloc} sent invalid JSON") from None
            return Token.from_response(body, netloc)

        return self.exchange(
            "GET", realm, handle, params=params, headers=headers, budget=budget, authenticate=False
        )
