"""A Debian kernel and a busybox initramfs for boot tests, built once and cached.

``debian_kernel()`` downloads (``apt-get download``, no root needed) the
versioned package behind ``linux-image-cloud-amd64`` (resolved with
``apt-cache depends``, e.g. ``linux-image-6.1.0-56-cloud-amd64``) and
``busybox-static``, unpacks them with ``dpkg-deb -x`` and builds:

* ``vmlinuz``: the kernel's bzImage (``qemu -kernel`` boots it directly);
* ``modules/``: the package's ``lib/modules/<version>`` tree, as shipped
  (no ``modules.dep``: depmod is not run);
* ``initrd.img``: a gzip'd newc cpio, written here in Python (no root, no
  cpio/bsdtar, byte-for-byte reproducible for the same packages) holding
  ``/bin/busybox``, ``/dev/console``, the modules ``MODULES`` names that the
  kernel does not have built in (decompressed: busybox insmod takes no
  ``.ko.xz``) and ``/init`` (``INIT``): mount proc, sys and devtmpfs, insmod
  the modules in order, wait for ``root=`` (a device, ``UUID=`` or
  ``LABEL=``), mount it (``rw`` unless ``ro`` is on the command line;
  ``rootfstype=``, ``rootflags=`` and ``init=`` are honoured) and
  ``switch_root`` to ``init`` (default ``/sbin/init``). Any failure prints
  ``banger-initrd: error: ...`` and ends PID 1, so with ``panic=-1`` the
  kernel reboots at once and ``qemu -no-reboot`` exits;
* ``version``: the kernel release (``6.1.0-56-cloud-amd64``).

The cloud kernel has crc32c, crc16, mbcache, jbd2 and ext4 built in; only
virtio_ring, virtio, virtio_mmio and virtio_blk are modules. The generic
``linux-image-amd64`` kernel has more as modules; both work.

Everything lives in
``${BANGER_TEST_CACHE:-/var/cache/banger-build-tests}/kernel-<hash16>/``
where the hash is the sha256 of this file. It is built in a temp dir beside
it under an flock (``kernel-<hash16>.lock``) and renamed into place, so
readers see all or nothing. The two .debs are kept, checked against the
sha256 in apt's lists, in ``debs/`` beside it: a new version of this file
rebuilds without the network unless Debian published a newer package.

Fixture: ``debian_kernel_files`` (session) -> ``KernelFiles``.
CLI: ``python -m tests.support.kernel build`` prints the directory;
``python -m tests.support.kernel info`` prints the files as JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
CACHE_ENV = "BANGER_TEST_CACHE"
DEFAULT_CACHE = "/var/cache/banger-build-tests"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Modules the initramfs loads, in this order, and the file names that provide them.
MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("crc32c", ("crc32c_generic", "crc32c")),
    ("crc16", ("crc16",)),
    ("mbcache", ("mbcache",)),
    ("jbd2", ("jbd2",)),
    ("ext4", ("ext4",)),
    ("virtio_ring", ("virtio_ring",)),
    ("virtio", ("virtio",)),
    ("virtio_mmio", ("virtio_mmio",)),
    ("virtio_blk", ("virtio_blk",)),
)
_KO_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")

#: PID 1 of the initramfs. @MODULES@ becomes the module paths, in load order.
INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /newroot
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

fail() {
    echo "banger-initrd: error: $*"
    exit 1  # PID 1 exits: the kernel panics, panic=-1 reboots, qemu -no-reboot stops
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
echo "banger-initrd: started"

for module in @MODULES@; do
    insmod "$module" || fail "insmod $module failed"
done

root=/dev/vda fstype=ext4 mode=rw flags= init=/sbin/init wait=300
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        rootfstype=*) fstype="${arg#rootfstype=}" ;;
        rootflags=*) flags="${arg#rootflags=}" ;;
        rootdelay=*) wait=$(( ${arg#rootdelay=} * 10 )) ;;
        init=*) init="${arg#init=}" ;;
        ro) mode=ro ;;
        rw) mode=rw ;;
    esac
done

dev=
i=0
while :; do
    case "$root" in
        UUID=*|LABEL=*) dev=$(findfs "$root" 2>/dev/null) ;;
        *) dev="$root" ;;
    esac
    [ -n "$dev" ] && [ -b "$dev" ] && break
    i=$((i + 1))
    [ "$i" -gt "$wait" ] && fail "root device $root did not appear"
    usleep 100000
done

mount -t "$fstype" -o "$mode${flags:+,$flags}" "$dev" /newroot \
    || fail "cannot mount $dev ($fstype, $mode${flags:+,$flags}) on /newroot"
echo "banger-initrd: mounted $dev ($mode), switching to $init"
if [ -d /newroot/dev ]; then
    mount -o move /dev /newroot/dev || umount /dev
else
    umount /dev
fi
umount /sys
umount /proc
exec switch_root /newroot "$init"
"""


