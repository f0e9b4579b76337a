"""``banger-build ls``: list store paths with name, size, build time and recipe.

A substituted path (taken from a registry instead of built) says so: the text
listing ends its line with ``<- SOURCE (signed by KEY)``, the digest cut to 12
hex digits; ``--json`` gives every path an ``origin`` (``built``,
``substituted`` or ``unknown``: no record in this store) and a ``substituted``
object (``source``: the artifact's ``REGISTRY/REPO@sha256:...``, ``signer``: the
trusted key's name, ``""`` when accepted unsigned), null for the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from banger_build.commands import common

if TYPE_CHECKING:
    from banger_build.store import Substitution

NAME = "ls"
HELP = "list store paths (name, size, time, recipe, rooted, substituted from where)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_home(p)


def substitution_json(sub: Substitution | None) -> dict[str, str] | None:
    """A substitution record as ``ls --json`` and ``show`` print it."""
    return None if sub is None else {"source": sub.source, "signer": sub.signer}


def _from(sub: Substitution) -> str:
    """``<- REGISTRY/REPO@sha256:0123456789ab (signed by KEY)``, for humans."""
    name, at, digest = sub.source.partition("@")
    source = f"{name}@{digest[: len('sha256:') + 12]}" if at else sub.source
    trust = f"signed by {sub.signer}" if sub.signer else "unsigned"
    return f"  <- {source or '?'} ({trust})"


def run(args: argparse.Namespace) -> int:
    from banger_build.gc import entries
    from banger_build.store import Store

    home = common.home(args)
    if not (home / "store").is_dir():  # nothing built yet: list nothing, create nothing
        if args.json:
            print("[]")
        else:
            print(f"no store at {home} yet", file=sys.stderr)
        return 0
    store = Store(home)
    roots = store.rooted()
    listing = entries(store)
    if args.json:
        rows = [
            {
                "path": str(e.path), "name": e.name, "key": e.key, "size": e.size,
                "time": int(e.time), "recipe": e.recipe, "rooted": e.path.name in roots,
                "origin": e.origin, "substituted": substitution_json(e.substituted),
            }
            for e in listing
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return 0
    table: list[tuple[str, ...]] = [("", "STORE PATH", "SIZE", "BUILT", "ORIGIN", "RECIPE")]
    for e in listing:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.time))
        mark = "*" if e.path.name in roots else ""
        source = _from(e.substituted) if e.substituted is not None else ""
        size = f"{e.size / 2**20:.1f} MiB"
        table.append((mark, e.path.name, size, when, e.origin, (e.recipe or "-") + source))
    print_table(table, right=frozenset({2}))
    if roots:
        print("(* rooted: an out-link points at it; gc keeps it)")
    return 0


def print_table(rows: list[tuple[str, ...]], right: frozenset[int] = frozenset()) -> None:
    """Rows in aligned columns (the last one unpadded); ``right``: right-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row[:-1])
        ]
        print("  ".join([*cells, row[-1]]).rstrip())
