"""Debian kernels per architecture, with an initramfs that also brings up the NIC.

``boot_kernel(arch)`` gives a ``BootKernel`` for ``amd64`` or ``arm64``:

* amd64: the kernel and modules of ``tests.support.kernel`` (the cloud
  kernel, cached there) with an initramfs of its own;
* arm64: the package behind ``linux-image-cloud-arm64`` and
  ``busybox-static:arm64``, fetched by ``apt-get download`` through a
  private apt state (``apt-arm64/`` in the cache: its own sources list,
  lists and ``APT::Architecture=arm64``; the host's apt configuration and
  dpkg architectures are not touched; apt checks the archive's signature
  with the host's Debian archive keyring and every .deb's sha256), unpacked
  with ``dpkg-deb -x``. Debian's arm64 ``vmlinuz`` is a gzip'd ``Image``,
  which ``qemu-system-aarch64 -kernel`` takes as it is.

The initramfs is ``tests.support.kernel``'s (its ``Newc`` writer and
``INIT``) with more modules: besides the root disk's (``kernel.MODULES``)
it loads ``NET_MODULES`` (virtio_net and what it needs), so the guest has
its NIC before systemd starts and the guest set's network unit can
configure it whether or not the image has a ``modules.dep``. The vsock
modules are not in it: they are the image's (``modules-load.d``).

Everything lives in
``${BANGER_TEST_CACHE:-/var/cache/banger-build-tests}/bootkernel-<arch>-<hash16>/``
(the hash covers this file and ``tests/support/kernel.py``), built in a
temp dir beside it under an flock and renamed into place; downloaded .debs
are kept, verified, in ``debs-<arch>/``.

Fixtures: ``amd64_boot_kernel``, ``arm64_boot_kernel`` (session).
CLI: ``python -m tests.support.bootkernel build ARCH`` prints ``vmlinuz PATH``,
``initrd PATH``, ``modules PATH`` and ``version VERSION`` lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from tests.support import debian, kernel

ARCHES = ("amd64", "arm64")
#: Modules for the NIC, in load order, after the root disk's (kernel.MODULES).
NET_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("failover", ("failover",)),
    ("net_failover", ("net_failover",)),
    ("virtio_net", ("virtio_net",)),
)
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PATH = kernel.PATH


class BootKernelError(RuntimeError):
    """The kernel, its modules or the initramfs cannot be made."""


@dataclass(frozen=True)
class BootKernel:
    arch: str
    vmlinuz: Path
    initrd: Path
    modules_dir: Path  # lib/modules/<version>, as the package ships it (no modules.dep)
    version: str

    @property
    def dirs(self) -> list[Path]:
        """The directories the files lie in (for ``--allow-source``)."""
        return sorted({self.vmlinuz.parent, self.initrd.parent, self.modules_dir.parent})


# --------------------------------------------------------------------------- cache


def source_hash() -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(Path(kernel.__file__).read_bytes())  # its initramfs pieces, amd64's kernel
    return h.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get(kernel.CACHE_ENV) or kernel.DEFAULT_CACHE)


def cache_dir(arch: str) -> Path:
    return cache_root() / f"bootkernel-{arch}-{source_hash()[:16]}"


def _ready(base: Path) -> bool:
    return (base / "version").is_file() and (base / "initrd.img").is_file()


def _files(arch: str, base: Path) -> BootKernel:
    version = (base / "version").read_text().strip()
    if arch == "amd64":  # the kernel and modules stay in tests.support.kernel's cache
        amd64 = kernel.debian_kernel()
        if amd64.version != version:
            raise BootKernelError(f"{base}: built for {version}, the kernel is {amd64.version}")
        return BootKernel(arch, amd64.vmlinuz, base / "initrd.img", amd64.modules_dir, version)
    return BootKernel(arch, base / "vmlinuz", base / "initrd.img", base / "modules", version)


def boot_kernel(arch: str, *, log: IO[str] | None = None) -> BootKernel:
    """Build (once) or reuse the cached kernel of ``arch``."""
    if arch not in ARCHES:
        raise BootKernelError(f"no boot kernel for {arch!r} (there are: {', '.join(ARCHES)})")
    base = cache_dir(arch)
    if _ready(base):
        with contextlib.suppress(OSError):
            os.utime(base / "version")  # in use: not pruned
        return _files(arch, base)
    out = log if log is not None else sys.stderr
    base.parent.mkdir(parents=True, exist_ok=True)
    with open(base.parent / f"{base.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ready(base):
            return _files(arch, base)
        for stale in base.parent.glob(f".{base.name}.build-*"):  # a crashed builder's
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{base.name}.build-", dir=base.parent))
        try:
            t0 = time.monotonic()
            (build_amd64 if arch == "amd64" else build_arm64)(work / "out", work, out)
            kernel._chmod_readable(work / "out")
            shutil.rmtree(base, ignore_errors=True)  # an incomplete leftover
            os.rename(work / "out", base)
            print(f"boot kernel {arch}: {base} ({time.monotonic() - t0:.1f} s)", file=out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _prune(base, arch)
    return _files(arch, base)


def _prune(keep: Path, arch: str, max_age: float = 3 * 86400) -> None:
    """Drop kernels of older versions of this file that nobody used for days."""
    for other in keep.parent.glob(f"bootkernel-{arch}-*"):
        stamp = other / "version"
        if other == keep or other.is_symlink() or not other.is_dir() or not stamp.is_file():
            continue
        if time.time() - stamp.stat().st_mtime > max_age:
            shutil.rmtree(other, ignore_errors=True)
            with contextlib.suppress(OSError):
                other.with_name(other.name + ".lock").unlink()


# ------------------------------------------------------------------------ builds


def build_amd64(out: Path, work: Path, log: IO[str]) -> None:
    """The cached amd64 kernel's modules and the host architecture's busybox-static."""
    amd64 = kernel.debian_kernel(log=log)
    (deb,) = kernel.fetch_debs([kernel.BUSYBOX_PACKAGE], cache_root() / "debs", log)
    kernel.extract(deb, work / "root")
    out.mkdir()
    initrd = make_initrd(work / "root" / "bin" / "busybox", amd64.modules_dir, amd64.version)
    (out / "initrd.img").write_bytes(initrd)
    (out / "version").write_text(amd64.version + "\n")


def build_arm64(out: Path, work: Path, log: IO[str]) -> None:
    apt = Apt(cache_root() / "apt-arm64", "arm64")
    apt.update(log)
    package = apt.kernel_package("linux-image-cloud-arm64")
    debs = apt.fetch([package, kernel.BUSYBOX_PACKAGE], cache_root() / "debs-arm64", log)
    root = work / "root"
    for deb in debs:
        kernel.extract(deb, root)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise BootKernelError(f"{package}: expected one /boot/vmlinuz-*, found {kernels}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    modules = root / "lib" / "modules" / version
    busybox = root / "bin" / "busybox"
    if not modules.is_dir() or not busybox.is_file():
        raise BootKernelError(f"{package}/{kernel.BUSYBOX_PACKAGE}: no {modules} or {busybox}")
    out.mkdir()
    shutil.copyfile(kernels[0], out / "vmlinuz")
    (out / "initrd.img").write_bytes(make_initrd(busybox, modules, version))
    shutil.move(modules, out / "modules")
    (out / "version").write_text(version + "\n")


# ------------------------------------------------------------------- private apt


class Apt:
    """apt-get and apt-cache for another architecture, with their own state in ``top``."""

    def __init__(self, top: Path, arch: str) -> None:
        self.top, self.arch = top, arch

    def options(self) -> list[str]:
        t = self.top
        return [
            f"-oAPT::Architecture={self.arch}",
            f"-oAPT::Architectures={self.arch}",
            f"-oDir::State={t}/state",
            f"-oDir::State::status={t}/state/status",
            f"-oDir::Cache={t}/cache",
            f"-oDir::Etc::SourceList={t}/sources.list",
            f"-oDir::Etc::SourceParts={t}/sources.list.d",
            "-oAPT::Sandbox::User=root",  # _apt need not read this directory
        ]

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        return kernel._run([tool, *self.options(), *args], cwd=cwd)

    def update(self, log: IO[str]) -> None:
        for d in ("state/lists/partial", "cache/archives/partial", "sources.list.d"):
            (self.top / d).mkdir(parents=True, exist_ok=True)
        (self.top / "state" / "status").touch()
        mirror = debian.apt_mirror()
        (self.top / "sources.list").write_text(
            f"deb [arch={self.arch} signed-by={KEYRING}] {mirror} {debian.SUITE} main\n"
        )
        print(f"boot kernel {self.arch}: apt-get update ({mirror})", file=log, flush=True)
        self.run("apt-get", "-q", "update")

    def kernel_package(self, meta: str) -> str:
        text = self.run("apt-cache", "depends", meta)
        found = re.findall(r"^\s*Depends:\s*(linux-image-\d\S*)$", text, re.MULTILINE)
        if not found:
            raise BootKernelError(f"apt-cache depends {meta} names no linux-image-<version>")
        return str(found[0])

    def package_file(self, package: str) -> tuple[str, str]:
        text = self.run("apt-cache", "show", "--no-all-versions", package)
        filename = re.search(r"^Filename: (\S+)$", text, re.MULTILINE)
        digest = re.search(r"^SHA256: ([0-9a-f]{64})$", text, re.MULTILINE)
        if not filename or not digest:
            raise BootKernelError(f"apt-cache show {package}: no Filename/SHA256")
        return os.path.basename(filename.group(1)), digest.group(1)

    def fetch(self, packages: list[str], debs: Path, log: IO[str]) -> list[Path]:
        """The packages' candidate .debs, verified, from ``debs`` or ``apt-get download``."""
        debs.mkdir(parents=True, exist_ok=True)
        wanted = {pkg: self.package_file(pkg) for pkg in packages}
        for pkg, (name, sha) in wanted.items():
            if kernel._verified(debs / name, sha):
                continue
            print(f"boot kernel {self.arch}: apt-get download {pkg}", file=log, flush=True)
            with tempfile.TemporaryDirectory(prefix=".download-", dir=debs) as tmp:
                self.run("apt-get", "-q", "download", pkg, cwd=Path(tmp))
                got = sorted(Path(tmp).glob(f"{pkg}_*.deb"))
                if len(got) != 1 or not kernel._verified(got[0], sha):
                    raise BootKernelError(f"apt-get download {pkg}: no .deb with sha256 {sha}")
                os.replace(got[0], debs / name)
            for old in debs.glob(f"{pkg}_*.deb"):  # older versions
                if old.name != name:
                    old.unlink(missing_ok=True)
        return [debs / name for name, _ in wanted.values()]


