"""Resolve a recipe to its derivation: small verb-named steps, listed in order.

    recipe --load--> Recipe --lock file--> pins
      --local files, templates, then fetched files' digests--> entries
      --lock pin or registry--> image manifest, config --> epoch
      --kernel artifact--> staged kernel --> tool versions --> derivation (key)

Only the fetched files', image and kernel steps may touch the network, through
the build's ``Source`` (cache first); a fetched file's bytes are not needed to
resolve (its digest is the artifact layer's, or the recipe's sha256): the
build downloads them when it builds. ``save_lock`` writes new pins, always
reported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from banger_build.context import BuildOptions, Context, FileInput, run_steps
from banger_build.derivation import derive
from banger_build.entries import Staged, Where
from banger_build.errors import InputError, Reason, RecipeError, RegistryError
from banger_build.inputs import Fetched, FileEntry, resolve_injected, resolve_kernel
from banger_build.lockfile import Lock, lock_path_for
from banger_build.oci.fileartifact import FileArtifact
from banger_build.oci.kernel import modules_tar_is_tree
from banger_build.oci.reference import Digest, Reference, ReferenceSyntaxError
from banger_build.progress import Reporter
from banger_build.recipe import apply_overrides, load_recipe


def read_recipe(ctx: Context) -> None:
    recipe = load_recipe(ctx.recipe_path, source_roots=ctx.options.source_roots)
    ctx.recipe = apply_overrides(recipe, ctx.options.overrides)


def read_lock(ctx: Context) -> None:
    ctx.lock = Lock.load(lock_file(ctx))


def _pin_gone(ctx: Context, what: Reference, digest: Digest, name: str, exc: RegistryError) -> None:
    """A pinned digest the registry answered 404 for: say which lock pins it."""
    if exc.reason != Reason.NOT_FOUND:
        return
    raise RegistryError(
        f"{what}@{digest}, pinned by {lock_file(ctx)}, is on no registry "
        f"(the tag moved and the old manifest is gone, or a mirror lacks it); run "
        f"`banger-build update {ctx.recipe.path} {name}` to pin what the tag names now",
        reference=str(what),
        status=exc.status,
        reason=Reason.PIN_NOT_FOUND,
    ) from exc


def pin(
    ctx: Context,
    *,
    input_name: str,
    what: str,
    key: str,
    where: Where | None,
    pinned: Digest | None,
    resolve: Callable[[], Digest],
    record: Callable[[Digest], Lock],
) -> Digest:
    """The digest an input is pinned to, by the lock mode: use the pin; "locked"
    fails without one (at the recipe's ``key``); a missing pin, or "update" of
    this input, asks the registry and records the new pin (reported, never silent)."""
    mode = ctx.options.lock_mode
    if pinned is None and mode == "locked":
        lock_path = lock_file(ctx)
        state = "does not exist" if not lock_path.exists() else "has no pin for it"
        raise RecipeError(
            f"{what} is not locked: {lock_path} {state}; run `banger-build lock {ctx.recipe.path}`",
            file=str(ctx.recipe.path),
            line=where.line if where else None,
            col=where.col if where else None,
            key=key,
            reason=Reason.NOT_LOCKED,
        )
    refresh = mode == "update" and ctx.options.update_input in (None, input_name)
    if pinned is not None and not refresh:
        return pinned
    ctx.reporter.step(f"resolving {what}")
    digest = resolve()
    if digest != pinned:
        ctx.lock = record(digest)
        ctx.lock_changed = True
        old = f" (was {pinned})" if pinned else ""
        ctx.lock_notes.append(f"pinned {what} to {digest}{old}")
    return digest


def resolve_image(ctx: Context) -> None:
    """Lock pin (no network) or registry resolution; then manifest and config,
    cache first (no registry client at all when they are cached)."""
    recipe, source = ctx.recipe, ctx.source
    pinned = ctx.lock.image_digest(recipe.image, recipe.platform)
    digest = pin(
        ctx,
        input_name="image",
        what=f"{recipe.image} ({recipe.platform})",
        key="image.ref",
        where=recipe.image_where,
        pinned=pinned,
        resolve=lambda: source.resolve(recipe.image, recipe.platform),
        record=lambda d: ctx.lock.with_image(recipe.image, recipe.platform, d),
    )
    try:
        ctx.manifest = source.manifest(recipe.image, digest)
    except RegistryError as exc:
        if digest == pinned:
            _pin_gone(ctx, recipe.image, digest, "image", exc)
        raise
    ctx.config = source.config(recipe.image, ctx.manifest)
    arch, os_ = ctx.config.get("architecture"), ctx.config.get("os")
    if (os_, arch) != (recipe.platform.os, recipe.platform.architecture):
        message = (
            f"{recipe.image}@{digest}: image is for {os_}/{arch}, the recipe asks for "
            f"{recipe.platform}"
        )
        if recipe.platform_where is None:
            raise InputError(message, reason=Reason.PLATFORM_MISMATCH)
        raise recipe.platform_where.error(message, Reason.PLATFORM_MISMATCH)


def choose_epoch(ctx: Context) -> None:
    """Timestamps of what we add: SOURCE_DATE_EPOCH, else the image's creation time."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        if not env.isdigit():
            raise InputError(f"SOURCE_DATE_EPOCH={env!r} is not a number of seconds")
        ctx.epoch = max(1, int(env))
        return
    created = ctx.config.get("created")
    if isinstance(created, str):
        try:
            when = datetime.fromisoformat(created)
        except ValueError:
            return
        if when.tzinfo is None:  # never let the build host's TZ leak in
            when = when.replace(tzinfo=UTC)
        ctx.epoch = max(1, int(when.timestamp()))


def resolve_kernel_artifact(ctx: Context) -> None:
    """``[kernel] ref``: the lock pin (no network when the manifest and blobs are
    cached) or the registry's answer for the tag (pinned then); its blobs become
    the staged kernel files, so the derivation looks like a local kernel's."""
    spec = ctx.recipe.kernel
    if spec is None or spec.ref is None:
        return
    ref, where = spec.ref, spec.ref_where or spec.where
    source = ctx.source
    # a reference by digest is pinned by itself and never re-resolved
    digest = ref.digest or pin(
        ctx,
        input_name="kernel",
        what=f"kernel {ref}",
        key="kernel.ref",
        where=where,
        pinned=ctx.lock.kernel_digest(ref),
        resolve=lambda: source.digest(ref),
        record=lambda d: ctx.lock.with_kernel(ref, d),
    )
    artifact = source.kernel(ref, digest)
    config = artifact.config
    version = source.kernel_version(ref, artifact)
    if spec.install_modules and ("modules.tar" not in artifact.files or not version):
        raise RecipeError(
            f"install_modules: kernel {ref}@{digest} has no modules (push it with --modules)",
            file=str(ctx.recipe.path), line=where.line, col=where.col,
            key="kernel.install_modules", reason=Reason.NO_MODULES,
        )  # fmt: skip
    staged = []
    for name, desc in artifact.files.items():
        path = source.blob(ref, desc)
        staged.append(Staged(name, path, desc.digest.hex, desc.size, where=where))
        if name == "modules.tar" and spec.install_modules and not modules_tar_is_tree(path):
            raise RecipeError(
                f"install_modules: the modules of kernel {ref}@{digest} are not a modules "
                f"tree (no modules.order or kernel/ at the top of its modules.tar); push it "
                "again with --modules naming the lib/modules/<version> directory",
                file=str(ctx.recipe.path), line=where.line, col=where.col,
                key="kernel.install_modules", reason=Reason.NOT_A_MODULES_TREE,
            )  # fmt: skip
    ctx.kernel = tuple(staged)
    ctx.kernel_version = version
    ctx.kernel_artifact = {
        "reference": str(ref),
        "manifest": str(digest),
        "config": str(config.digest),
    }


def fetched_file(ctx: Context, e: FileEntry) -> Fetched:
    """A fetched file's digest, pinned, without its bytes: a URL's is the recipe's
    sha256; a file artifact's is its layer's, by the lock pin (the manifest from the
    blob cache, else the registry) or the registry's answer for the tag (pinned then).
    The build downloads the bytes (``build.fetch_files``) when it builds."""
    source = ctx.source
    if e.url is not None:
        assert e.sha256 is not None  # load_recipe requires it
        digest = Digest(e.sha256)
        ctx.fetches.append(FileInput(e.dest, digest, url=e.url))
        return Fetched(source.cache.path(digest), e.sha256, None)
    ref = e.ref
    assert ref is not None
    pinned = ctx.lock.file_digest(ref)
    # a reference by digest is pinned by itself and never re-resolved
    digest = ref.digest or pin(
        ctx,
        input_name="files",
        what=f"file {ref}",
        key=e.where.key,
        where=e.where,
        pinned=pinned,
        resolve=lambda: source.digest(ref),
        record=lambda d: ctx.lock.with_file(ref, d),
    )
    try:
        artifact: FileArtifact = source.file(ref, digest, ctx.recipe.platform)
    except RegistryError as exc:
        if digest == pinned:
            _pin_gone(ctx, ref, digest, "files", exc)
        raise
    layer, limit = artifact.layer, ctx.options.limits.max_file_input
    if layer.size > limit:
        raise e.where.error(
            f"{ref}@{artifact.digest}: the file is {layer.size} bytes, more than the limit "
            f"of {limit} bytes",
            Reason.TOO_LARGE,
        )
    ctx.fetches.append(
        FileInput(
            e.dest, layer.digest, reference=ref, manifest=artifact.digest,
            index=artifact.index, size=layer.size,
        )
    )  # fmt: skip
    return Fetched(source.cache.path(layer.digest), layer.digest.hex, artifact.executable)


def resolve_inputs(ctx: Context) -> None:
    ctx.injected = resolve_injected(ctx.recipe, lambda e: fetched_file(ctx, e))
    if ctx.recipe.kernel is None or ctx.recipe.kernel.ref is None:
        ctx.kernel = resolve_kernel(
            ctx.recipe.kernel, ctx.recipe.source_roots, note=ctx.reporter.note
        )


def read_diff_ids(ctx: Context) -> None:
    """The uncompressed digests of the layers, from the image config: with the config
    digest they are what the derivation knows of the image (so the same image
    recompressed or re-pushed gives the same key)."""
    image, layers = ctx.recipe.image, ctx.manifest.layers
    rootfs = ctx.config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        count = len(diff_ids) if isinstance(diff_ids, list) else "no list of"
        raise InputError(
            f"{image}: the image config lists {count} diff_ids for {len(layers)} layers",
            reason=Reason.CONFIG_MISMATCH,
        )
    parsed = []
    for diff_id in diff_ids:
        try:
            parsed.append(Digest.parse(diff_id if isinstance(diff_id, str) else ""))
        except ReferenceSyntaxError:
            raise InputError(
                f"{image}: the image config lists an invalid diff_id {diff_id!r:.100}",
                reason=Reason.CONFIG_MISMATCH,
            ) from None
    ctx.diff_ids = tuple(parsed)


def make_derivation(ctx: Context) -> None:
    ctx.derivation = derive(
        ctx.recipe,
        ctx.manifest,
        diff_ids=ctx.diff_ids,
        injected=ctx.injected,
        kernel=ctx.kernel,
        epoch=ctx.epoch,
        kernel_version=ctx.kernel_version,
    )


RESOLVE: tuple[Callable[[Context], None], ...] = (
    read_recipe,
    read_lock,
    resolve_inputs,  # local files and templates first: their errors need no network
    resolve_image,
    read_diff_ids,
    choose_epoch,
    resolve_kernel_artifact,
    make_derivation,
)


def lock_file(ctx: Context) -> Path:
    """The lock file: ``--lock-file``, else the one beside the recipe."""
    return ctx.options.lock_path or lock_path_for(ctx.recipe.path)


def save_lock(ctx: Context, *, strict: bool = False) -> None:
    """Write the lock file when pins changed; a change is always reported, never silent.

    With ``--no-write-lock`` nothing is written (and that is said). A build that
    cannot write it goes on with the pins it resolved and says what it could not
    write; ``lock`` and ``update`` (``strict``) fail instead."""
    if not ctx.lock_changed:
        return
    path = lock_file(ctx)
    if not ctx.options.write_lock:
        for note in ctx.lock_notes:
            ctx.reporter.always(f"not writing {path} (--no-write-lock): {note}")
        return
    existed = path.exists()
    try:
        ctx.lock.save(path)
    except RecipeError as exc:
        if strict:
            raise
        ctx.reporter.always(
            f"could not write {path} ({exc.detail}); building with the new pins anyway"
        )
        return
    for note in ctx.lock_notes:
        ctx.reporter.always(f"{'updated' if existed else 'wrote'} {path}: {note}")


def resolve(recipe_path: Path, options: BuildOptions, reporter: Reporter) -> Context:
    ctx = Context(recipe_path, options, reporter)
    run_steps(ctx, RESOLVE)
    return ctx
