"""Options shared by several subcommands, and the objects they configure."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from banger_build.registry_config import RegistryOptions


def add_home(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--home", type=Path, default=None,
        help="state directory (default: $BANGER_BUILD_HOME or $XDG_CACHE_HOME/banger-build)",
    )  # fmt: skip


def add_registry(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mirror", action="append", default=[], metavar="REGISTRY=URL",
        help="pull REGISTRY's images from URL, e.g. docker.io=http://127.0.0.1:5000 "
        "(repeatable; also $BANGER_BUILD_MIRRORS, comma-separated)",
    )  # fmt: skip
    p.add_argument(
        "--insecure-registry", action="append", default=[], metavar="HOST",
        help="allow plain HTTP to HOST (loopback is always allowed)",
    )  # fmt: skip


def home(args: argparse.Namespace) -> Path:
    from banger_build.store import default_home

    home: Path = args.home or default_home()
    return home


def registry_options(args: argparse.Namespace) -> RegistryOptions:
    from banger_build.registry_config import options_from_env

    return options_from_env(args.mirror, args.insecure_registry)
