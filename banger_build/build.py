"""The build: small verb-named steps over one context, listed in order at the end.

    recipe --load--> Recipe --resolve (lock, registry, files, templates)-->
    derivation --sha256--> key --store hit?--> done
                                --miss--> pull, flatten, inject, size, mkfs,
                                          restore metadata, fsck, stage kernel,
                                          manifest --> publish (one rename)

Only the steps touch the outside world. Everything a miss builds lives in a
private directory under ``<home>/tmp`` until the publishing rename, so a
failed or interrupted build leaves nothing in the store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from banger_build import __version__, ext4, signals
from banger_build.derivation import Derivation, derive
from banger_build.errors import (
    HostError,
    ImageError,
    InputError,
    Reason,
    RecipeError,
    StoreError,
    host_error,
)
from banger_build.flatten import Flattener, LayerInput
from banger_build.fsutil import ContentChanged, copy_verified, hash_file, remove_tree
from banger_build.inject import inject, install_modules
from banger_build.inputs import Injected, Staged, hash_tree, resolve_injected, resolve_kernel
from banger_build.limits import Limits
from banger_build.lockfile import Lock, lock_path_for
from banger_build.oci.blobs import BlobCache
from banger_build.oci.kernel import extract_modules
from banger_build.oci.manifest import ImageManifest
from banger_build.oci.options import RegistryOptions
from banger_build.oci.reference import Digest, ReferenceSyntaxError
from banger_build.oci.source import Source
from banger_build.progress import Reporter
from banger_build.recipe import Recipe, Where, load_recipe
from banger_build.run import tool_version
from banger_build.store import Store, set_out_link
from banger_build.store import write_manifest as write_manifest_file
from banger_build.tree import Inode, Tree

ROOTFS = "rootfs.ext4"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class BuildOptions:
    home: Path
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    out_link: Path | None = Path("result")
    #: "auto": use pins, add missing ones (and say so); "locked": every input must be
    #: pinned already; "update": re-resolve (``update_input``, or everything) and re-pin.
    lock_mode: str = "auto"
    update_input: str | None = None
    #: resolve with this lock file instead of the one beside the recipe (read-only)
    lock_path: Path | None = None
    #: directories sources may lie in besides the recipe's project (--allow-source)
    source_roots: tuple[Path, ...] = ()
    #: bounds on what the image may make the build do (``--max-image-size``)
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class BuildResult:
    path: Path
    key: str
    cached: bool
    derivation: Derivation


class Context:
    """The one mutable object of a build. Steps read and fill it in order."""

    def __init__(self, recipe_path: Path, options: BuildOptions, reporter: Reporter) -> None:
        self.recipe_path = recipe_path
        self.options = options
        self.reporter = reporter
        self.store = Store(options.home)
        #: every image manifest, config and blob of the build comes from here
        self.source = Source(
            BlobCache(self.store.blobs, self.store.temp_roots),
            options.registry,
            progress=reporter.progress,
        )
        # filled by the resolve steps
        self.recipe: Recipe
        self.lock: Lock
        self.lock_changed = False
        self.lock_notes: list[str] = []
        self.manifest: ImageManifest
        self.config: dict[str, Any]
        self.epoch = 1
        self.injected: tuple[Injected, ...] = ()
        self.kernel: tuple[Staged, ...] = ()
        self.kernel_version: str | None = None  # a [kernel] ref artifact's modules version
        #: a [kernel] ref artifact's manifest and config digests (for manifest.json and gc)
        self.kernel_artifact: dict[str, str] = {}
        self.tools: dict[str, str] = {}
        self.derivation: Derivation
        # filled by the build steps
        self.work: Path
        self.layers: list[LayerInput] = []
        self.tree: Tree
        self.plan: ext4.SizePlan
        self.extra_inodes: list[Inode] = []
        self.inode_count = 0
        self.outputs: dict[str, dict[str, object]] = {}  # output name -> sha256, size
        self.timings: dict[str, float] = {}  # step name -> seconds
        self.differences: list[str] = []  # check: how the rebuild differs from the store

    @property
    def key(self) -> str:
        return self.derivation.key

    @property
    def staging(self) -> Path:
        return self.work / "staging"

    @property
    def out(self) -> Path:
        return self.work / "out"

    @property
    def image(self) -> Path:
        return self.out / ROOTFS


# -- resolve ------------------------------------------------------------------


def read_recipe(ctx: Context) -> None:
    ctx.recipe = load_recipe(ctx.recipe_path, source_roots=ctx.options.source_roots)


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
        lock_path = ctx.options.lock_path or lock_path_for(ctx.recipe.path)
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
    ctx.lock = Lock.load(ctx.options.lock_path or lock_path_for(recipe.path))
    digest = pin(
        ctx,
        input_name="image",
        what=f"{recipe.image} ({recipe.platform})",
        key="image.ref",
        where=recipe.image_where,
        pinned=ctx.lock.image_digest(recipe.image, recipe.platform),
        resolve=lambda: source.resolve(recipe.image, recipe.platform),
        record=lambda d: ctx.lock.with_image(recipe.image, recipe.platform, d),
    )
    ctx.manifest = source.manifest(recipe.image, digest)
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
    ctx.kernel = tuple(staged)
    ctx.kernel_version = version
    ctx.kernel_artifact = {
        "reference": str(ref),
        "manifest": str(digest),
        "config": str(config.digest),
    }


def resolve_inputs(ctx: Context) -> None:
    ctx.injected = resolve_injected(ctx.recipe)
    if ctx.recipe.kernel is None or ctx.recipe.kernel.ref is None:
        ctx.kernel = resolve_kernel(ctx.recipe.kernel, ctx.recipe.source_roots)


def read_tool_versions(ctx: Context) -> None:
    ctx.tools = {"mke2fs": tool_version("mke2fs"), "debugfs": tool_version("debugfs")}


def make_derivation(ctx: Context) -> None:
    ctx.derivation = derive(
        ctx.recipe,
        ctx.manifest,
        injected=ctx.injected,
        kernel=ctx.kernel,
        epoch=ctx.epoch,
        tools=ctx.tools,
        kernel_version=ctx.kernel_version,
    )


# -- build --------------------------------------------------------------------


def pull_layers(ctx: Context) -> None:
    image, layers = ctx.recipe.image, ctx.manifest.layers
    rootfs = ctx.config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        count = len(diff_ids) if isinstance(diff_ids, list) else "no list of"
        raise InputError(
            f"{image}: the image config lists {count} diff_ids for {len(layers)} layers",
            reason=Reason.CONFIG_MISMATCH,
        )
    uncompressed = []
    for diff_id in diff_ids:
        try:
            uncompressed.append(Digest.parse(diff_id if isinstance(diff_id, str) else ""))
        except ReferenceSyntaxError:
            raise InputError(
                f"{image}: the image config lists an invalid diff_id {diff_id!r:.100}",
                reason=Reason.CONFIG_MISMATCH,
            ) from None
    ctx.reporter.step(f"pulling {len(layers)} layers of {image}")
    for desc, diff_id in zip(layers, uncompressed, strict=True):
        ctx.layers.append(LayerInput(desc.digest, ctx.source.blob(image, desc), diff_id))


def flatten_layers(ctx: Context) -> None:
    ctx.reporter.step("flattening layers")
    flattener = Flattener(ctx.staging, ctx.epoch, ctx.options.limits)
    for layer in ctx.layers:
        stats = flattener.apply(layer)
        ctx.reporter.note(
            f"{layer.digest.short}: {stats.entries} entries, {stats.bytes / 1e6:.1f} MB"
        )
    ctx.tree = flattener.tree


def inject_files(ctx: Context) -> None:
    if ctx.injected:
        ctx.reporter.step(f"injecting {len(ctx.injected)} recipe files")
        inject(ctx.tree, ctx.staging, ctx.injected, epoch=ctx.epoch)
    kernel = ctx.recipe.kernel
    guest_path = ctx.derivation.data.get("modules_install")
    if kernel is None or not guest_path:
        return
    modules: Path | None = None
    if kernel.ref is not None:
        tar = next((k.source for k in ctx.kernel if k.name == "modules.tar"), None)
        if tar is None:
            return
        modules = ctx.work / "kernel-modules"
        extract_modules(tar, modules)
    else:
        modules = ctx.out / "modules"  # the copy stage_kernel verified against the derivation
    if modules is not None:
        version = Path(guest_path).name
        where = install_modules(ctx.tree, ctx.staging, modules, version, epoch=ctx.epoch)
        ctx.reporter.step(f"installed the kernel modules at {where}")


@contextlib.contextmanager
def _size_at_recipe(ctx: Context) -> Iterator[None]:
    """A size the image cannot have (too small for the tree, too large for the
    host) is the recipe's ``rootfs.size`` (or, when it is the default, the image)."""
    try:
        yield
    except ImageError as exc:
        where = ctx.recipe.size_where or ctx.recipe.image_where
        if exc.reason in (Reason.SIZE_TOO_SMALL, Reason.SIZE_TOO_LARGE) and where is not None:
            raise where.error(exc.message, exc.reason) from exc
        raise


