"""A store path's recorded inputs, resolved again: what ``check STORE-PATH`` rebuilds.

A store path's manifest.json records its derivation (every input, by content)
and how its image was fetched (reference and manifest digest). Checking a
store path rebuilds exactly that derivation, whatever its recipe says today:

    image          the recorded manifest digest, from the blob cache or the
                   recorded reference's registry (or its mirror); its config
                   and diff_ids must be the derivation's
    name, platform, size, epoch, symlinks, modes, owners, modules_install
                   the derivation's values
    fetched files  the recorded file artifact (by its manifest digest) or URL,
                   from the blob cache or fetched again
    file and template bytes, local kernel files
                   named only by sha256 in the record: taken from the recipe
                   the path was built from (the store's meta record, or
                   ``recipe=``) wherever it yields those bytes today
    kernel artifact  the recorded manifest digest
    ext4           the recorded writer parameters and format must be this
                   banger-build's (an older format's bytes cannot be made again)

The inputs resolved this way must derive the recorded key. When one cannot be
had (a source edited since the build, a recipe gone, a substituted path with no
recipe here, another ext4 writer format), the error is one line naming the first
missing input (``not-rebuildable``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger_build import ext4
from banger_build.context import BuildOptions, Context, FileInput, run_steps
from banger_build.derivation import DERIVATION_FORMAT, OUTPUT_FORMAT, Derivation
from banger_build.entries import Injected, Staged, Where
from banger_build.errors import BangerError, InputError, Reason, StoreError
from banger_build.explain import differences
from banger_build.inputs import resolve_injected, resolve_kernel
from banger_build.oci.reference import Digest, Platform, Reference, ReferenceSyntaxError
from banger_build.progress import Reporter
from banger_build.recipe import (
    Invalid,
    KernelSpec,
    Recipe,
    SizeSpec,
    apply_overrides,
    load_recipe,
    parse_bytes,
)
from banger_build.resolve import make_derivation, read_diff_ids
from banger_build.store import Store, StoreEntry

if TYPE_CHECKING:
    from banger_build.build import CheckResult


class NotRebuildable(InputError):
    """The record does not hold (or no longer leads to) every input of a rebuild."""

    reason = Reason.NOT_REBUILDABLE


class RecordedContext(Context):
    """A build context whose inputs come from a store path's record."""

    def __init__(
        self, entry: StoreEntry, recipe: Path | None, options: BuildOptions, reporter: Reporter
    ) -> None:
        super().__init__(recipe or entry.path, options, reporter)
        self.entry = entry
        self.recipe_file = recipe
        self.record: dict[str, Any] = {}
        self.recorded: Derivation
        self.today: Recipe | None = None  # the recipe as it reads now, if it does
        self.today_problem = ""  # why there is none: said when its bytes are needed

    def missing(self, what: str) -> NotRebuildable:
        """``what`` (an input by its recorded hash) cannot be had: one line saying why."""
        if self.today is None:
            why = self.today_problem
        else:
            why = f"{self.today.path} does not give those bytes any more (edited since?)"
        hint = (
            f"; `banger-build check {self.recipe_file}` checks what the recipe builds now"
            if self.recipe_file is not None and self.today is not None
            else ""
        )
        return NotRebuildable(
            f"cannot rebuild {self.entry.path} from its recorded inputs: {what}: {why}{hint}"
        )


def _ctx(ctx: Context) -> RecordedContext:
    assert isinstance(ctx, RecordedContext)
    return ctx


