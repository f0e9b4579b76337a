"""``banger-build check RECIPE|STORE-PATH``: rebuild from scratch and compare bit for bit.

Nothing in the store changes. On a mismatch the first differing files are
named with what differs (content, owner, mode, times, xattrs, layout) and
the exit status is 1. A store path is checked against the recipe recorded
when it was built.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from banger_build.commands import common
from banger_build.errors import InputError, Reason

if TYPE_CHECKING:
    from banger_build.store import Store

NAME = "check"
HELP = "rebuild a recipe's store path in a temp dir and compare it bit for bit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", type=Path, help="a recipe, or a store path (e.g. ./result)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    common.add_lock_options(p)
    common.add_sources(p)
    common.add_overrides(p)
    common.add_limits(p)
    common.add_home(p)
    common.add_registry(p)


def recipe_of(store_path: Path, store: Store) -> Path:
    recipe = store.entry_of(store_path).recipe
    if recipe is None:
        raise InputError(
            f"no recipe is recorded for {store_path}: run `banger-build check RECIPE`",
            reason=Reason.MISSING_INPUT,
        )
    return Path(recipe)


def run_check(args: argparse.Namespace, recipe: Path, expected: Path | None = None) -> int:
    from banger_build.build import check
    from banger_build.progress import Reporter

    reporter = Reporter(quiet=getattr(args, "quiet", False))
    result = check(recipe, common.build_options(args), reporter)
    if expected is not None and result.path != expected.resolve():
        raise InputError(
            f"{recipe} now builds {result.path.name}, not {expected.resolve().name}: "
            "its inputs changed since (see `banger-build why`)",
            reason=Reason.RECIPE_CHANGED,
        )
    if result.ok:
        print(f"ok: {result.path} is reproducible (rebuilt bit for bit)")
        return 0
    print(f"FAILED: {result.path} differs from a rebuild from the same inputs:")
    for line in result.differences:
        print(f"  {line}")
    return 1


def run(args: argparse.Namespace) -> int:
    from banger_build.store import Store

    target: Path = args.target
    if target.is_dir():
        store = Store(common.home(args))
        return run_check(args, recipe_of(target, store), expected=target)
    return run_check(args, target)
