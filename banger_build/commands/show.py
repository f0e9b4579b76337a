"""``banger-build show RECIPE|STORE-PATH``: print the derivation (every input, its digest,
the key) as JSON. A store path (``./result``) shows what it was built from: its
recorded derivation, without resolving anything.

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
from banger_build.errors import BangerError

NAME = "show"
HELP = "print a recipe's derivation and store key as JSON"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, metavar="RECIPE|STORE-PATH",
                   help="a recipe (TOML) or a store path (e.g. ./result)")  # fmt: skip
    common.add_lock_options(p)
    common.add_sources(p)
    common.add_overrides(p)
    common.add_home(p)
    common.add_registry(p)


def run(args: argparse.Namespace) -> int:
    from banger_build.commands.ls import substitution_json

    if args.recipe.is_dir():
        return show_store_path(args, args.recipe)
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


def show_store_path(args: argparse.Namespace, path: Path) -> int:
    """What a store path records: its derivation, key and where it came from."""
    from banger_build.commands.ls import substitution_json
    from banger_build.derivation import Derivation
    from banger_build.store import Store, StoreEntry

    home = common.home(args)
    try:
        entry = Store(home).entry_of(path) if (home / "store").is_dir() else None
    except BangerError:
        entry = None  # a store path of another home, or copied: still readable
    if entry is None:
        entry = StoreEntry.at(path.resolve())
    derivation = entry.derivation()
    meta = entry.meta()
    out = {
        "name": str(derivation.get("name", entry.name)),
        "key": Derivation(derivation).key,
        "store_path": str(entry.path),
        "built": entry.exists(),
        "origin": entry.origin(meta) if entry.meta_file is not None else None,
        "substituted": substitution_json(entry.substitution(meta)),
        "derivation": derivation,
    }
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0