def read_record(ctx: Context) -> None:
    rc = _ctx(ctx)
    rc.record = rc.entry.manifest()
    rc.recorded = Derivation(rc.entry.derivation())
    formats = (rc.recorded.data.get("format"), rc.recorded.data.get("output_format"))
    if formats != (DERIVATION_FORMAT, OUTPUT_FORMAT):
        raise NotRebuildable(
            f"cannot rebuild {rc.entry.path}: its derivation has format {formats[0]}, output "
            f"format {formats[1]}; this banger-build makes {DERIVATION_FORMAT}, {OUTPUT_FORMAT}"
        )
    image = rc.record.get("image")
    if not isinstance(image, dict) or not all(
        isinstance(image.get(k), str) for k in ("reference", "manifest")
    ):
        raise NotRebuildable(
            f"cannot rebuild {rc.entry.path}: its manifest.json does not record where its "
            "image came from (reference and manifest digest)"
        )


def read_recipe_today(ctx: Context) -> None:
    """The recipe the path was built from, as it reads now: only a source of bytes."""
    rc = _ctx(ctx)
    if rc.recipe_file is None:
        origin = rc.entry.origin()
        rc.today_problem = (
            "it was substituted, so no recipe is recorded for it; pass --recipe RECIPE"
            if origin == "substituted"
            else "no recipe is recorded for it; pass --recipe RECIPE"
        )
        return
    try:
        recipe = load_recipe(rc.recipe_file, source_roots=rc.options.source_roots)
        rc.today = apply_overrides(recipe, dataclasses.replace(rc.options.overrides, platform=None))
    except BangerError as exc:
        rc.today_problem = f"its recipe no longer loads ({exc})"


def _size(text: str) -> SizeSpec:
    try:
        if text == "auto":
            return SizeSpec("auto", True, 0)
        if text.startswith("auto+"):
            return SizeSpec(text, True, parse_bytes(text[len("auto+") :]))
        return SizeSpec(text, False, parse_bytes(text))
    except Invalid as exc:
        raise NotRebuildable(f"the recorded size {text!r} is malformed: {exc}") from None


def recorded_recipe(ctx: Context) -> None:
    """A Recipe holding the recorded name, image, platform, size and kernel; the
    rest of today's recipe (its positions, source roots) only to name places."""
    rc = _ctx(ctx)
    drv, image = rc.recorded.data, rc.record["image"]
    where = Where(str(rc.entry.manifest_file), None, None, "kernel")
    try:
        ref = Reference.parse(image["reference"])
        platform = Platform.parse(str(drv["platform"]))
        artifact = rc.record.get("kernel_artifact")
        kernel_ref = (
            Reference.parse(str(artifact["reference"])) if isinstance(artifact, dict) else None
        )
    except (ReferenceSyntaxError, KeyError) as exc:
        raise NotRebuildable(
            f"cannot rebuild {rc.entry.path}: its record is malformed ({exc})"
        ) from None
    today_kernel = rc.today.kernel if rc.today is not None else None
    kernel: KernelSpec | None = None
    if kernel_ref is not None:
        kernel = KernelSpec(None, None, None, where, "modules_install" in drv, ref=kernel_ref)
    elif drv.get("kernel"):
        base = today_kernel or KernelSpec(None, None, None, where)
        kernel = dataclasses.replace(base, ref=None, install_modules="modules_install" in drv)
    base_recipe = rc.today or Recipe(
        path=rc.entry.manifest_file, name="", image=ref, platform=platform,
        size=SizeSpec("auto", True, 0), kernel=None, files=(), templates=(), symlinks=(),
    )  # fmt: skip
    rc.recipe = dataclasses.replace(
        base_recipe,
        name=rc.recorded.name,
        image=ref,
        platform=platform,
        size=_size(str(drv["size"])),
        kernel=kernel,
    )