def size_image(ctx: Context) -> None:
    size = ctx.recipe.size
    with _size_at_recipe(ctx):
        ctx.plan = ext4.plan_size(ctx.tree, auto=size.auto, size=size.bytes)


def make_filesystem(ctx: Context) -> None:
    ctx.reporter.step(f"making ext4 ({ctx.plan.size // ext4.MiB} MiB, {ctx.plan.inodes} inodes)")
    ctx.out.mkdir(exist_ok=True)
    with _size_at_recipe(ctx):
        ext4.make_filesystem(
            ctx.image, ctx.staging, ctx.plan, key=ctx.key, epoch=ctx.epoch, workdir=ctx.work
        )
    removal = remove_tree(ctx.staging)  # free the disk early; the image holds it all now
    if not removal.ok:
        raise HostError(
            "make filesystem: cannot remove the staging tree: " + "; ".join(removal.failures[:3]),
            reason=Reason.IO,
        )


def restore_metadata(ctx: Context) -> None:
    ctx.reporter.step("restoring ownership, modes, times and xattrs")
    ctx.extra_inodes = ext4.assign_inodes(ctx.image, ctx.tree, epoch=ctx.epoch)
    ext4.make_special_nodes(ctx.image, ctx.tree, epoch=ctx.epoch)
    ctx.inode_count = ext4.apply_metadata(
        ctx.image, ctx.tree, ctx.extra_inodes, epoch=ctx.epoch, workdir=ctx.work
    )


