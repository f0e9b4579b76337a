"""``banger-build boot``: the qemu command line, the console watcher and its outcomes
(against a fake qemu), argument errors, and real microVM boots (slow) of an ext4
that banger-build itself built from a busybox image, with the Debian kernel and
busybox initramfs of tests/support/kernel.py."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger_build import boot as bootmod
from banger_build import kvm, vsock
from banger_build.boot import (
    BootError,
    BootOptions,
    BootTarget,
    Console,
    boot,
    resolve_target,
    sparse_copy,
)
from banger_build.cli import main
from banger_build.errors import InputError
from banger_build.kvm import ProbeCache, choose_accel
from banger_build.machines import (
    MACHINES,
    host_tsc_khz,
    kernel_arch,
    kernel_cmdline,
    qemu_argv,
)
from banger_build.run import find_tool
from banger_build.vsock import no_vsock_reason
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


AMD64, ARM64 = MACHINES["amd64"], MACHINES["arm64"]


def fake_store_path(path: Path, platform: str = "linux/amd64", kernel: bytes = b"bzImage") -> Path:
    """A read-only store path of fake files (enough for everything but a real boot)."""
    path.mkdir(parents=True)
    with open(path / "rootfs.ext4", "wb") as f:
        f.write(b"ext4 head")
        f.truncate(8 << 20)
    (path / "manifest.json").write_text(json.dumps({"image": {"platform": platform}}) + "\n")
    (path / "vmlinux").write_bytes(kernel)
    (path / "initrd.img").write_bytes(b"initrd")
    for p in path.iterdir():
        p.chmod(0o444)
    path.chmod(0o555)
    return path


@pytest.fixture
def store_path(tmp_path: Path) -> Iterator[Path]:
    path = fake_store_path(tmp_path / "store" / "0123-fake")
    yield path
    path.chmod(0o755)


def bzimage() -> bytes:
    """The start of an x86 boot image: the setup header's "HdrS" at 0x202."""
    head = bytearray(1024)
    head[0x202:0x206] = b"HdrS"
    return bytes(head)


def arm64_image() -> bytes:
    """The start of an arm64 Image: "ARM\\x64" at 56."""
    head = bytearray(1024)
    head[56:60] = b"ARM\x64"
    return bytes(head)


# ------------------------------------------------------------------ command line


def test_qemu_argv_for_a_store_path(store_path: Path, tmp_path: Path) -> None:
    target = resolve_target(store_path)
    assert target == BootTarget(
        store_path / "rootfs.ext4", store_path / "vmlinux", store_path / "initrd.img", "amd64"
    )
    disk = tmp_path / "copy" / "rootfs.ext4"
    cmdline = kernel_cmdline(AMD64, "quiet systemd.unit=multi-user.target", 2445426)
    argv = qemu_argv(
        AMD64, target.kernel, target.initrd, disk, qemu="qemu", accel="tcg", memory=512,
        cmdline=cmdline,
    )  # fmt: skip

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
    assert "-cpu" not in argv and "-netdev" not in argv
    assert "vhost-vsock-device" not in " ".join(argv)
    assert str(store_path / "rootfs.ext4") not in argv  # only ever the copy

    with_vsock = qemu_argv(
        AMD64, target.kernel, None, disk, accel="kvm", memory=256, cmdline="", vsock_cid=7,
        network=True,
    )  # fmt: skip
    assert with_vsock[0] == "qemu-system-x86_64"
    assert with_vsock[-6:] == [
        "-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0",
        "-device", "vhost-vsock-device,guest-cid=7",
    ]  # fmt: skip
    assert "kvm" in with_vsock and "256" in with_vsock and "-initrd" not in with_vsock


def test_an_arm64_image_gets_the_arm64_machine(tmp_path: Path) -> None:
    path = fake_store_path(tmp_path / "arm", "linux/arm64/v8", arm64_image())
    target = resolve_target(path)
    assert target.arch == "arm64"
    cmdline = kernel_cmdline(ARM64, "quiet", 2445426, network=True)
    assert cmdline.split() == [
        "console=ttyAMA0", "root=/dev/vda", "rw", "panic=-1",  # no tsc_early_khz: x86 only
        "banger.ip=10.0.2.15/24", "banger.gw=10.0.2.2", "banger.dns=10.0.2.3", "quiet",
    ]  # fmt: skip
    argv = qemu_argv(
        ARM64, target.kernel, target.initrd, tmp_path / "d", accel="tcg", memory=512,
        cmdline=cmdline, network=True,
    )  # fmt: skip
    assert argv[:5] == ["qemu-system-aarch64", "-M", "virt", "-accel", "tcg"]
    assert argv[argv.index("-cpu") + 1] == "max"
    kvm_argv = qemu_argv(ARM64, target.kernel, None, None, accel="kvm", memory=512, cmdline="")
    assert kvm_argv[kvm_argv.index("-cpu") + 1] == "host"
    assert "virtio-blk-device,drive=root" in argv and "virtio-net-device,netdev=net0" in argv


