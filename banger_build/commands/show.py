"""``banger-build show RECIPE``: print the derivation (every input, its digest, the key) as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from banger_build.commands import common

NAME = "show"
HELP = "print a recipe's derivation and store key as JSON"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="the recipe (TOML)")
    common.add_lock_options(p)
    common.add_sources(p)
    common.add_home(p)
    common.add_registry(p)


def run(args: argparse.Namespace) -> int:
    ctx = common.resolve_recipe(args, args.recipe)
    out = {
        "name": ctx.derivation.name,
        "key": ctx.key,
        "store_path": str(ctx.store.path_for(ctx.key, ctx.derivation.name)),
        "built": ctx.store.lookup(ctx.key, ctx.derivation.name) is not None,
        "derivation": ctx.derivation.data,
    }
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0
