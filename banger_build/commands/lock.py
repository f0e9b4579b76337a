"""``banger-build lock RECIPE``: resolve what is not pinned yet and write the lock file."""

from __future__ import annotations

import argparse
from pathlib import Path

from banger_build.commands import common

NAME = "lock"
HELP = "resolve the recipe's inputs and write the missing pins to its lock file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="the recipe (TOML)")
    p.add_argument(
        "--prune", action="store_true",
        help="also drop pins the recipe no longer uses (another image, platform, kernel or file)",
    )  # fmt: skip
    p.add_argument("--lock-file", type=Path, metavar="PATH",
                   help="the lock file (default: RECIPE.lock beside the recipe)")  # fmt: skip
    common.add_sources(p)
    common.add_home(p)
    common.add_registry(p)


def run(args: argparse.Namespace) -> int:
    return common.write_lock(args, args.recipe, lock_mode="auto")
