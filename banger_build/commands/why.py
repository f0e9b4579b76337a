"""``banger-build why A B``: which inputs differ between two builds.

A and B are recipes, lock files (the recipe beside them, resolved with that
lock) or store paths (their recorded derivation). This answers "why did this
rebuild?": the key changes exactly when one of the named inputs does. The
exit status is diff's: 0 when nothing differs, 1 when inputs differ.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from banger_build.commands import common
from banger_build.errors import InputError, Reason

NAME = "why"
HELP = "say which inputs differ between two recipes, lock files or store paths"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", type=Path, help="recipe, lock file or store path")
    p.add_argument("b", type=Path, help="recipe, lock file or store path")
    p.add_argument(
        "--recipe", type=Path, default=None,
        help="the recipe to resolve lock files with (default: the .toml beside each lock)",
    )  # fmt: skip
    common.add_sources(p)
    common.add_home(p)
    common.add_registry(p)


def _derivation(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    from banger_build.explain import store_derivation

    if path.is_dir():
        return store_derivation(path)
    if path.suffix == ".lock":
        recipe = args.recipe or path.with_suffix(".toml")
        if not recipe.is_file():
            raise InputError(f"no recipe for the lock file {path}: pass --recipe", reason=Reason.IO)
        return common.resolve_recipe(
            args, recipe, lock_path=path, lock_mode="locked"
        ).derivation.data
    return common.resolve_recipe(args, path).derivation.data


def run(args: argparse.Namespace) -> int:
    from banger_build.derivation import Derivation
    from banger_build.explain import differences

    a, b = _derivation(args, args.a), _derivation(args, args.b)
    ka, kb = Derivation(a).key, Derivation(b).key
    lines = list(differences(a, b))
    if not lines:
        print(f"no difference: both have key {ka}")
        return 0
    print(f"{args.a}: key {ka}\n{args.b}: key {kb}\n{len(lines)} input(s) differ:")
    for line in lines:
        print(f"  {line}")
    return 1  # like diff: 0 the same, 1 different, 2 trouble