def recorded_inputs(ctx: Context) -> None:
    """The recorded files, templates and symlinks; their bytes from today's recipe,
    its templates rendered with the recorded ``recipe.*`` facts (name, image, platform)."""
    rc = _ctx(ctx)
    fetched = _fetched(rc)
    rc.fetches = list(fetched.values())
    today: dict[str, Injected] = {}  # sha256 -> an entry of today's recipe with those bytes
    by_dest: dict[str, Injected] = {}
    if rc.today is not None and any(
        f.get("kind") != "symlink" and (f.get("dest"), f.get("sha256")) not in fetched
        for f in _files(rc)
    ):
        try:
            for item in resolve_injected(rc.recipe):
                if item.kind != "symlink":
                    today.setdefault(item.sha256, item)
                by_dest[item.dest] = item
        except BangerError as exc:
            rc.today_problem = f"its recipe no longer resolves ({exc})"
            rc.today = None
    out = []
    for f in _files(rc):
        dest, kind, owner = str(f["dest"]), str(f["kind"]), str(f["owner"])
        if kind == "symlink":
            target = str(f["target"])
            digest = hashlib.sha256(target.encode()).hexdigest()
            item = Injected(dest, kind, 0o777, owner, digest, target=target)
        elif (dest, f.get("sha256")) in fetched:  # the build fetches it, cache first
            sha = str(f["sha256"])
            mode = int(str(f["mode"]), 8)
            source = rc.source.cache.path(Digest(sha))
            item = Injected(dest, kind, mode, owner, sha, source=source)
        else:
            sha = str(f["sha256"])
            have = today.get(sha)
            if have is None:
                raise rc.missing(f"the bytes of {dest} (a {kind}, sha256 {sha[:12]}...)")
            mode = int(str(f["mode"]), 8)
            item = Injected(dest, kind, mode, owner, sha, source=have.source, data=have.data)
        same = by_dest.get(dest)  # today's entry for the path: its recipe position
        if same is not None:
            item = dataclasses.replace(item, where=same.where, owner_where=same.owner_where)
        out.append(item)
    rc.injected = tuple(out)


def _fetched(rc: RecordedContext) -> dict[tuple[str, str], FileInput]:
    """The record's fetched files, by (dest, sha256 hex), in the record's order."""
    raw = rc.record.get("fetched_files", [])
    out: dict[tuple[str, str], FileInput] = {}
    try:
        if not isinstance(raw, list):
            raise TypeError("fetched_files is not a list")
        for item in raw:
            digest = Digest.parse(str(item["sha256"]))

            def opt(key: str, item: dict[str, Any] = item) -> Digest | None:
                return Digest.parse(str(item[key])) if key in item else None

            ref = item.get("reference")
            size = item.get("size")
            got = FileInput(
                str(item["dest"]), digest,
                reference=Reference.parse(str(ref)) if ref is not None else None,
                manifest=opt("manifest"), index=opt("index"),
                size=size if isinstance(size, int) else None,
                url=str(item["url"]) if "url" in item else None,
            )  # fmt: skip
            if (got.url is None) == (got.reference is None) or (got.url is None and size is None):
                raise ValueError(f"{got.dest}: neither a URL nor a sized artifact")
            out[got.dest, digest.hex] = got
    except (TypeError, KeyError, ValueError, ReferenceSyntaxError) as exc:
        raise NotRebuildable(
            f"cannot rebuild {rc.entry.path}: its record of fetched files is malformed ({exc})"
        ) from None
    return out


def _files(rc: RecordedContext) -> list[dict[str, Any]]:
    files = rc.recorded.data.get("files")
    return [f for f in files if isinstance(f, dict)] if isinstance(files, list) else []


def recorded_image(ctx: Context) -> None:
    """The image by the recorded manifest digest; it must be the recorded config."""
    rc = _ctx(ctx)
    digest = Digest.parse(rc.record["image"]["manifest"])
    rc.reporter.step(f"image {rc.recipe.image}@{digest.short} (as recorded)")
    rc.manifest = rc.source.manifest(rc.recipe.image, digest)
    rc.config = rc.source.config(rc.recipe.image, rc.manifest)
    read_diff_ids(rc)
    rc.epoch = rc.recorded.epoch


