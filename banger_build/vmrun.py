"""Running qemu and watching its serial console (``boot``'s machinery).

``Console`` copies the console's bytes to a sink and searches them, without
their colour codes, for wanted texts (across read boundaries), a kernel
panic and a guest reboot. ``run_vm`` runs qemu in its own process group
until a condition holds, it exits or a deadline passes; qemu is always
killed and reaped.
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from banger_build.errors import BangerError, Reason, ToolError
from banger_build.run import spawned

PANIC = "Kernel panic - not syncing"
REBOOT = "reboot: Restarting system"
ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]")  # CSI sequences (systemd's colours)
ANSI_INCOMPLETE = re.compile(rb"\x1b(\[[0-?]*[ -/]*)?$")
CONTEXT_LINES = 4  # console lines quoted in an error
MAX_LINE = 4096


class BootError(BangerError):
    """The VM did not do what was asked (timeout, panic, qemu failure)."""

    reason = Reason.BOOT_FAILED


class Console:
    """The serial console: copied to ``sink`` as is, and searched, without its
    colour codes, for the wanted texts (across read boundaries), a kernel panic
    and a guest reboot (whole lines)."""

    def __init__(self, texts: Sequence[bytes], sink: Callable[[bytes], None] | None = None) -> None:
        self.texts = tuple(texts)
        self.sink = sink
        self.found: set[bytes] = set()
        self.panic: str | None = None
        self.rebooted = False
        self.lines: deque[str] = deque(maxlen=CONTEXT_LINES)  # the last non-empty lines
        self.before_panic: list[str] = []
        self._keep = max([len(t) for t in self.texts], default=0) + 1
        self._tail = b""
        self._partial = b""
        self._held = b""  # an escape sequence cut by a read

    def feed(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink(data)
        raw = self._held + data  # colour codes are matched as if they were not there
        held = ANSI_INCOMPLETE.search(raw)
        self._held = raw[held.start() :] if held else b""
        text = ANSI.sub(b"", raw[: held.start()] if held else raw)
        window = self._tail + text
        self.found.update(t for t in self.texts if t in window)
        self._tail = window[-self._keep :]
        *complete, partial = (self._partial + text).split(b"\n")
        self._partial = partial[-MAX_LINE:]
        for raw in complete:
            self._line(raw.decode("utf-8", "replace").strip())

    def _line(self, line: str) -> None:
        if not line:
            return
        if self.panic is None and PANIC in line:
            self.panic = line[line.index(PANIC) :]
            self.before_panic = list(self.lines)
        self.rebooted = self.rebooted or REBOOT in line
        self.lines.append(line)

    def close(self) -> None:
        """The console ended: its last line counts even without a newline."""
        self._line(self._partial.decode("utf-8", "replace").strip())
        self._partial = b""

    def missing(self) -> list[str]:
        return [t.decode() for t in self.texts if t not in self.found]


@dataclass(frozen=True)
class Ended:
    exited: bool  # qemu exited by itself (else: stopped by us, done or deadline)
    returncode: int | None
    stderr: str
    seconds: float


def watch(
    proc: subprocess.Popen[bytes], console: Console, deadline: float, done: Callable[[], bool]
) -> Ended:
    """Feed qemu's stdout to ``console`` until ``done()``, qemu exits or the deadline."""
    started = time.monotonic()
    err = bytearray()
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    try:
        while sel.get_map() and not done():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(min(left, 0.5)):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                elif key.data == "err":
                    err += data[: max(0, 65536 - len(err))]
                else:
                    console.feed(data)
        exited = not sel.get_map()
    finally:
        sel.close()
    returncode = None
    if exited:
        try:
            returncode = proc.wait(5.0)
        except subprocess.TimeoutExpired:
            exited = False
    stderr = err.decode("utf-8", "replace")
    return Ended(exited, returncode, stderr, time.monotonic() - started)


def run_vm(
    argv: Sequence[str], console: Console, deadline: float, done: Callable[[], bool]
) -> Ended:
    """Run qemu (its own process group, the tools' clean environment) until
    ``done()``, its exit or the deadline; it is always killed and reaped."""
    try:
        with spawned(argv) as proc:
            return watch(proc, console, deadline, done)
    except ToolError as exc:
        raise BootError(str(exc), reason=Reason.QEMU_FAILED) from exc
    finally:
        console.close()
