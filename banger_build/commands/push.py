"""``banger-build push RECIPE|STORE-PATH REGISTRY/REPO[:TAG] [--sign-key FILE]``:
publish a store path as one OCI artifact and print ``REGISTRY/REPO@sha256:...``.

The artifact (banger_build/oci/rootfs.py): the store path's manifest.json as
its config, the imagecat bundle and the staged kernel files as layers, and
annotations naming the store key and the raw sha256 of rootfs.ext4 and
manifest.json. Its digest is a function of the store path alone, so every
builder of a key pushes the same one. Only blobs the registry lacks are
uploaded. The tag ``sk-<key>`` is written last (after TAG); when it already
names an artifact with another rootfs.ext4, the push stops: the build is not
reproducible (``banger-build check`` shows why). A recipe is built first; the
store path is held under its key's shared lock while it is pushed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from banger_build.commands import common
from banger_build.errors import Reason

if TYPE_CHECKING:
    from banger_build.progress import Reporter
    from banger_build.publish import Attach, PushResult, PushTarget
    from banger_build.store import Store

NAME = "push"
HELP = "push a store path (or a recipe, built first) to a registry as an OCI artifact"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target", type=Path, metavar="RECIPE|STORE-PATH",
        help="a store path (e.g. ./result) or a recipe (.toml), built first",
    )  # fmt: skip
    p.add_argument("ref", metavar="REGISTRY/REPO[:TAG]", help="where to push it")
    add_sign_key(p)
    common.add_output(p)
    common.add_sources(p)
    common.add_limits(p)
    common.add_home(p)
    common.add_registry(p)


def add_sign_key(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sign-key", type=Path, metavar="FILE",
        help="sign the pushed artifact with this secret key (`banger-build key generate`)",
    )  # fmt: skip


def sign_function(key_file: Path | None) -> Callable[..., object] | None:
    """``--sign-key``: the function that signs a pushed artifact once it exists by
    digest and before any tag names it (``publish.Attach``). The key is read here,
    before anything is built or pushed, so a bad key file fails first."""
    if key_file is None:
        return None
    from banger_build.signing.attach import sign_pushed
    from banger_build.signing.keys import load_secret_key

    return functools.partial(sign_pushed, secret_key=load_secret_key(key_file))


def push_path(
    args: argparse.Namespace,
    store: Store,
    path: Path,
    target: PushTarget,
    reporter: Reporter,
    sign: Callable[..., object] | None,
) -> PushResult:
    """Push the store path ``path`` (held by the caller) to ``target``, signed with
    ``args.sign_key`` when ``sign`` is given."""
    from banger_build.publish import push_store_path

    remote = common.remote(args, store, reporter.progress)
    attach: Attach | None = None
    if sign is not None:

        def attach(result: PushResult) -> None:
            sign(result, remote=remote, reporter=reporter)

    try:
        return push_store_path(
            path, target, remote=remote, store=store, reporter=reporter, attach=attach
        )
    finally:
        store.temp_roots.close()


def push_built(
    args: argparse.Namespace,
    path: Path,
    key: str,
    target: PushTarget,
    reporter: Reporter,
    sign: Callable[..., object] | None,
) -> PushResult:
    """``build --push``: push the path a build just printed, under its key's shared
    lock (gc may have collected an unrooted path since: an error then)."""
    from banger_build.errors import StoreError
    from banger_build.store import Store

    store = Store(common.home(args))
    with store.key_lock(key, shared=True):
        if not store.entry(path).exists():
            raise StoreError(
                f"{path} was garbage-collected before it could be pushed", reason=Reason.IO
            )
        return push_path(args, store, path, target, reporter, sign)


def run(args: argparse.Namespace) -> int:
    from banger_build.commands.boot import protect
    from banger_build.publish import parse_target
    from banger_build.store import Store

    target = parse_target(args.ref)
    sign = sign_function(args.sign_key)
    reporter = common.reporter(args)
    store = Store(common.home(args))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        path = protect(stack, store, args, reporter)
        result = push_path(args, store, path, target, reporter, sign)
    if args.json:
        reporter.result(
            ref=str(result.ref),
            path=str(result.store_path),
            key=result.store_key,
            name=result.name,
            tag=result.tag,
            key_tag=result.key_tag,
            uploaded=[str(d) for d in result.uploaded],
            signed=args.sign_key is not None,
            bundle=result.bundle.record(),
            seconds=round(time.monotonic() - started, 3),
        )
        return 0
    reporter.step(f"pushed {result.name}: {len(result.uploaded)} blobs uploaded")
    print(result.ref, flush=True)
    return 0
