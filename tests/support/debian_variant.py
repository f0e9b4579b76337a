"""The machinery of the Debian test images other than bookworm's (arm64, trixie).

A ``Variant`` names one image: its cache directory prefix, the checks a build
needs, and how it debootstraps and packs the tree. ``Variant.layout()`` builds
it once or reuses it, the way ``tests.support.debian`` does bookworm's, in
``${BANGER_TEST_CACHE:-/var/cache/banger-build-tests}/<name>-<hash16>/layout``
where the hash covers the variant's module, this file and
``tests/support/debian.py`` (whose packing and normaliser are used): editing any
of them rebuilds the image. Builds run under an flock in a temp dir beside the
layout and are renamed into place; caches of other hashes nobody used for days
are pruned.

``debootstrap()`` runs debootstrap ``--variant=minbase``; ``write_image()``
writes the config, manifest, index and ``oci-layout`` of a one-platform layout;
``main()`` is the ``build|info`` CLI of a variant's module.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.support import debian

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Variant:
    """One cached Debian test image: where it is cached and how it is built."""

    #: Cache directory prefix, e.g. ``debian-arm64``.
    name: str
    #: The image's name in log lines and errors, e.g. ``arm64 Debian test image``.
    title: str
    #: The variant's module file (``__file__``): part of the cache key.
    source: str
    #: What building needs besides root, for the error when not root.
    needs: str
    #: The debootstrap run as the build's log line says it.
    announce: str
    #: Raises RuntimeError when this host cannot build the image (run as root).
    preflight: Callable[[], None]
    #: Debootstraps ``(target, mirror)``.
    debootstrap: Callable[[Path, str], None]
    #: Packs ``(rootfs, layout)`` and returns its statistics (``entries`` among them).
    pack: Callable[[Path, Path], dict[str, Any]]

    def source_hash(self) -> str:
        h = hashlib.sha256(Path(self.source).read_bytes())
        h.update(Path(__file__).read_bytes())  # the build steps below
        h.update(Path(debian.__file__).read_bytes())  # the packing and normaliser used here
        return h.hexdigest()

    def cache_dir(self) -> Path:
        root = Path(os.environ.get(debian.CACHE_ENV) or debian.DEFAULT_CACHE)
        return root / f"{self.name}-{self.source_hash()[:16]}"

    def build_stats(self) -> dict[str, Any]:
        path = self.cache_dir() / "stats.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def layout(self, *, log: IO[str] | None = None) -> Path:
        """Build (once) or reuse the cached image layout; return its directory."""
        base = self.cache_dir()
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
                    f"the {self.title} is not cached at {layout} and building it "
                    f"({self.needs}) needs root"
                )
            self.preflight()
            work = Path(tempfile.mkdtemp(prefix="build-", dir=base))
            try:
                self._build(work, base, layout, out)
            finally:
                debian._remove_tree(work)
        self._prune(base)
        return layout

    def _build(self, work: Path, base: Path, layout: Path, out: IO[str]) -> None:
        rootfs = work / "rootfs"
        mirror = debian.apt_mirror()
        print(f"{self.title}: {self.announce.format(mirror=mirror)} ...", file=out, flush=True)
        t0 = time.monotonic()
        self.debootstrap(rootfs, mirror)
        t1 = time.monotonic()
        debian.normalize_tree(rootfs)
        stats = self.pack(rootfs, work / "layout")
        t2 = time.monotonic()
        stats.update(
            debootstrap_seconds=round(t1 - t0, 1),
            pack_seconds=round(t2 - t1, 1),
            mirror=mirror,
            source_hash=self.source_hash(),
        )
        debian._chmod_readable(work / "layout")
        os.rename(work / "layout", layout)
        (base / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
        os.chmod(base / "stats.json", 0o644)
        print(
            f"{self.title}: {layout} ({stats['entries']} entries, debootstrap "
            f"{stats['debootstrap_seconds']} s, pack {stats['pack_seconds']} s)",
            file=out,
            flush=True,
        )

    def _prune(self, keep: Path, max_age: float = 3 * 86400) -> None:
        """Drop this image's caches of other hashes that nobody used for days."""
        for other in keep.parent.glob(f"{self.name}-*"):
            stats = other / "stats.json"
            if other == keep or other.is_symlink() or not stats.is_file():
                continue
            if time.time() - stats.stat().st_mtime > max_age:
                with contextlib.suppress(OSError, RuntimeError):
                    debian._remove_tree(other)


def _ready(layout: Path) -> bool:
    return (layout / "index.json").is_file() and (layout / "oci-layout").is_file()


# ---------------------------------------------------------------------- debootstrap


def debootstrap(
    target: Path, mirror: str, *, suite: str, include: str, options: Sequence[str] = ()
) -> None:
    """``debootstrap [options] --variant=minbase --include=... suite target mirror``."""
    cmd = [
        "debootstrap",
        *options,
        "--variant=minbase",
        f"--include={include}",
        suite,
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


def write_image(
    layout: Path,
    written: list[dict[str, Any]],
    *,
    history: list[str],
    platform: dict[str, str],
    ref_name: str,
    manifest_type: str = debian.MT_MANIFEST,
    config_type: str = debian.MT_CONFIG,
) -> dict[str, Any]:
    """Write the config, manifest, index and oci-layout over the layers ``written``
    (``debian._write_layer`` results, lowest first, already in ``layout``'s blobs);
    return the manifest's descriptor."""
    blobs = layout / "blobs" / "sha256"
    config = {
        **platform,
        "created": debian.CREATED,
        "config": {"Cmd": ["bash"], "Env": [f"PATH={PATH}"]},
        "rootfs": {"type": "layers", "diff_ids": [w["diff_id"] for w in written]},
        "history": [{"created": debian.CREATED, "created_by": h} for h in history],
    }
    config_desc = {"mediaType": config_type, **debian._put_blob(blobs, debian._canonical(config))}
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config_desc,
        "layers": [w["descriptor"] for w in written],
    }
    manifest_desc = {
        "mediaType": manifest_type,
        **debian._put_blob(blobs, debian._canonical(manifest)),
    }
    index = {
        "schemaVersion": 2,
        "mediaType": debian.MT_INDEX,
        "manifests": [
            {
                **manifest_desc,
                "platform": platform,
                "annotations": {"org.opencontainers.image.ref.name": ref_name},
            }
        ],
    }
    (layout / "oci-layout").write_bytes(debian._canonical({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_bytes(debian._canonical(index))
    return manifest_desc


# ---------------------------------------------------------------------------- CLI


def main(
    variant: Variant,
    prog: str,
    argv: list[str],
    info: Callable[[Path], dict[str, Any]] = lambda layout: {},
) -> int:
    """``prog [build|info]``: build prints the layout path, info the build statistics
    (and ``info(layout)``) as JSON."""
    cmd = argv[0] if argv else "build"
    if cmd not in ("build", "info"):
        print(f"usage: python -m {prog} [build|info]", file=sys.stderr)
        return 2
    try:
        layout = variant.layout()
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    if cmd == "build":
        print(layout)
    else:
        print(
            json.dumps(
                {"layout": str(layout), **variant.build_stats(), **info(layout)},
                indent=2,
                sort_keys=True,
            )
        )
    return 0
