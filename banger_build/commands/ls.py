"""``banger-build ls``: list store paths with name, size, build time and recipe."""

from __future__ import annotations

import argparse
import json
import time

from banger_build.commands import common

NAME = "ls"
HELP = "list store paths (name, size, time, recipe, rooted)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_home(p)


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
            }
            for e in listing
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return 0
    for e in listing:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.time))
        mark = "*" if e.path.name in roots else " "
        print(f"{mark} {e.path.name}  {e.size / 2**20:8.1f} MiB  {when}  {e.recipe or '-'}")
    return 0
