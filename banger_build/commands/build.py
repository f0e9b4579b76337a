"""``banger-build [build] RECIPE``: build a recipe into the store and link the result."""

from __future__ import annotations

import argparse
from pathlib import Path

from banger_build.commands import common, push
from banger_build.errors import InputError, Reason

NAME = "build"
HELP = "build a recipe (the default command)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="the recipe (TOML), e.g. recipes/debian.toml")
    link = p.add_mutually_exclusive_group()
    link.add_argument(
        "-o", "--out-link", type=Path, default=Path("result"), metavar="PATH",
        help="symlink to the store path (default: ./result)",
    )  # fmt: skip
    link.add_argument("--no-link", action="store_true", help="do not create an out-link")
    p.add_argument(
        "--print-out-paths", action="store_true",
        help="print only the store path on stdout, and no progress",
    )  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--check", action="store_true",
        help="rebuild the existing store path from scratch and compare (see `check`)",
    )  # fmt: skip
    p.add_argument(
        "--push", metavar="REGISTRY/REPO[:TAG]",
        help="then push the store path there as an OCI artifact (see `push`); "
        "REGISTRY/REPO@sha256:... is printed after the store path",
    )  # fmt: skip
    push.add_sign_key(p)
    common.add_lock_options(p)
    common.add_sources(p)
    common.add_limits(p)
    common.add_home(p)
    common.add_registry(p)


def run(args: argparse.Namespace) -> int:
    from banger_build.build import BuildResult, build
    from banger_build.commands.check import run_check
    from banger_build.progress import Reporter

    if args.check and args.push is not None:
        raise InputError(
            "--push pushes what a build made, --check builds nothing: not both",
            reason=Reason.BAD_ARGUMENT,
        )
    if args.check:
        return run_check(args, args.recipe)
    if args.sign_key is not None and args.push is None:
        raise InputError(
            "--sign-key signs what --push pushes: give --push too", reason=Reason.BAD_ARGUMENT
        )
    target = sign = None
    if args.push is not None:  # checked before anything is built
        from banger_build.publish import parse_target

        target = parse_target(args.push)
        sign = push.sign_function(args.sign_key)

    options = common.build_options(args, out_link=None if args.no_link else args.out_link)
    reporter = Reporter(quiet=args.quiet or args.print_out_paths)

    def ready(result: BuildResult) -> None:
        # printed while the key lock still protects the path from gc
        print(result.path, flush=True)

    result = build(args.recipe, options, reporter, on_ready=ready)
    if not (args.quiet or args.print_out_paths):
        state = "cached" if result.cached else "built"
        reporter.step(f"{state} {result.derivation.name} (key {result.key})")
    if target is not None:
        pushed = push.push_built(args, result.path, result.key, target, reporter, sign)
        print(pushed.ref, flush=True)
    return 0
