"""Boot a store path in a throw-away qemu microVM: the local stand-in for the
microVM manager, and a CI smoke test.

    target (store path + kernel/initrd overrides) --copy rootfs.ext4 (sparse)-->
    choose acceleration (kvm only after a probe boot proves it) -->
    qemu-system-x86_64 -M microvm ... --watch the serial console--> outcome

The store is never written: the VM gets a sparse copy of rootfs.ext4 in a
temp dir, removed afterwards. The serial console's bytes go to
``BootOptions.console`` and are searched for the ``expect`` texts. Success is all texts seen (the VM
is then stopped) or, without texts, the guest powering off by itself. A
timeout, a kernel panic, a guest reboot or a qemu failure is a BootError.

qemu runs in its own process group (so a Ctrl-C on the terminal reaches us,
not it) and is always killed before ``boot`` returns or raises.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import selectors
import shlex
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from banger_build.errors import BangerError, InputError, Reason, ToolError
from banger_build.run import find_tool, spawned

QEMU = "qemu-system-x86_64"
MACHINE = "microvm,x-option-roms=off,pit=off,pic=off,rtc=on,acpi=on"
ROOTFS, KERNEL, INITRD = "rootfs.ext4", "vmlinux", "initrd.img"
ACCELS = ("auto", "kvm", "tcg")

#: KVM probe: the kernel banner and then the hand-over to init (or, with no
#: initrd, a panic that stops the VM) must come within this many seconds.
PROBE_SECONDS = 6.0
PROBE_BANNER = b"Linux version"
PROBE_LATE = (b"Run /", b"Kernel panic")

PANIC = "Kernel panic - not syncing"
REBOOT = "reboot: Restarting system"
ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]")  # CSI sequences (systemd's colours)
ANSI_INCOMPLETE = re.compile(rb"\x1b(\[[0-?]*[ -/]*)?$")
CONTEXT_LINES = 4  # console lines quoted in an error
MAX_LINE = 4096
VSOCK_DEVICE = "/dev/vhost-vsock"


class BootError(BangerError):
    """The VM did not do what was asked (timeout, panic, qemu failure)."""

    reason = Reason.BOOT_FAILED


@dataclass(frozen=True)
class BootTarget:
    rootfs: Path
    kernel: Path
    initrd: Path | None


@dataclass(frozen=True)
class BootOptions:
    memory: int = 512  # MiB
    accel: str = "auto"
    timeout: float = 300.0
    expect: tuple[str, ...] = ()
    append: str = ""
    console: Callable[[bytes], None] | None = None  # gets the serial console's bytes


@dataclass(frozen=True)
class BootResult:
    accel: str
    seconds: float
    how: str  # "expected" (all texts seen) or "poweroff"


# -- what to boot ---------------------------------------------------------------


def resolve_target(
    store_path: Path, kernel: Path | None = None, initrd: Path | None = None
) -> BootTarget:
    """The rootfs of ``store_path`` with its staged kernel, or the overrides.

    ``--kernel`` alone means that kernel without an initrd: the staged initrd
    belongs to the staged kernel.
    """
    if not store_path.is_dir():
        raise InputError(
            f"{store_path}: not a directory (not a store path)", reason=Reason.NO_ROOTFS
        )
    rootfs = store_path / ROOTFS
    if not rootfs.is_file():
        raise InputError(
            f"{store_path}: no {ROOTFS} in it (not a store path)", reason=Reason.NO_ROOTFS
        )
    if kernel is None:
        kernel = store_path / KERNEL
        if not kernel.is_file():
            raise InputError(
                f"{store_path}: no kernel ({KERNEL}): add a [kernel] table to the recipe "
                "or pass --kernel PATH",
                reason=Reason.NO_KERNEL,
            )
        staged = store_path / INITRD
        initrd = initrd if initrd is not None else (staged if staged.is_file() else None)
    for what, path in (("--kernel", kernel), ("--initrd", initrd)):
        if path is not None and not path.is_file():
            raise InputError(f"{what} {path}: no such file", reason=Reason.NO_KERNEL)
    return BootTarget(rootfs, kernel, initrd)


def sparse_copy(src: Path, dest: Path) -> None:
    """Copy ``src`` to a new private file ``dest``, leaving holes as holes."""
    size = src.stat().st_size
    with (
        open(src, "rb") as fin,
        open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fout,
    ):
        rfd, wfd = fin.fileno(), fout.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(rfd, pos, os.SEEK_DATA)
                end = os.lseek(rfd, start, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                if exc.errno != errno.EINVAL:  # EINVAL: no SEEK_DATA here, copy it all
                    raise
                start, end = pos, size
            _copy_range(rfd, wfd, start, end)
            pos = end
        os.ftruncate(wfd, size)


def _copy_range(rfd: int, wfd: int, start: int, end: int) -> None:
    while start < end:
        try:
            n = os.copy_file_range(rfd, wfd, min(end - start, 1 << 30), start, start)
        except OSError as exc:  # an old kernel or a filesystem pair it cannot do
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = os.pwrite(wfd, os.pread(rfd, min(end - start, 1 << 20), start), start)
        if n == 0:
            raise OSError(errno.EIO, "unexpected end of file while copying")
        start += n


# -- the qemu command line --------------------------------------------------------


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host's CPU clock in kHz, for ``tsc_early_khz=`` (TCG boots hang without it)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.MULTILINE)
    return round(float(match.group(1)) * 1000) if match else None


def kernel_cmdline(extra: str = "", tsc_khz: int | None = None) -> str:
    words = ["console=ttyS0", "root=/dev/vda", "rw", "panic=-1"]
    if tsc_khz:
        words.append(f"tsc_early_khz={tsc_khz}")
    return " ".join(words + extra.split())


def qemu_argv(
    qemu: str,
    target: BootTarget,
    disk: Path | None,
    *,
    accel: str,
    memory: int,
    cmdline: str,
    vsock_cid: int | None = None,
) -> list[str]:
    """The qemu command line; ``disk`` is the copy to boot (None: no disk, for the probe)."""
    argv = [
        qemu, "-M", MACHINE, "-accel", accel,
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-m", str(memory), "-smp", "1",
        "-kernel", str(target.kernel),
    ]  # fmt: skip
    if target.initrd is not None:
        argv += ["-initrd", str(target.initrd)]
    argv += ["-append", cmdline]
    argv += ["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]
    if disk is not None:
        drive = str(disk).replace(",", ",,")
        argv += ["-drive", f"id=root,file={drive},format=raw,if=none"]
        argv += ["-device", "virtio-blk-device,drive=root"]
    if vsock_cid is not None:
        argv += ["-device", f"vhost-vsock-device,guest-cid={vsock_cid}"]
    return argv


def vsock_cid(device: str = VSOCK_DEVICE, first: int = 3, tries: int = 64) -> int | None:
    """A guest CID free right now on a usable /dev/vhost-vsock, else None (no vsock)."""
    import fcntl
    import struct

    set_owner, set_cid = 0xAF01, 0x4008AF60  # VHOST_SET_OWNER, VHOST_VSOCK_SET_GUEST_CID
    for cid in range(first, first + tries):
        try:
            fd = os.open(device, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.ioctl(fd, set_owner)
            fcntl.ioctl(fd, set_cid, struct.pack("Q", cid))
            return cid
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return None
        finally:
            os.close(fd)
    return None


# -- running and watching qemu ------------------------------------------------------


class Console:
    """The serial console: copied to ``sink`` as is, and searched, without its
    colour codes, for the wanted texts (across read boundaries), a kernel panic
    and a guest reboot (whole lines)."""

    def __init__(self, texts: Sequence[bytes], sink: Callable[[bytes], None] | None = None) -> None:
        self.texts = tuple(texts)
        self.sink = sink
        self.found: set[bytes] = set()
        self.panic: str | None = None
        self.rebooted = False
        self.lines: deque[str] = deque(maxlen=CONTEXT_LINES)  # the last non-empty lines
        self.before_panic: list[str] = []
        self._keep = max([len(t) for t in self.texts], default=0) + 1
        self._tail = b""
        self._partial = b""
        self._held = b""  # an escape sequence cut by a read

    def feed(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink(data)
        raw = self._held + data  # colour codes are matched as if they were not there
        held = ANSI_INCOMPLETE.search(raw)
        self._held = raw[held.start() :] if held else b""
        text = ANSI.sub(b"", raw[: held.start()] if held else raw)
        window = self._tail + text
        self.found.update(t for t in self.texts if t in window)
        self._tail = window[-self._keep :]
        *complete, partial = (self._partial + text).split(b"\n")
        self._partial = partial[-MAX_LINE:]
        for raw in complete:
            self._line(raw.decode("utf-8", "replace").strip())

    def _line(self, line: str) -> None:
        if not line:
            return
        if self.panic is None and PANIC in line:
            self.panic = line[line.index(PANIC) :]
            self.before_panic = list(self.lines)
        self.rebooted = self.rebooted or REBOOT in line
        self.lines.append(line)

    def close(self) -> None:
        """The console ended: its last line counts even without a newline."""
        self._line(self._partial.decode("utf-8", "replace").strip())
        self._partial = b""

    def missing(self) -> list[str]:
        return [t.decode() for t in self.texts if t not in self.found]


@dataclass(frozen=True)
class Ended:
    exited: bool  # qemu exited by itself (else: stopped by us, done or deadline)
    returncode: int | None
    stderr: str
    seconds: float


def watch(
    proc: subprocess.Popen[bytes], console: Console, deadline: float, done: Callable[[], bool]
) -> Ended:
    """Feed qemu's stdout to ``console`` until ``done()``, qemu exits or the deadline."""
    started = time.monotonic()
    err = bytearray()
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    try:
        while sel.get_map() and not done():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(min(left, 0.5)):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                elif key.data == "err":
                    err += data[: max(0, 65536 - len(err))]
                else:
                    console.feed(data)
        exited = not sel.get_map()
    finally:
        sel.close()
    returncode = None
    if exited:
        try:
            returncode = proc.wait(5.0)
        except subprocess.TimeoutExpired:
            exited = False
    stderr = err.decode("utf-8", "replace")
    return Ended(exited, returncode, stderr, time.monotonic() - started)


