"""The emulated machine per image architecture, and its qemu command line.

    amd64   qemu-system-x86_64  -M microvm (virtio-mmio through ACPI), console ttyS0
    arm64   qemu-system-aarch64 -M virt    (virtio-mmio through the device tree),
                                           console ttyAMA0, -cpu max under TCG

Both get the same devices, on virtio-mmio: the root disk (virtio-blk), a
user-mode NIC (virtio-net, qemu's slirp: the guest is ``GUEST_IP`` behind the
gateway ``GATEWAY`` with qemu's resolver ``DNS``, announced to the guest set's
network unit as ``banger.ip=``/``banger.gw=``/``banger.dns=``) and, when the
host has a usable /dev/vhost-vsock, a vsock device.

``kernel_arch`` reads a kernel's header to say which architecture it is for
(an x86 bzImage, an arm64 Image, gzip'd or not), so ``boot`` refuses a kernel
of the wrong architecture before qemu fails in its own words.
"""

from __future__ import annotations

import contextlib
import gzip
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from banger_build.errors import Reason
from banger_build.vmrun import BootError

#: The user-mode network (qemu's defaults, written out).
GUEST_IP = "10.0.2.15/24"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
NETWORK_ARGS = f"banger.ip={GUEST_IP} banger.gw={GATEWAY} banger.dns={DNS}"

NETWORKS = ("user", "none")


@dataclass(frozen=True)
class Machine:
    arch: str  # the OCI architecture of the images it boots
    qemu: str
    machine: str  # -M
    console: str  # the kernel's console= device (the first serial port)
    hosts: tuple[str, ...]  # os.uname().machine of hosts whose KVM runs it
    tcg_cpu: str | None  # -cpu under TCG (None: qemu's default)
    kvm_cpu: str | None  # -cpu under KVM
    tsc_khz: bool  # pass the host's TSC frequency (x86: TCG boots hang without it)


MACHINES: dict[str, Machine] = {
    "amd64": Machine(
        "amd64", "qemu-system-x86_64", "microvm,x-option-roms=off,pit=off,pic=off,rtc=on,acpi=on",
        "ttyS0", ("x86_64",), None, None, True,
    ),
    "arm64": Machine(
        "arm64", "qemu-system-aarch64", "virt", "ttyAMA0", ("aarch64", "arm64"),
        "max", "host", False,
    ),
}  # fmt: skip


def machine_for(arch: str) -> Machine:
    machine = MACHINES.get(arch)
    if machine is None:
        raise BootError(
            f"boot has no emulator for {arch} images (it boots: {', '.join(MACHINES)})",
            reason=Reason.UNSUPPORTED_ARCH,
        )
    return machine


# -- the kernel's architecture ----------------------------------------------------------

_ARM64_MAGIC = b"ARM\x64"  # at offset 56 of an arm64 Image (and of its EFI stub)


def kernel_arch(path: Path) -> str | None:
    """``amd64`` for an x86 bzImage, ``arm64`` for an arm64 Image (gzip'd or not),
    None for anything else (qemu then says what it thinks of it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
            if head[:2] == b"\x1f\x8b":  # gzip: read the start of what it holds
                f.seek(0)
                with contextlib.suppress(OSError, EOFError, zlib.error):
                    head = gzip.GzipFile(fileobj=f).read(1024)
    except OSError:
        return None
    if head[0x202:0x206] == b"HdrS":
        return "amd64"
    if head[56:60] == _ARM64_MAGIC:
        return "arm64"
    return None


def check_kernel(path: Path, arch: str, what: str = "the kernel") -> None:
    """Refuse a kernel that is plainly for another architecture than the image."""
    found = kernel_arch(path)
    if found is not None and found != arch:
        raise BootError(
            f"{what} {path} is an {found} kernel, but the image is for {arch}: "
            f"boot it with an {arch} kernel (--kernel PATH)",
            reason=Reason.KERNEL_ARCH_MISMATCH,
        )


# -- the command line -----------------------------------------------------------------


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host's CPU clock in kHz, for ``tsc_early_khz=`` (TCG boots hang without it)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.MULTILINE)
    return round(float(match.group(1)) * 1000) if match else None


def kernel_cmdline(
    machine: Machine, extra: str = "", tsc_khz: int | None = None, *, network: bool = False
) -> str:
    """Ours first, then ``extra``: a word of ``extra`` (``banger.ip=...``) wins."""
    words = [f"console={machine.console}", "root=/dev/vda", "rw", "panic=-1"]
    if tsc_khz and machine.tsc_khz:
        words.append(f"tsc_early_khz={tsc_khz}")
    if network:
        words += NETWORK_ARGS.split()
    return " ".join(words + extra.split())


def qemu_argv(
    machine: Machine,
    kernel: Path,
    initrd: Path | None,
    disk: Path | None,
    *,
    qemu: str | None = None,
    accel: str,
    memory: int,
    cmdline: str,
    network: bool = False,
    vsock_cid: int | None = None,
) -> list[str]:
    """The qemu command line; ``disk`` is the copy to boot (None: no disk, for the probe)."""
    argv = [
        qemu or machine.qemu, "-M", machine.machine, "-accel", accel,
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-m", str(memory), "-smp", "1",
    ]  # fmt: skip
    cpu = machine.kvm_cpu if accel == "kvm" else machine.tcg_cpu
    if cpu is not None:
        argv += ["-cpu", cpu]
    argv += ["-kernel", str(kernel)]
    if initrd is not None:
        argv += ["-initrd", str(initrd)]
    argv += ["-append", cmdline]
    argv += ["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]
    if disk is not None:
        drive = str(disk).replace(",", ",,")
        argv += ["-drive", f"id=root,file={drive},format=raw,if=none"]
        argv += ["-device", "virtio-blk-device,drive=root"]
    if network:
        argv += ["-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"]
    if vsock_cid is not None:
        argv += ["-device", f"vhost-vsock-device,guest-cid={vsock_cid}"]
    return argv
