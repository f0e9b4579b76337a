"""Boot a store path in a throw-away qemu VM: the local stand-in for the
microVM manager, and a CI smoke test.

    target (store path + kernel/initrd overrides, the image's architecture)
      --copy rootfs.ext4 (sparse)--> the machine for that architecture (machines.py)
      --> KVM or TCG (kvm.py: KVM only after a probe boot proved it, remembered per host)
      --> qemu with the disk, a user-mode NIC and a vsock device where the host has one
      --watch the serial console (vmrun.py)--> outcome [--> ping the agent (vsock.py)]

The store is never written: the VM gets a sparse copy of rootfs.ext4 in a
temp dir, removed afterwards. The image's architecture is the platform its
manifest.json records; it picks the emulator, and a kernel plainly for
another architecture is refused. The serial console's bytes go to
``BootOptions.console`` and are searched for the ``expect`` texts. Success is
all texts seen (the VM is then stopped); without texts, a login prompt on
the console (what a systemd image ends its boot with) or the guest powering
off by itself. A timeout, a kernel panic, a guest reboot or a qemu failure
is a BootError. With ``ping_agent`` the agent must then answer on vsock, or
the ping is skipped, with its reason, where the host has no vhost-vsock.

qemu runs in its own process group (so a Ctrl-C on the terminal reaches us,
not it) and is always killed before ``boot`` returns or raises.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from banger_build.errors import InputError, Reason
from banger_build.kvm import ACCELS as ACCELS
from banger_build.kvm import ProbeCache, choose_accel
from banger_build.machines import (
    NETWORKS,
    Machine,
    check_kernel,
    host_tsc_khz,
    kernel_cmdline,
    machine_for,
    qemu_argv,
)
from banger_build.oci.reference import Platform, ReferenceSyntaxError
from banger_build.run import find_tool
from banger_build.vmrun import BootError as BootError
from banger_build.vmrun import Console as Console
from banger_build.vmrun import Ended, run_vm
from banger_build.vsock import DEFAULT_PORT, AgentPing, no_vsock_reason, vsock_cid

ROOTFS, KERNEL, INITRD, MANIFEST = "rootfs.ext4", "vmlinux", "initrd.img", "manifest.json"

#: What a systemd image's serial getty prints last ("banger login: ").
LOGIN_PROMPT = " login: "

#: KVM probe: the kernel banner and then the hand-over to init (or, with no
#: initrd, a panic that stops the VM) must come within this many seconds.
PROBE_SECONDS = 6.0
PROBE_BANNER = b"Linux version"
PROBE_LATE = (b"Run /", b"Kernel panic")

#: How long the agent may take to answer once the guest has booted.
AGENT_SECONDS = 60.0


@dataclass(frozen=True)
class BootTarget:
    rootfs: Path
    kernel: Path
    initrd: Path | None
    arch: str  # the image's architecture (OCI: amd64, arm64)


@dataclass(frozen=True)
class BootOptions:
    memory: int = 512  # MiB
    accel: str = "auto"
    timeout: float = 300.0
    expect: tuple[str, ...] = ()  # none: a login prompt, or the guest powering off
    append: str = ""
    console: Callable[[bytes], None] | None = None  # gets the serial console's bytes
    network: str = "user"  # "user": a user-mode NIC and banger.ip= for it; "none"
    ping_agent: bool = False
    agent_port: int = DEFAULT_PORT
    probe_cache: Path | None = None  # where KVM probe answers are kept (None: this process)


@dataclass(frozen=True)
class BootResult:
    accel: str
    seconds: float
    how: str  # "expected" (all texts seen), "login" (the prompt) or "poweroff"
    arch: str = "amd64"
    agent: str | None = None  # "pong" when the agent answered the ping
    agent_skipped: str | None = None  # why the ping was not tried (no vsock here)


# -- what to boot ---------------------------------------------------------------


def image_arch(store_path: Path) -> str:
    """The architecture of the image the store path holds (its manifest's platform)."""
    path = store_path / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{store_path}: no {MANIFEST} in it (not a store path)", reason=Reason.NO_ROOTFS
        ) from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read it: {exc}", reason=Reason.IO) from None
    image = data.get("image") if isinstance(data, dict) else None
    text = image.get("platform") if isinstance(image, dict) else None
    if not isinstance(text, str):
        raise InputError(
            f"{path} records no image platform: cannot tell which emulator boots it",
            reason=Reason.NO_PLATFORM,
        )
    try:
        return Platform.parse(text).architecture
    except ReferenceSyntaxError as exc:
        raise InputError(f"{path}: {exc}", reason=Reason.NO_PLATFORM) from None


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
    arch = image_arch(store_path)
    what = "--kernel"
    if kernel is None:
        what = "the store path's kernel"
        kernel = store_path / KERNEL
        if not kernel.is_file():
            raise InputError(
                f"{store_path}: no kernel ({KERNEL}): add a [kernel] table to the recipe "
                f"or pass --kernel PATH (an {arch} kernel)",
                reason=Reason.NO_KERNEL,
            )
        staged = store_path / INITRD
        initrd = initrd if initrd is not None else (staged if staged.is_file() else None)
    for flag, path in (("--kernel", kernel), ("--initrd", initrd)):
        if path is not None and not path.is_file():
            raise InputError(f"{flag} {path}: no such file", reason=Reason.NO_KERNEL)
    check_kernel(kernel, arch, what)
    return BootTarget(rootfs, kernel, initrd, arch)


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


# -- acceleration ---------------------------------------------------------------------