def test_the_image_platform_decides_and_a_kernel_of_another_arch_is_refused(
    tmp_path: Path,
) -> None:
    arm = fake_store_path(tmp_path / "arm", "linux/arm64", bzimage())
    with pytest.raises(BootError, match="is an amd64 kernel, but the image is for arm64") as exc:
        resolve_target(arm)
    assert exc.value.reason == "kernel-arch-mismatch"
    assert "the store path's kernel" in str(exc.value) and "--kernel PATH" in str(exc.value)
    image = tmp_path / "Image"
    image.write_bytes(arm64_image())
    assert resolve_target(arm, image).kernel == image  # --kernel: the right one
    amd = fake_store_path(tmp_path / "amd", "linux/amd64", bzimage())
    code, _, err = run_cli("boot", str(amd), "--kernel", str(image), "--accel", "tcg")
    assert code == 1 and "Traceback" not in err
    assert f"--kernel {image} is an arm64 kernel, but the image is for amd64" in err

    odd = fake_store_path(tmp_path / "riscv", "linux/riscv64")
    with pytest.raises(BootError, match="no emulator for riscv64 images") as exc:
        boot(resolve_target(odd), BootOptions())
    assert exc.value.reason == "unsupported-arch"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "rootfs.ext4").write_bytes(b"")
    (tmp_path / "old" / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="records no image platform") as exc:
        resolve_target(tmp_path / "old")
    assert exc.value.reason == "no-platform"


def test_kernel_arch_reads_the_header(tmp_path: Path) -> None:
    for name, data, arch in (
        ("bz", bzimage(), "amd64"),
        ("image", arm64_image(), "arm64"),
        ("image.gz", gzip.compress(arm64_image() + b"x" * 4096), "arm64"),
        ("other", b"\x7fELF" + bytes(2048), None),
        ("short", b"", None),
    ):
        (tmp_path / name).write_bytes(data)
        assert kernel_arch(tmp_path / name) == arch, name
    assert kernel_arch(tmp_path / "missing") is None


