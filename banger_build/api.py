"""The Python API: ``build``, ``check`` and ``show``, as ``import banger_build`` exposes them.

Each takes the paths and options the command line takes, as keyword arguments,
and returns data instead of printing it. Nothing is written into the current
directory unless asked: ``build`` makes an out-link only when ``out_link`` is
given (the CLI's ``./result`` is the CLI's default, not the library's). Every
failure is a ``banger_build.BangerError`` whose ``str()`` is one line and whose
``reason`` is a stable slug (``banger_build.errors.Reason``).

This module imports only what its signatures need; the builder is imported
when a function runs, so ``import banger_build`` stays cheap.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from banger_build.build import BuildOptions, CheckResult
    from banger_build.context import BuildResult
    from banger_build.progress import Reporter

StrPath = str | os.PathLike[str]


def _options(
    *,
    home: StrPath | None,
    out_link: StrPath | None,
    mirrors: Mapping[str, str] | None,
    insecure_registries: Sequence[str],
    offline: bool,
    mirror_only: bool,
    locked: bool,
    lock_file: StrPath | None,
    write_lock: bool,
    variables: Mapping[str, Any] | None,
    platform: str | None,
    allow_sources: Sequence[StrPath],
) -> BuildOptions:
    import dataclasses

    from banger_build.context import BuildOptions
    from banger_build.errors import InputError, Reason
    from banger_build.oci.options import options_from_env
    from banger_build.oci.reference import Platform, ReferenceSyntaxError
    from banger_build.recipe import Overrides
    from banger_build.store import default_home

    registry = options_from_env(
        [f"{host}={url}" for host, url in (mirrors or {}).items()], insecure_registries
    )
    try:
        target = Platform.parse(platform) if platform is not None else None
    except ReferenceSyntaxError as exc:
        raise InputError(str(exc), reason=Reason.BAD_ARGUMENT) from None
    return BuildOptions(
        home=Path(home) if home is not None else default_home(),
        registry=dataclasses.replace(registry, offline=offline, mirror_only=mirror_only),
        out_link=Path(out_link) if out_link is not None else None,
        lock_mode="locked" if locked else "auto",
        lock_path=Path(lock_file) if lock_file is not None else None,
        write_lock=write_lock,
        source_roots=tuple(Path(p) for p in allow_sources),
        overrides=Overrides(tuple((variables or {}).items()), target),
    )


def _reporter(progress: TextIO | None) -> Reporter:
    from banger_build.progress import Reporter

    if progress is None:  # quiet; what a user must hear (a lock written) still goes to stderr
        return Reporter(sys.stderr, quiet=True)
    return Reporter(progress)


def build(
    recipe: StrPath,
    *,
    home: StrPath | None = None,
    out_link: StrPath | None = None,
    mirrors: Mapping[str, str] | None = None,
    insecure_registries: Sequence[str] = (),
    offline: bool = False,
    mirror_only: bool = False,
    locked: bool = False,
    lock_file: StrPath | None = None,
    write_lock: bool = True,
    variables: Mapping[str, Any] | None = None,
    platform: str | None = None,
    allow_sources: Sequence[StrPath] = (),
    progress: TextIO | None = None,
) -> BuildResult:
    """Build (or find in the store) the store path of ``recipe``, a recipe file.

    ``home``: the state directory (default ``$BANGER_BUILD_HOME``, else
    ``$XDG_CACHE_HOME/banger-build``). ``out_link``: also point this symlink at the
    store path (a gc root); by default none is made. ``mirrors``: registry host ->
    mirror URL, e.g. ``{"docker.io": "http://127.0.0.1:5000"}`` (``$BANGER_BUILD_MIRRORS``
    is added, as on the command line). ``offline``: no network at all; ``mirror_only``:
    never the registry itself. ``locked``: fail unless every input is pinned by the
    lock file (``lock_file``, default ``RECIPE.lock``); new pins are written to it unless
    ``write_lock=False``. ``variables`` override the recipe's ``[vars]``, ``platform``
    (``"linux/arm64"``) its ``image.platform``. ``allow_sources``: more directories
    the recipe's sources may lie in. ``progress``: a stream for progress lines
    (default: none).

    Returns a ``BuildResult``: ``path`` (``<home>/store/<key>-<name>``, holding
    ``rootfs.ext4`` and ``manifest.json``), ``key``, ``status`` (``"built"``,
    ``"cached"`` or ``"substituted"``) and ``derivation``.
    """
    from banger_build.build import build as run_build

    options = _options(
        home=home, out_link=out_link, mirrors=mirrors, insecure_registries=insecure_registries,
        offline=offline, mirror_only=mirror_only, locked=locked, lock_file=lock_file,
        write_lock=write_lock, variables=variables, platform=platform,
        allow_sources=allow_sources,
    )  # fmt: skip
    return run_build(Path(recipe), options, _reporter(progress))


def check(
    target: StrPath,
    *,
    home: StrPath | None = None,
    recipe: StrPath | None = None,
    mirrors: Mapping[str, str] | None = None,
    insecure_registries: Sequence[str] = (),
    offline: bool = False,
    mirror_only: bool = False,
    locked: bool = False,
    lock_file: StrPath | None = None,
    variables: Mapping[str, Any] | None = None,
    platform: str | None = None,
    allow_sources: Sequence[StrPath] = (),
    progress: TextIO | None = None,
) -> CheckResult:
    """Rebuild a store path from scratch in a temp dir and compare it bit for bit;
    nothing in the store changes.

    ``target`` is a recipe (its store path must be built) or a store path (or an
    out-link to one), which is rebuilt from its recorded inputs; ``recipe`` then
    supplies the bytes its record names only by hash (default: the recipe it was
    built from). The other options are ``build``'s; the lock file is never written.

    Returns a ``CheckResult``: ``path``, ``key``, ``ok`` and ``differences`` (lines
    naming what differs, empty when ``ok``).
    """
    from banger_build.build import check as check_recipe
    from banger_build.recorded import check_store_path

    options = _options(
        home=home, out_link=None, mirrors=mirrors, insecure_registries=insecure_registries,
        offline=offline, mirror_only=mirror_only, locked=locked, lock_file=lock_file,
        write_lock=False, variables=variables, platform=platform, allow_sources=allow_sources,
    )  # fmt: skip
    path = Path(target)
    reporter = _reporter(progress)
    if path.is_dir():
        return check_store_path(
            path, options, reporter, recipe=Path(recipe) if recipe is not None else None
        )
    return check_recipe(path, options, reporter)


def show(
    target: StrPath,
    *,
    home: StrPath | None = None,
    mirrors: Mapping[str, str] | None = None,
    offline: bool = False,
    mirror_only: bool = False,
    locked: bool = False,
    lock_file: StrPath | None = None,
    variables: Mapping[str, Any] | None = None,
    platform: str | None = None,
    allow_sources: Sequence[StrPath] = (),
) -> dict[str, Any]:
    """The derivation of a recipe (resolved, nothing written) or of a store path (as
    recorded, nothing resolved): ``{"name", "key", "store_path", "built", "derivation"}``,
    as ``banger-build show`` prints it."""
    from banger_build.derivation import Derivation
    from banger_build.resolve import resolve
    from banger_build.store import StoreEntry

    path = Path(target)
    if path.is_dir():
        entry = StoreEntry.at(path.resolve())
        derivation = Derivation(entry.derivation())
        return {
            "name": derivation.name,
            "key": derivation.key,
            "store_path": str(entry.path),
            "built": entry.exists(),
            "derivation": derivation.data,
        }
    options = _options(
        home=home, out_link=None, mirrors=mirrors, insecure_registries=(), offline=offline,
        mirror_only=mirror_only, locked=locked, lock_file=lock_file, write_lock=False,
        variables=variables, platform=platform, allow_sources=allow_sources,
    )  # fmt: skip
    ctx = resolve(path, options, _reporter(None))
    try:
        stored = ctx.store.lookup(ctx.key, ctx.derivation.name)
    finally:
        ctx.store.temp_roots.close()
    return {
        "name": ctx.derivation.name,
        "key": ctx.key,
        "store_path": str(ctx.store.path_for(ctx.key, ctx.derivation.name)),
        "built": stored is not None,
        "derivation": ctx.derivation.data,
    }
