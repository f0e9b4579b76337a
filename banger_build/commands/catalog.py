"""``banger-build catalog REF... [-o FILE] [--trusted-key NAME:BASE64]...``: imagecat
entries of pushed store paths, for banger to consume.

Each REF (``REGISTRY/REPO:TAG``, ``REGISTRY/REPO@sha256:...``, e.g. what ``push``
prints) names a rootfs artifact; its manifest and its manifest.json are fetched
and verified, and the entry records the name, ``REGISTRY/REPO@sha256:...`` of
the artifact, the bundle's digest and size, the raw sha256 of rootfs.ext4 and
manifest.json, the store key, the kernel (the kernel artifact it came from, and
the staged files' layers) and the architecture. A store path is no REF: push it
first. With --trusted-key (or $BANGER_BUILD_TRUSTED_KEYS) every artifact must be
signed by one of those keys (its entry names the signers), else nothing is
written.

The catalog is canonical JSON (sorted keys, indented), its entries sorted by
name and architecture: the same artifacts give the same bytes, whatever the
order of the REFs. Written to FILE (atomically; FILE is printed), else to stdout.
The format is specified in banger_build/catalog.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from banger_build.commands import common
from banger_build.errors import InputError, Reason

NAME = "catalog"
HELP = "write imagecat entries (JSON) of pushed store paths, for banger"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "refs", nargs="+", metavar="REF",
        help="a pushed artifact: REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:... (as push prints)",
    )  # fmt: skip
    p.add_argument(
        "-o", "--output", type=Path, metavar="FILE",
        help="write the catalog to FILE (default: stdout)",
    )  # fmt: skip
    common.add_trusted_keys(p)
    common.add_output(p)
    common.add_home(p)
    common.add_registry(p)


def run(args: argparse.Namespace) -> int:
    from banger_build.catalog import make_catalog, parse_ref, render, write_catalog
    from banger_build.store import Store

    reporter = common.reporter(args)  # first: --json reports the errors below too
    if args.json and args.output is None:
        raise InputError(
            "--json writes events to stdout: give the catalog a file with -o FILE",
            reason=Reason.BAD_ARGUMENT,
        )
    refs = [parse_ref(text) for text in args.refs]  # every argument checked first
    trusted = common.trusted_keys(args)
    started = time.monotonic()
    store = Store(common.home(args))
    remote = common.remote(args, store, reporter.progress)
    try:
        catalog = make_catalog(remote, refs, reporter, trusted)
    finally:
        store.temp_roots.close()
    data = render(catalog)
    entries = [entry["ref"] for entry in catalog["entries"]]
    if args.output is None:
        sys.stdout.write(data.decode())
        sys.stdout.flush()
        return 0
    write_catalog(args.output, data)
    if args.json:
        reporter.result(
            path=str(args.output),
            entries=entries,
            signed=bool(trusted),
            seconds=round(time.monotonic() - started, 3),
        )
    else:
        reporter.step(f"wrote {len(entries)} entries to {args.output}")
        print(args.output, flush=True)
    return 0
