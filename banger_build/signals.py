"""Terminating signals as one exception, raised only where it is safe.

SIGINT, SIGTERM and SIGHUP become ``Terminated`` (a KeyboardInterrupt), raised
in the main thread so every ``finally`` and context manager runs: child
process groups are killed, temp dirs removed, locks released.

Two things make that reliable:

- ``deferred()`` marks a critical section (starting a child and recording
  it, killing one, taking a lock): a signal arriving inside is recorded and
  raised when the section ends, so no child is ever started unrecorded and
  no kill is cut short.
- A raise can be lost (it may land in a ``__del__`` or in code that catches
  BaseException), so the signal stays pending: ``checkpoint()`` raises it
  again; the build calls it between steps, and the CLI before it reports
  success. ``delivered()`` marks it handled once the CLI has caught it.

Handlers are installed only by the command-line entry point; a library
caller keeps its own.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from types import FrameType

TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """A terminating signal arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _State:
    pending: int | None = None  # the first signal that arrived
    delivered = False  # the CLI caught it: nothing raises it again
    depth = 0  # inside deferred() sections


_state = _State()


def _may_raise() -> bool:
    """Not inside a critical section, not yet delivered, and not while an
    exception is being handled (cleanup after the first raise runs in peace)."""
    return (
        _state.pending is not None
        and not _state.delivered
        and _state.depth == 0
        and sys.exc_info()[1] is None
    )


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state.pending is None:
        _state.pending = signum
    if _may_raise():
        raise Terminated(_state.pending)


def install() -> None:
    for sig in TERMINATING:
        signal.signal(sig, _handler)


def checkpoint() -> None:
    """Raise the pending signal if it has not reached the CLI yet."""
    if _may_raise():
        assert _state.pending is not None
        raise Terminated(_state.pending)


def pending() -> int | None:
    """The signal that arrived and has not been delivered, if any."""
    return None if _state.delivered else _state.pending


def pending_or(default: int) -> int:
    return _state.pending if _state.pending is not None else default


def delivered() -> None:
    _state.delivered = True


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A critical section: a signal arriving inside is raised when it ends."""
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
    checkpoint()


def after_fork() -> None:
    """In a forked child: no critical section of the parent's is open here."""
    _state.depth = 0


def reset() -> None:
    """Forget any pending signal (tests that deliver signals in-process)."""
    _state.pending = None
    _state.delivered = False
    _state.depth = 0
