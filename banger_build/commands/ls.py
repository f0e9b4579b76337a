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

    store = Store(common.home(args))
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
    for e in listing:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.time))
        mark = "*" if e.path.name in roots else " "
        source = _from(e.substituted) if e.substituted is not None else ""
        print(f"{mark} {e.path.name}  {e.size / 2**20:8.1f} MiB  {when}  {e.recipe or '-'}{source}")
    return 0
