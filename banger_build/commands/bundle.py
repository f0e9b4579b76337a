"""``banger-build bundle RECIPE|STORE-PATH [-o FILE]``: write the imagecat bundle of a
store path, ``<name>-<key>.tar.zst`` (in the current directory unless -o says
otherwise; -o DIR puts it in DIR), and its ``.sha256`` sidecar beside it.

The bundle is a tar of exactly manifest.json then rootfs.ext4, compressed with
pinned zstd parameters (see banger_build/bundle.py): the same store path gives
the same bytes on every machine with the same zstandard version. A recipe is
built first. The store path is held under its key's shared lock while it is
read, and rootfs.ext4 is checked against the sha256 its manifest.json records.
Prints the bundle's path.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from banger_build.commands import common

NAME = "bundle"
HELP = "write a store path's imagecat bundle (<name>-<key>.tar.zst) and its .sha256"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target", type=Path, metavar="RECIPE|STORE-PATH",
        help="a store path (e.g. ./result) or a recipe (.toml), built first",
    )  # fmt: skip
    p.add_argument(
        "-o", "--output", type=Path, metavar="FILE",
        help="where to write the bundle (default: ./<name>-<key>.tar.zst; a directory: in it)",
    )  # fmt: skip
    common.add_output(p)
    common.add_sources(p)
    common.add_limits(p)
    common.add_home(p)
    common.add_registry(p)


def run(args: argparse.Namespace) -> int:
    from banger_build.bundle import bundle_name, write_bundle_file
    from banger_build.commands.boot import protect
    from banger_build.store import Store
    from banger_build.storepath import read_store_path

    reporter = common.reporter(args)
    started = time.monotonic()
    store = Store(common.home(args))
    with contextlib.ExitStack() as stack:
        sp = read_store_path(protect(stack, store, args, reporter))
        dest: Path = args.output or Path(bundle_name(sp.name, sp.key))
        if dest.is_dir():
            dest = dest / bundle_name(sp.name, sp.key)
        reporter.step(f"bundling {sp.name} (key {sp.key}) into {dest}")
        info = write_bundle_file(sp, dest, reporter.progress)
    reporter.done()
    if args.json:
        seconds = round(time.monotonic() - started, 3)
        reporter.result(path=str(dest), key=sp.key, name=sp.name, seconds=seconds, **info.record())
        return 0
    reporter.step(
        f"{dest}: {info.size / 1e6:.1f} MB (rootfs.ext4 {sp.rootfs.size / 1e6:.1f} MB), "
        f"sha256 {info.digest.hex}"
    )
    print(dest)
    return 0