def test_drive_path_commas_are_escaped(store_path: Path) -> None:
    argv = qemu_argv(
        AMD64, store_path / "vmlinux", None, Path("/tmp/a,b/rootfs.ext4"),
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
    assert "tsc_early_khz" not in kernel_cmdline(AMD64, "", None)


def test_kernel_and_initrd_overrides(store_path: Path, tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "bzImage", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    assert resolve_target(store_path, kernel).initrd is None  # the staged one is the other kernel's
    assert resolve_target(store_path, kernel, initrd) == BootTarget(
        store_path / "rootfs.ext4", kernel, initrd, "amd64"
    )
    assert resolve_target(store_path, None, initrd).kernel == store_path / "vmlinux"
    with pytest.raises(InputError, match="--kernel .*nope: no such file"):
        resolve_target(store_path, tmp_path / "nope")


def test_store_path_without_a_kernel(tmp_path: Path) -> None:
    (tmp_path / "rootfs.ext4").write_bytes(b"")
    (tmp_path / "manifest.json").write_text('{"image": {"platform": "linux/arm64"}}')
    with pytest.raises(InputError, match=r"no kernel \(vmlinux\).*--kernel PATH \(an arm64") as exc:
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
        boot(target, BootOptions(accel="fast"))
    with pytest.raises(InputError, match="--network"):
        boot(target, BootOptions(network="tap"))
    with pytest.raises(InputError, match="--agent-port"):
        boot(target, BootOptions(agent_port=0))


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


def fake_version_qemu(path: Path, version: str) -> str:
    path.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version}'\n")
    path.chmod(0o755)
    return str(path)


def test_accel_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probes: list[str] = []

    def probe() -> bool:
        probes.append("probe")
        return False

    qemu = fake_version_qemu(tmp_path / "qemu", "7.2.0")
    monkeypatch.setattr(kvm, "_probed", {})
    monkeypatch.setattr(kvm, "host_machine", lambda: "x86_64")
    monkeypatch.setattr(kvm, "kvm_available", lambda: False)
    cache = ProbeCache(None)
    assert choose_accel("auto", AMD64, qemu, probe, cache) == "tcg"
    with pytest.raises(BootError, match="/dev/kvm") as exc:
        choose_accel("kvm", AMD64, qemu, probe, cache)
    assert exc.value.reason == "no-kvm"
    assert probes == []

    monkeypatch.setattr(kvm, "kvm_available", lambda: True)
    assert choose_accel("tcg", AMD64, qemu, probe, cache) == "tcg"
    assert choose_accel("kvm", AMD64, qemu, probe, cache) == "kvm"  # asked for: no probe
    notes: list[str] = []
    assert choose_accel("auto", AMD64, qemu, probe, cache, notes.append) == "tcg"
    assert choose_accel("auto", AMD64, qemu, probe, cache) == "tcg"
    assert probes == ["probe"]  # once per process
    assert notes[-1] == "KVM probe failed: using TCG"

    # an arm64 guest on this x86_64 host: never KVM, never a probe
    notes.clear()
    assert choose_accel("auto", ARM64, qemu, probe, cache, notes.append) == "tcg"
    assert notes == ["an arm64 guest on a x86_64 host: TCG"]
    with pytest.raises(BootError, match="an arm64 guest cannot use KVM on this x86_64 host") as exc:
        choose_accel("kvm", ARM64, qemu, probe, cache)
    assert exc.value.reason == "no-kvm" and probes == ["probe"]


def test_the_kvm_probe_answer_is_kept_per_host_kernel_and_qemu_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = [True]
    probes: list[bool] = []

    def probe() -> bool:
        probes.append(answers[0])
        return answers[0]

    monkeypatch.setattr(kvm, "host_machine", lambda: "x86_64")
    monkeypatch.setattr(kvm, "kvm_available", lambda: True)
    path = tmp_path / "cache" / "banger-build" / "kvm-probe.json"
    qemu = fake_version_qemu(tmp_path / "qemu", "7.2.0")

    def choose(notes: list[str] | None = None) -> str:
        monkeypatch.setattr(kvm, "_probed", {})  # a new process
        return choose_accel(
            "auto",
            AMD64,
            qemu,
            probe,
            ProbeCache(path),
            (notes if notes is not None else []).append,
        )

    assert choose() == "kvm" and probes == [True]
    key = f"{os.uname().release} | QEMU emulator version 7.2.0 | amd64"
    assert json.loads(path.read_text()) == {"format": 1, "answers": {key: True}}
    notes: list[str] = []
    answers[0] = False
    assert choose(notes) == "kvm" and probes == [True]  # remembered: no probe
    assert notes == [f"KVM works (remembered in {path}; delete it to probe again)"]

    fake_version_qemu(tmp_path / "qemu", "8.0.0")  # a new qemu: probed again
    assert choose() == "tcg" and probes == [True, False]
    assert len(json.loads(path.read_text())["answers"]) == 2
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "h", "7.0-new", "", "")))
    assert choose() == "tcg" and probes == [True, False, False]  # a new host kernel too

    path.write_text("not json")  # unreadable: probed again, rewritten
    assert choose() == "tcg" and len(probes) == 4
    assert json.loads(path.read_text())["format"] == 1
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kvm.default_cache_path() == tmp_path / "xdg" / "banger-build" / "kvm-probe.json"


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
    monkeypatch.setattr(kvm, "kvm_available", lambda: False)
    monkeypatch.setattr(bootmod, "vsock_cid", lambda: None)  # as on a host without vhost-vsock
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


