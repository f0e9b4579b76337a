"""A real Debian bookworm arm64 test image, and one multi-arch index with the amd64 one.

``arm64_layout()`` debootstraps a minimal arm64 bookworm (``--arch=arm64``,
the packages of ``INCLUDE``) as root on this amd64 host: debootstrap's
second stage runs the arm64 maintainer scripts through qemu-user
(``qemu-aarch64-static``, registered in binfmt_misc with the F flag, so the
chroot needs no copy of it). ``ensure_binfmt()`` mounts binfmt_misc and
enables the qemu-aarch64 entry (binfmt-support's ``update-binfmts``) when
they are not yet. The tree is normalised like the amd64 image's and packed
into an OCI image layout of one gzip layer whose config says linux/arm64/v8.

It reuses ``tests.support.debian``'s packing, normaliser and oracle, and is
cached the same way: in
``${BANGER_TEST_CACHE:-/var/cache/banger-build-tests}/debian-arm64-<hash16>/layout``
where the hash covers this file and ``tests/support/debian.py``.

Fixture: ``debian_arm64_layout`` (session), the arm64 layout directory
(``tests.support.multiarch`` pushes it with the amd64 one in one index).

CLI: ``python -m tests.support.debian_arm64 build`` prints the layout path;
``info`` prints the build statistics as JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import pytest

from tests.support import debian

ARCH = "arm64"
VARIANT = "v8"
PLATFORM = f"linux/{ARCH}/{VARIANT}"
#: kmod for lsmod/modprobe in the guest; the rest as the amd64 image.
INCLUDE = "systemd-sysv,udev,iproute2,kmod"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_ENTRY = "qemu-aarch64"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --------------------------------------------------------------------------- cache


def source_hash() -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(Path(debian.__file__).read_bytes())  # the packing and normaliser used here
    return h.hexdigest()


def cache_dir() -> Path:
    root = Path(os.environ.get(debian.CACHE_ENV) or debian.DEFAULT_CACHE)
    return root / f"debian-arm64-{source_hash()[:16]}"


def _ready(layout: Path) -> bool:
    return (layout / "index.json").is_file() and (layout / "oci-layout").is_file()


def arm64_layout(*, log: IO[str] | None = None) -> Path:
    """Build (once) or reuse the cached arm64 Debian OCI layout; return its directory."""
    base = cache_dir()
    layout = base / "layout"
    if _ready(layout):
        with contextlib.suppress(OSError):
            os.utime(base / "stats.json")  # in use: not pruned
        return layout
    out = log if log is not None else sys.stderr
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base.parent, 0o755)
    os.chmod(base, 0o755)
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ready(layout):
            return layout
        for stale in base.glob("build-*"):  # a crashed builder's leftovers
            debian._remove_tree(stale)
        if os.geteuid() != 0:
            raise RuntimeError(
                f"the arm64 Debian test image is not cached at {layout} and building it "
                "(debootstrap, binfmt_misc) needs root"
            )
        ensure_binfmt()
        work = Path(tempfile.mkdtemp(prefix="build-", dir=base))
        try:
            rootfs = work / "rootfs"
            mirror = debian.apt_mirror()
            print(
                f"arm64 debian test image: debootstrap --arch={ARCH} {debian.SUITE} from "
                f"{mirror} (second stage under qemu-user) ...",
                file=out,
                flush=True,
            )
            t0 = time.monotonic()
            debootstrap(rootfs, mirror)
            t1 = time.monotonic()
            debian.normalize_tree(rootfs)
            stats = pack_layout(rootfs, work / "layout")
            t2 = time.monotonic()
            stats.update(
                debootstrap_seconds=round(t1 - t0, 1),
                pack_seconds=round(t2 - t1, 1),
                mirror=mirror,
                source_hash=source_hash(),
            )
            debian._chmod_readable(work / "layout")
            os.rename(work / "layout", layout)
            (base / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
            os.chmod(base / "stats.json", 0o644)
            print(
                f"arm64 debian test image: {layout} ({stats['entries']} entries, debootstrap "
                f"{stats['debootstrap_seconds']} s, pack {stats['pack_seconds']} s)",
                file=out,
                flush=True,
            )
        finally:
            debian._remove_tree(work)
    _prune(base)
    return layout


def _prune(keep: Path, max_age: float = 3 * 86400) -> None:
    """Drop arm64 images of older versions of this file that nobody used for days."""
    for other in keep.parent.glob("debian-arm64-*"):
        stats = other / "stats.json"
        if other == keep or other.is_symlink() or not stats.is_file():
            continue
        if time.time() - stats.stat().st_mtime > max_age:
            with contextlib.suppress(OSError, RuntimeError):
                debian._remove_tree(other)


def build_stats() -> dict[str, Any]:
    path = cache_dir() / "stats.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ------------------------------------------------------------------- qemu-user


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, check=False, env={"PATH": PATH, "LC_ALL": "C"}
    )


def ensure_binfmt() -> None:
    """arm64 ELF binaries run here through qemu-aarch64-static (F flag), or RuntimeError."""
    entry = BINFMT / QEMU_ENTRY
    if not (BINFMT / "register").exists():
        proc = _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
        if proc.returncode != 0:
            raise RuntimeError(f"cannot mount binfmt_misc on {BINFMT}: {proc.stderr.strip()}")
    if not entry.is_file() or not entry.read_text().startswith("enabled"):
        if shutil.which("update-binfmts", path=PATH) is None:
            raise RuntimeError("update-binfmts is missing (apt-get install binfmt-support)")
        proc = _run(["update-binfmts", "--enable", QEMU_ENTRY])
        if proc.returncode != 0:
            raise RuntimeError(
                f"update-binfmts --enable {QEMU_ENTRY} failed (apt-get install "
                f"qemu-user-static binfmt-support): {proc.stderr.strip() or proc.stdout.strip()}"
            )
    text = entry.read_text() if entry.is_file() else ""
    flags = next((line[7:] for line in text.splitlines() if line.startswith("flags: ")), "")
    if not text.startswith("enabled") or "F" not in flags:
        raise RuntimeError(
            f"{entry} is not an enabled qemu-aarch64 entry with the F flag:\n{text.strip()}"
        )


def debootstrap(target: Path, mirror: str) -> None:
    cmd = [
        "debootstrap",
        f"--arch={ARCH}",
        "--variant=minbase",
        f"--include={INCLUDE}",
        debian.SUITE,
        str(target),
        mirror,
    ]
    env = {"PATH": PATH, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
    for key in ("http_proxy", "https_proxy", "no_proxy"):
        if key in os.environ:
            env[key] = os.environ[key]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        log = target / "debootstrap" / "debootstrap.log"
        tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}\n{tail}"
        )


# ------------------------------------------------------------------------- packing


def pack_layout(root: Path, layout: Path) -> dict[str, Any]:
    """One gzip layer (the tree) with a linux/arm64/v8 config; deterministic bytes."""
    members, counts = debian._tree_members(root)
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer = debian._write_layer(members, blobs)
    config = {
        "architecture": ARCH,
        "variant": VARIANT,
        "os": "linux",
        "created": debian.CREATED,
        "config": {"Cmd": ["bash"], "Env": [f"PATH={PATH}"]},
        "rootfs": {"type": "layers", "diff_ids": [layer["diff_id"]]},
        "history": [
            {
                "created": debian.CREATED,
                "created_by": f"debootstrap --arch={ARCH} --variant=minbase "
                f"--include={INCLUDE} {debian.SUITE}",
            }
        ],
    }
    config_desc = {
        "mediaType": debian.MT_CONFIG,
        **debian._put_blob(blobs, debian._canonical(config)),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": debian.MT_MANIFEST,
        "config": config_desc,
        "layers": [layer["descriptor"]],
    }
    manifest_desc = {
        "mediaType": debian.MT_MANIFEST,
        **debian._put_blob(blobs, debian._canonical(manifest)),
    }
    index = {
        "schemaVersion": 2,
        "mediaType": debian.MT_INDEX,
        "manifests": [
            {
                **manifest_desc,
                "platform": {"architecture": ARCH, "os": "linux", "variant": VARIANT},
                "annotations": {"org.opencontainers.image.ref.name": f"{debian.TAG}-{ARCH}"},
            }
        ],
    }
    (layout / "oci-layout").write_bytes(debian._canonical({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_bytes(debian._canonical(index))
    return {
        **counts,
        "manifest_digest": manifest_desc["digest"],
        "layers": [layer["descriptor"]["digest"]],
        "compressed_bytes": layer["descriptor"]["size"],
        "uncompressed_bytes": layer["uncompressed_size"],
    }


# ---------------------------------------------------------------------- fixture


@pytest.fixture(scope="session")
def debian_arm64_layout() -> Path:
    """The cached arm64 Debian OCI image layout (built on first use)."""
    try:
        return arm64_layout()
    except Exception as exc:
        pytest.fail(f"cannot build the arm64 Debian test image: {exc}", pytrace=False)


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "build"
    if cmd not in ("build", "info"):
        print("usage: python -m tests.support.debian_arm64 [build|info]", file=sys.stderr)
        return 2
    try:
        layout = arm64_layout()
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"tests.support.debian_arm64: error: {exc}", file=sys.stderr)
        return 1
    if cmd == "build":
        print(layout)
    else:
        info = {"layout": str(layout), **build_stats()}
        print(json.dumps(info, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
