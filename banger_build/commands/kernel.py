"""``banger-build kernel push REF --kernel VMLINUZ [--initrd INITRD] [--modules DIR]``:
publish a kernel as an OCI artifact that a recipe's ``[kernel] ref`` names.

One layer per file (vmlinux, initrd.img, and modules.tar: a deterministic tar
of the lib/modules/<version> directory); the config records the modules
version. Files are streamed, never read into memory. Prints the manifest
digest; the same inputs always give the same digest.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from banger_build.commands import common
from banger_build.errors import InputError, Reason

NAME = "kernel"
HELP = "publish a kernel (and its initrd and modules) to a registry as an OCI artifact"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="kernel_command", metavar="ACTION", required=True)
    push = sub.add_parser("push", help="push a kernel artifact to REF and print its digest")
    push.add_argument("ref", help="where to push it, e.g. registry.example/kernels/vmlinux:6.1")
    push.add_argument("--kernel", type=Path, required=True, metavar="VMLINUZ",
                      help="the kernel image")  # fmt: skip
    push.add_argument("--initrd", type=Path, metavar="INITRD", help="an initramfs")
    push.add_argument("--modules", type=Path, metavar="DIR",
                      help="the kernel's lib/modules/<version> directory (or a directory "
                      "holding one, e.g. an unpacked package)")  # fmt: skip
    common.add_home(push)
    common.add_registry(push)


def run(args: argparse.Namespace) -> int:
    from banger_build.errors import host_error

    try:
        return push_kernel(args)
    except OSError as exc:  # the host's files (a kernel that cannot be read, a full disk)
        raise host_error("kernel push", exc) from exc


def push_kernel(args: argparse.Namespace) -> int:
    from banger_build.kmodules import ModulesTreeError, find_tree, modules_version
    from banger_build.oci.kernel import (
        CONFIG_TYPE,
        LAYERS,
        config_bytes,
        manifest_bytes,
        write_modules_tar,
    )
    from banger_build.oci.manifest import OCI_MANIFEST, Descriptor
    from banger_build.oci.reference import Reference, ReferenceSyntaxError
    from banger_build.store import Store

    try:
        ref = Reference.parse(args.ref)
    except ReferenceSyntaxError as exc:
        raise InputError(f"{args.ref}: {exc}", reason=Reason.INVALID_REFERENCE) from None
    for what, path in (("--kernel", args.kernel), ("--initrd", args.initrd)):
        if path is not None and not path.is_file():
            raise InputError(f"{what} {path}: not a file", reason=Reason.MISSING_INPUT)
    modules: Path | None = args.modules
    if modules is not None:
        if not modules.is_dir():
            raise InputError(f"--modules {modules}: not a directory", reason=Reason.MISSING_INPUT)
        try:
            modules, found_below = find_tree(modules)
        except ModulesTreeError as exc:
            raise InputError(f"--modules {exc.message}", reason=exc.reason) from None
        if found_below is not None:
            print(f"banger-build: --modules: {found_below}", file=sys.stderr)

    store = Store(common.home(args))
    client = common.remote(args, store)
    push = functools.partial(client.push_file, ref)
    with store.temp_dir("kernel-push") as tmp:
        files: list[tuple[str, Descriptor]] = [("vmlinux", push(args.kernel, LAYERS["vmlinux"]))]
        if args.initrd is not None:
            files.append(("initrd.img", push(args.initrd, LAYERS["initrd.img"])))
        version = ""
        if modules is not None:
            version = modules_version(modules)
            tar = Path(tmp) / "modules.tar"
            with open(tar, "wb") as out:
                write_modules_tar(modules, out)
            files.append(("modules.tar", push(tar, LAYERS["modules.tar"])))
        config_path = Path(tmp) / "config.json"
        config_path.write_bytes(config_bytes(version))
        config = push(config_path, CONFIG_TYPE)
        digest = client.push_manifest(ref, manifest_bytes(config, files), OCI_MANIFEST)
    print(digest)
    return 0
