"""``banger-build boot``: the qemu command line, the console watcher and its outcomes
(against a fake qemu), argument errors, and real microVM boots (slow) of an ext4
that banger-build itself built from a busybox image, with the Debian kernel and
busybox initramfs of tests/support/kernel.py."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger_build import boot as bootmod
from banger_build.boot import (
    BootError,
    BootOptions,
    BootTarget,
    Console,
    boot,
    choose_accel,
    host_tsc_khz,
    kernel_cmdline,
    qemu_argv,
    resolve_target,
    sparse_copy,
)
from banger_build.cli import main
from banger_build.errors import InputError
from banger_build.run import find_tool
from tests.support.kernel import KernelFiles
from tests.support.oci import Entry, make_layer, push_image
from tests.support.registry import RegistryServer

MARKER = "BANGER-MARKER"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def store_path(tmp_path: Path) -> Iterator[Path]:
    """A read-only store path of fake files (enough for everything but a real boot)."""
    path = tmp_path / "store" / "0123-fake"
    path.mkdir(parents=True)
    with open(path / "rootfs.ext4", "wb") as f:
        f.write(b"ext4 head")
        f.truncate(8 << 20)
    (path / "manifest.json").write_text("{}\n")
    (path / "vmlinux").write_bytes(b"bzImage")
    (path / "initrd.img").write_bytes(b"initrd")
    for p in path.iterdir():
        p.chmod(0o444)
    path.chmod(0o555)
    yield path
    path.chmod(0o755)


# ------------------------------------------------------------------ command line


def test_qemu_argv_for_a_store_path(store_path: Path, tmp_path: Path) -> None:
    target = resolve_target(store_path)
    assert target == BootTarget(
        store_path / "rootfs.ext4", store_path / "vmlinux", store_path / "initrd.img"
    )
    disk = tmp_path / "copy" / "rootfs.ext4"
    cmdline = kernel_cmdline("quiet systemd.unit=multi-user.target", 2445426)
    argv = qemu_argv("qemu", target, disk, accel="tcg", memory=512, cmdline=cmdline)

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert argv[0] == "qemu"
    assert value("-M").startswith("microvm,")
    assert value("-accel") == "tcg"
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv
    assert (value("-m"), value("-smp")) == ("512", "1")
    assert value("-kernel") == str(store_path / "vmlinux")
    assert value("-initrd") == str(store_path / "initrd.img")
    assert value("-append").split() == [
        "console=ttyS0", "root=/dev/vda", "rw", "panic=-1", "tsc_early_khz=2445426",
        "quiet", "systemd.unit=multi-user.target",
    ]  # fmt: skip
    assert value("-drive") == f"id=root,file={disk},format=raw,if=none"
    assert value("-device") == "virtio-blk-device,drive=root"
    assert "vhost-vsock-device" not in " ".join(argv)
    assert str(store_path / "rootfs.ext4") not in argv  # only ever the copy

    with_vsock = qemu_argv("q", target, disk, accel="kvm", memory=256, cmdline="", vsock_cid=7)
    assert with_vsock[-2:] == ["-device", "vhost-vsock-device,guest-cid=7"]
    assert "kvm" in with_vsock and "256" in with_vsock


def test_drive_path_commas_are_escaped(store_path: Path) -> None:
    argv = qemu_argv(
        "q", resolve_target(store_path), Path("/tmp/a,b/rootfs.ext4"),
        accel="tcg", memory=512, cmdline="",
    )  # fmt: skip
    assert "id=root,file=/tmp/a,,b/rootfs.ext4,format=raw,if=none" in argv


def test_host_tsc_khz(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2445.426\n")
    assert host_tsc_khz(cpuinfo) == 2445426
    cpuinfo.write_text("processor\t: 0\n")
    assert host_tsc_khz(cpuinfo) is None
    assert host_tsc_khz(tmp_path / "missing") is None
    assert "tsc_early_khz" not in kernel_cmdline("", None)


def test_kernel_and_initrd_overrides(store_path: Path, tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "bzImage", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    assert resolve_target(store_path, kernel).initrd is None  # the staged one is the other kernel's
    assert resolve_target(store_path, kernel, initrd) == BootTarget(
        store_path / "rootfs.ext4", kernel, initrd
    )
    assert resolve_target(store_path, None, initrd).kernel == store_path / "vmlinux"
    with pytest.raises(InputError, match="--kernel .*nope: no such file"):
        resolve_target(store_path, tmp_path / "nope")


def test_store_path_without_a_kernel(tmp_path: Path) -> None:
    (tmp_path / "rootfs.ext4").write_bytes(b"")
    with pytest.raises(InputError, match=r"no kernel \(vmlinux\).*--kernel PATH") as exc:
        resolve_target(tmp_path)
    assert exc.value.reason == "no-kernel"
    code, _, err = run_cli("boot", str(tmp_path))
    assert code == 1
    assert "banger-build: error:" in err and "no kernel" in err and "Traceback" not in err


def test_missing_rootfs(tmp_path: Path) -> None:
    (tmp_path / "vmlinux").write_bytes(b"")
    with pytest.raises(InputError, match="no rootfs.ext4 in it") as exc:
        resolve_target(tmp_path)
    assert exc.value.reason == "no-rootfs"
    code, _, err = run_cli("boot", str(tmp_path))
    assert code == 1 and "no rootfs.ext4" in err


def test_invalid_arguments(tmp_path: Path) -> None:
    code, _, err = run_cli("boot", str(tmp_path / "nothing-here"))
    assert code == 1
    assert "nothing-here: no such store path or recipe" in err
    other = tmp_path / "rootfs.ext4"
    other.write_bytes(b"")
    code, _, err = run_cli("boot", str(other))
    assert code == 1
    assert "neither a store path" in err and "nor a recipe" in err
    with pytest.raises(SystemExit) as exit_:
        run_cli("boot", str(tmp_path), "--accel", "fast")
    assert exit_.value.code == 2


def test_bad_options_are_input_errors(store_path: Path) -> None:
    target = resolve_target(store_path)
    with pytest.raises(InputError, match="--timeout"):
        boot(target, BootOptions(timeout=0))
    with pytest.raises(InputError, match="--memory"):
        boot(target, BootOptions(memory=16))
    with pytest.raises(InputError, match="--accel"):
        choose_accel("fast", "qemu", target, 512, None)


def test_missing_qemu_is_a_tool_error(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_tool.cache_clear()
    monkeypatch.setenv("PATH", str(store_path))  # no qemu in it; find_tool adds only sbin dirs
    try:
        code, _, err = run_cli("boot", str(store_path), "--accel", "tcg")
    finally:
        find_tool.cache_clear()
    assert code == 1
    assert "qemu-system-x86_64 not found" in err


# -------------------------------------------------------------------- acceleration


def test_accel_choice(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = resolve_target(store_path)
    probes: list[str] = []

    def probe(qemu: str, *_: object) -> bool:
        probes.append(qemu)
        return False

    monkeypatch.setattr(bootmod, "probe_kvm", probe)
    monkeypatch.setattr(bootmod, "_probed", {})
    monkeypatch.setattr(bootmod, "kvm_available", lambda: False)
    assert choose_accel("auto", "qemu", target, 512, None) == "tcg"
    with pytest.raises(BootError, match="/dev/kvm") as exc:
        choose_accel("kvm", "qemu", target, 512, None)
    assert exc.value.reason == "no-kvm"
    assert probes == []

    monkeypatch.setattr(bootmod, "kvm_available", lambda: True)
    assert choose_accel("tcg", "qemu", target, 512, None) == "tcg"
    assert choose_accel("kvm", "qemu", target, 512, None) == "kvm"  # asked for: no probe
    notes: list[str] = []
    assert choose_accel("auto", "qemu", target, 512, None, notes.append) == "tcg"
    assert choose_accel("auto", "qemu", target, 512, None) == "tcg"
    assert probes == ["qemu"]  # once per process and kernel
    assert notes[-1] == "KVM probe failed: using TCG"


# ------------------------------------------------------------ console and outcomes


def test_console_matches_text_without_colour_codes() -> None:
    console = Console([b"Reached target multi-user.target"])
    for chunk in (b"[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1", b";39mmulti-user.tar",
                  b"get\x1b[0m - Multi-User System.\r\n"):  # fmt: skip
        console.feed(chunk)
    assert console.found == {b"Reached target multi-user.target"}
    assert list(console.lines) == ["[  OK  ] Reached target multi-user.target - Multi-User System."]


def test_console_finds_texts_across_reads_and_keeps_context() -> None:
    seen: list[bytes] = []
    console = Console([b"BANGER-MARKER", b"other"], seen.append)
    for chunk in (b"boot\r\nBANG", b"ER-MAR", b"KER\r\n", b"line 3\nKernel panic - not sync",
                  b"ing: Attempted to kill init!\n"):  # fmt: skip
        console.feed(chunk)
    assert console.found == {b"BANGER-MARKER"}
    assert console.missing() == ["other"]
    assert console.panic == "Kernel panic - not syncing: Attempted to kill init!"
    assert console.before_panic == ["boot", "BANGER-MARKER", "line 3"]
    assert b"".join(seen).startswith(b"boot\r\nBANGER-MARKER")


FAKE_QEMU = """#!{python}
import json, os, sys, time
with open({config!r}) as f:  # qemu gets the tools' clean environment: no FAKE_* there
    env = json.load(f)
