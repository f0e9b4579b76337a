"""Command line: ``banger-build [build] RECIPE`` and friends.

Errors are printed as ``banger-build: error: ...`` with exit status 1; usage
errors exit 2. No traceback reaches a user unless BANGER_BUILD_DEBUG is set.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from banger_build import __version__
from banger_build.errors import BangerError

COMMANDS = ("build",)


def _add_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="the recipe (TOML), e.g. recipes/debian.toml")
    link = p.add_mutually_exclusive_group()
    link.add_argument(
        "-o", "--out-link", type=Path, default=Path("result"), metavar="PATH",
        help="symlink to the store path (default: ./result)",
    )
    link.add_argument("--no-link", action="store_true", help="do not create an out-link")
    p.add_argument(
        "--print-out-paths", action="store_true",
        help="print only the store path on stdout, and no progress",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--home", type=Path, default=None,
        help="state directory (default: $BANGER_BUILD_HOME or $XDG_CACHE_HOME/banger-build)",
    )
    p.add_argument(
        "--mirror", action="append", default=[], metavar="REGISTRY=URL",
        help="pull REGISTRY's images from URL, e.g. docker.io=http://127.0.0.1:5000 "
        "(repeatable; also $BANGER_BUILD_MIRRORS, comma-separated)",
    )
    p.add_argument(
        "--insecure-registry", action="append", default=[], metavar="HOST",
        help="allow plain HTTP to HOST (loopback is always allowed)",
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="banger-build",
        description="Build a bootable microVM root filesystem from a recipe, "
        "into a content-addressed store.",
    )
    parser.add_argument("--version", action="version", version=f"banger-build {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    build = sub.add_parser("build", help="build a recipe (the default command)")
    _add_build_args(build)
    _add_common(build)
    return parser


def _cmd_build(args: argparse.Namespace) -> int:
    from banger_build.build import BuildOptions, build
    from banger_build.progress import Reporter
    from banger_build.registry_config import options_from_env
    from banger_build.store import default_home

    options = BuildOptions(
        home=args.home or default_home(),
        registry=options_from_env(args.mirror, args.insecure_registry),
        out_link=None if args.no_link else args.out_link,
    )
    reporter = Reporter(quiet=args.quiet or args.print_out_paths)
    result = build(args.recipe, options, reporter)
    if not (args.quiet or args.print_out_paths):
        state = "cached" if result.cached else "built"
        reporter.step(f"{state} {result.derivation.name} (key {result.key})")
    print(result.path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and not args_list[0].startswith("-") and args_list[0] not in COMMANDS:
        args_list.insert(0, "build")  # `banger-build recipes/debian.toml`
    parser = make_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _cmd_build(args)
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
