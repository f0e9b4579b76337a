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

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger_build import __version__, ext4
from banger_build.blobs import BlobCache
from banger_build.derivation import Derivation, derive
from banger_build.errors import InputError, Reason, RecipeError, StoreError
from banger_build.flatten import Flattener, LayerInput
from banger_build.fsutil import hash_file
from banger_build.inject import inject, install_modules
from banger_build.inputs import Injected, Staged, hash_tree, resolve_injected, resolve_kernel
from banger_build.kernel_artifact import extract_modules, parse_kernel_manifest, read_version
from banger_build.limits import Limits
from banger_build.lockfile import Lock, lock_path_for
from banger_build.oci import ImageManifest, ManifestError, cached_manifest
from banger_build.progress import Reporter
from banger_build.recipe import Recipe, Where, load_recipe
from banger_build.reference import Digest
from banger_build.registry_config import RegistryOptions
from banger_build.run import tool_version
from banger_build.store import MANIFEST, Store, set_out_link
from banger_build.tree import Inode, Tree

if TYPE_CHECKING:  # imported on first use: a cached build needs no HTTP stack
    from banger_build.registry import RegistryClient

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
        self._client: RegistryClient | None = None
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

    @property
    def client(self) -> RegistryClient:
        """The registry client, created (and oras/requests imported) on first use."""
        if self._client is None:
            from banger_build.registry import RegistryClient

            self._client = RegistryClient(
                BlobCache(self.store.blobs), self.options.registry, progress=self.reporter.progress
            )
        return self._client

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
    ctx.recipe = load_recipe(ctx.recipe_path)


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
    from the blob cache when they are there (no registry client at all)."""
    recipe = ctx.recipe
    ctx.lock = Lock.load(ctx.options.lock_path or lock_path_for(recipe.path))
    digest = pin(
        ctx,
        input_name="image",
        what=f"{recipe.image} ({recipe.platform})",
        key="image.ref",
        where=recipe.image_where,
        pinned=ctx.lock.image_digest(recipe.image, recipe.platform),
        resolve=lambda: ctx.client.resolve(recipe.image, recipe.platform),
        record=lambda d: ctx.lock.with_image(recipe.image, recipe.platform, d),
    )
    blobs = BlobCache(ctx.store.blobs)
    try:
        manifest = cached_manifest(blobs, digest)
    except ManifestError as exc:
        raise exc.error_for(str(recipe.image)) from exc
    if manifest is None:
        manifest = ctx.client.manifest(recipe.image, digest)
    ctx.manifest = manifest
    config = manifest.config
    config_path = blobs.get(config.digest, config.size) or ctx.client.blob(recipe.image, config)
    try:
        ctx.config = json.loads(config_path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{recipe.image}: image config is not valid JSON: {exc}") from exc
    if not isinstance(ctx.config, dict):
        raise InputError(f"{recipe.image}: image config is not a JSON object")
    arch, os_ = ctx.config.get("architecture"), ctx.config.get("os")
    if (os_, arch) != (recipe.platform.os, recipe.platform.architecture):
        raise InputError(
            f"{recipe.image}@{digest}: image is for {os_}/{arch}, the recipe asks for "
            f"{recipe.platform}",
            reason=Reason.PLATFORM_MISMATCH,
        )


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
    # a reference by digest is pinned by itself and never re-resolved
    digest = ref.digest or pin(
        ctx,
        input_name="kernel",
        what=f"kernel {ref}",
        key="kernel.ref",
        where=where,
        pinned=ctx.lock.kernel_digest(ref),
        resolve=lambda: ctx.client.raw_manifest(ref)[0],
        record=lambda d: ctx.lock.with_kernel(ref, d),
    )
    blobs = BlobCache(ctx.store.blobs)
    cached = blobs.get(digest)
    data = cached.read_bytes() if cached is not None else ctx.client.raw_manifest(ref, digest)[1]
    try:
        artifact = parse_kernel_manifest(digest, data)
    except ManifestError as exc:
        raise exc.error_for(str(ref)) from exc
    config = artifact.config
    config_path = blobs.get(config.digest, config.size) or ctx.client.blob(ref, config)
    version = read_version(config_path.read_bytes(), f"{ref}@{digest}")
    if spec.install_modules and ("modules.tar" not in artifact.files or not version):
        raise RecipeError(
            f"install_modules: kernel {ref}@{digest} has no modules (push it with --modules)",
            file=str(ctx.recipe.path), line=where.line, col=where.col,
            key="kernel.install_modules", reason=Reason.NO_MODULES,
        )  # fmt: skip
    staged = []
    for name, desc in artifact.files.items():
        path = blobs.get(desc.digest, desc.size) or ctx.client.blob(ref, desc)
        staged.append(Staged(name, path, desc.digest.hex, desc.size))
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
        ctx.kernel = resolve_kernel(ctx.recipe.kernel)


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
    layers = ctx.manifest.layers
    diff_ids = (ctx.config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layers):
        raise InputError(
            f"{ctx.recipe.image}: the image config lists {len(diff_ids)} diff_ids for "
            f"{len(layers)} layers",
            reason=Reason.CONFIG_MISMATCH,
        )
    ctx.reporter.step(f"pulling {len(layers)} layers of {ctx.recipe.image}")
    for desc, diff_id in zip(layers, diff_ids, strict=True):
        path = ctx.client.blob(ctx.recipe.image, desc)
        ctx.layers.append(LayerInput(desc.digest, path, Digest.parse(str(diff_id))))


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
    modules = kernel.modules
    if kernel.ref is not None:
        tar = next((k.source for k in ctx.kernel if k.name == "modules.tar"), None)
        if tar is None:
            return
        modules = ctx.work / "kernel-modules"
        extract_modules(tar, modules)
    if modules is not None:
        version = Path(guest_path).name
        where = install_modules(ctx.tree, ctx.staging, modules, version, epoch=ctx.epoch)
        ctx.reporter.step(f"installed the kernel modules at {where}")


def size_image(ctx: Context) -> None:
    size = ctx.recipe.size
    ctx.plan = ext4.plan_size(ctx.tree, auto=size.auto, size=size.bytes)


def make_filesystem(ctx: Context) -> None:
    ctx.reporter.step(f"making ext4 ({ctx.plan.size // ext4.MiB} MiB, {ctx.plan.inodes} inodes)")
    ctx.out.mkdir()
    ext4.make_filesystem(
        ctx.image, ctx.staging, ctx.plan, key=ctx.key, epoch=ctx.epoch, workdir=ctx.work
    )
    shutil.rmtree(ctx.staging)  # free the disk early; the image holds it all now


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
    for item in ctx.kernel:
        dest = ctx.out / item.name
        if item.source.is_dir():
            shutil.copytree(item.source, dest, symlinks=True)
            digest = hash_tree(dest)[0]
        else:
            shutil.copyfile(item.source, dest)
            digest = hash_file(dest)[0]
        if digest != item.sha256:
            raise InputError(f"{item.source} changed while it was being staged", reason=Reason.IO)
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
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (ctx.out / MANIFEST).write_text(text, encoding="utf-8")


RESOLVE: tuple[Callable[[Context], None], ...] = (
    read_recipe,
    resolve_image,
    choose_epoch,
    resolve_kernel_artifact,
    resolve_inputs,
    read_tool_versions,
    make_derivation,
)

BUILD: tuple[Callable[[Context], None], ...] = (
    pull_layers,
    flatten_layers,
    inject_files,
    size_image,
    make_filesystem,
    restore_metadata,
    check_filesystem,
    stage_kernel,
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


def resolve(recipe_path: Path, options: BuildOptions, reporter: Reporter) -> Context:
    ctx = Context(recipe_path, options, reporter)
    for step in RESOLVE:
        step(ctx)
    return ctx


def build(
    recipe_path: Path, options: BuildOptions, reporter: Reporter | None = None
) -> BuildResult:
    reporter = reporter or Reporter()
    ctx = resolve(recipe_path, options, reporter)
    name, key = ctx.derivation.name, ctx.key
    path = ctx.store.lookup(key, name)
    cached = path is not None
    if path is None:
        with ctx.store.lock(
            key, on_wait=lambda: reporter.step("waiting for another build of this key")
        ):
            path = ctx.store.lookup(key, name)
            cached = path is not None
            if path is None:
                with ctx.store.build_dir(key) as work:
                    ctx.work = work
                    for step in BUILD:
                        step(ctx)
                    path = ctx.store.publish(ctx.out, key, name)
                    ctx.store.record(path, ctx.recipe.path)
    save_lock(ctx)
    if options.out_link is not None:
        set_out_link(options.out_link, path)
        ctx.store.add_root(options.out_link)
    reporter.done()
    return BuildResult(path, key, cached, ctx.derivation)


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
    ctx = resolve(recipe_path, options, reporter)
    name, key = ctx.derivation.name, ctx.key
    path = ctx.store.lookup(key, name)
    if path is None:
        raise StoreError(
            f"{name} (key {key}) is not in the store: build it before checking it",
            reason=Reason.NOT_BUILT,
        )

    def waiting() -> None:
        reporter.step("waiting for a build of this key")

    with ctx.store.lock(key, on_wait=waiting), ctx.store.build_dir(key) as work:
        ctx.work = work
        for step in BUILD:
            step(ctx)
        reporter.step(f"comparing the rebuild with {path}")
        differences = compare_outputs(path, ctx.out)
    reporter.done()
    return CheckResult(path, key, tuple(differences))