args = sys.argv[1:]
with open(env["FAKE_QEMU_ARGS"], "w") as f:
    json.dump(args, f)
for arg in args:
    if arg.startswith("id=root,file="):
        disk = arg[len("id=root,file="):].split(",format=")[0]
        with open(disk, "r+b") as f:
            f.write(b"the guest wrote this")
sys.stdout.write(env.get("FAKE_QEMU_OUT", "").replace("|", "\\n"))
sys.stdout.flush()
sys.stderr.write(env.get("FAKE_QEMU_ERR", ""))
sys.stderr.flush()
if env.get("FAKE_QEMU_SLEEP"):
    os.system("sleep " + env["FAKE_QEMU_SLEEP"])  # a child in qemu's process group
sys.exit(int(env.get("FAKE_QEMU_EXIT", "0")))
"""


class FakeQemu:
    """The fake qemu's settings, in a file it reads (it runs with a clean environment)."""

    config: Path

    @classmethod
    def set(cls, name: str, value: str) -> None:
        data = json.loads(cls.config.read_text())
        data[name] = value
        cls.config.write_text(json.dumps(data))


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Replace qemu with a script that records its argv (to the returned path),
    scribbles on the disk it is given, prints $FAKE_QEMU_OUT ('|' = newline),
    sleeps $FAKE_QEMU_SLEEP and exits $FAKE_QEMU_EXIT."""
    script = tmp_path / "fake-qemu"
    config = tmp_path / "fake-qemu.json"
    config.write_text("{}")
    script.write_text(FAKE_QEMU.format(python=sys.executable, config=str(config)))
    FakeQemu.config = config
    script.chmod(0o755)
    args = tmp_path / "qemu-args.json"
    monkeypatch.setattr(bootmod, "find_tool", lambda name: str(script))
    monkeypatch.setattr(bootmod, "kvm_available", lambda: False)
    FakeQemu.set("FAKE_QEMU_ARGS", str(args))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    yield args


def fake_boot(
    monkeypatch: pytest.MonkeyPatch, store_path: Path, out: str, *, sleep: str = "",
    exit: int = 0, err: str = "", **options: object,
) -> tuple[bootmod.BootResult, bytes]:  # fmt: skip
    FakeQemu.set("FAKE_QEMU_OUT", out)
    FakeQemu.set("FAKE_QEMU_SLEEP", sleep)
    FakeQemu.set("FAKE_QEMU_EXIT", str(exit))
    FakeQemu.set("FAKE_QEMU_ERR", err)
    console: list[bytes] = []
    opts = BootOptions(console=console.append, **options)  # type: ignore[arg-type]
    return boot(resolve_target(store_path), opts), b"".join(console)


def test_expected_texts_stop_the_vm_and_never_touch_the_store(
    store_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    before = sha256(store_path / "rootfs.ext4")
    t0 = time.monotonic()
    result, console = fake_boot(
        monkeypatch, store_path, f"Linux version 6.1|{MARKER}|", sleep="60",
        expect=("Linux version", MARKER), timeout=30,
    )  # fmt: skip
    assert time.monotonic() - t0 < 20  # stopped once seen, not after the sleep
    assert (result.how, result.accel) == ("expected", "tcg")
    assert MARKER.encode() in console
    argv = json.loads(fake_qemu.read_text())
    assert "-no-reboot" in argv and argv[argv.index("-accel") + 1] == "tcg"
    drive = argv[argv.index("-drive") + 1]
    assert str(tmp_path / "tmp") in drive and str(store_path) not in drive
    assert sha256(store_path / "rootfs.ext4") == before
    assert list((tmp_path / "tmp").iterdir()) == []  # the copy is gone


def test_poweroff_without_expect_succeeds(
    store_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, _ = fake_boot(monkeypatch, store_path, "booted|reboot: Power down|")
    assert result.how == "poweroff"


def test_timeout_kills_qemu_and_says_so(
    store_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = time.monotonic()
    with pytest.raises(BootError, match=r"timed out after 1\.5 s \(tcg\) waiting for 'NEVER'"):
        fake_boot(monkeypatch, store_path, "still booting|", sleep="60", expect=("NEVER",),
                  timeout=1.5)  # fmt: skip
    assert time.monotonic() - t0 < 15
    with pytest.raises(BootError, match="waiting for the VM to power off") as exc:
        fake_boot(monkeypatch, store_path, "", sleep="60", timeout=0.5)
    assert exc.value.reason == "boot-timeout"


def test_panic_reboot_and_missing_texts_fail(
    store_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = (
        "switch_root: can't execute '/sbin/init'|"
        "Kernel panic - not syncing: Attempted to kill init!|"
    )
    with pytest.raises(BootError, match="guest kernel panicked.*Attempted to kill init") as exc:
        fake_boot(monkeypatch, store_path, out)
    assert exc.value.reason == "guest-panic"
    assert "switch_root: can't execute" in str(exc.value)
    with pytest.raises(BootError, match="guest rebooted") as exc:
        fake_boot(monkeypatch, store_path, "reboot: Restarting system|")
    assert exc.value.reason == "guest-reboot"
    with pytest.raises(BootError, match="powered off without printing 'X-MARK'") as exc:
        fake_boot(monkeypatch, store_path, "reboot: Power down", expect=("X-MARK",))
    assert exc.value.reason == "expect-missing"


def test_qemu_failure_shows_its_stderr(
    store_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BootError, match="qemu failed with exit code 1:\nqemu: bad device") as exc:
        fake_boot(monkeypatch, store_path, "", exit=1, err="qemu: bad device\n")
    assert exc.value.reason == "qemu-failed"


def test_kvm_probe(store_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = resolve_target(store_path)
    monkeypatch.setattr(bootmod, "PROBE_SECONDS", 1.0)
    FakeQemu.set("FAKE_QEMU_OUT", "Linux version 6.1|Run /init as init process|")
    FakeQemu.set("FAKE_QEMU_SLEEP", "60")
    qemu = str(fake_qemu.parent / "fake-qemu")
    assert bootmod.probe_kvm(qemu, target, 512, None)
    argv = json.loads(fake_qemu.read_text())
    assert argv[argv.index("-accel") + 1] == "kvm" and "-drive" not in argv
    FakeQemu.set("FAKE_QEMU_OUT", "Probing EDD (edd=off to disable)... ok|")
    assert not bootmod.probe_kvm(qemu, target, 512, None)  # a silent hang: no KVM


def test_sparse_copy_keeps_holes_and_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.write(b"head")
        f.seek(64 << 20)
        f.write(b"middle")
        f.truncate(128 << 20)
    dest = tmp_path / "dest"
    sparse_copy(src, dest)
    assert dest.stat().st_size == src.stat().st_size
    assert sha256(dest) == sha256(src)
    assert dest.stat().st_blocks * 512 < 8 << 20
    assert dest.stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------- real boots

INIT = f"""#!/bin/busybox sh
/bin/busybox echo {MARKER}
/bin/busybox poweroff -f
"""
WAIT_FOREVER = """#!/bin/busybox sh
/bin/busybox echo WAITING
while :; do /bin/busybox sleep 1; done
"""


def busybox_layer() -> bytes:
    busybox = Path("/bin/busybox").read_bytes()  # Debian's busybox-static (scripts/setup)
    return make_layer(
        [
            Entry.dir("bin"),
            Entry.file("bin/busybox", busybox, mode=0o755),
            Entry.symlink("bin/sh", "busybox"),
            Entry.dir("sbin"),
            Entry.file("sbin/init", INIT.encode(), mode=0o755),
            Entry.file("sbin/wait-forever", WAIT_FOREVER.encode(), mode=0o755),
            Entry.dir("dev"),
            Entry.dir("proc"),
            Entry.dir("sys"),
            Entry.dir("tmp", mode=0o1777),
        ]
    )


@pytest.fixture(scope="module")
def busybox_recipe(
    registry: RegistryServer,
    debian_kernel_files: KernelFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    push_image(registry.url, "boot/busybox", "v1", [busybox_layer()])
    recipe = tmp_path_factory.mktemp("busybox-recipe") / "busybox.toml"
    recipe.write_text(
        f"""version = 1