def test_without_expect_a_login_prompt_ends_the_boot(
    store_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = time.monotonic()
    prompt = "|Debian GNU/Linux 12 banger ttyS0||banger login: "  # no newline after it
    result, console = fake_boot(monkeypatch, store_path, prompt, sleep="60", timeout=30)
    assert time.monotonic() - t0 < 20  # stopped at the prompt, not after the sleep
    assert result.how == "login" and console.endswith(b"banger login: ")
    with pytest.raises(BootError, match="powered off without printing 'login:'") as exc:
        fake_boot(monkeypatch, store_path, "reboot: Power down|", expect=("login:",))
    assert exc.value.reason == "expect-missing"  # asked for: a power-off is not enough


def test_the_vm_has_a_user_mode_nic_configured_on_the_command_line(
    store_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_boot(monkeypatch, store_path, "reboot: Power down|", append="banger.ip=10.0.2.99/24")
    argv = json.loads(fake_qemu.read_text())
    assert argv[argv.index("-netdev") + 1] == "user,id=net0"
    assert "virtio-net-device,netdev=net0" in argv
    words = argv[argv.index("-append") + 1].split()
    assert words.index("banger.ip=10.0.2.15/24") < words.index("banger.ip=10.0.2.99/24")
    assert {"banger.gw=10.0.2.2", "banger.dns=10.0.2.3"} <= set(words)  # the last one wins ^
    fake_boot(monkeypatch, store_path, "reboot: Power down|", network="none")
    argv = json.loads(fake_qemu.read_text())
    assert "-netdev" not in argv and "banger.ip" not in argv[argv.index("-append") + 1]


def test_an_agent_that_does_not_answer_fails_the_boot(
    store_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a host with vhost-vsock (a CID is had), but no guest answers on it."""
    monkeypatch.setattr(bootmod, "vsock_cid", lambda: 4242)
    monkeypatch.setattr(bootmod, "AGENT_SECONDS", 1.5)
    monkeypatch.setattr(vsock, "CONNECT_SECONDS", 0.5)
    t0 = time.monotonic()
    with pytest.raises(BootError) as exc:
        fake_boot(monkeypatch, store_path, "x login: ", sleep="60", ping_agent=True, timeout=60)
    assert time.monotonic() - t0 < 20
    assert exc.value.reason == "agent-unreachable"
    assert str(exc.value).startswith(
        "the guest booted, but its agent did not answer on vsock cid 4242 port 1024 ("
    )
    argv = json.loads(fake_qemu.read_text())
    assert argv[-2:] == ["-device", "vhost-vsock-device,guest-cid=4242"]
    with pytest.raises(BootError, match="powered off before its agent could be pinged") as exc:
        fake_boot(monkeypatch, store_path, "reboot: Power down|", ping_agent=True)
    assert exc.value.reason == "agent-unreachable"


def test_an_agent_ping_without_vhost_vsock_is_skipped_with_the_reason(
    store_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    result, _ = fake_boot(monkeypatch, store_path, "x login: ", sleep="60", ping_agent=True)
    assert result.how == "login" and result.agent is None
    assert result.agent_skipped == no_vsock_reason()
    argv = json.loads(fake_qemu.read_text())
    assert "vhost-vsock-device" not in " ".join(argv)
    result, _ = fake_boot(monkeypatch, store_path, "x login: ", sleep="60")
    assert result.agent_skipped is None  # not asked: nothing to say
    assert no_vsock_reason(str(tmp_path / "none")) == (
        f"this host has no {tmp_path / 'none'} (load the vhost_vsock module)"
    )
    code, _, err = run_cli(
        "boot",
        str(store_path),
        "--accel",
        "tcg",
        "--ping-agent",
        "--timeout",
        "30",
        "--home",
        str(tmp_path / "home"),
    )
    assert code == 0, err
    assert f"banger-build: agent ping skipped: {no_vsock_reason()}" in err
    assert "the login prompt appeared" in err


def test_timeout_kills_qemu_and_says_so(
    store_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = time.monotonic()
    with pytest.raises(BootError, match=r"timed out after 1\.5 s \(tcg\) waiting for 'NEVER'"):
        fake_boot(monkeypatch, store_path, "still booting|", sleep="60", expect=("NEVER",),
                  timeout=1.5)  # fmt: skip
    assert time.monotonic() - t0 < 15
    with pytest.raises(
        BootError, match="waiting for a login prompt \\('login:'\\) or the VM to power off"
    ) as exc:
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
    assert bootmod.probe_kvm(AMD64, qemu, target, 512, None)
    argv = json.loads(fake_qemu.read_text())
    assert argv[argv.index("-accel") + 1] == "kvm" and "-drive" not in argv
    FakeQemu.set("FAKE_QEMU_OUT", "Probing EDD (edd=off to disable)... ok|")
    assert not bootmod.probe_kvm(AMD64, qemu, target, 512, None)  # a silent hang: no KVM


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
    assert "boot ok under tcg (amd64)" in err
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


@pytest.mark.slow
def test_auto_probes_kvm_once_per_host(
    busybox_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's answer outlives the process: a second boot does not probe again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = tmp_path / "xdg" / "banger-build" / "kvm-probe.json"
    args = ["boot", str(busybox_store), "--expect", MARKER, "--timeout", "120"]
    monkeypatch.setattr(kvm, "_probed", {})
    code, _, first = run_cli(*args)
    assert code == 0, first
    monkeypatch.setattr(kvm, "_probed", {})  # as a new process
    code, _, second = run_cli(*args)
    assert code == 0, second
    if not kvm.kvm_available():  # nothing to probe: TCG, and nothing kept
        assert "probing KVM" not in first + second and not cache.exists()
        assert "under tcg" in second
        return
    assert "probing KVM" in first and "probing KVM" not in second
    assert f"(remembered in {cache}; delete it to probe again)" in second
    (answer,) = json.loads(cache.read_text())["answers"].values()
    assert f"under {'kvm' if answer else 'tcg'}" in second
    print(f"KVM probe answer here: {answer}")