def run_vm(
    argv: Sequence[str], console: Console, deadline: float, done: Callable[[], bool]
) -> Ended:
    """Run qemu (its own process group, the tools' clean environment) until
    ``done()``, its exit or the deadline; it is always killed and reaped."""
    try:
        with spawned(argv) as proc:
            return watch(proc, console, deadline, done)
    except ToolError as exc:
        raise BootError(str(exc), reason=Reason.QEMU_FAILED) from exc
    finally:
        console.close()


# -- acceleration ---------------------------------------------------------------------

_probed: dict[tuple[str, str], bool] = {}


def kvm_available(device: str = "/dev/kvm") -> bool:
    return os.access(device, os.R_OK | os.W_OK)


def probe_kvm(qemu: str, target: BootTarget, memory: int, tsc_khz: int | None) -> bool:
    """A short diskless boot under KVM: does the kernel get as far as starting init
    (or, without an initrd, panicking on the missing root and stopping the VM)?

    /dev/kvm is no proof: on some hosts a guest hangs silently in early boot.
    """
    argv = qemu_argv(
        qemu, target, None, accel="kvm", memory=memory, cmdline=kernel_cmdline("", tsc_khz)
    )
    console = Console([PROBE_BANNER, *PROBE_LATE])

    def done() -> bool:
        return PROBE_BANNER in console.found and bool(console.found & set(PROBE_LATE))

    ended = run_vm(argv, console, time.monotonic() + PROBE_SECONDS, done)
    return done() or (ended.exited and ended.returncode == 0 and PROBE_BANNER in console.found)