name = "busybox-boot"

[image]
ref = "{registry.host}/boot/busybox:v1"

[kernel]
path = "{debian_kernel_files.vmlinuz}"
initrd = "{debian_kernel_files.initrd}"
"""
    )
    return recipe


@pytest.fixture(scope="module")
def busybox_store(
    busybox_recipe: Path, debian_kernel_files: KernelFiles, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    home = tmp_path_factory.mktemp("boot-home")
    code, out, err = run_cli(
        "build", str(busybox_recipe), "--no-link", "--home", str(home),
        "--allow-source", str(debian_kernel_files.vmlinuz.parent),  # the cached kernel
    )  # fmt: skip
    assert code == 0, err
    path = Path(out.strip().splitlines()[-1])
    assert {"rootfs.ext4", "vmlinux", "initrd.img", "manifest.json"} <= {
        p.name for p in path.iterdir()
    }
    return path


@pytest.mark.slow
def test_boot_reaches_the_marker(busybox_store: Path) -> None:
    before = sha256(busybox_store / "rootfs.ext4")
    t0 = time.monotonic()
    code, out, err = run_cli(
        "boot", str(busybox_store), "--expect", MARKER, "--timeout", "120", "--accel", "tcg"
    )
    seconds = time.monotonic() - t0
    assert code == 0, err + out[-3000:]
    assert MARKER in out and "banger-initrd: mounted /dev/vda (rw)" in out
    assert "boot ok under tcg" in err
    print(f"TCG boot to the marker: {seconds:.1f} s")
    assert sha256(busybox_store / "rootfs.ext4") == before


@pytest.mark.slow
def test_boot_powers_off_by_itself(busybox_store: Path, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    code, out, err = run_cli(
        "boot", str(busybox_store), "--timeout", "120", "--console-log", str(log), "--accel", "auto"
    )
    assert code == 0, err
    assert out == ""  # the console went to the log
    assert MARKER in log.read_text() and "reboot: Power down" in log.read_text()
    assert "the guest powered off" in err


@pytest.mark.slow
def test_boot_times_out_on_text_never_printed(busybox_store: Path, tmp_path: Path) -> None:
    before = sha256(busybox_store / "rootfs.ext4")
    log = tmp_path / "console.log"
    t0 = time.monotonic()
    code, _, err = run_cli(
        "boot", str(busybox_store), "--expect", "NEVER-PRINTED", "--timeout", "20",
        "--append", "init=/sbin/wait-forever", "--accel", "tcg", "--console-log", str(log),
    )  # fmt: skip
    assert code == 1
    assert 19 < time.monotonic() - t0 < 40
    assert "timed out after 20 s (tcg) waiting for 'NEVER-PRINTED'" in err
    assert "Traceback" not in err
    assert "WAITING" in log.read_text(), log.read_text()  # the guest did boot
    assert "last console lines:" in err  # quoted (the kernel may print after WAITING)
    assert sha256(busybox_store / "rootfs.ext4") == before


@pytest.mark.slow
def test_boot_a_recipe_builds_it_first(
    busybox_recipe: Path, busybox_store: Path, debian_kernel_files: KernelFiles
) -> None:
    home = busybox_store.parent.parent  # the same home: a cache hit
    code, out, err = run_cli(
        "boot", str(busybox_recipe), "--home", str(home), "--expect", MARKER,
        "--timeout", "120", "--accel", "tcg",
        "--allow-source", str(debian_kernel_files.vmlinuz.parent),  # the cached kernel
    )  # fmt: skip
    assert code == 0, err
    assert MARKER in out
