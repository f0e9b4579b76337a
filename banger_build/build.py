"""The build: small verb-named steps over one context, listed in order (``BUILD``).

    resolve (banger_build.resolve) --> key --store hit?--> link, done
      --miss--> pull, fetch files, flatten, stage kernel, inject, size, write ext4,
                [fsck], manifest --> publish (one rename) --> link

``build()`` and ``check()`` are the library's entry points. Only the steps
touch the outside world. Everything a miss builds lives in a
private directory under ``<home>/tmp`` until the publishing rename, so a
failed or interrupted build leaves nothing in the store.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from banger_build import __version__, ext4, guest
from banger_build.context import (
    ROOTFS,
    BuildOptions,
    BuildResult,
    Context,
    boundary,
    run_steps,
)
from banger_build.entries import error_at
from banger_build.errors import ImageError, InputError, LayerError, Reason, StoreError
from banger_build.flatten import Flattener, LayerInput
from banger_build.fsutil import ContentChanged, copy_verified, hash_file, make_read_only
from banger_build.inject import inject, install_modules, resolve_owners
from banger_build.inputs import hash_tree
from banger_build.oci.blobs import BlobCache
from banger_build.oci.fileartifact import LAYER_TYPE
from banger_build.oci.kernel import extract_modules
from banger_build.oci.manifest import Descriptor
from banger_build.oci.reference import Digest
from banger_build.progress import Reporter
from banger_build.resolve import RESOLVE, save_lock
from banger_build.spool import Spool
from banger_build.store import set_out_link
from banger_build.store import write_manifest as write_manifest_file
from banger_build.substitute import require, substitute

__all__ = ["BUILD", "BuildOptions", "BuildResult", "CheckResult", "build", "check"]

MANIFEST_FORMAT = 1


def pull_layers(ctx: Context) -> None:
    """The layer blobs into the cache (verified as they are written). A blob the
    cache has already is not hashed here: ``flatten_layers`` hashes it while it
    reads it (and checks the bytes it uses against the diff_ids itself)."""
    image, layers = ctx.recipe.image, ctx.manifest.layers
    ctx.reporter.step(f"pulling {len(layers)} layers of {image}")
    for desc, diff_id in zip(layers, ctx.diff_ids, strict=True):
        path = ctx.source.cache.present(desc.digest, desc.size)
        if path is None:
            path = ctx.source.blob(image, desc)
        else:
            ctx.unhashed.append(desc)
        ctx.layers.append(LayerInput(desc.digest, path, diff_id))


def fetch_files(ctx: Context) -> None:
    """The fetched file inputs' bytes into the blob cache (each verified as it is
    written), from their registry or URL when the cache lacks them."""
    done: set[Digest] = set()
    for f in ctx.fetches:
        if f.sha256 in done:
            continue
        done.add(f.sha256)
        if ctx.source.cache.get(f.sha256) is not None:
            continue
        ctx.reporter.step(f"fetching {f.url or f.reference} for {f.dest}")
        if f.url is not None:
            ctx.source.url(f.url, f.sha256, ctx.options.limits.max_file_input)
        else:
            assert f.reference is not None and f.size is not None
            ctx.source.blob(f.reference, Descriptor(LAYER_TYPE, f.sha256, f.size))


def flatten_layers(ctx: Context) -> None:
    """The layers into ``ctx.tree`` and their files' bytes into ``ctx.spool``.

    Meanwhile a thread hashes the cached blobs ``pull_layers`` did not: one that
    is damaged is removed, fetched again, and the layers are flattened again (a
    damaged blob may also have made the flatten fail: it is retried then too)."""
    ctx.reporter.step("flattening layers")
    hashing = _BlobCheck(ctx.source.cache, ctx.unhashed)
    try:
        _flatten(ctx)
        failure: LayerError | OSError | None = None
    except (LayerError, OSError) as exc:  # OSError: the hashing removed it meanwhile
        failure = exc
    damaged = hashing.damaged()
    ctx.unhashed.clear()
    if not damaged:
        if failure is not None:
            raise failure
        return
    for desc in damaged:
        ctx.reporter.note(f"cached layer {desc.digest.short} was damaged: fetching it again")
        ctx.source.blob(ctx.recipe.image, desc)  # into the same cache path, verified
    ctx.reporter.note("flattening the layers again")
    _flatten(ctx)


class _BlobCheck:
    """Hashes cached blobs in a daemon thread (a signal that stops the build does
    not wait for it); ``damaged()`` waits and gives those that do not hash to
    their digest (the cache has removed them)."""

    def __init__(self, cache: BlobCache, descs: list[Descriptor]) -> None:
        self._cache = cache
        self._descs = list(descs)
        self._damaged: list[Descriptor] = []
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hash-blobs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for d in self._descs:
                if self._cache.get(d.digest, d.size) is None:
                    self._damaged.append(d)
        except BaseException as exc:  # raised by damaged()
            self._failed = exc

    def damaged(self) -> list[Descriptor]:
        self._thread.join()
        if self._failed is not None:
            raise self._failed
        return self._damaged


def _flatten(ctx: Context) -> None:
    if getattr(ctx, "spool", None) is not None:  # a second try: the first one's bytes go
        ctx.spool.close()
        ctx.spool.path.unlink(missing_ok=True)
    ctx.spool = Spool(ctx.work / "spool")  # closed by run_build, however the steps end
    flattener = Flattener(ctx.spool, ctx.epoch, ctx.options.limits)
    for layer in ctx.layers:
        stats = flattener.apply(layer)
        ctx.reporter.note(
            f"{layer.digest.short}: {stats.entries} entries, {stats.bytes / 1e6:.1f} MB"
        )
    ctx.spool.flush()  # a write the spool's thread could not make fails this step
    ctx.tree = flattener.tree


def check_owners(ctx: Context) -> None:
    """Owner names of the recipe's entries, from the image's passwd and group: right
    after the flatten, so an unknown one fails before anything else is done."""
    ctx.owners = resolve_owners(ctx.tree, ctx.spool, ctx.injected)


def check_agent(ctx: Context) -> None:
    """The guest agent (local, built-in or fetched) runs on the image's architecture:
    an agent for another one would only fail in the guest, silently."""
    for item in ctx.injected:
        if item.dest != guest.AGENT_DEST or item.source is None:
            continue
        with open(item.source, "rb") as f:
            head = f.read(20)
        problem = guest.agent_arch_problem(head, ctx.recipe.platform.architecture)
        if problem is not None:
            message = f"the guest agent {item.source} {problem}"
            raise error_at(item.where, message, Reason.AGENT_ARCH_MISMATCH)


def inject_files(ctx: Context) -> None:
    if ctx.injected:
        ctx.reporter.step(f"injecting {len(ctx.injected)} recipe files")
        inject(ctx.tree, ctx.spool, ctx.injected, ctx.owners, epoch=ctx.epoch)
    kernel = ctx.recipe.kernel
    guest_path = ctx.derivation.data.get("modules_install")
    if kernel is None or not guest_path:
        return
    if kernel.ref is not None:
        origin = next((k for k in ctx.kernel if k.name == "modules.tar"), None)
        if origin is None:
            return
        modules = ctx.work / "kernel-modules"
        extract_modules(origin.source, modules)
        label = f"kernel {kernel.ref} modules.tar"
    else:
        origin = next(k for k in ctx.kernel if k.name == "modules")
        modules = ctx.out / "modules"  # the copy stage_kernel verified against the derivation
        label = str(origin.source)
    version = Path(guest_path).name
    try:
        where = install_modules(ctx.tree, ctx.spool, modules, version, epoch=ctx.epoch, label=label)
    except InputError as exc:  # a module the index generator refuses
        at = f"{origin.where}: " if origin.where is not None else ""
        raise InputError(f"{at}{exc.message}", reason=exc.reason) from None
    ctx.reporter.step(f"installed the kernel modules at {where}, with modules.dep and indexes")


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


def write_filesystem(ctx: Context) -> None:
    ctx.reporter.step(f"writing ext4 ({ctx.plan.size // ext4.MiB} MiB, {ctx.plan.inodes} inodes)")
    ctx.out.mkdir(exist_ok=True)
    with _size_at_recipe(ctx):
        written = ext4.write_image(
            ctx.image,
            ctx.tree,
            ctx.spool,
            ctx.plan,
            fs_uuid=ext4.derived_uuid(ctx.key, "fs-uuid"),
            hash_seed=ext4.derived_uuid(ctx.key, "hash-seed"),
            epoch=ctx.epoch,
        )
    ctx.inode_count = written.inodes
    ctx.outputs[ctx.image.name] = {"sha256": written.sha256, "size": ctx.plan.size}
    ctx.spool.close()
    ctx.spool.path.unlink()  # free the disk early; the image holds it all now


def check_filesystem(ctx: Context) -> None:
    if not ctx.options.fsck:
        return
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
    # each output was hashed where it was made: the image as it was written, the
    # kernel's files as they were staged and verified
    names = sorted(path.name for path in ctx.out.iterdir())
    if names != sorted(ctx.outputs):
        raise RuntimeError(f"the outputs are {names}, but the steps recorded {sorted(ctx.outputs)}")
    outputs = {name: ctx.outputs[name] for name in names}
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": ctx.derivation.name,
        "key": ctx.key,
        # how the image was fetched (the derivation has only its content: config
        # and diff_ids): for gc, which keeps these blobs, and for signatures' pins
        "image": {
            "reference": str(ctx.recipe.image),
            "platform": str(ctx.recipe.platform),
            "manifest": str(ctx.manifest.digest),
            "layers": [
                {"digest": str(d.digest), "media_type": d.media_type, "size": d.size}
                for d in ctx.manifest.layers
            ],
        },
        "derivation": ctx.derivation.data,
        "outputs": outputs,
        "filesystem": {
            "size": ctx.plan.size,
            "needed": ctx.plan.needed,
            "inodes": ctx.inode_count,
            "uuid": ext4.derived_uuid(ctx.key, "fs-uuid"),
        },
        "tools": {"banger-build": __version__},
    }
    if ctx.kernel_artifact:  # not in the derivation: a store path is about the kernel's bytes
        manifest["kernel_artifact"] = ctx.kernel_artifact
    if ctx.fetches:  # the same: the derivation has their sha256 only
        manifest["fetched_files"] = [f.as_dict() for f in ctx.fetches]
    write_manifest_file(ctx.out, manifest)


BUILD: tuple[Callable[[Context], None], ...] = (
    pull_layers,
    fetch_files,
    flatten_layers,
    check_owners,
    check_agent,
    stage_kernel,
    inject_files,
    size_image,
    write_filesystem,
    check_filesystem,
    write_manifest,
)


def run_build(ctx: Context, steps: tuple[Callable[[Context], None], ...]) -> None:
    try:
        run_steps(ctx, steps)
    finally:
        spool = getattr(ctx, "spool", None)
        if spool is not None:
            spool.close()


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
            substituted = False
            if path is None:
                with boundary(ctx, substitute):
                    path = substitute(ctx)
                substituted = path is not None
            if path is None:
                if ctx.options.no_build:
                    require(ctx)
                with ctx.store.build_dir(key) as work:
                    ctx.work = work
                    run_build(ctx, BUILD)
                    path = ctx.store.publish(ctx.out, key, name)
                ctx.store.record(path, ctx.recipe.path)
            _link(ctx, path)
            result = BuildResult(path, key, cached, ctx.derivation, substituted)
            if on_ready is not None:
                on_ready(result)
    if result.status == "built" and ctx.timings:
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
            run_build(ctx, (*BUILD, compare_with_store))
    reporter.done()
    return CheckResult(path, key, tuple(ctx.differences))


def compare_with_store(ctx: Context) -> None:
    path = ctx.store.path_for(ctx.key, ctx.derivation.name)
    ctx.reporter.step(f"comparing the rebuild with {path}")
    make_read_only(ctx.out)  # as publish makes a store path: a tree's hash has its modes
    ctx.differences = compare_outputs(path, ctx.out)
