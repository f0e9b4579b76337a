"""Several recipes on one command line, each built as a lone build would be.

``-j N`` (default: the CPU count) runs up to N at once, one forked process per
recipe: its own key locks, temp dirs, signal handling and one-line errors on
stderr, its stdout (store paths, pushed references, JSON events) sent through
a pipe. The parent prints each recipe's stdout in recipe order as soon as the
recipes before it are done, so ``a b`` prints a's path before b's whichever
finishes first. Progress lines start with the recipe's name, JSON events carry
a ``recipe`` field. A terminating signal stops every child (each removes its
temp dirs) and the parent exits 128+n; a child whose parent dies gets SIGTERM.
``-j 1`` builds them one after the other in this process. Either way every
recipe is tried, a failure is one line naming the recipe, and the exit status
is the first failing recipe's (else 0).
"""

from __future__ import annotations

import ctypes
import functools
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from banger_build import progress, signals
from banger_build.errors import Reason
from banger_build.progress import Reporter

#: Exit status of a child that failed before it could say why (a bug).
_INTERNAL = 70
_PR_SET_PDEATHSIG = 1


@dataclass
class _Child:
    n: int
    recipe: Path
    label: str
    pid: int = 0
    fd: int = -1  # its stdout, read end
    out: bytearray = field(default_factory=bytearray)
    status: int | None = None


def labels(recipes: Sequence[Path]) -> list[str]:
    """What names each recipe in progress lines: its file's stem, or its path when
    two recipes share a stem."""
    stems = [r.stem for r in recipes]
    return [s if stems.count(s) == 1 else str(r) for s, r in zip(stems, recipes, strict=True)]


def run_in_turn(
    recipes: Sequence[Path], one: Callable[[int, Path], int], reporter: Reporter
) -> int:
    """``-j 1``: one after the other, every recipe tried; stops at a signal."""
    from banger_build.cli import guarded

    first = 0
    for n, (recipe, label) in enumerate(zip(recipes, labels(recipes), strict=True), 1):
        _name(reporter, recipe, label)
        status = guarded(functools.partial(one, n, recipe), f"{recipe}: ")
        if status >= 128:  # interrupted (or stdout gone): the rest would be too
            return status
        first = first or status
    return first


def run_parallel(
    recipes: Sequence[Path],
    one: Callable[[int, Path], int],
    jobs: int,
    reporter: Reporter,
) -> int:
    children = [
        _Child(n, recipe, label)
        for n, (recipe, label) in enumerate(zip(recipes, labels(recipes), strict=True), 1)
    ]
    waiting = list(children)
    running: dict[int, _Child] = {}
    printed = 0
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                child = waiting.pop(0)
                with signals.deferred():  # forked and recorded, or neither
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


def _name(reporter: Reporter, recipe: Path, label: str) -> None:
    reporter.prefix = f"{label}: "
    if isinstance(reporter, progress.JsonReporter):
        reporter.fields = {"recipe": str(recipe)}


def _start(child: _Child, one: Callable[[int, Path], int], reporter: Reporter) -> None:
    read, write = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: build, report, and never return into the parent's code
        status = _INTERNAL
        try:
            signals.after_fork()
            _die_with(parent)
            os.close(read)
            os.dup2(write, 1)
            os.close(write)
            parent_stdout = sys.stdout
            from banger_build.cli import guarded, whole_writes_stdout

            sys.stdout = whole_writes_stdout(1)
            if reporter.stream is parent_stdout:  # --json: events into the pipe too
                reporter.stream = sys.stdout
            _name(reporter, child.recipe, child.label)
            status = guarded(functools.partial(one, child.n, child.recipe), f"{child.recipe}: ")
        except BaseException:  # BANGER_BUILD_DEBUG=1 (guarded re-raises), or a bug
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(status)
    os.close(write)
    child.pid, child.fd = pid, read


def _die_with(parent: int) -> None:
    """SIGTERM this process when the parent dies (Linux), so an orphan stops."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


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
        code = os.waitstatus_to_exitcode(status)
        if code < 0:  # killed by a signal before it could say why
            name = signal.Signals(-code).name
            message = f"{child.recipe}: the build was killed by {name}"
            print(f"banger-build: error: {message}", file=sys.stderr, flush=True)
            progress.report_error(Reason.KILLED, message, 128 - code)
            code = 128 - code
        child.status = code
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
