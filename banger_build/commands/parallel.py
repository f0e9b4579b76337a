"""Several recipes at once: one forked process per recipe, at most ``jobs`` at a time.

Each child builds its recipe exactly as a lone build would (its own key locks,
temp dirs, signal handling and one-line errors on stderr) and writes its stdout
(store paths, pushed references, JSON events) into a pipe. The parent prints
those in recipe order as each earlier recipe finishes, so ``a b`` prints a's
path before b's whichever finishes first. Progress lines on stderr carry the
recipe's name. A terminating signal reaches every child (they share the
parent's process group from a terminal; a ``kill`` of the parent is forwarded),
each removes its temp dirs, and the parent exits 128+n. The exit status is the
first failing recipe's, else 0.
"""

from __future__ import annotations

import io
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from banger_build import signals
from banger_build.progress import Reporter


@dataclass
class _Child:
    n: int
    recipe: Path
    pid: int = 0
    fd: int = -1  # its stdout, read end
    out: bytearray = field(default_factory=bytearray)
    status: int | None = None


def run_parallel(
    recipes: Sequence[Path],
    one: Callable[[int, Path], int],
    jobs: int,
    reporter: Reporter,
) -> int:
    children = [_Child(n, recipe) for n, recipe in enumerate(recipes, 1)]
    waiting = list(children)
    running: dict[int, _Child] = {}
    printed = 0
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                child = waiting.pop(0)
                _start(child, one, reporter)
                running[child.pid] = child
            _pump(running)
            while printed < len(children) and children[printed].status is not None:
                _emit(children[printed].out)
                printed += 1
    except BaseException:
        for child in running.values():  # a signal (or a bug) here: the children go too
            _stop(child)
        raise
    return next((c.status for c in children if c.status), 0)


def _start(child: _Child, one: Callable[[int, Path], int], reporter: Reporter) -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: build, report, and never return into the parent's code
        status = 70
        try:
            os.close(read)
            os.dup2(write, 1)
            os.close(write)
            parent_stdout = sys.stdout
            sys.stdout = io.TextIOWrapper(
                io.FileIO(1, "w", closefd=False), encoding="utf-8", line_buffering=True
            )
            if reporter.stream is parent_stdout:  # --json: events into the pipe too
                reporter.stream = sys.stdout
            reporter.prefix = f"{child.recipe.stem}: "
            from banger_build.cli import guarded

            status = guarded(lambda: one(child.n, child.recipe), f"{child.recipe}: ")
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)
    os.close(write)
    child.pid, child.fd = pid, read


def _pump(running: dict[int, _Child]) -> None:
    """Read what the children wrote; reap the ones that ended."""
    fds = {c.fd: c for c in running.values() if c.fd >= 0}
    if fds:
        ready, _, _ = select.select(list(fds), [], [], 0.2)
        for fd in ready:
            data = os.read(fd, 65536)
            if data:
                fds[fd].out += data
            else:
                os.close(fd)
                fds[fd].fd = -1
    for pid, child in list(running.items()):
        if child.fd >= 0:
            continue  # its stdout is still open: not done yet
        _, status = os.waitpid(pid, 0)
        child.status = os.waitstatus_to_exitcode(status)
        if child.status < 0:  # killed by a signal
            child.status = 128 - child.status
        del running[pid]
    signals.checkpoint()


def _emit(data: bytes | bytearray) -> None:
    sys.stdout.write(bytes(data).decode("utf-8", "surrogateescape"))
    sys.stdout.flush()


def _stop(child: _Child) -> None:
    sig = signals.pending_or(signal.SIGTERM)
    try:
        os.kill(child.pid, sig)
        os.waitpid(child.pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    if child.fd >= 0:
        os.close(child.fd)
        child.fd = -1
