"""Every way a command ends is one line and an exit status: host failures name the
step, the path and the errno's words; a closed stdout is quiet; a bug is exit 70;
signals kill children (qemu too) and remove temp dirs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from banger_build import cli
from banger_build.commands import show
from tests.support.e2e import BASE, push, run_cli, write_recipe
from tests.support.oci import Entry
from tests.support.registry import RegistryServer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "banger_build", *args],
        env=env or ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_bug_is_one_line_and_exit_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def broken(args: object) -> int:
        raise KeyError("oops")

    monkeypatch.setattr(show, "run", broken)
    monkeypatch.delenv("BANGER_BUILD_DEBUG", raising=False)
    code = cli.main(["show", str(tmp_path / "r.toml")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_INTERNAL == 70
    assert err.count("\n") == 1 and err.startswith("banger-build: internal error: KeyError")
    monkeypatch.setenv("BANGER_BUILD_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["show", str(tmp_path / "r.toml")])


def test_a_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    (tmp_path / "big.j2").write_text(
        "{% for i in range(1000) %}{% for j in range(200) %}line {{ i }} {{ j }}\n"
        "{% endfor %}{% endfor %}"
    )
    recipe.write_text(
        '[image]\nref = "example.org/x:1"\n\n[[templates]]\nsrc = "big.j2"\ndest = "/etc/big"\n'
    )
    proc = subprocess.run(
        f"{sys.executable} -m banger_build render {recipe} | head -c 100 >/dev/null; "
        "echo ${PIPESTATUS[0]} >&2",
        shell=True,
        executable="/bin/bash",
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stderr.strip() == str(cli.EXIT_BROKEN_PIPE)  # nothing else: no traceback


def test_a_full_disk_names_the_step_the_path_and_the_errno(
    tmp_path: Path, registry: RegistryServer
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs: run the suite as root (CI does)")
    big = os.urandom(12 << 20)  # incompressible: the blob fits, blob + spool do not
    push(registry, "robust/full", [[*BASE, Entry.file("big", big)]])
    recipe = write_recipe(tmp_path / "r", f"{registry.host}/robust/full:v1")
    home = tmp_path / "home"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "none", str(home)], check=True)
    try:
        code, out, err = run_cli(home, str(recipe), "--no-link", "-q")
        assert code == 1 and out == ""
        *notes, error = err.splitlines()  # the lock file's pin is reported first
        assert all(n.startswith("banger-build: wrote ") for n in notes), err
        assert error.startswith(f"banger-build: error: flatten layers: {home}/tmp/build-")
        assert error.endswith("/spool: No space left on device (ENOSPC)")
        assert list((home / "tmp").iterdir()) == []
        assert list((home / "store").iterdir()) == []
    finally:
        subprocess.run(["umount", str(home)], check=True)


FAKE_QEMU = """#!/bin/sh
sleep 600 &
echo $$ $! > {marker}
wait
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_boot_kills_qemu_and_removes_its_copy(
    tmp_path: Path, sig: signal.Signals
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker = tmp_path / "qemu-started"
    qemu = bindir / "qemu-system-x86_64"
    qemu.write_text(FAKE_QEMU.format(marker=marker))
    qemu.chmod(0o755)
    store_path = tmp_path / "path"
    store_path.mkdir()
    with open(store_path / "rootfs.ext4", "wb") as f:
        f.truncate(64 << 20)
    (store_path / "vmlinux").write_bytes(b"kernel")
    (store_path / "manifest.json").write_text('{"image": {"platform": "linux/amd64"}}')
    home = tmp_path / "home"
    env = {**ENV, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = _cli("boot", str(store_path), "--accel", "tcg", "--home", str(home), env=env)
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()
    time.sleep(0.2)
    assert len(list((home / "tmp").iterdir())) == 1  # the disk copy
    pids = [int(p) for p in marker.read_text().split()]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {sig.name}" in err and "Traceback" not in err
    for pid in pids:
        assert not _alive(pid)
    assert list((home / "tmp").iterdir()) == []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except OSError:
        return False
    return state != "Z"