def choose_accel(
    requested: str,
    qemu: str,
    target: BootTarget,
    memory: int,
    tsc_khz: int | None,
    note: Callable[[str], None] = lambda _: None,
) -> str:
    """``kvm`` or ``tcg`` for ``requested`` (auto probes KVM once per kernel and process)."""
    if requested not in ACCELS:
        raise InputError(f"--accel {requested}: expected one of {', '.join(ACCELS)}")
    if requested == "tcg":
        return "tcg"
    if not kvm_available():
        if requested == "kvm":
            raise BootError(
                "--accel kvm: /dev/kvm is missing or not accessible", reason=Reason.NO_KVM
            )
        return "tcg"
    if requested == "kvm":
        return "kvm"
    key = (qemu, str(target.kernel.resolve()))
    if key not in _probed:
        note(f"probing KVM (a diskless boot of up to {PROBE_SECONDS:g} s)")
        _probed[key] = probe_kvm(qemu, target, memory, tsc_khz)
        note("KVM works" if _probed[key] else "KVM probe failed: using TCG")
    return "kvm" if _probed[key] else "tcg"


# -- the boot -----------------------------------------------------------------------------


def boot(
    target: BootTarget,
    options: BootOptions,
    note: Callable[[str], None] = lambda _: None,
    *,
    workdir: Path | None = None,
) -> BootResult:
    """Boot a copy of ``target.rootfs``; return when it did what ``options`` ask.

    The copy lives in ``workdir`` (the caller removes it; the CLI uses a temp
    dir of the store, which gc collects if we are killed), else in a
    temporary directory removed here.
    """
    qemu = find_tool(QEMU)
    if options.timeout <= 0:
        raise InputError(f"--timeout {options.timeout:g}: must be more than 0 seconds")
    if options.memory < 64:
        raise InputError(f"--memory {options.memory}: at least 64 MiB")
    tsc_khz = host_tsc_khz()
    accel = choose_accel(options.accel, qemu, target, options.memory, tsc_khz, note)
    deadline = time.monotonic() + options.timeout
    cid = vsock_cid()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="banger-boot-")))
        disk = copy_rootfs(target.rootfs, workdir)

        def launch(cid: int | None) -> tuple[Console, Ended]:
            argv = qemu_argv(
                qemu, target, disk, accel=accel, memory=options.memory,
                cmdline=kernel_cmdline(options.append, tsc_khz), vsock_cid=cid,
            )  # fmt: skip
            vsock = "" if cid is None else f", vsock cid {cid}"
            note(f"booting under {accel}{vsock}: {shlex.join(argv)}")
            console = Console([t.encode() for t in options.expect], options.console)
            expect = set(console.texts)  # none: run until the guest powers off

            def done() -> bool:
                return bool(expect) and expect <= console.found

            return console, run_vm(argv, console, deadline, done)

        console, ended = launch(cid)
        if cid is not None and ended.exited and ended.returncode and "vhost-vsock" in ended.stderr:
            note("vhost-vsock did not start: booting without vsock")
            console, ended = launch(None)
    return BootResult(accel, ended.seconds, outcome(ended, console, options, accel))