def recorded_kernel(ctx: Context) -> None:
    """The kernel's files: the recorded artifact, or today's local files with the
    recorded bytes."""
    rc = _ctx(ctx)
    recorded = rc.recorded.data.get("kernel") or {}
    spec = rc.recipe.kernel
    if spec is None:
        return
    if spec.ref is not None:
        artifact = rc.record["kernel_artifact"]
        digest = Digest.parse(str(artifact["manifest"]))
        got = rc.source.kernel(spec.ref, digest)
        rc.kernel_version = rc.source.kernel_version(spec.ref, got)
        rc.kernel = tuple(
            Staged(name, rc.source.blob(spec.ref, desc), desc.digest.hex, desc.size)
            for name, desc in got.files.items()
        )
        rc.kernel_artifact = {k: str(v) for k, v in artifact.items()}
        return
    if spec.path is None and spec.initrd is None and spec.modules is None:
        name = next(iter(recorded), "vmlinux")
        raise rc.missing(f"kernel {name}")
    try:
        local = {s.name: s for s in resolve_kernel(spec, rc.recipe.source_roots)}
    except BangerError as exc:
        raise rc.missing(f"the kernel files ({exc})") from None
    staged = []
    for name, want in recorded.items():
        have = local.get(name)
        if have is None or have.sha256 != want.get("sha256"):
            raise rc.missing(f"kernel {name} (sha256 {str(want.get('sha256'))[:12]}...)")
        staged.append(have)
    rc.kernel = tuple(staged)


def same_writer(ctx: Context) -> None:
    rc = _ctx(ctx)
    recorded = rc.recorded.data.get("ext4")
    if recorded != ext4.PARAMS:
        made = recorded.get("writer") if isinstance(recorded, dict) else None
        raise NotRebuildable(
            f"cannot rebuild {rc.entry.path} here: its ext4 was written by writer format "
            f"{made} with other parameters; this banger-build writes format "
            f"{ext4.PARAMS['writer']}"
        )


def recorded_derivation(ctx: Context) -> None:
    """Derive from what was resolved: it must be the record, input for input."""
    rc = _ctx(ctx)
    make_derivation(rc)
    if rc.derivation.key != rc.recorded.key:
        lines = list(differences(rc.recorded.data, rc.derivation.data))
        raise NotRebuildable(
            f"cannot rebuild {rc.entry.path} from its recorded inputs: they resolve to key "
            f"{rc.derivation.key}, not {rc.recorded.key} ({'; '.join(lines[:3])})"
        )


RESOLVE_RECORDED = (
    read_record,
    read_recipe_today,
    recorded_recipe,
    recorded_inputs,  # local bytes first: a missing one is said before any network
    recorded_kernel,
    recorded_image,
    same_writer,
    recorded_derivation,
)


def check_store_path(
    path: Path,
    options: BuildOptions,
    reporter: Reporter | None = None,
    *,
    recipe: Path | None = None,
) -> CheckResult:
    """Rebuild the store path ``path`` (or ``./result``) from its recorded inputs in a
    temp dir and compare it bit for bit; nothing in the store changes."""
    from banger_build.build import BUILD, CheckResult, compare_with_store, run_build

    reporter = reporter or Reporter()
    entry = Store(options.home).entry_of(path)
    if recipe is None and entry.recipe is not None:
        recipe = Path(entry.recipe)
    ctx = RecordedContext(entry, recipe, options, reporter)
    try:
        run_steps(ctx, RESOLVE_RECORDED)
        key, name = ctx.key, ctx.derivation.name

        def waiting() -> None:
            reporter.step("waiting for a build of this key")

        # shared: gc keeps the stored path until the comparison is done
        with ctx.store.key_lock(key, shared=True, on_wait=waiting):
            if ctx.store.lookup(key, name) is None:
                raise StoreError(f"{entry.path} left the store", reason=Reason.NOT_BUILT)
            with ctx.store.build_dir(key) as work:
                ctx.work = work
                run_build(ctx, (*BUILD, compare_with_store))
        reporter.done()
        return CheckResult(entry.path, key, tuple(ctx.differences))
    finally:
        ctx.store.temp_roots.close()
