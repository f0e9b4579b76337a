"""The one way banger-build runs a subprocess.

``run()`` (a tool that finishes) and ``spawned()`` (one that runs until we
stop it, like qemu) take an argv list, never a shell string, and start the
tool in its own process group with the same environment policy; whatever
interrupts us (SIGINT, SIGTERM, SIGHUP, an exception), the group is killed
and reaped before the error propagates. On failure it raises
ToolError naming the command, its exit code and the end of its stderr. A tool
that is not installed is "X not found", not a traceback. Tools run with a
clean environment (``LC_ALL=C``, ``TZ=UTC``, a fixed PATH) so the bytes they
produce do not depend on the caller's locale, time zone or e2fsprogs config.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import IO, Any

from banger_build import signals
from banger_build.errors import Reason, ToolError

# e2fsprogs lives in /sbin on Debian; an unprivileged user's PATH often lacks it.
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin")
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Debian package that provides each tool, for the "not found" hint.
_PACKAGES = {
    "mkfs.ext4": "e2fsprogs",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
}


@cache
def find_tool(name: str) -> str:
    """Absolute path of ``name``, or ToolError(reason=Reason.TOOL_MISSING)."""
    search = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_EXTRA_PATH)
    found = shutil.which(name, path=search)
    if found is None:
        pkg = _PACKAGES.get(name)
        hint = f" (install the Debian package {pkg})" if pkg else ""
        raise ToolError(f"{name} not found{hint}", argv=[name], reason=Reason.TOOL_MISSING)
    return found


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal, deterministic environment for external tools."""
    env = {"PATH": CLEAN_PATH, "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
    if extra:
        env.update(extra)
    return env


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _argv(argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    args = [os.fspath(a) for a in argv]
    return [find_tool(args[0]) if "/" not in args[0] else args[0], *args[1:]]


def stop(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """Kill ``proc``'s process group (TERM, then KILL) and reap it; a signal
    arriving meanwhile waits until the group is gone."""
    with signals.deferred():
        _stop(proc, grace)


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything the child left behind in its group
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Popen in a new process group; the group is ours to kill, whatever happens."""
    return subprocess.Popen(argv, process_group=0, **kwargs)


def _signal_words(returncode: int) -> str:
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    input: bytes | None = None,
    stdin: IO[bytes] | int | None = None,
    stdout: IO[bytes] | int | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` (tool name resolved with find_tool) and capture its output.

    ``env`` is the complete environment (default: ``tool_env()``). ``stdout``
    sends the tool's output there (e.g. ``subprocess.DEVNULL``) instead of
    capturing it; stderr is always captured. The tool runs in its own process
    group, killed and reaped if anything interrupts us (a signal, a timeout, an
    exception), so nothing outlives the command.
    """
    args = [os.fspath(a) for a in argv]
    try:
        with signals.deferred():  # started and recorded, or not started at all
            proc = _popen(
                _argv(args),
                stdin=subprocess.PIPE if input is not None else stdin,
                stdout=subprocess.PIPE if stdout is None else stdout,
                stderr=subprocess.PIPE,
                env=dict(env) if env is not None else tool_env(),
                cwd=cwd,
            )
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise ToolError(f"{args[0]} not found", argv=args, reason=Reason.TOOL_MISSING) from exc
        raise ToolError(
            f"cannot run {args[0]}: {exc.strerror}", argv=args, reason=Reason.TOOL_FAILED
        ) from exc
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        stop(proc, grace=0)
        raise ToolError(
            f"{shlex.join(args)} timed out after {timeout:g}s",
            argv=args,
            reason=Reason.TOOL_TIMEOUT,
        ) from exc
    except BaseException:
        stop(proc, grace=0)
        raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out or b"", err)
    if check and proc.returncode != 0:
        text = err.decode("utf-8", "replace")
        how = (
            _signal_words(proc.returncode)
            if proc.returncode < 0
            else f"failed with exit code {proc.returncode}"
        )
        raise ToolError(
            f"{shlex.join(args)} {how}:\n{_tail(text)}",
            argv=args,
            returncode=proc.returncode,
            stderr=text,
            reason=Reason.TOOL_KILLED if proc.returncode < 0 else Reason.TOOL_FAILED,
        )
    return result


@contextlib.contextmanager
def spawned(
    argv: Sequence[str | os.PathLike[str]], *, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running tool (qemu) with piped stdout and stderr, in its own
    process group, under the same environment policy as ``run``; killed and
    reaped when the block ends, however it ends."""
    args = [os.fspath(a) for a in argv]
    try:
        with signals.deferred():
            proc = _popen(
                _argv(args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(env) if env is not None else tool_env(),
            )
    except OSError as exc:
        reason = Reason.TOOL_MISSING if isinstance(exc, FileNotFoundError) else Reason.TOOL_FAILED
        raise ToolError(
            f"cannot start {args[0]}: {exc.strerror}", argv=args, reason=reason
        ) from exc
    try:
        yield proc
    finally:
        stop(proc)


def tool_version(name: str) -> str:
    """The version an e2fsprogs tool reports on stderr (e.g. ``1.47.0``)."""
    proc = run([name, "-V"], check=False)
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    for word in text.split():
        if word[:1].isdigit() and "." in word:
            return word.rstrip(",")
    raise ToolError(f"cannot read the version of {name}: {_tail(text)}", argv=[name, "-V"])
