"""The one way banger-build runs a subprocess.

``run()`` takes an argv list, never a shell string. On failure it raises
ToolError naming the command, its exit code and the end of its stderr. A tool
that is not installed is "X not found", not a traceback. Tools run with a
clean environment (``LC_ALL=C``, ``TZ=UTC``, a fixed PATH) so the bytes they
produce do not depend on the caller's locale, time zone or e2fsprogs config.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import IO

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
    capturing it; stderr is always captured.
    """
    args = [os.fspath(a) for a in argv]
    exe = find_tool(args[0]) if "/" not in args[0] else args[0]
    try:
        proc = subprocess.run(
            [exe, *args[1:]],
            input=input,
            stdin=stdin if input is None else None,
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else tool_env(),
            cwd=cwd,
            check=False,
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise ToolError(f"{args[0]} not found", argv=args, reason=Reason.TOOL_MISSING) from exc
    except subprocess.TimeoutExpired as exc:
        raise ToolError(
            f"{shlex.join(args)} timed out after {timeout}s", argv=args, reason=Reason.TOOL_TIMEOUT
        ) from exc
    if check and proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace")
        raise ToolError(
            f"{shlex.join(args)} failed with exit code {proc.returncode}:\n{_tail(stderr)}",
            argv=args,
            returncode=proc.returncode,
            stderr=stderr,
        )
    return proc


def tool_version(name: str) -> str:
    """The version an e2fsprogs tool reports on stderr (e.g. ``1.47.0``)."""
    proc = run([name, "-V"], check=False)
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    for word in text.split():
        if word[:1].isdigit() and "." in word:
            return word.rstrip(",")
    raise ToolError(f"cannot read the version of {name}: {_tail(text)}", argv=[name, "-V"])