def check_filesystem(ctx: Context) -> None:
    ctx.reporter.step("checking the filesystem (e2fsck -fn)")
    ext4.check_filesystem(ctx.image)


def stage_kernel(ctx: Context) -> None:
    """Copy the kernel's files beside the image, each verified against the digest
    the derivation holds (a modules directory is installed from this copy)."""
    ctx.out.mkdir(exist_ok=True)
    for item in ctx.kernel:
        dest = ctx.out / item.name
        try:
            if item.source.is_dir():
                shutil.copytree(item.source, dest, symlinks=True)
                digest = hash_tree(dest)[0]
                if digest != item.sha256:
                    raise ContentChanged(item.source, item.sha256, digest)
            else:
                copy_verified(item.source, dest, item.sha256)
        except ContentChanged as exc:
            raise InputError(
                f"{item.source} changed while the image was being built (sha256 "
                f"{exc.expected} when the build started, now {exc.actual}); build again",
                reason=Reason.INPUT_CHANGED,
            ) from None
        ctx.outputs[item.name] = {"sha256": item.sha256, "size": item.size}  # verified above


def write_manifest(ctx: Context) -> None:
    outputs: dict[str, dict[str, object]] = {}
    for path in sorted(ctx.out.iterdir()):
        if path.name in ctx.outputs:  # staged and hashed already
            outputs[path.name] = ctx.outputs[path.name]
            continue
        digest, size = hash_tree(path) if path.is_dir() else hash_file(path)
        outputs[path.name] = {"sha256": digest, "size": size}
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": ctx.derivation.name,
        "key": ctx.key,
        "image": {"reference": str(ctx.recipe.image), "platform": str(ctx.recipe.platform)},
        "derivation": ctx.derivation.data,
        "outputs": outputs,
        "filesystem": {
            "size": ctx.plan.size,
            "needed": ctx.plan.needed,
            "inodes": ctx.inode_count,
            "uuid": ext4.derived_uuid(ctx.key, "fs-uuid"),
        },
        "tools": {"banger-build": __version__, **ctx.tools},
    }
    if ctx.kernel_artifact:  # not in the derivation: a store path is about the kernel's bytes
        manifest["kernel_artifact"] = ctx.kernel_artifact
    write_manifest_file(ctx.out, manifest)


