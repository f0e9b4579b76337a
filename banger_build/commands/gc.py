"""``banger-build gc``: delete store paths no out-link points at, and unreferenced blobs."""

from __future__ import annotations

import argparse
import re

from banger_build.commands import common
from banger_build.errors import InputError

NAME = "gc"
HELP = "delete unreferenced store paths and blobs (out-links are roots)"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> float:
    m = re.fullmatch(r"(\d+)([smhdw])", text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (e.g. 30m, 12h, 7d)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def size(text: str) -> int:
    from banger_build.recipe import Invalid, parse_bytes

    try:
        return parse_bytes(text)
    except (Invalid, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 20GiB)") from exc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--dry-run", action="store_true", help="only say what would be deleted")
    p.add_argument(
        "--older-than",
        type=duration,
        metavar="AGE",
        help="only delete paths built longer ago than AGE (30m, 12h, 7d)",
    )
    p.add_argument(
        "--keep-last", type=int, metavar="N", help="keep the N newest unrooted paths of each name"
    )
    p.add_argument(
        "--max-size",
        type=size,
        metavar="SIZE",
        help="delete oldest first only until the store is at most SIZE",
    )
    common.add_home(p)


def run(args: argparse.Namespace) -> int:
    from banger_build.gc import collect
    from banger_build.store import Store

    if args.keep_last is not None and args.keep_last < 0:
        raise InputError("--keep-last must be 0 or more")
    report = collect(
        Store(common.home(args)),
        dry_run=args.dry_run,
        older_than=args.older_than,
        keep_last=args.keep_last,
        max_size=args.max_size,
    )
    verb = "would delete" if args.dry_run else "deleted"
    for entry in report.deleted:
        print(f"{verb} {entry.path} ({entry.size / 2**20:.1f} MiB)")
    for entry in report.kept_in_use:
        print(f"kept {entry.path}: in use by a running build, check or boot")
    for failure in report.failures:
        print(f"could not remove {failure}")
    print(
        f"{verb} {_count(len(report.deleted), 'store path')}, "
        f"{_count(report.blobs_deleted, 'blob')}, "
        f"{_count(report.tmp_deleted, 'stale temp entry', 'stale temp entries')}; "
        f"{'would free' if args.dry_run else 'freed'} {report.freed / 2**20:.1f} MiB; "
        f"kept {_count(len(report.kept_rooted), 'rooted path')}"
    )
    return 1 if report.failures else 0


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"