def copy_rootfs(rootfs: Path, tmp: Path) -> Path:
    """The throw-away copy the VM boots (and may write): the store stays untouched."""
    disk = tmp / ROOTFS
    try:
        sparse_copy(rootfs, disk)
    except OSError as exc:
        raise BootError(f"cannot copy {rootfs} to {tmp}: {exc.strerror}", reason=Reason.IO) from exc
    return disk


def outcome(ended: Ended, console: Console, options: BootOptions, accel: str) -> str:
    """``expected`` or ``poweroff``, or the BootError that says what went wrong."""
    missing = ", ".join(repr(t) for t in console.missing())
    if console.texts and not missing:
        return "expected"
    if not ended.exited:
        waiting = f"for {missing}" if missing else "for the VM to power off"
        raise BootError(
            f"timed out after {options.timeout:g} s ({accel}) waiting {waiting}"
            + _quote("last console lines", list(console.lines)),
            reason=Reason.BOOT_TIMEOUT,
        )
    if ended.returncode != 0:
        tail = "\n".join(ended.stderr.strip().splitlines()[-10:])
        raise BootError(
            f"qemu failed with exit code {ended.returncode}:\n{tail}", reason=Reason.QEMU_FAILED
        )
    still = f" (never printed: {missing})" if missing else ""
    if console.panic is not None:
        raise BootError(
            f"the guest kernel panicked{still}: {console.panic}"
            + _quote("console lines before it", console.before_panic),
            reason=Reason.GUEST_PANIC,
        )
    if console.rebooted:
        raise BootError(
            f"the guest rebooted{still}" + _quote("last console lines", list(console.lines)),
            reason=Reason.GUEST_REBOOT,
        )
    if missing:
        raise BootError(
            f"the VM powered off without printing {missing}"
            + _quote("last console lines", list(console.lines)),
            reason=Reason.EXPECT_MISSING,
        )
    return "poweroff"


def _quote(title: str, lines: list[str]) -> str:
    return f"\n{title}:\n" + "\n".join(f"  {line}" for line in lines) if lines else ""
