"""Options shared by several subcommands, and the objects they configure."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from banger_build.build import BuildOptions
    from banger_build.config import Substituter
    from banger_build.context import Context
    from banger_build.limits import Limits
    from banger_build.oci.options import RegistryOptions
    from banger_build.oci.remote import Progress, Remote
    from banger_build.progress import Reporter
    from banger_build.recipe import Overrides
    from banger_build.signing.keys import PublicKey
    from banger_build.store import Store


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
    p.add_argument(
        "--offline", action="store_true",
        help="no network at all: what the blob cache lacks is an error naming it",
    )  # fmt: skip
    p.add_argument(
        "--mirror-only", action="store_true",
        help="pull only from the --mirror of a registry, never the registry itself",
    )  # fmt: skip


#: Set to 1: every build checks its image with e2fsck (the test suite sets it).
ENV_FSCK = "BANGER_BUILD_FSCK"


def add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-image-size", type=_size, default=None, metavar="SIZE",
        help="refuse an image whose layers uncompress to more than SIZE (default: 32GiB)",
    )  # fmt: skip
    p.add_argument(
        "--fsck", action="store_true",
        help="check the image with e2fsck -fn (e2fsprogs) before it is stored; "
        f"also ${ENV_FSCK}=1",
    )  # fmt: skip


def _size(text: str) -> int:
    from banger_build.recipe import Invalid, parse_bytes

    try:
        return parse_bytes(text)
    except Invalid as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def limits(args: argparse.Namespace) -> Limits:
    from banger_build.limits import Limits

    size: int | None = getattr(args, "max_image_size", None)
    return Limits() if size is None else Limits(max_image_size=size)


def home(args: argparse.Namespace) -> Path:
    from banger_build.store import default_home

    home: Path = args.home or default_home()
    return home


def registry_options(args: argparse.Namespace) -> RegistryOptions:
    from banger_build.oci.options import options_from_env

    options = options_from_env(args.mirror, args.insecure_registry)
    return dataclasses.replace(
        options,
        offline=getattr(args, "offline", False),
        mirror_only=getattr(args, "mirror_only", False),
    )


def remote(args: argparse.Namespace, store: Store, progress: Progress | None = None) -> Remote:
    """A registry client over ``store``'s blob cache, with the registry options of ``args``."""
    from banger_build.oci.blobs import BlobCache
    from banger_build.oci.remote import Remote

    return Remote(BlobCache(store.blobs, store.temp_roots), registry_options(args), progress)


def add_sources(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-source", action="append", default=[], type=Path, metavar="DIR",
        help="let the recipe's sources lie in DIR too, not only in its project (the "
        "nearest directory above it holding .git); repeatable. /proc, /sys, /dev never",
    )  # fmt: skip


def source_roots(args: argparse.Namespace) -> tuple[Path, ...]:
    return tuple(getattr(args, "allow_source", None) or ())


def add_lock_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--locked", action="store_true",
        help="fail, naming the input, unless every input is pinned by the lock file",
    )  # fmt: skip
    p.add_argument(
        "--lock-file", type=Path, metavar="PATH",
        help="read and write the pins there (default: RECIPE.lock beside the recipe)",
    )  # fmt: skip
    p.add_argument(
        "--no-write-lock", action="store_true",
        help="use new pins but do not write them to the lock file (say so instead)",
    )  # fmt: skip


def build_options(
    args: argparse.Namespace,
    *,
    lock_mode: str | None = None,
    lock_path: Path | None = None,
    update_input: str | None = None,
    out_link: Path | None = None,
) -> BuildOptions:
    from banger_build.build import BuildOptions

    if lock_mode is None:
        lock_mode = "locked" if getattr(args, "locked", False) else "auto"
    return BuildOptions(
        home=home(args),
        registry=registry_options(args),
        out_link=out_link,
        lock_mode=lock_mode,
        lock_path=lock_path or getattr(args, "lock_file", None),
        write_lock=not getattr(args, "no_write_lock", False),
        update_input=update_input,
        source_roots=source_roots(args),
        limits=limits(args),
        substituters=substituters(args),
        no_build=getattr(args, "no_build", False),
        fsck=getattr(args, "fsck", False) or os.environ.get(ENV_FSCK) == "1",
        overrides=overrides(args),
    )


def resolve_recipe(
    args: argparse.Namespace,
    recipe: Path,
    *,
    lock_mode: str | None = None,
    lock_path: Path | None = None,
) -> Context:
    """Resolve a recipe to its derivation without building (or writing the lock)."""
    from banger_build.progress import Reporter
    from banger_build.resolve import resolve

    options = build_options(args, lock_mode=lock_mode, lock_path=lock_path)
    return resolve(recipe, options, Reporter(quiet=True))


