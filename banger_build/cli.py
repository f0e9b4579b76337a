"""Command line: ``banger-build [build] RECIPE`` and the other subcommands.

Every way a command ends is one line on stderr (or none) and an exit status:

    0    success
    1    an error the user can act on (``banger-build: error: ...``, a BangerError)
    2    a usage error (argparse)
    70   an internal error: a bug (one line; the traceback with BANGER_BUILD_DEBUG=1)
    129, 130, 143   SIGHUP, SIGINT, SIGTERM: children killed, temp dirs removed
    141  stdout was closed (``banger-build render R | head``): quietly

No traceback reaches a user unless BANGER_BUILD_DEBUG is set.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from banger_build import __version__, progress, signals
from banger_build.commands import (
    boot,
    catalog,
    check,
    completion,
    gc,
    init,
    kernel,
    key,
    lock,
    ls,
    push,
    show,
    update,
    verify,
    why,
)
from banger_build.commands import build as build_command
from banger_build.commands import bundle as bundle_command
from banger_build.commands import file as file_command
from banger_build.commands import render as render_command
from banger_build.errors import BangerError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS: tuple[ModuleType, ...] = (
    build_command,
    init,
    check,
    show,
    why,
    lock,
    update,
    ls,
    gc,
    boot,
    render_command,
    kernel,
    file_command,
    key,
    verify,
    bundle_command,
    push,
    catalog,
    completion,
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="banger-build",
        description="Build a bootable microVM root filesystem from a recipe, "
        "into a content-addressed store. `banger-build RECIPE` is `banger-build build RECIPE`.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"banger-build {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        p = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=prose(module.__doc__ or ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def prose(doc: str) -> str:
    """A module docstring as help text: ``code`` marks dropped."""
    return doc.replace("``", "").strip()


def arrange(args: list[str]) -> list[str]:
    """Put the command first, wherever it is on the line, so shared options may
    come before it (``banger-build --home X ls``, ``banger-build -q R.toml``);
    with no command word, the line is a build (``banger-build R.toml``). A first
    word that is neither a command nor a path but close to a command is a typo:
    UsageError with a suggestion."""
    names = [m.NAME for m in COMMANDS]
    if not args or args[0] in ("-h", "--help", "-V", "--version"):
        return args
    for i, word in enumerate(args):
        if word in names:
            return [word, *args[:i], *args[i + 1 :]]
        if word == "--":
            break
    first = next((w for w in args if not w.startswith("-")), None)
    if first is not None and "/" not in first and "." not in first and not os.path.exists(first):
        close = difflib.get_close_matches(first, names, n=1, cutoff=0.6)
        if close:
            raise UsageError(f"unknown command {first!r} (did you mean {close[0]!r}?)")
    return ["build", *args]


class UsageError(Exception):
    """A command line that cannot be meant as written (exit 2, like argparse's)."""


EXIT_ERROR = 1
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


class StdoutClosed(Exception):
    """Our stdout's reader went away (``banger-build render R | head``)."""


class _WholeWrites(io.RawIOBase):
    """stdout's fd, written whole or not at all: a pipe whose reader leaves mid-write
    returns a short count (and only the next write EPIPE), which CPython's
    BufferedWriter can report as success; here the rest is written, so the
    broken pipe surfaces as BrokenPipeError."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self._fd, view[done:])
        except BrokenPipeError as exc:
            raise StdoutClosed() from exc
        return done


def _reliable_stdout() -> None:
    out = sys.stdout
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's capture): nothing to do
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(_WholeWrites(fd)),
        encoding=out.encoding,
        errors=out.errors,
        line_buffering=bool(out.line_buffering),
    )


def whole_writes_stdout(fd: int) -> io.TextIOWrapper:
    """A text stdout on ``fd`` written whole, a closed reader raising StdoutClosed."""
    return io.TextIOWrapper(
        io.BufferedWriter(_WholeWrites(fd)), encoding="utf-8", line_buffering=True
    )


def _quiet_stdout() -> None:
    """stdout is gone: point it at /dev/null so the final flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    progress.reset()
    return guarded(lambda: _run(argv))


def guarded(run: Callable[[], int], label: str = "") -> int:
    """Run a command: every failure one line on stderr and an exit status. ``label``
    starts an error line that does not start with it already (a recipe's path)."""
    debug = bool(os.environ.get("BANGER_BUILD_DEBUG"))
    try:
        status = run()
        sys.stdout.flush()  # a reader that went away is found here, not at exit
        signals.checkpoint()  # a signal whose raise was lost still ends the command
        return status
    except StdoutClosed:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as exc:
        return _interrupted(exc.signum if isinstance(exc, signals.Terminated) else None)
    except BangerError as exc:
        if debug:
            raise
        if signals.pending() is not None:  # the error is the interruption's doing
            return _interrupted(None)
        text = str(exc)
        print(
            f"banger-build: error: {'' if text.startswith(label) else label}{text}", file=sys.stderr
        )
        progress.report_error(exc.reason, str(exc), EXIT_ERROR)
        return EXIT_ERROR
    except Exception as exc:  # a bug: one line, a distinct status
        if debug:
            raise
        if signals.pending() is not None:
            return _interrupted(None)
        message = f"internal error: {type(exc).__name__}: {exc}"
        print(
            f"banger-build: {message} "
            "(a bug in banger-build; BANGER_BUILD_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        progress.report_error("internal", message, EXIT_INTERNAL)
        return EXIT_INTERNAL


def _run(argv: Sequence[str] | None) -> int:
    parser = make_parser()
    try:
        args_list = arrange(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"banger-build: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.handler(args))


def _interrupted(signum: int | None) -> int:
    signals.delivered()
    signum = signum or signals.pending_or(signal.SIGINT)
    name = signal.Signals(signum).name
    with contextlib.suppress(OSError, ValueError, StdoutClosed):
        print(f"banger-build: interrupted by {name}", file=sys.stderr)
        progress.report_error("interrupted", f"interrupted by {name}", 128 + signum)
    return 128 + signum


def entry_point() -> int:
    """The ``banger-build`` console script: ``main`` with signals handled."""
    signals.install()
    _reliable_stdout()
    try:
        return main()
    except KeyboardInterrupt as exc:  # one that arrived while main was reporting
        return _interrupted(exc.signum if isinstance(exc, signals.Terminated) else None)
    finally:
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(entry_point())