# ---------------------------------------------------------------------- initramfs


def find_modules(modules_dir: Path) -> list[Path]:
    """The module files of ``kernel.MODULES`` and ``NET_MODULES`` that are not built in."""
    builtin_file = modules_dir / "modules.builtin"
    builtin = set()
    if builtin_file.is_file():
        builtin = {kernel._module_name(line) for line in builtin_file.read_text().split()}
    files: dict[str, Path] = {}
    for path in sorted((modules_dir / "kernel").rglob("*.ko*")):
        files.setdefault(kernel._module_name(path.name), path)
    found = []
    for name, candidates in (*kernel.MODULES, *NET_MODULES):
        names = [c.replace("-", "_") for c in candidates]
        if any(n in builtin for n in names):
            continue
        hit = next((files[n] for n in names if n in files), None)
        if hit is None:
            raise BootKernelError(f"module {name} is neither built in nor in {modules_dir}")
        found.append(hit)
    return found


def make_initrd(busybox: Path, modules_dir: Path, version: str) -> bytes:
    """tests.support.kernel's initramfs, loading ``find_modules`` (NIC included)."""
    cpio = kernel.Newc()
    dirs = ["bin", "dev", "proc", "sys", "newroot", "sbin", "usr", "usr/bin", "usr/sbin"]
    modules = []
    payload: list[tuple[str, bytes]] = []
    for path in find_modules(modules_dir):
        rel = path.relative_to(modules_dir).as_posix()
        for suffix in (".xz", ".zst", ".gz"):
            rel = rel.removesuffix(suffix)
        name = f"lib/modules/{version}/{rel}"
        modules.append("/" + name)
        payload.append((name, kernel.module_bytes(path)))
        dirs.extend(kernel._parents(name))
    for d in sorted(set(dirs)):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for name, data in payload:
        cpio.file(name, data)
    cpio.file("init", kernel.INIT.replace("@MODULES@", " ".join(modules)).encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=9, mtime=0)


# ------------------------------------------------------------------------ fixtures


def _fixture(arch: str) -> BootKernel:
    try:
        return boot_kernel(arch)
    except (BootKernelError, kernel.KernelBuildError, OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"cannot build the {arch} boot kernel: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def amd64_boot_kernel() -> BootKernel:
    """The amd64 cloud kernel with an initramfs that also loads the NIC's modules."""
    return _fixture("amd64")


@pytest.fixture(scope="session")
def arm64_boot_kernel() -> BootKernel:
    """The arm64 cloud kernel, its modules and an initramfs (root disk and NIC modules)."""
    return _fixture("arm64")


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "build" or argv[1] not in ARCHES:
        print(f"usage: python -m tests.support.bootkernel build {{{'|'.join(ARCHES)}}}")
        return 2
    try:
        files = boot_kernel(argv[1])
    except (BootKernelError, kernel.KernelBuildError, OSError) as exc:
        print(f"tests.support.bootkernel: error: {exc}", file=sys.stderr)
        return 1
    print(f"vmlinuz {files.vmlinuz}\ninitrd {files.initrd}")
    print(f"modules {files.modules_dir}\nversion {files.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
