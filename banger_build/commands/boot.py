"""``banger-build boot [RECIPE | STORE-PATH]``: boot a throw-away copy of a store
path's rootfs.ext4 in qemu, the local stand-in for the microVM manager and a CI
smoke test: ``qemu-system-x86_64 -M microvm`` for an amd64 image,
``qemu-system-aarch64 -M virt`` for an arm64 one (the platform the store
path's manifest.json records).

A recipe is built first. The kernel and initrd are the ones staged in the
store path (the recipe's [kernel] table) unless --kernel/--initrd say
otherwise; --kernel alone boots that kernel without an initrd. The VM has a
user-mode NIC (the guest set's network unit configures it from the
``banger.ip=`` boot gives) and, where the host has /dev/vhost-vsock, a vsock
device. The serial console streams to stdout (or --console-log FILE).

Success (exit 0): every --expect text appeared on the console (the VM is then
stopped), or, without --expect, a login prompt appeared or the guest powered
off by itself; with --ping-agent the guest agent must then answer on vsock
(skipped, saying why, where the host has no vhost-vsock). A timeout, a
kernel panic, a guest reboot, a silent agent or a qemu failure exits 1. The
store path is never modified.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

from banger_build.commands import common
from banger_build.errors import InputError, Reason, StoreError

if TYPE_CHECKING:
    from banger_build.progress import Reporter
    from banger_build.store import Store

NAME = "boot"
HELP = "boot a store path (or a recipe, built first) in a qemu VM for its architecture"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target", type=Path, metavar="RECIPE|STORE-PATH",
        help="a store path (a directory with rootfs.ext4, e.g. ./result) or a recipe (.toml)",
    )  # fmt: skip
    p.add_argument(
        "--kernel", type=Path, metavar="PATH",
        help="boot this kernel (a bzImage for amd64, an Image for arm64)",
    )  # fmt: skip
    p.add_argument("--initrd", type=Path, metavar="PATH", help="with this initrd")
    p.add_argument(
        "--expect", action="append", default=[], metavar="TEXT",
        help="succeed once TEXT appeared on the console (repeatable: all of them); "
        "default: a login prompt, or the guest powering off",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=float, default=300.0, metavar="SECONDS",
        help="hard limit of the VM's run; qemu is killed after it (default: 300)",
    )  # fmt: skip
    p.add_argument(
        "--accel", choices=("auto", "kvm", "tcg"), default="auto",
        help="auto (default): KVM if a short probe boot works, else TCG",
    )  # fmt: skip
    p.add_argument(
        "--memory", type=int, default=512, metavar="MIB", help="guest RAM (default: 512)"
    )
    p.add_argument(
        "--append", default="", metavar="ARGS", help="extra kernel command-line arguments"
    )
    p.add_argument(
        "--network", choices=("user", "none"), default="user",
        help="user (default): a user-mode NIC, the guest at 10.0.2.15/24 via 10.0.2.2 "
        "(banger.ip= etc. on the kernel command line); none: no NIC",
    )  # fmt: skip
    p.add_argument(
        "--ping-agent", action="store_true",
        help="once booted, the guest agent must answer a ping on vsock (skipped, saying "
        "why, where the host has no /dev/vhost-vsock)",
    )  # fmt: skip
    p.add_argument(
        "--agent-port", type=int, default=1024, metavar="PORT",
        help="the agent's vsock port (the recipe's vsock_port; default: 1024)",
    )  # fmt: skip
    p.add_argument(
        "--console-log", type=Path, metavar="FILE",
        help="write the console to FILE instead of stdout",
    )  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")
    common.add_sources(p)
    common.add_overrides(p)
    common.add_limits(p)
    common.add_home(p)
    common.add_registry(p)


def store_path_of(args: argparse.Namespace, reporter: Reporter) -> Path:
    """The store path to boot: the argument itself, or the build of a recipe."""
    target: Path = args.target
    if target.is_dir():
        return target
    if target.is_file() and target.suffix == ".toml":
        from banger_build.build import build

        return build(target, common.build_options(args, out_link=None), reporter).path
    if target.exists():
        raise InputError(
            f"{target}: neither a store path (a directory with rootfs.ext4) nor a recipe (.toml)",
            reason=Reason.BAD_ARGUMENT,
        )
    raise InputError(f"{target}: no such store path or recipe", reason=Reason.BAD_ARGUMENT)


def protect(
    stack: contextlib.ExitStack, store: Store, args: argparse.Namespace, reporter: Reporter
) -> Path:
    """The store path to boot, held under its shared key lock until the boot ends
    (gc keeps it meanwhile). A recipe's path collected between its build and the
    lock is built again, once; a path outside this store is booted as it is."""
    for _ in range(2):
        path = store_path_of(args, reporter)
        try:
            entry = store.entry_of(path)
        except StoreError:
            return path  # not in this store: nothing of ours to protect
        stack.enter_context(store.key_lock(entry.key, shared=True))
        if entry.exists():
            return path
        stack.close()
    raise StoreError(f"{path} was garbage-collected before it could boot", reason=Reason.IO)


def console_writer(binary: BinaryIO | None, text: TextIO) -> Callable[[bytes], None]:
    """Write console bytes as they come: to ``binary``, else decoded to ``text``."""

    def write(data: bytes) -> None:
        if binary is not None:
            binary.write(data)
            binary.flush()
        else:
            text.write(data.decode("utf-8", "replace"))
            text.flush()

    return write


def open_console_log(path: Path) -> BinaryIO:
    try:
        return open(path, "wb")  # the caller's ExitStack closes it
    except OSError as exc:
        raise InputError(f"--console-log {path}: {exc.strerror}") from exc


def run(args: argparse.Namespace) -> int:
    from banger_build.boot import BootOptions, boot, resolve_target
    from banger_build.kvm import default_cache_path
    from banger_build.progress import Reporter
    from banger_build.store import Store

    reporter = Reporter(quiet=args.quiet)
    store = Store(common.home(args))
    with contextlib.ExitStack() as stack:
        path = protect(stack, store, args, reporter)
        target = resolve_target(path, args.kernel, args.initrd)
        binary: BinaryIO | None = getattr(sys.stdout, "buffer", None)
        if args.console_log is not None:
            binary = stack.enter_context(open_console_log(args.console_log))
        sys.stdout.flush()
        options = BootOptions(
            memory=args.memory,
            accel=args.accel,
            timeout=args.timeout,
            expect=tuple(args.expect),
            append=args.append,
            console=console_writer(binary, sys.stdout),
            network=args.network,
            ping_agent=args.ping_agent,
            agent_port=args.agent_port,
            probe_cache=default_cache_path(),
        )
        workdir = stack.enter_context(store.temp_dir("boot"))
        result = boot(target, options, note=reporter.step, workdir=workdir)
    what = {
        "expected": "all expected texts seen",
        "login": "the login prompt appeared",
        "poweroff": "the guest powered off",
    }[result.how]
    if result.agent is not None:
        what += f"; the agent answered {result.agent!r} on vsock port {args.agent_port}"
    reporter.step(f"boot ok under {result.accel} ({result.arch}) in {result.seconds:.1f} s: {what}")
    if result.agent_skipped is not None:
        reporter.always(f"agent ping skipped: {result.agent_skipped}")
    return 0