def write_lock(
    args: argparse.Namespace, recipe: Path, *, lock_mode: str, update_input: str | None = None
) -> int:
    from banger_build.progress import Reporter
    from banger_build.resolve import lock_file, resolve, save_lock

    options = build_options(args, lock_mode=lock_mode, update_input=update_input)
    ctx = resolve(recipe, options, Reporter())
    if getattr(args, "prune", False):
        ctx.lock_notes += prune_lock(ctx)
    save_lock(ctx, strict=True)
    if not ctx.lock_changed:
        print(f"{lock_file(ctx)}: up to date")
    return 0


def prune_lock(ctx: Context) -> list[str]:
    """Drop the pins the recipe no longer uses (another image, platform, kernel or file)."""
    from banger_build.lockfile import Lock

    recipe = ctx.recipe
    keep_image = (str(recipe.image), str(recipe.platform))
    kernel = recipe.kernel.ref if recipe.kernel is not None else None
    used_files = {str(f.reference) for f in ctx.fetches if f.reference is not None}
    images = tuple(p for p in ctx.lock.images if (p.ref, p.platform) == keep_image)
    kernels = tuple(p for p in ctx.lock.kernels if kernel is not None and p.ref == str(kernel))
    files = tuple(p for p in ctx.lock.files if p.ref in used_files)
    dropped = [f"{p.ref} ({p.platform})" for p in ctx.lock.images if p not in images]
    dropped += [f"kernel {p.ref}" for p in ctx.lock.kernels if p not in kernels]
    dropped += [f"file {p.ref}" for p in ctx.lock.files if p not in files]
    if dropped:
        ctx.lock = Lock(images, kernels, files)
        ctx.lock_changed = True
    return [f"dropped the unused pin of {what}" for what in dropped]


def add_output(p: argparse.ArgumentParser) -> None:
    """``-q`` and ``--json``: how a command reports while it works."""
    out = p.add_mutually_exclusive_group()
    out.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    out.add_argument(
        "--json",
        action="store_true",
        help="one JSON event per line on stdout (steps, timings, progress, the result, errors)",
    )


def reporter(args: argparse.Namespace, *, quiet: bool = False) -> Reporter:
    """The command's reporter: JSON events with --json, else human lines on stderr."""
    from banger_build.progress import JsonReporter, Reporter

    if getattr(args, "json", False):
        return JsonReporter()
    return Reporter(quiet=quiet or getattr(args, "quiet", False))


def add_trusted_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trusted-key", action="append", default=[], metavar="NAME:BASE64",
        help="trust signatures by this public key (the FILE.pub of `banger-build key "
        "generate`); repeatable; also $BANGER_BUILD_TRUSTED_KEYS, comma-separated",
    )  # fmt: skip


def trusted_keys(args: argparse.Namespace) -> tuple[PublicKey, ...]:
    import os

    from banger_build.signing.keys import ENV_TRUSTED_KEYS, parse_trusted_keys

    return parse_trusted_keys(args.trusted_key, os.environ.get(ENV_TRUSTED_KEYS))


def add_substituters(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--substituter", action="append", default=[], metavar="REGISTRY/REPO",
        help="take store paths pushed there (tag sk-<key>) instead of building them, when "
        "signed by a trusted key; repeatable; also $BANGER_BUILD_SUBSTITUTERS and "
        "[[substituter]] in $XDG_CONFIG_HOME/banger-build/config.toml",
    )  # fmt: skip
    p.add_argument(
        "--accept-unsigned", action="store_true",
        help="also take unsigned store paths from the substituters (not recommended)",
    )  # fmt: skip
    p.add_argument(
        "--no-build", action="store_true",
        help="never build: a path no store or substituter has is an error",
    )  # fmt: skip


def substituters(args: argparse.Namespace) -> tuple[Substituter, ...]:
    from banger_build.config import substituters as configured

    if not hasattr(args, "substituter"):  # a command that never substitutes
        return ()
    return configured(
        getattr(args, "substituter", ()),
        getattr(args, "trusted_key", ()),
        accept_unsigned=getattr(args, "accept_unsigned", False),
    )


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--var", action="append", default=[], metavar="KEY=VALUE",
        help="set a template variable over the recipe's [vars] (repeatable); VALUE is read "
        "as a TOML value when it is one (1024, true, \"text\"), else as a string",
    )  # fmt: skip
    p.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]",
        help="build for this platform instead of the recipe's image.platform",
    )  # fmt: skip


def overrides(args: argparse.Namespace) -> Overrides:
    from banger_build.errors import InputError, Reason
    from banger_build.oci.reference import Platform, ReferenceSyntaxError
    from banger_build.recipe import Overrides, parse_var

    try:
        variables = tuple(parse_var(text) for text in getattr(args, "var", ()))
        text = getattr(args, "platform", None)
        platform = Platform.parse(text) if text else None
    except (ValueError, ReferenceSyntaxError) as exc:
        raise InputError(str(exc), reason=Reason.BAD_ARGUMENT) from None
    return Overrides(variables, platform)
