"""Command line: ``banger-build [build] RECIPE`` and the other subcommands.

Errors are printed as ``banger-build: error: ...`` with exit status 1; usage
errors exit 2. No traceback reaches a user unless BANGER_BUILD_DEBUG is set.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from banger_build import __version__
from banger_build.commands import boot, check, gc, kernel, lock, ls, show, update, why
from banger_build.commands import build as build_command
from banger_build.commands import render as render_command
from banger_build.errors import BangerError

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS: tuple[ModuleType, ...] = (
    build_command,
    check,
    show,
    why,
    lock,
    update,
    ls,
    gc,
    boot,
    render_command,
    kernel,
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="banger-build",
        description="Build a bootable microVM root filesystem from a recipe, "
        "into a content-addressed store. `banger-build RECIPE` is `banger-build build RECIPE`.",
    )
    parser.add_argument("--version", action="version", version=f"banger-build {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    names = {m.NAME for m in COMMANDS}
    if args_list and not args_list[0].startswith("-") and args_list[0] not in names:
        args_list.insert(0, "build")  # `banger-build recipes/debian.toml`
    parser = make_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except BangerError as exc:
        if os.environ.get("BANGER_BUILD_DEBUG"):
            raise
        print(f"banger-build: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("banger-build: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
