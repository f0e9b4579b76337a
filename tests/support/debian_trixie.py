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

Cached in ``${BANGER_TEST_CACHE:-/var/cache/banger-build-tests}/debian-trixie-<hash16>/layout``;
the hash covers this file and ``tests/support/debian.py`` (whose packing it uses).

Fixtures: ``debian_trixie_layout`` (the layout dir) and ``trixie_image`` (the
layout pushed to the session ``registry`` as ``library/debian:trixie``, so
``--mirror docker.io=<registry.url>`` serves ``docker.io/library/debian:trixie``).

CLI: ``python -m tests.support.debian_trixie build`` prints the layout path;
``info`` prints the build statistics as JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import pytest

from tests.support import debian

SUITE = "trixie"
INCLUDE = debian.INCLUDE
REPO, TAG = debian.REPO, SUITE
REFERENCE = f"docker.io/{REPO}:{TAG}"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

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


# --------------------------------------------------------------------------- cache


def source_hash() -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(Path(debian.__file__).read_bytes())  # the packing and normaliser used here
    return h.hexdigest()


def cache_dir() -> Path:
    root = Path(os.environ.get(debian.CACHE_ENV) or debian.DEFAULT_CACHE)
    return root / f"debian-{SUITE}-{source_hash()[:16]}"


def _ready(layout: Path) -> bool:
    return (layout / "index.json").is_file() and (layout / "oci-layout").is_file()


def trixie_layout(*, log: IO[str] | None = None) -> Path:
    """Build (once) or reuse the cached trixie image layout; return its directory."""
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
                f"the trixie test image is not cached at {layout} and building it "
                "(debootstrap) needs root"
            )
        if not Path("/usr/share/debootstrap/scripts", SUITE).exists():
            raise RuntimeError(
                f"this debootstrap has no script for {SUITE} (apt-get install debootstrap)"
            )
        work = Path(tempfile.mkdtemp(prefix="build-", dir=base))
        try:
            rootfs = work / "rootfs"
            mirror = debian.apt_mirror()
            print(f"trixie test image: debootstrap {SUITE} from {mirror} ...", file=out, flush=True)
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
                f"trixie test image: {layout} ({stats['entries']} entries, debootstrap "
                f"{stats['debootstrap_seconds']} s, pack {stats['pack_seconds']} s)",
                file=out,
                flush=True,
            )
        finally:
            debian._remove_tree(work)
    _prune(base)
    return layout


def _prune(keep: Path, max_age: float = 3 * 86400) -> None:
    """Drop trixie images of older versions of this file that nobody used for days."""
    for other in keep.parent.glob(f"debian-{SUITE}-*"):
        stats = other / "stats.json"
        if other == keep or other.is_symlink() or not stats.is_file():
            continue
        if time.time() - stats.stat().st_mtime > max_age:
            with contextlib.suppress(OSError, RuntimeError):
                debian._remove_tree(other)


def build_stats() -> dict[str, Any]:
    path = cache_dir() / "stats.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def debootstrap(target: Path, mirror: str) -> None:
    cmd = ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(target), mirror]
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
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": debian.CREATED,
        "config": {"Cmd": ["bash"], "Env": [f"PATH={PATH}"]},
        "rootfs": {"type": "layers", "diff_ids": [w["diff_id"] for w in written]},
        "history": [{"created": debian.CREATED, "created_by": h} for h in history],
    }
    config_desc = {
        "mediaType": DOCKER_CONFIG,
        **debian._put_blob(blobs, debian._canonical(config)),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": config_desc,
        "layers": [w["descriptor"] for w in written],
    }
    manifest_desc = {
        "mediaType": DOCKER_MANIFEST,
        **debian._put_blob(blobs, debian._canonical(manifest)),
    }
    index = {
        "schemaVersion": 2,
        "mediaType": debian.MT_INDEX,
        "manifests": [
            {
                **manifest_desc,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": TAG},
            }
        ],
    }
    (layout / "oci-layout").write_bytes(debian._canonical({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_bytes(debian._canonical(index))
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
    cmd = argv[0] if argv else "build"
    if cmd not in ("build", "info"):
        print("usage: python -m tests.support.debian_trixie [build|info]", file=sys.stderr)
        return 2
    try:
        layout = trixie_layout()
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"tests.support.debian_trixie: error: {exc}", file=sys.stderr)
        return 1
    if cmd == "build":
        print(layout)
    else:
        info = {
            "layout": str(layout),
            **build_stats(),
            "expected_paths": len(debian.expected_tree(layout)),
        }
        print(json.dumps(info, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
