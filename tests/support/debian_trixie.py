"""A real Debian trixie (13, usr-merged) test image, pushed with Docker v2 schema 2 media types.

``trixie_layout()`` debootstraps a minimal trixie (``--variant=minbase``, the
packages of ``debian.INCLUDE``) as root from the mirror apt uses
(``debian.apt_mirror()``; Debian 12's debootstrap knows trixie as sid's
script). trixie's base-files ships ``/bin``, ``/sbin``, ``/lib`` and
``/lib64`` as symlinks into ``/usr``: the tree is usr-merged by Debian's own
packages. The tree is normalised like the bookworm image's and packed into an
image layout whose manifest is Docker's, not OCI's:

* manifest ``application/vnd.docker.distribution.manifest.v2+json``;
* config ``application/vnd.docker.container.image.v1+json``;
* two layers ``application/vnd.docker.image.rootfs.diff.tar.gzip``: the
  debootstrap tree, and an upper layer planting the cases of ``SPECIAL`` (a
  whiteout, a whited-out directory, an opaque directory, setuid, 0600, ids
  no passwd names, a hard link pair, a ``security.capability`` xattr) plus a
  file written at its canonical path below ``/usr`` (``MERGED``), which the
  guest sees through the ``/sbin`` symlink.

``tests.support.oci.push_layout`` pushes it as-is, so the registry stores and
serves the Docker manifest with its own media type. The oracle
(``debian.expected_tree``) reads the layout like the bookworm one.

Built and cached by ``tests.support.debian_variant`` (``IMAGE``) in
``${BANGER_TEST_CACHE:-/var/cache/banger-build-tests}/debian-trixie-<hash16>/layout``;
the hash covers this file, ``tests/support/debian_variant.py`` and
``tests/support/debian.py`` (whose packing it uses).

Fixtures: ``debian_trixie_layout`` (the layout dir) and ``trixie_image`` (the
layout pushed to the session ``registry`` as ``library/debian:trixie``, so
``--mirror docker.io=<registry.url>`` serves ``docker.io/library/debian:trixie``).

CLI: ``python -m tests.support.debian_trixie build`` prints the layout path;
``info`` prints the build statistics as JSON.
"""

from __future__ import annotations

import os
import stat
import sys
import tarfile
from pathlib import Path
from typing import IO, Any

import pytest

from tests.support import debian, debian_variant

SUITE = "trixie"
INCLUDE = debian.INCLUDE
REPO, TAG = debian.REPO, SUITE
REFERENCE = f"docker.io/{REPO}:{TAG}"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = debian.DOCKER_LAYER_GZIP

#: Top-level names trixie's base-files makes symlinks into /usr (amd64).
USR_MERGED = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}

#: As the bookworm image's, with an opaque directory trixie's minbase has
#: (adduser, whose examples bookworm's uses, is not in it).
SPECIAL = debian.Special(
    opaque_dir="usr/share/doc/apt/examples",
    opaque_new="usr/share/doc/apt/examples/banger-opaque.txt",
)
#: Written at its canonical path; /sbin/banger-test-merged in the guest.
MERGED = "usr/sbin/banger-test-merged"


# --------------------------------------------------------------------------- image


def trixie_layout(*, log: IO[str] | None = None) -> Path:
    """Build (once) or reuse the cached trixie image layout; return its directory."""
    return IMAGE.layout(log=log)


def _has_script() -> None:
    if not Path("/usr/share/debootstrap/scripts", SUITE).exists():
        raise RuntimeError(
            f"this debootstrap has no script for {SUITE} (apt-get install debootstrap)"
        )


def debootstrap(target: Path, mirror: str) -> None:
    debian_variant.debootstrap(target, mirror, suite=SUITE, include=INCLUDE)
    for name, target_path in USR_MERGED.items():
        link = target / name
        if not link.is_symlink() or os.readlink(link) != target_path:
            raise RuntimeError(f"debootstrap {SUITE}: /{name} is not a symlink to {target_path}")


# ------------------------------------------------------------------------- packing


