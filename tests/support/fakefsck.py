"""A stand-in e2fsck for the tests that stop a build while it checks (``--fsck``),
and what they check afterwards.

``fake_e2fsck(tmp, script)`` writes ``tmp/bin/e2fsck`` (``#!/bin/sh`` and
``script``) and returns the environment entries that put it first on PATH;
``hanging_e2fsck(tmp)`` is one that records its pid in ``tmp/markers/`` and
sleeps, so a test knows when each build is checking. ``gone(pid)`` says a
process is gone (or a zombie); ``assert_no_leftovers(home)`` asserts the
home's temp dir and store are empty.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def fake_e2fsck(tmp: Path, script: str) -> dict[str, str]:
    fake = tmp / "bin"
    fake.mkdir()
    (fake / "e2fsck").write_text("#!/bin/sh\n" + script)
    (fake / "e2fsck").chmod(0o755)
    return {"PATH": f"{fake}:{os.environ['PATH']}"}


def hanging_e2fsck(tmp: Path) -> tuple[dict[str, str], Path]:
    """(the PATH entry, the markers directory: one file per e2fsck started, its pid)."""
    markers = tmp / "markers"
    markers.mkdir()
    return fake_e2fsck(tmp, f"touch {markers}/$$\nsleep 600\n"), markers


def wait_for_markers(
    markers: Path,
    count: int,
    running: subprocess.Popen[str] | None = None,
    timeout: float = 120,
) -> None:
    """Until ``count`` e2fsck runs started (or ``timeout`` seconds); with ``running``,
    assert that process is still running meanwhile."""
    deadline = time.monotonic() + timeout
    while len(list(markers.iterdir())) < count and time.monotonic() < deadline:
        if running is not None:
            assert running.poll() is None, running.communicate()
        time.sleep(0.05)


def gone(pid: int) -> bool:
    """The process ``pid`` no longer runs: it is not there, or it is a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


def assert_no_leftovers(home: Path) -> None:
    assert list((home / "tmp").iterdir()) == []
    assert list((home / "store").iterdir()) == []
