"""``banger-build file push REF FILE [--name NAME] [--platform OS/ARCH]``: publish one
file as an OCI artifact that a recipe's ``[[files]] ref`` (or ``[guest] agent_ref``)
names.

One layer, the file's bytes as they are (its digest is the file's sha256), titled
with its name (default: FILE's), with its mode as git keeps it (0755 if its owner
may execute it, else 0644). The same file, name and mode always give the same
manifest digest. Prints ``REF@sha256:...``: the manifest's digest, or with
``--platform`` the digest of the image index tagged REF, in which the pushed file
is now the entry of that platform (the other entries are kept; one push per
tag at a time), so one reference serves each platform its own file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
from pathlib import Path

from banger_build.commands import common
from banger_build.errors import InputError, Reason

NAME = "file"
HELP = "publish one file to a registry as an OCI artifact (for [[files]] ref, agent_ref)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="file_command", metavar="ACTION", required=True)
    push = sub.add_parser("push", help="push FILE to REF and print REF@sha256:...")
    push.add_argument("ref", help="where to push it, e.g. registry.example/tools/jq:1.7")
    push.add_argument("file", type=Path, help="the file (a regular file)")
    push.add_argument("--name", metavar="NAME",
                      help="its name in the artifact (default: FILE's name)")  # fmt: skip
    push.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                      help="make it this platform's entry of the image index tagged REF "
                      "(e.g. linux/arm64), keeping the other platforms'")  # fmt: skip
    common.add_home(push)
    common.add_registry(push)


def run(args: argparse.Namespace) -> int:
    from banger_build.errors import host_error

    try:
        return push_file(args)
    except OSError as exc:  # the host's files (a file that cannot be read, a full disk)
        raise host_error("file push", exc) from exc


def push_file(args: argparse.Namespace) -> int:
    from banger_build.errors import RegistryError
    from banger_build.limits import Limits
    from banger_build.oci.fileartifact import (
        EMPTY_CONFIG,
        LAYER_TYPE,
        check_name,
        index_entry,
        manifest_bytes,
        merge_index,
    )
    from banger_build.oci.manifest import OCI_INDEX, OCI_MANIFEST, ManifestError
    from banger_build.oci.reference import Digest, Platform, Reference, ReferenceSyntaxError
    from banger_build.store import Store

    try:
        ref = Reference.parse(args.ref)
        platform = Platform.parse(args.platform) if args.platform is not None else None
    except ReferenceSyntaxError as exc:
        raise InputError(str(exc), reason=Reason.INVALID_REFERENCE) from None
    if platform is not None and ref.tag is None:
        raise InputError(
            f"{ref}: --platform needs a tag (the index of platforms is kept under it)",
            reason=Reason.BAD_ARGUMENT,
        )
    path: Path = args.file
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file", reason=Reason.MISSING_INPUT) from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file", reason=Reason.NOT_A_REGULAR_FILE)
    limit = Limits().max_file_input
    if st.st_size > limit:
        raise InputError(
            f"{path} is {st.st_size} bytes, more than the limit of {limit} bytes for a file input",
            reason=Reason.TOO_LARGE,
        )
    name = args.name if args.name is not None else path.name
    problem = check_name(name)
    if problem is not None:
        raise InputError(f"--name: {problem}", reason=Reason.BAD_ARGUMENT)

    client = common.remote(args, Store(common.home(args)))
    layer = client.push_file(ref, path, LAYER_TYPE)
    client.push_bytes(ref, EMPTY_CONFIG)
    manifest = manifest_bytes(layer, name, bool(st.st_mode & stat.S_IXUSR))
    if platform is None:
        digest = client.push_manifest(ref, manifest, OCI_MANIFEST)
    else:
        assert ref.tag is not None
        own = Digest(hashlib.sha256(manifest).hexdigest())
        client.push_manifest(
            Reference(ref.registry, ref.repository, None, own), manifest, OCI_MANIFEST
        )
        try:
            current: bytes | None = client.manifest(ref, ref.tag, None, upstream=True)[1]
        except RegistryError as exc:
            if exc.reason != Reason.NOT_FOUND:
                raise
            current = None
        try:
            index = merge_index(current, index_entry(own, len(manifest), platform))
        except ManifestError as exc:
            raise InputError(
                f"{ref}: {exc.message}: push without --platform, or to another tag",
                reason=exc.reason,
            ) from None
        digest = client.push_manifest(ref, index, OCI_INDEX)
    print(Reference(ref.registry, ref.repository, ref.tag, digest))
    return 0