class KernelBuildError(RuntimeError):
    """The Debian kernel or the initramfs cannot be made."""


@dataclass(frozen=True)
class KernelFiles:
    vmlinuz: Path
    initrd: Path
    modules_dir: Path
    version: str

    @classmethod
    def at(cls, base: Path) -> KernelFiles:
        return cls(
            vmlinuz=base / "vmlinuz",
            initrd=base / "initrd.img",
            modules_dir=base / "modules",
            version=(base / "version").read_text().strip(),
        )


# --------------------------------------------------------------------------- cache


def source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def cache_dir() -> Path:
    root = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    return root / f"kernel-{source_hash()[:16]}"


def _ready(base: Path) -> bool:
    return all((base / n).exists() for n in ("vmlinuz", "initrd.img", "modules", "version"))


def debian_kernel(*, log: IO[str] | None = None) -> KernelFiles:
    """Build (once) or reuse the cached kernel, initrd and modules."""
    base = cache_dir()
    if _ready(base):
        with contextlib.suppress(OSError):
            os.utime(base / "version")  # in use: not pruned
        return KernelFiles.at(base)
    out = log if log is not None else sys.stderr
    base.parent.mkdir(parents=True, exist_ok=True)
    lock_path = base.parent / f"{base.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ready(base):
            return KernelFiles.at(base)
        for stale in base.parent.glob(f".{base.name}.build-*"):  # a crashed builder's
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{base.name}.build-", dir=base.parent))
        try:
            t0 = time.monotonic()
            build_into(work / "out", work, out, debs=base.parent / "debs")
            _chmod_readable(work / "out")
            shutil.rmtree(base, ignore_errors=True)  # an incomplete leftover
            os.rename(work / "out", base)
            print(f"debian kernel: {base} ({time.monotonic() - t0:.1f} s)", file=out, flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _prune(base)
    return KernelFiles.at(base)


def _prune(keep: Path, max_age: float = 3 * 86400) -> None:
    """Drop kernels of older versions of this file that nobody used for days."""
    for other in keep.parent.glob("kernel-*"):
        stamp = other / "version"
        if other == keep or other.is_symlink() or not other.is_dir() or not stamp.is_file():
            continue
        if time.time() - stamp.stat().st_mtime > max_age:
            shutil.rmtree(other, ignore_errors=True)
            with contextlib.suppress(OSError):
                other.with_name(other.name + ".lock").unlink()


def _chmod_readable(top: Path) -> None:
    for dirpath, _dirs, files in os.walk(top):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)


# --------------------------------------------------------------------- packages


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, check=False,
            env={**os.environ, "PATH": PATH, "LC_ALL": "C"},
        )  # fmt: skip
    except FileNotFoundError as exc:
        raise KernelBuildError(f"{argv[0]} not found") from exc
    if proc.returncode != 0:
        raise KernelBuildError(
            f"{' '.join(argv)} failed with exit code {proc.returncode}:\n{proc.stderr.strip()}"
        )
    return proc.stdout


def kernel_package(meta: str = META_PACKAGE) -> str:
    """The versioned image package the meta package depends on."""
    text = _run(["apt-cache", "depends", meta])
    found = re.findall(r"^\s*Depends:\s*(linux-image-\d\S*)$", text, re.MULTILINE)
    if not found:
        raise KernelBuildError(
            f"apt-cache depends {meta} names no linux-image-<version> package "
            f"(run apt-get update?):\n{text.strip()}"
        )
    return str(found[0])


def package_file(package: str) -> tuple[str, str]:
    """The candidate .deb's file name in the pool and its sha256 (from apt's lists)."""
    text = _run(["apt-cache", "show", "--no-all-versions", package])
    filename = re.search(r"^Filename: (\S+)$", text, re.MULTILINE)
    digest = re.search(r"^SHA256: ([0-9a-f]{64})$", text, re.MULTILINE)
    if not filename or not digest:
        raise KernelBuildError(f"apt-cache show {package}: no Filename/SHA256:\n{text.strip()}")
    return os.path.basename(filename.group(1)), digest.group(1)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch_debs(packages: list[str], debs: Path, log: IO[str]) -> list[Path]:
    """The packages' candidate .debs, verified, from ``debs`` (kept across versions
    of this file, so editing it needs no network) or ``apt-get download``."""
    debs.mkdir(parents=True, exist_ok=True)
    wanted = {pkg: package_file(pkg) for pkg in packages}
    missing = [p for p, (name, sha) in wanted.items() if not _verified(debs / name, sha)]
    if missing:
        print(f"debian kernel: apt-get download {' '.join(missing)}", file=log, flush=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=debs) as tmp:
            _run(["apt-get", "download", *missing], cwd=Path(tmp))
            for pkg in missing:
                got = sorted(Path(tmp).glob(f"{pkg}_*.deb"))
                name, sha = wanted[pkg]
                if len(got) != 1 or not _verified(got[0], sha):
                    raise KernelBuildError(f"apt-get download {pkg}: no .deb with sha256 {sha}")
                os.replace(got[0], debs / name)
    for pkg, (name, _) in wanted.items():  # older versions of the same packages
        for old in debs.glob(f"{pkg}_*.deb"):
            if old.name != name:
                old.unlink(missing_ok=True)
    return [debs / name for name, _ in wanted.values()]


