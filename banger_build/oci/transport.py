"""The wire: one registry endpoint over HTTP, through oras and requests.

This module and ``remote`` are the only ones importing oras and requests.
``Endpoint`` is an ``oras.provider.Registry`` (its session, URL layout and
upload ``Location`` handling) whose every request goes through
``Endpoint.exchange``, which covers what oras 0.2.43 lacks:

- one retry loop per request with one total bound (``options.retries``) for
  every transient cause together: a refused or reset connection, 408/429/5xx
  (``Retry-After`` honoured up to ``MAX_RETRY_AFTER``), a cut or stalled body,
  and the token request the request needed;
- timeouts: connecting (``CONNECT_TIMEOUT``), each read (``options.timeout``,
  at most ``options.low_speed_time``), the response headers as a whole (the
  same bound: a server trickling its headers is cut off), and a low-speed rule
  for bodies: fewer than ``low_speed`` bytes/s over ``low_speed_time`` seconds
  abandons the transfer (``Meter``);
- bodies streamed with ``read1`` (whatever arrived, at most ``CHUNK``), every
  one bounded: manifests by the caller's limit, tokens by ``MAX_TOKEN_BODY``,
  error bodies by ``MAX_ERROR_BODY``;
- per-scope bearer tokens and Basic credentials (``auth.Auth``); a 401 from
  a host a redirect led to is not answered there (requests strips the
  credentials on a cross-host redirect, and the message says so);
- failures named after the host that failed: a redirect target that refuses
  the connection is named, with the endpoint it was redirected from.

Failures are ``WireError``s (a ``failure.Failure``); ``remote`` turns them
into ``RegistryError``s with the reference. Only exceptions of requests,
urllib3 and the sockets under them are translated here; anything else is a
bug and propagates as it is.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import oras.container
import oras.provider
import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.exceptions

from banger_build import __version__
from banger_build.errors import Reason
from banger_build.oci.auth import Auth, AuthError, Credentials, ScopeKey, Token, docker_config_path
from banger_build.oci.failure import Failure
from banger_build.oci.options import RegistryOptions, redact_url

# -- limits --------------------------------------------------------------------

CHUNK = 1 << 20  # largest piece of a body read or sent at once
CONNECT_TIMEOUT = 10.0  # seconds for a TCP (and TLS) connection
MAX_ERROR_BODY = 64 << 10  # bytes of an error response read for its message
MAX_TOKEN_BODY = 1 << 20  # bytes of a token service's answer (real ones: a few KiB)
MAX_AUTH_ROUNDS = 2  # 401 -> credentials/token -> resend, at most this often
BACKOFF = 0.2  # seconds before the first retry, doubled per retry
MAX_BACKOFF = 2.0
MAX_RETRY_AFTER = 10.0  # the longest Retry-After honoured
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
USER_AGENT = f"banger-build/{__version__}"

T = TypeVar("T")


class WireError(Failure):
    """A failure on the wire; ``transient`` ones are worth another attempt."""

    def __init__(
        self, message: str, *, reason: Reason, status: int | None = None, transient: bool = False
    ) -> None:
        super().__init__(message, reason=reason, status=status)
        self.transient = transient


# -- one request's retries ---------------------------------------------------------


class Budget:
    """The retries left to one request, shared with the token requests it makes."""

    def __init__(self, retries: int) -> None:
        self.left = max(0, retries)
        self.used = 0

    def retry(self, resp: requests.Response | None = None) -> bool:
        """Wait before another attempt and return True, or False when none is left."""
        if self.left <= 0:
            return False
        delay = min(BACKOFF * (1 << self.used), MAX_BACKOFF)
        after = str(resp.headers.get("Retry-After", "")) if resp is not None else ""
        if after.isdigit():
            delay = min(float(after), MAX_RETRY_AFTER)
        self.left -= 1
        self.used += 1
        time.sleep(delay)
        return True


# -- bodies ------------------------------------------------------------------------


class Meter:
    """Abandons a transfer that moves fewer than ``low_speed`` bytes per second over
    a window of ``window`` seconds (curl's --speed-limit / --speed-time).

    Checked whenever bytes arrive; a read that gets nothing at all ends in a
    read timeout no longer than the window. So a trickle fails within two
    windows at most, about one in practice.
    """

    def __init__(
        self,
        where: str,
        low_speed: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.where = where
        self.low_speed = low_speed
        self.window = window
        self.clock = clock
        self.total = 0
        self._mark = (clock(), 0)  # start of the current window, bytes by then

    def add(self, n: int) -> None:
        self.total += n
        now = self.clock()
        since, then = self._mark
        elapsed = now - since
        if elapsed < self.window:
            return
        moved = self.total - then
        if moved < self.low_speed * elapsed:
            raise WireError(
                f"transfer from {self.where} stalled: {moved} bytes in {elapsed:.0f} s "
                f"(less than {self.low_speed} bytes/s for {self.window:g} s)",
                reason=Reason.STALLED,
                transient=True,
            )
        self._mark = (now, self.total)


def body_failure(exc: Exception, where: str) -> WireError:
    """The failure for an exception raised while reading a response body."""
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return WireError(
            f"{where} stopped sending (read timed out)", reason=Reason.TIMEOUT, transient=True
        )
    if isinstance(exc, urllib3.exceptions.DecodeError):
        return WireError(
            f"{where} sent a body that does not decode: {_why(exc)}", reason=Reason.PROTOCOL
        )
    return WireError(
        f"transfer from {where} was interrupted: {_why(exc)}",
        reason=Reason.INTERRUPTED,
        transient=True,
    )


def iter_body(resp: requests.Response, meter: Meter) -> Iterator[bytes]:
    """A streamed response's body as it arrives, in pieces of at most ``CHUNK``."""
    while True:
        try:
            chunk = resp.raw.read1(CHUNK, decode_content=True)
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # reading the socket
            raise body_failure(exc, meter.where) from exc
        if not chunk:
            return
        meter.add(len(chunk))
        yield chunk


def _content_length(resp: requests.Response) -> int | None:
    length = str(resp.headers.get("Content-Length", ""))
    return int(length) if length.isdigit() else None


# -- failures ----------------------------------------------------------------------

_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")
_HINTS = {
    "Connection refused": "Connection refused",
    "Name or service not known": "Name or service not known",
    "Remote end closed connection without response": "closed the connection without a response",
    "Connection reset": "Connection reset",
    "IncompleteRead": "the body ended early",
    "Read timed out": "timed out",
    "timed out": "timed out",
    "Connection aborted": "Connection aborted",
}


def _why(exc: BaseException) -> str:
    text = str(exc)
    found = _ERRNO_RE.findall(text)
    if found:
        return str(found[-1]).strip().rstrip(".")
    for hint, words in _HINTS.items():
        if hint in text:
            return words
    return type(exc).__name__


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def where(url: str | None, origin: str) -> str:
    """``origin``, or the host a redirect from it led to, named with its origin."""
    if url and urllib.parse.urlsplit(url).netloc not in ("", urllib.parse.urlsplit(origin).netloc):
        return f"{_origin(url)} (redirected from {origin})"
    return origin


def send_failure(exc: requests.RequestException, origin: str) -> WireError:
    """The failure for an exception raised while sending a request and reading
    its response headers (the redirects requests followed included)."""
    at = where(getattr(getattr(exc, "request", None), "url", None), origin)
    why = _why(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        return WireError(f"TLS error talking to {at}: {why}", reason=Reason.TLS)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return WireError(
            f"cannot connect to {at}: timed out", reason=Reason.UNREACHABLE, transient=True
        )
    if isinstance(exc, requests.exceptions.ReadTimeout) or (
        isinstance(exc, requests.exceptions.ConnectionError) and "Read timed out" in str(exc)
    ):
        return WireError(
            f"{at} stopped responding (read timed out)", reason=Reason.TIMEOUT, transient=True
        )
    if isinstance(exc, requests.exceptions.TooManyRedirects):
        return WireError(f"{origin} redirected too many times", reason=Reason.PROTOCOL)
    if isinstance(
        exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)
    ):
        return WireError(
            f"transfer from {at} was interrupted: {why}",
            reason=Reason.INTERRUPTED,
            transient=True,
        )
    if isinstance(exc, requests.exceptions.ConnectionError):
        return WireError(
            f"cannot connect to {at}: {why}", reason=Reason.UNREACHABLE, transient=True
        )
    # an invalid redirect target, header or scheme
    return WireError(
        f"unusable response from {at}: {redact_url(str(exc))[:300]}", reason=Reason.PROTOCOL
    )


def _summarise(resp: requests.Response, where_: str, low_speed: int, window: float) -> str:
    """The registry's ``{"errors": [{code, message}]}``, or the start of the body."""
    raw = bytearray()
    with contextlib.suppress(WireError):  # the status says enough
        for chunk in iter_body(resp, Meter(where_, low_speed, window)):
            raw += chunk
            if len(raw) >= MAX_ERROR_BODY:
                break
    text = bytes(raw[:MAX_ERROR_BODY]).decode("utf-8", "replace")
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


# -- a deadline for response headers -------------------------------------------------

#: seconds the response headers of the request being sent may take, all together
_HEADERS_WITHIN: ContextVar[float | None] = ContextVar("headers_within", default=None)


class _HeadersDeadline:
    """Shuts a socket down when the response headers are late (a per-read timeout
    cannot catch a server that sends them a byte at a time)."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._done = False
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            with contextlib.suppress(OSError):  # the socket itself, under any TLS layer
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def finish(self) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()


def _get_response(conn: urllib3.connection.HTTPConnection, get: Callable[[], T]) -> T:
    seconds = _HEADERS_WITHIN.get()
    if seconds is None or conn.sock is None:
        return get()
    deadline = _HeadersDeadline(conn.sock, seconds)
    try:
        return get()
    except Exception:
        if deadline.fired:  # urllib3 makes this a read timeout
            raise TimeoutError(f"no complete response headers after {seconds:g} s") from None
        raise
    finally:
        deadline.finish()


class _HTTPConnection(urllib3.connection.HTTPConnection):
    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        return _get_response(self, super().getresponse)


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        return _get_response(self, super().getresponse)


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter with connections that honour the headers deadline."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


# -- one endpoint ----------------------------------------------------------------------

_REPO_PATH_RE = re.compile(r"^/v2/(?P<name>.+)/(?:manifests|blobs|tags)/")


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
        adapter = _Adapter()
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
        length = _content_length(resp)
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
            what += f" (redirected to {_origin(resp.url)})"
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
        summary = _summarise(
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
        origin = _origin(url)
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
            token = _HEADERS_WITHIN.set(self.read_timeout)
            try:
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
            finally:
                _HEADERS_WITHIN.reset(token)
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
