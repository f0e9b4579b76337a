"""Progress for humans: a live line on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Reporter:
    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.quiet = quiet
        self._live = False
        self._last = 0.0
        self._started = time.monotonic()

    def _clear(self) -> None:
        if self._live:
            self.stream.write("\r\x1b[K")
            self._live = False

    def step(self, message: str) -> None:
        """A stage starts: one line, always."""
        if self.quiet:
            return
        self._clear()
        elapsed = time.monotonic() - self._started
        self.stream.write(f"[{elapsed:6.1f}s] {message}\n")
        self.stream.flush()

    def always(self, message: str) -> None:
        """Something the user must hear even with --quiet (e.g. a changed lock file)."""
        self._clear()
        self.stream.write(f"banger-build: {message}\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        if self.quiet:
            return
        self._clear()
        self.stream.write(f"         {message}\n")
        self.stream.flush()

    def progress(self, what: str, done: int, total: int | None) -> None:
        """Byte progress: redrawn in place on a terminal, silent otherwise."""
        if self.quiet or not self.tty:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and (total is None or done < total):
            return
        self._last = now
        pct = f" {100 * done // total:3d}%" if total else ""
        self.stream.write(f"\r\x1b[K         {what}: {done / 1e6:8.1f} MB{pct}")
        self.stream.flush()
        self._live = True

    def done(self) -> None:
        self._clear()
