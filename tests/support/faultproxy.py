"""A fault-injecting HTTP proxy in front of a real registry (loopback, threaded).

``FaultProxy(upstream_url)`` listens on ``127.0.0.1:<free port>`` and forwards
every request to the upstream (the real ``docker-registry``) unchanged, the
``Host`` header included, so the registry's own ``Location`` URLs point back
at the proxy. Rules injected with ``proxy.add(fault, match=..., method=...,
times=...)`` replace the forwarding for the requests they match (by method
and path substring, first rule first; ``times=None``: every match):

* ``Status(code, body)``: answer with ``code`` and a registry-style error body;
* ``Trickle(interval, step=1)``: the upstream's status and headers, then its
  body ``step`` bytes every ``interval`` seconds;
* ``TrickleHeaders(interval)``: the status line and headers a byte at a time;
* ``Stall(after)``: headers and ``after`` bytes of the body, then silence;
* ``Cut(after)``: headers (with the full Content-Length) and ``after`` bytes
  of the body, then the connection is closed;
* ``Redirect(base)``: ``307`` to ``base`` + the request's path and query
  (a port nobody listens on, another host name for the same registry...);
* ``Reply(code, body, headers)``: answer with exactly this (a registry that
  serves what a test scripts: a referrers API, a hostile index).
* ``Lost()``: the upstream gets the request and answers, but the answer is
  lost: the connection is closed without a response.

``proxy.hits`` lists ``(method, path, what)`` for every request, ``what``
being ``"forward"`` or the fault's name. Sleeping handlers end when the
client goes away or the proxy stops; the proxy never waits for them.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import pytest

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
    }
)
#: how long a stalled or trickling handler may live at most (the client gives up long before)
MAX_FAULT_SECONDS = 120.0


@dataclass(frozen=True)
class Status:
    code: int
    message: str = "injected failure"


@dataclass(frozen=True)
class Trickle:
    interval: float
    step: int = 1


@dataclass(frozen=True)
class TrickleHeaders:
    interval: float


@dataclass(frozen=True)
class Stall:
    after: int = 0


@dataclass(frozen=True)
class Cut:
    after: int


@dataclass(frozen=True)
class Redirect:
    base: str  # scheme://host:port
    status: int = 307


@dataclass(frozen=True)
class Reply:
    code: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class Lost:
    pass


Fault = Status | Trickle | TrickleHeaders | Stall | Cut | Redirect | Reply | Lost


@dataclass
class Rule:
    fault: Fault
    match: str
    method: str | None
    times: int | None
    after: int = 0


@dataclass
class Upstream:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def head(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {self.reason}"]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in HOP_BY_HOP]
        if not any(k.lower() == "content-length" for k, _ in self.headers):
            lines.append(f"Content-Length: {len(self.body)}")
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class FaultProxy:
    upstream: str  # http://host:port of the real registry
    rules: list[Rule] = field(default_factory=list)
    hits: list[tuple[str, str, str]] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None

    # -- addresses
    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- rules
    def add(
        self,
        fault: Fault,
        *,
        match: str = "",
        method: str | None = "GET",
        times: int | None = None,
        after: int = 0,
    ) -> None:
        with self._lock:
            self.rules.append(Rule(fault, match, method, times, after))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.hits.clear()

    def count(self, what: str, match: str = "") -> int:
        with self._lock:
            return sum(1 for _, path, w in self.hits if w == what and match in path)

    def _rule_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for rule in self.rules:
                if rule.match in path and rule.method in (None, method):
                    if rule.after > 0:
                        rule.after -= 1
                        continue
                    if rule.times is not None:
                        if rule.times <= 0:
                            continue
                        rule.times -= 1
                    return rule.fault
        return None

    # -- running
    def start(self) -> Self:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle_one(self) -> None:
                proxy._handle(self)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self.port = int(self._httpd.server_address[1])
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one request
    def _forward(self, h: BaseHTTPRequestHandler, body: bytes | None) -> Upstream:
        parts = urllib.parse.urlsplit(self.upstream)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return Upstream(resp.status, resp.reason, list(resp.getheaders()), data)
        finally:
            conn.close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        fault = self._rule_for(h.command, h.path)
        with self._lock:
            self.hits.append((h.command, h.path, type(fault).__name__ if fault else "forward"))
        h.close_connection = True
        try:
            if fault is None:
                up = self._forward(h, body)
                self._send(h, up.head() + (b"" if h.command == "HEAD" else up.body))
            elif isinstance(fault, Status):
                data = json.dumps(
                    {"errors": [{"code": "INJECTED", "message": fault.message}]}
                ).encode()
                up = Upstream(fault.code, "Injected", [("Content-Type", "application/json")], data)
                self._send(h, up.head() + data)
            elif isinstance(fault, Reply):
                up = Upstream(fault.code, "Scripted", list(fault.headers), fault.body)
                self._send(h, up.head() + (b"" if h.command == "HEAD" else fault.body))
            elif isinstance(fault, Lost):
                self._forward(h, body)  # the registry acts on it; nobody hears back
            elif isinstance(fault, Redirect):
                location = fault.base.rstrip("/") + h.path
                up = Upstream(fault.status, "Redirect", [("Location", location)], b"")
                self._send(h, up.head())
            else:
                up = self._forward(h, body)
                self._misbehave(h, fault, up)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: that is what these faults are for

    def _send(self, h: BaseHTTPRequestHandler, data: bytes) -> None:
        h.wfile.write(data)
        h.wfile.flush()

    def _client_gone(self, h: BaseHTTPRequestHandler, seconds: float) -> bool:
        """Wait ``seconds``; True when the client closed its side or the proxy stops."""
        if self._stop.wait(0):
            return True
        sock: socket.socket = h.connection
        readable, _, _ = select.select([sock], [], [], seconds)
        if readable:
            try:
                return sock.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True
        return self._stop.is_set()

    def _misbehave(self, h: BaseHTTPRequestHandler, fault: Fault, up: Upstream) -> None:
        head = up.head()
        body = b"" if h.command == "HEAD" else up.body
        deadline = time.monotonic() + MAX_FAULT_SECONDS
        if isinstance(fault, TrickleHeaders):
            for i in range(len(head)):
                self._send(h, head[i : i + 1])
                if time.monotonic() > deadline or self._client_gone(h, fault.interval):
                    return
            self._send(h, body)
            return
        self._send(h, head)
        if isinstance(fault, Trickle):
            for i in range(0, len(body), fault.step):
                self._send(h, body[i : i + fault.step])
                if time.monotonic() > deadline or self._client_gone(h, fault.interval):
                    return
        elif isinstance(fault, Stall):
            self._send(h, body[: fault.after])
            while time.monotonic() < deadline and not self._client_gone(h, 0.2):
                pass
        elif isinstance(fault, Cut):
            self._send(h, body[: fault.after])  # and the connection closes


@pytest.fixture
def fault_proxy(registry: Any) -> Iterator[FaultProxy]:
    """A ``FaultProxy`` in front of the shared registry; no rules yet."""
    with FaultProxy(registry.url) as proxy:
        yield proxy
