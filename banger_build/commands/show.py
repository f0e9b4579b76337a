"""``banger-build show RECIPE``: print the derivation (every input, its digest, the key) as JSON.

Besides ``derivation``, ``key``, ``name`` and ``store_path``: ``built`` (the
store path exists in this store, however it got there), ``origin`` (how it got
there: ``built`` here, ``substituted``, ``unknown`` without a record; null when
it does not exist) and ``substituted`` (``source`` and ``signer`` of a
substituted path, else null), as ``ls --json`` gives them.
"""

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
    from banger_build.commands.ls import substitution_json

    ctx = common.resolve_recipe(args, args.recipe)
    path = ctx.store.lookup(ctx.key, ctx.derivation.name)
    entry = ctx.store.entry(path) if path is not None else None
    meta = entry.meta() if entry is not None else {}
    out = {
        "name": ctx.derivation.name,
        "key": ctx.key,
        "store_path": str(ctx.store.path_for(ctx.key, ctx.derivation.name)),
        "built": path is not None,
        "origin": entry.origin(meta) if entry is not None else None,
        "substituted": substitution_json(entry.substitution(meta) if entry else None),
        "derivation": ctx.derivation.data,
    }
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0
