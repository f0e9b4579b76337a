"""``banger-build render RECIPE``: show what the recipe's templates render to.

Renders every template, the built-in guest set's (unless ``[guest]`` switches
it off) and the recipe's ``[[templates]]``, exactly as a build would, without
building and without the network. By default each file is printed under a
``==> /dest (mode owner) <==`` header; ``-o DIR`` writes them under DIR at
their destination paths, to diff against another rendering; ``--list`` prints
every path the build would add (files, templates, symlinks) with its mode,
owner, kind and sha256; a file fetched from a registry or URL with where it
comes from instead (its digest may need the registry).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from banger_build.commands import common
from banger_build.errors import Reason

if TYPE_CHECKING:
    from collections.abc import Sequence

    from banger_build.inputs import FileEntry, Injected

NAME = "render"
HELP = "render the recipe's templates (built-in guest set and [[templates]]) without building"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="the recipe (TOML), e.g. recipes/debian.toml")
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "-o", "--output", type=Path, metavar="DIR",
        help="write the rendered files under DIR at their destination paths",
    )  # fmt: skip
    what.add_argument(
        "--list", action="store_true",
        help="list every added path: dest, mode, owner, kind, sha256 (and a symlink's target)",
    )  # fmt: skip
    common.add_sources(p)
    common.add_overrides(p)


def run(args: argparse.Namespace) -> int:
    from banger_build.inputs import FileEntry, entries, resolve_injected
    from banger_build.recipe import apply_overrides, load_recipe

    recipe = apply_overrides(
        load_recipe(args.recipe, source_roots=common.source_roots(args)), common.overrides(args)
    )
    injected = resolve_injected(recipe)  # without the fetched files: no network
    if args.list:
        fetched = [e for e in entries(recipe) if isinstance(e, FileEntry) and e.fetched]
        print_list(injected, fetched)
    elif args.output is not None:
        write_tree(args.output, [i for i in injected if i.kind == "template"])
    else:
        print_templates([i for i in injected if i.kind == "template"])
    return 0


def print_templates(templates: list[Injected]) -> None:
    out = sys.stdout
    for n, item in enumerate(templates):
        assert item.data is not None
        text = item.data.decode("utf-8", "replace")
        out.write(("\n" if n else "") + f"==> {item.dest} ({item.mode:04o} {item.owner}) <==\n")
        out.write(text if text.endswith("\n") or not text else text + "\n")


def print_list(injected: tuple[Injected, ...], fetched: Sequence[FileEntry] = ()) -> None:
    """One line per added path, in dest order; a fetched file's mode is ``----`` unless
    the recipe gives it (else the artifact says, or 0644), its digest ``from ORIGIN``."""
    lines = []
    for i in injected:
        line = f"{i.mode:04o}  {i.owner}  {i.kind:<8}  {i.sha256}"
        if i.kind == "symlink":
            line += f"  -> {i.target}"
        lines.append((i.dest, line))
    for e in fetched:
        mode = f"{e.mode:04o}" if e.mode is not None else "----"
        lines.append((e.dest, f"{mode}  {e.owner}  {'file':<8}  from {e.origin}"))
    lines.sort(key=lambda item: item[0].encode())
    width = max((len(dest) for dest, _ in lines), default=0)
    for dest, line in lines:
        print(f"{dest:<{width}}  {line}")


def write_tree(root: Path, templates: list[Injected]) -> None:
    """Each rendered template at ``root``/dest, with its permission bits (not owners)."""
    from banger_build.errors import InputError

    for item in templates:
        assert item.data is not None
        path = root / item.dest.lstrip("/")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink() or path.exists():
                path.unlink()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(item.data)
            os.chmod(path, item.mode & 0o777)
        except OSError as exc:
            raise InputError(
                f"{item.dest}: cannot write {path}: {exc.strerror or exc}", reason=Reason.IO
            ) from exc
    print(f"rendered {len(templates)} template(s) under {root}", file=sys.stderr)
