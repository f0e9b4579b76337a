"""``banger-build [build] RECIPE``: build a recipe into the store and link the result."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from banger_build.commands import common, push
from banger_build.errors import InputError, Reason

if TYPE_CHECKING:
    from banger_build.build import BuildOptions
    from banger_build.progress import Reporter

NAME = "build"
HELP = "build a recipe (the default command)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "recipes", type=Path, nargs="+", metavar="RECIPE",
        help="the recipe (TOML), e.g. recipes/debian.toml; several are built in turn, "
        "linked as result, result-2, ...",
    )  # fmt: skip
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
    common.add_output(p)
    p.add_argument(
        "-j", "--jobs", type=_jobs, default=None, metavar="N",
        help="build up to N of the recipes at once, each in a process of its own "
        "(default: the number of CPUs; 1: one after the other). Recipes that resolve "
        "to the same store path wait for each other; paths are printed in recipe order",
    )  # fmt: skip
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
    common.add_substituters(p)
    common.add_trusted_keys(p)
    common.add_lock_options(p)
    common.add_sources(p)
    common.add_overrides(p)
    common.add_limits(p)
    common.add_home(p)
    common.add_registry(p)


def run(args: argparse.Namespace) -> int:
    from banger_build.commands.check import run_check

    if args.check and args.push is not None:
        raise InputError(
            "--push pushes what a build made, --check builds nothing: not both",
            reason=Reason.BAD_ARGUMENT,
        )
    if args.check:
        return max(run_check(args, recipe) for recipe in args.recipes)
    if args.sign_key is not None and args.push is None:
        raise InputError(
            "--sign-key signs what --push pushes: give --push too", reason=Reason.BAD_ARGUMENT
        )
    target = sign = None
    if args.push is not None:  # checked before anything is built
        from banger_build.publish import parse_target

        target = parse_target(args.push)
        sign = push.sign_function(args.sign_key)
    reporter = common.reporter(args, quiet=args.print_out_paths)

    def one(n: int, recipe: Path) -> int:
        link = None if args.no_link else out_link(args.out_link, n)
        path, key = build_one(args, recipe, common.build_options(args, out_link=link), reporter)
        if target is not None:
            pushed = push.push_built(args, path, key, target, reporter, sign)
            if args.json:
                reporter.result(pushed=str(pushed.ref), path=str(path), key=key)
            else:
                print(pushed.ref, flush=True)
        return 0

    if len(args.recipes) == 1:
        return one(1, args.recipes[0])
    from banger_build.commands.parallel import run_in_turn, run_parallel

    jobs = args.jobs if args.jobs is not None else os.cpu_count() or 1
    if jobs > 1:
        return run_parallel(args.recipes, one, jobs, reporter)
    return run_in_turn(args.recipes, one, reporter)


def _jobs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of jobs (1 or more)")
    return int(text)


def out_link(link: Path, n: int) -> Path:
    """The n-th recipe's out-link: ``result``, ``result-2``, ``result-3``... (as Nix)."""
    return link if n == 1 else link.with_name(f"{link.name}-{n}")


def build_one(
    args: argparse.Namespace, recipe: Path, options: BuildOptions, reporter: Reporter
) -> tuple[Path, str]:
    """Build one recipe and report its path (on stdout, or as a JSON result event)."""
    from banger_build.build import BuildResult, build

    started = time.monotonic()

    def ready(result: BuildResult) -> None:
        # reported while the key lock still protects the path from gc
        if args.json:
            reporter.result(
                path=str(result.path),
                key=result.key,
                name=result.derivation.name,
                status=result.status,
                out_link=None if options.out_link is None else str(options.out_link),
                seconds=round(time.monotonic() - started, 3),
            )
        else:
            print(result.path, flush=True)

    result = build(recipe, options, reporter, on_ready=ready)
    if not (args.quiet or args.print_out_paths or args.json):
        reporter.step(f"{result.status} {result.derivation.name} (key {result.key})")
    return result.path, result.key
