"""Several recipes on one command line build at once, each in a process of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.e2e import BASE, UPPER, push, write_recipe
from tests.support.fakefsck import (
    assert_no_leftovers,
    fake_e2fsck,
    gone,
    hanging_e2fsck,
    wait_for_markers,
)
from tests.support.oci import Entry
from tests.support.registry import RegistryServer

REPO = Path(__file__).resolve().parents[1]


def _cli(
    home: Path, *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "banger_build", "--home", str(home), *args],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _recipes(tmp: Path, registry: RegistryServer) -> tuple[Path, Path]:
    push(registry, "par/a", [BASE, UPPER])
    push(registry, "par/b", [BASE, [Entry.file("etc/b", b"b")]])
    a = write_recipe(tmp / "r", f"{registry.host}/par/a:v1", name="a.toml")
    b = write_recipe(tmp / "r", f"{registry.host}/par/b:v1", name="b.toml")
    return a, b


def test_two_recipes_build_at_once_and_print_in_recipe_order(
    tmp_path: Path, registry: RegistryServer
) -> None:
    a, b = _recipes(tmp_path, registry)
    proc = _cli(tmp_path / "home", "build", "-j", "2", str(b), str(a), cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    paths = out.split()
    assert len(paths) == 2 and paths[0].endswith("-b-v1") and paths[1].endswith("-a-v1"), out
    assert os.readlink(tmp_path / "result") == paths[0]
    assert os.readlink(tmp_path / "result-2") == paths[1]
    assert "] b: built" in err and "] a: built" in err  # progress says which recipe


def test_one_failing_recipe_fails_the_command_and_the_others_still_build(
    tmp_path: Path, registry: RegistryServer
) -> None:
    a, _ = _recipes(tmp_path, registry)
    missing = write_recipe(tmp_path / "r", f"{registry.host}/par/missing:v1", name="m.toml")
    proc = _cli(tmp_path / "home", str(a), str(missing), "--no-link", cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert out.strip().endswith("-a-v1") and len(out.split()) == 1
    errors = [line for line in err.splitlines() if line.startswith("banger-build: error:")]
    assert len(errors) == 1 and str(missing) in errors[0] and "Traceback" not in err


def test_a_signal_reaches_every_build_and_leaves_no_temp_dir(
    tmp_path: Path, registry: RegistryServer
) -> None:
    a, b = _recipes(tmp_path, registry)
    env, markers = hanging_e2fsck(tmp_path)
    home = tmp_path / "home"
    proc = _cli(home, str(a), str(b), "--no-link", "--fsck", cwd=tmp_path, env=env)
    wait_for_markers(markers, 2, running=proc)
    assert len(list(markers.iterdir())) == 2  # both builds are checking at once
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    for pid in (int(p.name) for p in markers.iterdir()):
        assert gone(pid)
    assert_no_leftovers(home)


def test_in_turn_every_recipe_is_tried_and_a_failure_names_its_recipe(
    tmp_path: Path, registry: RegistryServer
) -> None:
    a, _ = _recipes(tmp_path, registry)
    missing = write_recipe(tmp_path / "r", f"{registry.host}/par/missing:v1", name="m.toml")
    proc = _cli(tmp_path / "home", "-j", "1", str(missing), str(a), "--no-link", cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert out.strip().endswith("-a-v1")  # built after the failure
    (error,) = [line for line in err.splitlines() if line.startswith("banger-build: error:")]
    assert str(missing) in error


def test_json_events_say_which_recipe_and_a_killed_build_is_reported(
    tmp_path: Path, registry: RegistryServer
) -> None:
    a, b = _recipes(tmp_path, registry)
    env = fake_e2fsck(tmp_path, "kill -KILL $PPID\n")  # the build of a recipe dies
    proc = _cli(
        tmp_path / "home", "--json", "--fsck", str(a), str(b), "--no-link", cwd=tmp_path, env=env
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGKILL, err
    events = [json.loads(line) for line in out.splitlines()]
    assert {e.get("recipe") for e in events if e["event"] == "step"} == {str(a), str(b)}
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 2 and all(e["reason"] == "killed" for e in errors), errors
    assert f"{a}: the build was killed by SIGKILL" in err


def test_builds_stop_when_the_command_is_killed(tmp_path: Path, registry: RegistryServer) -> None:
    """SIGKILL to the command itself: each build gets SIGTERM and cleans up."""
    a, b = _recipes(tmp_path, registry)
    env, markers = hanging_e2fsck(tmp_path)
    home = tmp_path / "home"
    proc = _cli(home, str(a), str(b), "--no-link", "--fsck", cwd=tmp_path, env=env)
    wait_for_markers(markers, 2)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 60
    while list((home / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_no_leftovers(home)
