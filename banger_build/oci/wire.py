"""Bounded HTTP: what a registry's answer may cost, and how its failures read.

The mechanics under ``transport.Endpoint``, for requests and urllib3:

- ``Budget``: the retries of one request, all causes together, with backoff
  (``Retry-After`` honoured up to ``MAX_RETRY_AFTER``);
- ``Meter`` and ``iter_body``: a body read as it arrives (``read1``, at most
  ``CHUNK`` at once) and abandoned when it moves fewer than ``low_speed``
  bytes/s over ``low_speed_time`` seconds (curl's --speed-limit/--speed-time);
- ``Adapter`` and ``headers_within``: the response headers as a whole within
  a deadline (a per-read timeout cannot catch a server sending them a byte at
  a time: the socket is shut down when the deadline passes);
- ``send_failure``, ``body_failure``, ``summarise``: exceptions of requests,
  urllib3 and the sockets under them as ``WireError``s that name the host that
  failed -- the redirect target, with the endpoint it came from, when a
  redirect led there. Nothing else is translated: our own bugs propagate.
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

import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.exceptions

from banger_build.errors import Reason
from banger_build.oci.failure import Failure
from banger_build.oci.options import redact_url

# -- limits --------------------------------------------------------------------

CHUNK = 1 << 20  # largest piece of a body read or sent at once
MAX_ERROR_BODY = 64 << 10  # bytes of an error response read for its message
BACKOFF = 0.2  # seconds before the first retry, doubled per retry
MAX_BACKOFF = 2.0
MAX_RETRY_AFTER = 10.0  # the longest Retry-After honoured
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})

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


def content_length(resp: requests.Response) -> int | None:
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


def origin_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def where(url: str | None, origin: str) -> str:
    """``origin``, or the host a redirect from it led to, named with its origin."""
    if url and urllib.parse.urlsplit(url).netloc not in ("", urllib.parse.urlsplit(origin).netloc):
        return f"{origin_of(url)} (redirected from {origin})"
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


def summarise(resp: requests.Response, where_: str, low_speed: int, window: float) -> str:
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


class Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter with connections that honour the headers deadline."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


@contextlib.contextmanager
def headers_within(seconds: float) -> Iterator[None]:
    """Requests sent in this block get their response headers in ``seconds`` or fail
    with a read timeout (through an ``Adapter``)."""
    token = _HEADERS_WITHIN.set(seconds)
    try:
        yield
    finally:
        _HEADERS_WITHIN.reset(token)
