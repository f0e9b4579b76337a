"""Terminating signals: deferred inside critical sections, never lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger_build import signals
from banger_build.run import run, stop


@pytest.fixture
def handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in signals.TERMINATING}
    signals.reset()
    signals.install()
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        signals.reset()


def test_a_signal_inside_a_critical_section_is_raised_when_it_ends(handlers: None) -> None:
    reached = []
    with pytest.raises(signals.Terminated) as exc, signals.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        reached.append("end of the section")
    assert reached == ["end of the section"] and exc.value.signum == signal.SIGTERM


def test_a_swallowed_raise_is_raised_again_at_the_next_checkpoint(handlers: None) -> None:
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.05)
    except BaseException:  # what a careless __del__ or library does
        pass
    assert signals.pending() == signal.SIGHUP
    with pytest.raises(signals.Terminated):
        signals.checkpoint()
    signals.delivered()
    signals.checkpoint()  # delivered: nothing more


def test_cleanup_after_the_first_raise_is_not_cut_short(handlers: None) -> None:
    cleaned = []
    with pytest.raises(signals.Terminated):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal during cleanup
            time.sleep(0.05)
            cleaned.append("done")
    assert cleaned == ["done"]


def test_stop_kills_a_group_that_ignores_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        ["sh", "-c", "trap '' TERM; sleep 600 & echo $!; wait"],
        stdout=subprocess.PIPE,
        text=True,
        process_group=0,
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    t0 = time.monotonic()
    stop(proc, grace=0.5)  # type: ignore[arg-type]
    assert proc.returncode is not None and time.monotonic() - t0 < 15
    time.sleep(0.1)
    state = Path(f"/proc/{child}/stat")
    assert not state.exists() or state.read_text().split(") ")[1].startswith("Z")


def test_a_signal_while_run_waits_kills_the_tool(tmp_path: Path) -> None:
    """End to end in a child interpreter: SIGTERM during run() of a tool with a
    child of its own leaves neither running."""
    marker = tmp_path / "pids"
    code = (
        "import sys\n"
        "from banger_build import signals\n"
        "from banger_build.run import run\n"
        "signals.install()\n"
        "try:\n"
        f"    run(['sh', '-c', 'sleep 600 & echo $$ $! > {marker}; wait'])\n"
        "except signals.Terminated as exc:\n"
        "    sys.exit(128 + exc.signum)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(repo)}
    )
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    for pid in map(int, marker.read_text().split()):
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split(") ")[1].startswith("Z")
    assert run(["true"]).returncode == 0
