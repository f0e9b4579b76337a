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
built and cached by ``tests.support.debian_variant`` (``IMAGE``) in
``${BANGER_TEST_CACHE:-/var/cache/banger-build-tests}/debian-arm64-<hash16>/layout``
where the hash covers this file, ``tests/support/debian_variant.py`` and
``tests/support/debian.py``.

Fixture: ``debian_arm64_layout`` (session), the arm64 layout directory
(``tests.support.multiarch`` pushes it with the amd64 one in one index).

CLI: ``python -m tests.support.debian_arm64 build`` prints the layout path;
``info`` prints the build statistics as JSON.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import pytest

from tests.support import debian, debian_variant

ARCH = "arm64"
VARIANT = "v8"
PLATFORM = f"linux/{ARCH}/{VARIANT}"
#: kmod for lsmod/modprobe in the guest; the rest as the amd64 image.
INCLUDE = "systemd-sysv,udev,iproute2,kmod"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_ENTRY = "qemu-aarch64"
PATH = debian_variant.PATH


# --------------------------------------------------------------------------- image


def arm64_layout(*, log: IO[str] | None = None) -> Path:
    """Build (once) or reuse the cached arm64 Debian OCI layout; return its directory."""
    return IMAGE.layout(log=log)


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
    debian_variant.debootstrap(
        target, mirror, suite=debian.SUITE, include=INCLUDE, options=[f"--arch={ARCH}"]
    )


# ------------------------------------------------------------------------- packing


def pack_layout(root: Path, layout: Path) -> dict[str, Any]:
    """One gzip layer (the tree) with a linux/arm64/v8 config; deterministic bytes."""
    members, counts = debian._tree_members(root)
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer = debian._write_layer(members, blobs)
    manifest_desc = debian_variant.write_image(
        layout,
        [layer],
        history=[f"debootstrap --arch={ARCH} --variant=minbase --include={INCLUDE} {debian.SUITE}"],
        platform={"architecture": ARCH, "os": "linux", "variant": VARIANT},
        ref_name=f"{debian.TAG}-{ARCH}",
    )
    return {
        **counts,
        "manifest_digest": manifest_desc["digest"],
        "layers": [layer["descriptor"]["digest"]],
        "compressed_bytes": layer["descriptor"]["size"],
        "uncompressed_bytes": layer["uncompressed_size"],
    }


IMAGE = debian_variant.Variant(
    name="debian-arm64",
    title="arm64 Debian test image",
    source=__file__,
    needs="debootstrap, binfmt_misc",
    announce=f"debootstrap --arch={ARCH} {debian.SUITE} from {{mirror}}"
    " (second stage under qemu-user)",
    preflight=ensure_binfmt,
    debootstrap=debootstrap,
    pack=pack_layout,
)


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
    return debian_variant.main(IMAGE, "tests.support.debian_arm64", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
