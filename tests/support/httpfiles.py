"""Files served over plain HTTP on loopback by Python's http.server, for ``url`` inputs.

Fixture ``http_files`` (function): an ``HttpFiles`` serving a fresh directory on
``127.0.0.1:<free port>``; ``put(name, data)`` writes a file there and returns
its URL; a missing name answers 404. Stopped at the end of the test (``close``
stops it earlier).
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class HttpFiles:
    """Python's http.server on loopback, serving a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_Quiet, directory=str(root))
        self.closed = False
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def put(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return f"{self.url}/{name}"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_files(tmp_path: Path) -> Iterator[HttpFiles]:
    root = tmp_path / "served"
    root.mkdir()
    served = HttpFiles(root)
    yield served
    served.close()