def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and _sha256(path) == sha256


def extract(deb: Path, dest: Path) -> None:
    _run(["dpkg-deb", "-x", str(deb), str(dest)])


# ---------------------------------------------------------------------- modules


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in _KO_SUFFIXES:
        base = base.removesuffix(suffix)
    return base.replace("-", "_")


def find_modules(modules_dir: Path) -> list[Path]:
    """The module files of ``MODULES`` that are not built in, in load order."""
    builtin_file = modules_dir / "modules.builtin"
    builtin = set()
    if builtin_file.is_file():
        builtin = {_module_name(line) for line in builtin_file.read_text().split()}
    files: dict[str, Path] = {}
    for path in sorted((modules_dir / "kernel").rglob("*.ko*")):
        files.setdefault(_module_name(path.name), path)
    found = []
    for name, candidates in MODULES:
        names = [c.replace("-", "_") for c in candidates]
        if any(n in builtin for n in names):
            continue
        hit = next((files[n] for n in names if n in files), None)
        if hit is None:
            raise KernelBuildError(f"module {name} is neither built in nor in {modules_dir}")
        found.append(hit)
    return found


def module_bytes(path: Path) -> bytes:
    """A module's ELF bytes (busybox insmod cannot read compressed modules)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


# ---------------------------------------------------------------------- initramfs


class Newc:
    """A minimal newc (SVR4, no CRC) cpio writer: every entry root-owned, mtime 0."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(header + encoded)
        self.buf.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


def _parents(path: str) -> Iterator[str]:
    parts = path.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield "/".join(parts[:i])


def make_initrd(busybox: Path, modules_dir: Path, version: str) -> bytes:
    """The gzip'd newc initramfs (see the module docstring)."""
    cpio = Newc()
    dirs = ["bin", "dev", "proc", "sys", "newroot", "sbin", "usr", "usr/bin", "usr/sbin"]
    modules = []
    payload: list[tuple[str, bytes]] = []
    for path in find_modules(modules_dir):
        rel = path.relative_to(modules_dir).as_posix()
        for suffix in (".xz", ".zst", ".gz"):
            rel = rel.removesuffix(suffix)
        name = f"lib/modules/{version}/{rel}"
        modules.append("/" + name)
        payload.append((name, module_bytes(path)))
        dirs.extend(_parents(name))
    for d in sorted(set(dirs)):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for name, data in payload:
        cpio.file(name, data)
    init = INIT.replace("@MODULES@", " ".join(modules))
    cpio.file("init", init.encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=9, mtime=0)


# -------------------------------------------------------------------------- build


def build_into(out: Path, work: Path, log: IO[str], *, debs: Path) -> None:
    """Fetch (into ``debs``), unpack (in ``work``) and assemble into the new dir ``out``."""
    package = kernel_package()
    debs_files = fetch_debs([package, BUSYBOX_PACKAGE], debs, log)
    root = work / "root"
    for deb in debs_files:
        extract(deb, root)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise KernelBuildError(f"{package}: expected one /boot/vmlinuz-*, found {kernels}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    modules = root / "lib" / "modules" / version
    busybox = root / "bin" / "busybox"
    if not modules.is_dir() or not busybox.is_file():
        raise KernelBuildError(f"{package}/{BUSYBOX_PACKAGE}: no {modules} or {busybox}")
    out.mkdir()
    shutil.copyfile(kernels[0], out / "vmlinuz")
    (out / "initrd.img").write_bytes(make_initrd(busybox, modules, version))
    shutil.move(modules, out / "modules")
    (out / "version").write_text(version + "\n")


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def debian_kernel_files() -> KernelFiles:
    """The cached Debian kernel, busybox initrd and modules (built on first use)."""
    try:
        return debian_kernel()
    except (KernelBuildError, OSError) as exc:
        pytest.fail(f"cannot build the Debian test kernel: {exc}", pytrace=False)


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "build"
    if cmd not in ("build", "info"):
        print("usage: python -m tests.support.kernel [build|info]", file=sys.stderr)
        return 2
    try:
        files = debian_kernel()
    except (KernelBuildError, OSError) as exc:
        print(f"tests.support.kernel: error: {exc}", file=sys.stderr)
        return 1
    if cmd == "build":
        print(files.vmlinuz.parent)
    else:
        info: dict[str, object] = {k: str(v) for k, v in vars(files).items()}
        info["initrd_modules"] = [str(p) for p in find_modules(files.modules_dir)]
        print(json.dumps(info, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