def _upper_members(root: Path) -> list[debian.LayerEntry]:
    """The upper layer: SPECIAL's cases (as the bookworm image's) and MERGED."""
    s = SPECIAL
    out: dict[str, debian.LayerEntry] = {}

    def dir_from_lower(rel: str) -> None:
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p in out:
                continue
            info = tarfile.TarInfo(p)
            info.type = tarfile.DIRTYPE
            if os.path.lexists(root / p):  # as the lower has it (a symlink is refused)
                st = os.lstat(root / p)
                if not stat.S_ISDIR(st.st_mode):
                    raise RuntimeError(f"{p} is not a directory in the debootstrap tree")
                info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
                info.mtime = int(st.st_mtime)
            else:
                info.mode, info.uid, info.gid = 0o755, 0, 0
                info.mtime = debian.UPPER_MTIME
            info.uname = info.gname = ""
            out[p] = debian.LayerEntry(info)

    def add(
        rel: str,
        data: bytes = b"",
        *,
        kind: bytes = tarfile.REGTYPE,
        mode: int = 0o644,
        owner: tuple[int, int] = (0, 0),
        linkname: str = "",
        xattrs: dict[str, bytes] | None = None,
    ) -> None:
        dir_from_lower(rel.rpartition("/")[0])
        info = tarfile.TarInfo(rel)
        info.type, info.mode, (info.uid, info.gid) = kind, mode, owner
        info.uname = info.gname = ""
        info.mtime = debian.UPPER_MTIME
        info.linkname = linkname
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        if xattrs:
            info.pax_headers = {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
            }
        out[rel] = debian.LayerEntry(info, data if kind == tarfile.REGTYPE else None)

    for victim in (s.whiteout_victim, s.whiteout_dir):
        if not (root / victim).exists():
            raise RuntimeError(f"whiteout victim {victim} is not in the debootstrap tree")
        d, _, name = victim.rpartition("/")
        add(f"{d}/.wh.{name}")
    if not any((root / s.opaque_dir).iterdir()):
        raise RuntimeError(f"opaque dir {s.opaque_dir} is empty in the debootstrap tree")
    dir_from_lower(s.opaque_dir)
    add(f"{s.opaque_dir}/.wh..wh..opq")
    add(s.opaque_new, b"only this file survives the opaque whiteout\n")
    add(s.setuid, b"#!/bin/sh\necho banger setuid test file\n", mode=0o4755)
    add(s.secret, b"root-only secret of the banger test image\n", mode=0o600)
    add(s.owned, b"owned by 4242:4343, a user no passwd names\n", mode=0o640, owner=s.owned_ids)
    add(s.hardlink[0], b"one inode, two names\n")
    add(s.hardlink[1], kind=tarfile.LNKTYPE, linkname=s.hardlink[0])
    add(
        s.capability,
        b"#!/bin/sh\necho banger capability test file\n",
        mode=0o755,
        xattrs={"security.capability": debian.CAP_NET_RAW_EP},
    )
    add(MERGED, b"#!/bin/sh\necho written below /usr, run as /sbin\n", mode=0o755)
    return [out[k] for k in sorted(out, key=debian._sort_key)]


def pack_layout(root: Path, layout: Path) -> dict[str, Any]:
    """Two gzip layers under a Docker v2 schema 2 manifest and config; deterministic bytes."""
    lower, counts = debian._tree_members(root)
    upper = _upper_members(root)
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    written = [debian._write_layer(members, blobs) for members in (lower, upper)]
    for w in written:  # the same gzip'd tar, under Docker's name for it
        w["descriptor"]["mediaType"] = DOCKER_LAYER_GZIP
    history = [
        f"debootstrap --variant=minbase --include={INCLUDE} {SUITE}",
        "banger-build test fixture: whiteouts, opaque dir, setuid, 0600, hard links, xattr, "
        f"/{MERGED}",
    ]
    manifest_desc = debian_variant.write_image(
        layout,
        written,
        history=history,
        platform={"architecture": "amd64", "os": "linux"},
        ref_name=TAG,
        manifest_type=DOCKER_MANIFEST,
        config_type=DOCKER_CONFIG,
    )
    return {
        **counts,
        "upper_entries": len(upper),
        "manifest_digest": manifest_desc["digest"],
        "layers": [w["descriptor"]["digest"] for w in written],
        "layer_bytes": [w["descriptor"]["size"] for w in written],
        "layer_uncompressed_bytes": [w["uncompressed_size"] for w in written],
        "compressed_bytes": sum(w["descriptor"]["size"] for w in written),
        "uncompressed_bytes": sum(w["uncompressed_size"] for w in written),
    }


IMAGE = debian_variant.Variant(
    name=f"debian-{SUITE}",
    title="trixie test image",
    source=__file__,
    needs="debootstrap",
    announce=f"debootstrap {SUITE} from {{mirror}}",
    preflight=_has_script,
    debootstrap=debootstrap,
    pack=pack_layout,
)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def debian_trixie_layout() -> Path:
    """The cached trixie image layout (Docker v2 manifest; built on first use)."""
    try:
        return trixie_layout()
    except Exception as exc:
        pytest.fail(f"cannot build the trixie test image: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def trixie_image(registry: Any, debian_trixie_layout: Path) -> debian.DebianImage:
    """The trixie image pushed to the session registry as library/debian:trixie."""
    from tests.support.oci import push_layout

    digest = push_layout(registry.url, REPO, TAG, debian_trixie_layout)
    assert digest == debian.manifest_digest(debian_trixie_layout), digest
    return debian.DebianImage(
        registry=registry,
        digest=digest,
        layout=debian_trixie_layout,
        special=SPECIAL,
        tag=TAG,
        reference=REFERENCE,
    )


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    return debian_variant.main(
        IMAGE,
        "tests.support.debian_trixie",
        argv,
        lambda layout: {"expected_paths": len(debian.expected_tree(layout))},
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
