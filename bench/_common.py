"""Shared pieces of the benches: one command's wall time and peak RSS, a project
holding a one-image recipe, and a fresh home whose blob cache already holds the
image (hard links, so a cold build reads cached blobs and downloads nothing).

Peak RSS is what GNU time reports for the command: the ``ru_maxrss`` of its
``wait4``, the largest resident set of the command or of any child it waited
for. GNU time forks the command from its own small process (about 2 MiB), so
the figure does not start from the bench's RSS, as it would for a child
spawned straight from Python (``vfork``/``exec`` keeps the parent's high-water
mark).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GNU_TIME = "/usr/bin/time"
#: e2fsprogs live in /usr/sbin, which an unprivileged PATH may lack
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BenchError(Exception):
    """A step of a bench failed; the message is one line for the user."""


@dataclass(frozen=True)
class Measured:
    seconds: float  # wall time, from start to exit
    peak: int  # bytes: the largest RSS of the command or of a child of it
    stdout: str = ""


@dataclass
class Steps:
    """A pipeline of commands: times add up, the peak RSS is the largest."""

    seconds: float = 0.0
    peak: int = 0
    parts: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, m: Measured) -> Measured:
        self.seconds += m.seconds
        self.peak = max(self.peak, m.peak)
        self.parts[name] = self.parts.get(name, 0.0) + m.seconds
        return m


def missing_tools(tools: Iterable[str]) -> list[str]:
    path = f"{os.environ.get('PATH', '')}:{TOOL_PATH}"
    return [t for t in tools if shutil.which(t, path=path) is None]


def measure(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: bytes | None = None,
) -> Measured:
    """Run ``cmd`` under GNU time; ``BenchError`` (with its stderr's tail) if it fails."""
    fd, report = tempfile.mkstemp(prefix="bench-time-")
    os.close(fd)
    try:
        started = time.perf_counter()
        proc = subprocess.run(
            [GNU_TIME, "-f", "%M", "-o", report, *cmd],
            env=dict(env) if env is not None else None,
            cwd=cwd,
            input=stdin,
            capture_output=True,
            check=False,
        )
        seconds = time.perf_counter() - started
        lines = Path(report).read_text().split()
    finally:
        os.unlink(report)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()[-3:]
        raise BenchError(f"{' '.join(cmd)}: exit {proc.returncode}: {' | '.join(tail)}")
    return Measured(seconds, int(lines[-1]) * 1024, proc.stdout.decode(errors="replace"))


def remove_tree(path: Path) -> None:
    """Remove ``path``, read-only store directories included."""

    def writable(func: Any, name: str, _exc: Any) -> None:
        parent = os.path.dirname(name)
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR)
        func(name)

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=writable)


def isolated_env(work: Path) -> dict[str, str]:
    """This environment without the user's banger-build or registry settings, and
    with the package's bytecode compiled, as an installed package has it (pip
    compiles at install): a child then measures the tool, not the compiler."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(REPO / "banger_build")],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""},
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BANGER_BUILD_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    for name in ("docker", "config"):
        (work / name).mkdir(parents=True, exist_ok=True)
    return {
        **env,
        "PYTHONPATH": str(REPO),
        "DOCKER_CONFIG": str(work / "docker"),
        "XDG_CONFIG_HOME": str(work / "config"),
        "PATH": f"{env.get('PATH', '')}:{TOOL_PATH}",
        "LC_ALL": "C",
    }


def write_project(directory: Path, ref: str, size: str = "auto") -> Path:
    """A project (a directory with .git) holding ``recipe.toml`` for image ``ref``."""
    (directory / ".git").mkdir(parents=True, exist_ok=True)
    recipe = directory / "recipe.toml"
    recipe.write_text(f'version = 1\n\n[image]\nref = "{ref}"\n\n[rootfs]\nsize = "{size}"\n')
    return recipe


def prime_home(home: Path, blobs: Iterable[Path]) -> Path:
    """A new home whose blob cache holds ``blobs`` (files named by their sha256)."""
    cache = home / "blobs" / "sha256"
    cache.mkdir(parents=True)
    for blob in blobs:
        os.link(blob, cache / blob.name)
    return home


def cli(*args: str, env: Mapping[str, str]) -> Measured:
    """``banger-build ARGS``, as the console script runs it, measured."""
    return measure([sys.executable, "-m", "banger_build", *args], env=env, cwd=REPO)


def result_event(m: Measured) -> dict[str, Any]:
    """The ``result`` event of a ``--json`` run."""
    for line in m.stdout.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "result":
                return dict(event)
    raise BenchError(f"no result event in the output: {m.stdout[-300:]}")


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