RESOLVE: tuple[Callable[[Context], None], ...] = (
    read_recipe,
    resolve_inputs,  # local files and templates first: their errors need no network
    resolve_image,
    choose_epoch,
    resolve_kernel_artifact,
    read_tool_versions,
    make_derivation,
)

BUILD: tuple[Callable[[Context], None], ...] = (
    pull_layers,
    flatten_layers,
    stage_kernel,
    inject_files,
    size_image,
    make_filesystem,
    restore_metadata,
    check_filesystem,
    write_manifest,
)


def save_lock(ctx: Context) -> None:
    """Write the lock file when pins changed; a change is always reported, never silent."""
    if not ctx.lock_changed or ctx.options.lock_path is not None:
        return
    path = lock_path_for(ctx.recipe.path)
    existed = path.exists()
    ctx.lock.save(path)
    for note in ctx.lock_notes:
        ctx.reporter.always(f"{'updated' if existed else 'wrote'} {path}: {note}")


Step = Callable[[Context], None]


@contextlib.contextmanager
def boundary(ctx: Context, step: Step) -> Iterator[None]:
    """Run one step: named and timed; the host's failures (a full disk, a
    permission, an I/O error, memory) become one error naming the step, the
    path and the errno's words."""
    name = step.__name__.replace("_", " ")
    started = time.monotonic()
    try:
        yield
    except OSError as exc:
        raise host_error(name, exc) from exc
    except MemoryError as exc:
        raise HostError(f"{name}: out of memory", reason=Reason.OUT_OF_MEMORY) from exc
    except RecursionError as exc:  # a host tree nested past Python's stack
        raise HostError(
            f"{name}: a directory tree is nested too deeply", reason=Reason.TOO_DEEP
        ) from exc
    finally:
        ctx.timings[name] = time.monotonic() - started


def run_steps(ctx: Context, steps: tuple[Step, ...]) -> None:
    for step in steps:
        signals.checkpoint()  # a terminating signal whose raise was lost ends it here
        with boundary(ctx, step):
            step(ctx)


def resolve(recipe_path: Path, options: BuildOptions, reporter: Reporter) -> Context:
    ctx = Context(recipe_path, options, reporter)
    run_steps(ctx, RESOLVE)
    return ctx


def _link(ctx: Context, path: Path) -> None:
    """The out-link and its gc root, made while the key lock is held."""
    link = ctx.options.out_link
    if link is not None:
        with ctx.store.gc_guard():  # gc prunes roots under the exclusive lock
            set_out_link(link, path)
            ctx.store.add_root(link)


def build(
    recipe_path: Path,
    options: BuildOptions,
    reporter: Reporter | None = None,
    *,
    on_ready: Callable[[BuildResult], None] | None = None,
) -> BuildResult:
    """Build (or find) a recipe's store path. ``on_ready`` runs while the path is
    still protected by its key lock (the CLI prints it there), after the out-link
    (a gc root) exists."""
    reporter = reporter or Reporter()
    ctx = Context(recipe_path, options, reporter)
    try:
        return _build(ctx, on_ready)
    finally:
        ctx.store.temp_roots.close()  # the blobs it used are gc's again