def probe_kvm(
    machine: Machine, qemu: str, target: BootTarget, memory: int, tsc_khz: int | None
) -> bool:
    """A short diskless boot under KVM: does the kernel get as far as starting init
    (or, without an initrd, panicking on the missing root and stopping the VM)?"""
    argv = qemu_argv(
        machine, target.kernel, target.initrd, None, qemu=qemu, accel="kvm", memory=memory,
        cmdline=kernel_cmdline(machine, "", tsc_khz),
    )  # fmt: skip
    console = Console([PROBE_BANNER, *PROBE_LATE])

    def done() -> bool:
        return PROBE_BANNER in console.found and bool(console.found & set(PROBE_LATE))

    ended = run_vm(argv, console, time.monotonic() + PROBE_SECONDS, done)
    return done() or (ended.exited and ended.returncode == 0 and PROBE_BANNER in console.found)


# -- the boot -----------------------------------------------------------------------------


def check_options(options: BootOptions) -> None:
    if options.timeout <= 0:
        raise InputError(f"--timeout {options.timeout:g}: must be more than 0 seconds")
    if options.memory < 64:
        raise InputError(f"--memory {options.memory}: at least 64 MiB")
    if options.network not in NETWORKS:
        raise InputError(f"--network {options.network}: expected one of {', '.join(NETWORKS)}")
    if not 1 <= options.agent_port <= 0xFFFFFFFE:
        raise InputError(f"--agent-port {options.agent_port}: expected 1 to 4294967294")


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
    check_options(options)
    machine = machine_for(target.arch)
    qemu = find_tool(machine.qemu)
    tsc_khz = host_tsc_khz() if machine.tsc_khz else None

    def probe() -> bool:
        return probe_kvm(machine, qemu, target, options.memory, tsc_khz)

    cache = ProbeCache(options.probe_cache)
    accel = choose_accel(options.accel, machine, qemu, probe, cache, note)
    deadline = time.monotonic() + options.timeout
    network = options.network == "user"
    cid = vsock_cid()
    skipped = None if cid is not None else no_vsock_reason()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="banger-boot-")))
        disk = copy_rootfs(target.rootfs, workdir)

        def launch(cid: int | None) -> tuple[Console, Ended, AgentPing | None]:
            argv = qemu_argv(
                machine, target.kernel, target.initrd, disk, qemu=qemu, accel=accel,
                memory=options.memory, network=network, vsock_cid=cid,
                cmdline=kernel_cmdline(machine, options.append, tsc_khz, network=network),
            )  # fmt: skip
            extras = ("user-mode NIC" if network else "no NIC") + (
                "" if cid is None else f", vsock cid {cid}"
            )
            note(f"booting {target.arch} under {accel} ({extras}): {shlex.join(argv)}")
            texts = options.expect or (LOGIN_PROMPT,)
            console = Console([t.encode() for t in texts], options.console)
            expect = set(console.texts)
            pinger = None
            if options.ping_agent and cid is not None:
                pinger = AgentPing((cid, options.agent_port))

            def done() -> bool:
                if not expect <= console.found:
                    return False
                if pinger is None:
                    return True
                pinger.start()  # once: the guest has booted
                return pinger.done() or pinger.elapsed() > AGENT_SECONDS

            try:
                return console, run_vm(argv, console, deadline, done), pinger
            finally:
                if pinger is not None:
                    pinger.stop()

        console, ended, pinger = launch(cid)
        if cid is not None and ended.exited and ended.returncode and "vhost-vsock" in ended.stderr:
            note("vhost-vsock did not start: booting without vsock")
            skipped = f"vhost-vsock did not start ({_last_line(ended.stderr)})"
            console, ended, pinger = launch(None)
    how = outcome(ended, console, options, accel)
    agent = None
    if options.ping_agent and pinger is not None:
        if pinger.answer is None and how == "poweroff":
            raise BootError(
                "the guest powered off before its agent could be pinged",
                reason=Reason.AGENT_UNREACHABLE,
            )
        if pinger.answer is None:
            raise BootError(
                f"the guest booted, but its agent did not answer on {pinger.where()} "
                f"({pinger.attempts} tries in {pinger.seconds:.0f} s; "
                f"last: {pinger.last_error})" + _quote("last console lines", list(console.lines)),
                reason=Reason.AGENT_UNREACHABLE,
            )
        agent = pinger.answer
    return BootResult(
        accel, ended.seconds, how, target.arch, agent, skipped if options.ping_agent else None
    )


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no message"


def copy_rootfs(rootfs: Path, tmp: Path) -> Path:
    """The throw-away copy the VM boots (and may write): the store stays untouched."""
    disk = tmp / ROOTFS
    try:
        sparse_copy(rootfs, disk)
    except OSError as exc:
        raise BootError(f"cannot copy {rootfs} to {tmp}: {exc.strerror}", reason=Reason.IO) from exc
    return disk


def outcome(ended: Ended, console: Console, options: BootOptions, accel: str) -> str:
    """``expected``, ``login`` or ``poweroff``, or the BootError that says what went wrong."""
    missing = ", ".join(repr(t) for t in console.missing())
    if not missing:
        return "expected" if options.expect else "login"
    if not ended.exited:
        waiting = (
            f"for {missing}" if options.expect
            else f"for a login prompt ({LOGIN_PROMPT.strip()!r}) or the VM to power off"
        )  # fmt: skip
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
    still = f" (never printed: {missing})" if options.expect else ""
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
    if options.expect:
        raise BootError(
            f"the VM powered off without printing {missing}"
            + _quote("last console lines", list(console.lines)),
            reason=Reason.EXPECT_MISSING,
        )
    return "poweroff"


def _quote(title: str, lines: list[str]) -> str:
    return f"\n{title}:\n" + "\n".join(f"  {line}" for line in lines) if lines else ""
