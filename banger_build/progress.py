"""Progress: for humans, a live line on a terminal and plain lines otherwise
(``Reporter``, on stderr); for CI, one JSON object per line (``JsonReporter``,
on stdout, with ``--json``)::

    {"event": "step", "t": 0.12, "message": "flattening layers"}
    {"event": "timing", "t": 3.4, "step": "flatten layers", "seconds": 3.27}
    {"event": "progress", "t": 0.5, "what": "3f1c2a9b", "done": 1048576, "total": 5242880}
    {"event": "notice", "t": 0.1, "message": "wrote recipes/debian.lock: pinned ..."}
    {"event": "result", "t": 9.8, "path": "...", "key": "...", "status": "built", ...}
    {"event": "error", "t": 2.0, "reason": "layer-invalid", "message": "...", "exit": 1}

``t`` is seconds since the command started.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO


class Reporter:
    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.quiet = quiet
        self.prefix = ""  # before each line: the recipe's name when several build at once
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
        self.stream.write(f"[{elapsed:6.1f}s] {self.prefix}{message}\n")
        self.stream.flush()

    def always(self, message: str) -> None:
        """Something the user must hear even with --quiet (e.g. a changed lock file)."""
        self._clear()
        self.stream.write(f"banger-build: {self.prefix}{message}\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        if self.quiet:
            return
        self._clear()
        self.stream.write(f"         {self.prefix}{message}\n")
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

    def timing(self, step: str, seconds: float) -> None:
        """A build step ended (humans get the summary at the end of the build)."""

    def result(self, **fields: Any) -> None:
        """What the command produced (humans get it on stdout from the command)."""


#: the JSON reporter of this process, if ``--json`` is on (errors are reported there too)
_json: JsonReporter | None = None


class JsonReporter(Reporter):
    """One JSON object per line on ``stream`` (default stdout), flushed at once."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream or sys.stdout)
        self.tty = False
        #: in every event: the recipe, when several are built by one command
        self.fields: dict[str, str] = {}
        self._last_progress: dict[str, float] = {}
        global _json
        _json = self

    def emit(self, event: str, **fields: Any) -> None:
        record = {
            "event": event,
            "t": round(time.monotonic() - self._started, 3),
            **self.fields,
            **fields,
        }
        self.stream.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        self.stream.flush()

    def step(self, message: str) -> None:
        self.emit("step", message=message)

    def always(self, message: str) -> None:
        self.emit("notice", message=message)

    def note(self, message: str) -> None:
        self.emit("note", message=message)

    def progress(self, what: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        final = total is not None and done >= total
        if not final and now - self._last_progress.get(what, 0.0) < 0.5:
            return
        self._last_progress[what] = now
        self.emit("progress", what=what, done=done, total=total)

    def done(self) -> None:
        pass

    def timing(self, step: str, seconds: float) -> None:
        self.emit("timing", step=step, seconds=round(seconds, 3))

    def result(self, **fields: Any) -> None:
        self.emit("result", **fields)


def reset() -> None:
    """No JSON reporter (a new command in the same process)."""
    global _json
    _json = None


def report_error(reason: str, message: str, status: int) -> None:
    """An error ending the command, as a JSON event when ``--json`` is on."""
    if _json is not None:
        _json.emit("error", reason=reason, message=message, exit=status)