def _build(ctx: Context, on_ready: Callable[[BuildResult], None] | None) -> BuildResult:
    reporter = ctx.reporter
    run_steps(ctx, RESOLVE)
    save_lock(ctx)  # the pins are what was resolved, whatever the build does next
    name, key = ctx.derivation.name, ctx.key
    result: BuildResult | None = None
    with ctx.store.key_lock(key, shared=True):  # a cache hit: gc waits for us
        path = ctx.store.lookup(key, name)
        if path is not None:
            _link(ctx, path)
            result = BuildResult(path, key, True, ctx.derivation)
            if on_ready is not None:
                on_ready(result)
    if result is None:
        waiting = lambda: reporter.step("waiting for another build of this key")  # noqa: E731
        with ctx.store.key_lock(key, on_wait=waiting):
            path = ctx.store.lookup(key, name)
            cached = path is not None
            if path is None:
                with ctx.store.build_dir(key) as work:
                    ctx.work = work
                    run_steps(ctx, BUILD)
                    path = ctx.store.publish(ctx.out, key, name)
                ctx.store.record(path, ctx.recipe.path)
            _link(ctx, path)
            result = BuildResult(path, key, cached, ctx.derivation)
            if on_ready is not None:
                on_ready(result)
    if not result.cached and ctx.timings:
        reporter.note(
            "steps: " + ", ".join(f"{n} {t:.1f}s" for n, t in ctx.timings.items() if t >= 0.05)
        )
    reporter.done()
    return result


@dataclass(frozen=True)
class CheckResult:
    path: Path
    key: str
    differences: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.differences


def compare_outputs(stored: Path, rebuilt: Path) -> list[str]:
    """What differs between a store path and a rebuild of it (empty: bit for bit)."""
    from banger_build import imagediff

    lines: list[str] = []
    names = sorted({p.name for p in stored.iterdir()} | {p.name for p in rebuilt.iterdir()})
    for name in names:
        a, b = stored / name, rebuilt / name
        if not a.exists() or not b.exists():
            lines.append(f"{name}: only in the {'rebuild' if b.exists() else 'store path'}")
            continue
        digest_a = hash_tree(a)[0] if a.is_dir() else hash_file(a)[0]
        digest_b = hash_tree(b)[0] if b.is_dir() else hash_file(b)[0]
        if digest_a == digest_b:
            continue
        lines.append(f"{name}: sha256 {digest_a} in the store, {digest_b} rebuilt")
        if name == ROOTFS:
            lines += [f"  {line}" for line in imagediff.explain(a, b)]
    return lines


def check(
    recipe_path: Path, options: BuildOptions, reporter: Reporter | None = None
) -> CheckResult:
    """Rebuild an existing store path from scratch in a temp dir and compare; change nothing."""
    reporter = reporter or Reporter()
    ctx = Context(recipe_path, options, reporter)
    try:
        return _check(ctx)
    finally:
        ctx.store.temp_roots.close()


def _check(ctx: Context) -> CheckResult:
    reporter = ctx.reporter
    run_steps(ctx, RESOLVE)
    name, key = ctx.derivation.name, ctx.key

    def waiting() -> None:
        reporter.step("waiting for a build of this key")

    # shared: gc keeps the stored path until the comparison is done
    with ctx.store.key_lock(key, shared=True, on_wait=waiting):
        path = ctx.store.lookup(key, name)
        if path is None:
            raise StoreError(
                f"{name} (key {key}) is not in the store: build it before checking it",
                reason=Reason.NOT_BUILT,
            )
        with ctx.store.build_dir(key) as work:
            ctx.work = work
            run_steps(ctx, (*BUILD, compare_with_store))
    reporter.done()
    return CheckResult(path, key, tuple(ctx.differences))


def compare_with_store(ctx: Context) -> None:
    path = ctx.store.path_for(ctx.key, ctx.derivation.name)
    ctx.reporter.step(f"comparing the rebuild with {path}")
    ctx.differences = compare_outputs(path, ctx.out)
