"""One build's context and the boundary every step runs in.

``Context`` is the one mutable object of a build: the resolve steps
(``banger_build.resolve``) fill the recipe, pins, image, inputs and the
derivation; the build steps (``banger_build.build``) fill the work dir, the
tree, the plan and the outputs. ``run_steps`` runs a list of steps, each
inside ``boundary``: named, timed, and with the host's failures turned into
one error that names the step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banger_build import ext4, signals
from banger_build.config import Substituter
from banger_build.derivation import Derivation
from banger_build.entries import Injected, Staged
from banger_build.errors import HostError, Reason, host_error
from banger_build.flatten import LayerInput
from banger_build.limits import Limits
from banger_build.lockfile import Lock
from banger_build.oci.blobs import BlobCache
from banger_build.oci.manifest import Descriptor, ImageManifest
from banger_build.oci.options import RegistryOptions
from banger_build.oci.reference import Digest, Reference
from banger_build.oci.source import Source
from banger_build.progress import Reporter
from banger_build.recipe import Overrides, Recipe
from banger_build.spool import Spool
from banger_build.store import Store
from banger_build.tree import Tree

ROOTFS = "rootfs.ext4"


@dataclass(frozen=True)
class BuildOptions:
    home: Path
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    out_link: Path | None = Path("result")
    #: "auto": use pins, add missing ones (and say so); "locked": every input must be
    #: pinned already; "update": re-resolve (``update_input``, or everything) and re-pin.
    lock_mode: str = "auto"
    update_input: str | None = None
    #: the lock file, instead of the one beside the recipe
    lock_path: Path | None = None  # read and written (``--lock-file``)
    #: write new pins to the lock file (``--no-write-lock``: use them, say so, keep the file)
    write_lock: bool = True
    #: directories sources may lie in besides the recipe's project (--allow-source)
    source_roots: tuple[Path, ...] = ()
    #: bounds on what the image may make the build do (``--max-image-size``)
    limits: Limits = field(default_factory=Limits)
    #: registries to take the path from before building it (``--substituter``)
    substituters: tuple[Substituter, ...] = ()
    #: never build: a path no store or substituter has is an error (``--no-build``)
    no_build: bool = False
    #: ``--var KEY=VALUE`` and ``--platform``: changes to the recipe's values
    overrides: Overrides = field(default_factory=Overrides)
    #: check the image with ``e2fsck -fn`` before it is stored (``--fsck``)
    fsck: bool = False


@dataclass(frozen=True)
class FileInput:
    """A fetched file input (``ref`` or ``url``): where the build downloads its bytes
    from when the blob cache lacks them, and what manifest.json records of it (gc keeps
    those blobs; ``check STORE-PATH`` fetches them again)."""

    dest: str
    sha256: Digest
    reference: Reference | None = None
    manifest: Digest | None = None  # the file artifact's manifest
    index: Digest | None = None  # the index it was taken from (the lock pins this one)
    size: int | None = None  # the artifact's layer size
    url: str | None = None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"dest": self.dest, "sha256": str(self.sha256)}
        if self.url is not None:
            out["url"] = self.url
        if self.reference is not None:
            out["reference"] = str(self.reference)
        for name, value in (("manifest", self.manifest), ("index", self.index)):
            if value is not None:
                out[name] = str(value)
        if self.size is not None:
            out["size"] = self.size
        return out


@dataclass(frozen=True)
class BuildResult:
    path: Path
    key: str
    cached: bool  # it was in the store already
    derivation: Derivation
    substituted: bool = False  # taken from a substituter, not built here

    @property
    def status(self) -> str:
        return "cached" if self.cached else "substituted" if self.substituted else "built"


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
        self.diff_ids: tuple[Digest, ...] = ()  # the layers' uncompressed digests
        self.epoch = 1
        self.injected: tuple[Injected, ...] = ()
        self.kernel: tuple[Staged, ...] = ()
        self.kernel_version: str | None = None  # a [kernel] ref artifact's modules version
        #: a [kernel] ref artifact's manifest and config digests (for manifest.json and gc)
        self.kernel_artifact: dict[str, str] = {}
        #: the fetched file inputs (``[[files]] ref``/``url``, ``agent_ref``/``agent_url``)
        self.fetches: list[FileInput] = []
        self.derivation: Derivation
        # filled by the build steps
        self.work: Path
        self.layers: list[LayerInput] = []
        # cached layer blobs not hashed by pull_layers: flatten_layers hashes them
        self.unhashed: list[Descriptor] = []
        self.tree: Tree
        self.spool: Spool
        self.owners: list[tuple[int, int]] = []  # (uid, gid) of each injected entry
        self.plan: ext4.SizePlan
        self.inode_count = 0
        self.outputs: dict[str, dict[str, object]] = {}  # output name -> sha256, size
        self.timings: dict[str, float] = {}  # step name -> seconds
        self.differences: list[str] = []  # check: how the rebuild differs from the store

    @property
    def key(self) -> str:
        return self.derivation.key

    @property
    def out(self) -> Path:
        return self.work / "out"

    @property
    def image(self) -> Path:
        return self.out / ROOTFS


Step = Callable[[Context], None]


@contextlib.contextmanager
def boundary(ctx: Context, step: Callable[[Context], object]) -> Iterator[None]:
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
        ctx.reporter.timing(name, ctx.timings[name])


def run_steps(ctx: Context, steps: tuple[Step, ...]) -> None:
    for step in steps:
        signals.checkpoint()  # a terminating signal whose raise was lost ends it here
        with boundary(ctx, step):
            step(ctx)
