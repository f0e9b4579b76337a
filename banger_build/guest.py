"""The built-in guest asset set: what makes an image a banger microVM.

    /usr/local/bin/banger-vsock-agent              the agent binary, 0755
    /usr/local/libexec/banger-network-bootstrap    script, 0755
    /usr/local/libexec/banger-first-boot           script, 0755
    /etc/systemd/system/banger-network.service     unit, 0644
    /etc/systemd/system/banger-vsock-agent.service unit, 0644
    /etc/systemd/system/banger-first-boot.service  unit, 0644
    /etc/systemd/system/multi-user.target.wants/<unit>  enable symlinks -> ../<unit>
    /etc/modules-load.d/banger-vsock.conf          vsock modules, 0644
    /var/lib/banger/first-boot-pending             marker, 0644

All root-owned (0:0). Every file but the agent is a Jinja template under
``templates/guest/<name>.j2`` (package data ``banger_build/templates/guest``
once installed), rendered like the recipe's own ``[[templates]]``: from
``[vars]`` with StrictUndefined. A recipe replaces one by name under
``[guest.templates]``; only that file's bytes, and so its sha256 and the
store key, change.

The agent is ``[guest] agent`` (a file of the recipe's project), else the
built-in agent for the recipe's platform: ``banger-vsock-agent-<arch>``
(``amd64``, ``arm64``), package data ``banger_build/agents`` once installed,
``agents/out`` in a checkout, where ``agents/build`` puts them. A wheel built
without them (no compilers) installs and works; a recipe needing one is then
refused with one line saying how to get it (``builtin_agent``). Either way
the agent enters the derivation by its sha256, never by where it lies.

This module is the definition, plain data (``ENTRIES``: ``AGENT``,
``TEMPLATES``, ``LINKS``; ``DESTS``, ``VARS``), and where the built-in
templates and agents are (``builtin_template``, ``builtin_agent``). It
imports nothing of ``recipe`` or ``inputs``: ``recipe`` builds the
``[guest]`` schema from ``TEMPLATE_NAMES`` and checks ``VARS``; ``inputs``
resolves ``ENTRIES`` in the same loop as the recipe's own entries.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from banger_build import builtins
from banger_build.errors import InputError, Reason

OWNER = "0:0"
AGENT_NAME = "banger-vsock-agent"
AGENT_DEST = f"/usr/local/bin/{AGENT_NAME}"
AGENT_MODE = 0o755
UNIT_DIR = "/etc/systemd/system"
WANTS_DIR = f"{UNIT_DIR}/multi-user.target.wants"
MARKER = "/var/lib/banger/first-boot-pending"


@dataclass(frozen=True)
class BuiltinFile:
    """The agent: the file ``[guest] agent`` names, else the built-in one, copied to ``dest``."""

    dest: str
    mode: int


@dataclass(frozen=True)
class BuiltinTemplate:
    """One built-in template: ``templates/guest/<name>.j2`` rendered to ``dest``."""

    name: str
    dest: str
    mode: int


@dataclass(frozen=True)
class BuiltinLink:
    """A symlink of the set (a unit enabled for multi-user.target)."""

    dest: str
    target: str


TEMPLATES: tuple[BuiltinTemplate, ...] = (
    BuiltinTemplate(
        "banger-network-bootstrap", "/usr/local/libexec/banger-network-bootstrap", 0o755
    ),
    BuiltinTemplate("banger-first-boot", "/usr/local/libexec/banger-first-boot", 0o755),
    BuiltinTemplate("banger-network.service", f"{UNIT_DIR}/banger-network.service", 0o644),
    BuiltinTemplate("banger-vsock-agent.service", f"{UNIT_DIR}/banger-vsock-agent.service", 0o644),
    BuiltinTemplate("banger-first-boot.service", f"{UNIT_DIR}/banger-first-boot.service", 0o644),
    BuiltinTemplate("banger-vsock.conf", "/etc/modules-load.d/banger-vsock.conf", 0o644),
    BuiltinTemplate("first-boot-pending", MARKER, 0o644),
)
TEMPLATE_NAMES: tuple[str, ...] = tuple(t.name for t in TEMPLATES)
AGENT = BuiltinFile(AGENT_DEST, AGENT_MODE)


#: The units enabled for multi-user.target, as (link, relative target) pairs.
UNITS: tuple[str, ...] = (
    "banger-network.service",
    "banger-vsock-agent.service",
    "banger-first-boot.service",
)
ENABLE_LINKS: tuple[tuple[str, str], ...] = tuple((f"{WANTS_DIR}/{u}", f"../{u}") for u in UNITS)
LINKS: tuple[BuiltinLink, ...] = tuple(BuiltinLink(dest, target) for dest, target in ENABLE_LINKS)

#: The whole set, as entries ``inputs`` resolves like the recipe's own (all owned by OWNER).
ENTRIES: tuple[BuiltinFile | BuiltinTemplate | BuiltinLink, ...] = (AGENT, *TEMPLATES, *LINKS)

#: Every path the set writes, in byte order.
DESTS: tuple[str, ...] = tuple(
    sorted(
        [AGENT_DEST, *(t.dest for t in TEMPLATES), *(link for link, _ in ENABLE_LINKS)],
        key=str.encode,
    )
)


def conflicting_dest(dest: str) -> str | None:
    """The built-in path ``dest`` collides with: the same path, one under it, or its parent."""
    for builtin in DESTS:
        if dest == builtin or builtin.startswith(dest + "/") or dest.startswith(builtin + "/"):
            return builtin
    return None


def replacement_hint(dest: str) -> str:
    """How a recipe changes the built-in path ``dest`` instead of writing it itself."""
    if dest == AGENT_DEST:
        return "set guest.agent or guest.agent_ref to the agent you want there"
    for t in TEMPLATES:
        if t.dest == dest:
            return f'replace it under [guest.templates] as "{t.name}"'
    return "it enables a unit of the set"


# -- template variables the built-in templates read (all optional) -----------------

_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")


def _check_port(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 0xFFFFFFFE:
        return f"expected a vsock port, an integer from 1 to 4294967294, got {value!r}"
    return None


def _check_interface(value: Any) -> str | None:
    if not isinstance(value, str) or not (value == "" or _IFNAME.fullmatch(value)):
        return (
            "expected a network interface name (up to 15 of A-Z a-z 0-9 _ . : @ -) "
            f'or "" for eth0 or else the first one that is not lo, got {value!r}'
        )
    return None


def _check_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected a boolean, got {value!r}"


#: ``[vars]`` the built-in templates read, each with a check of its value (the
#: problem, or None). Each template gives its default with ``| default(...)``;
#: nothing else is defaulted, so a typo in a template still fails (StrictUndefined).
VARS: Mapping[str, Callable[[Any], str | None]] = {
    "vsock_port": _check_port,  # default 1024
    "network_interface": _check_interface,  # default "": eth0, else the first non-lo
    "regenerate_ssh_host_keys": _check_bool,  # default true
}


# -- the built-in templates: package data ------------------------------------------


def template_dir() -> Traversable:
    """The built-in guest templates: ``guest/`` of the built-in templates (``builtins``)."""
    directory = builtins.data_dir() / "guest"
    if not directory.is_dir():
        raise InputError(
            f"the built-in guest templates are missing (looked in {directory}): "
            "the installation is incomplete",
            reason=Reason.GUEST_TEMPLATES_MISSING,
        )
    return directory


def builtin_template(name: str) -> Traversable:
    return template_dir() / f"{name}.j2"


# -- the built-in agents: package data, or the checkout's agents/out -----------------


def agent_dirs() -> list[Path]:
    """Where built-in agents are looked for: the installed package data
    (``banger_build/agents``), then a source checkout's ``agents/out``."""
    package = resources.files("banger_build")
    if not isinstance(package, Path):  # a zip import: its data cannot be a build input
        return []
    return [package / "agents", package.parent / "agents" / "out"]


def builtin_agents() -> list[str]:
    """The architectures a built-in agent exists for, sorted."""
    found = {
        p.name.removeprefix(f"{AGENT_NAME}-")
        for d in agent_dirs()
        if d.is_dir()
        for p in d.glob(f"{AGENT_NAME}-*")
        if p.is_file()
    }
    return sorted(found)


def builtin_agent(platform: str, arch: str) -> Path:
    """The built-in agent for ``arch`` (``platform`` as the recipe says it), or the
    InputError saying how to get one."""
    for directory in agent_dirs():
        path = directory / f"{AGENT_NAME}-{arch}"
        if path.is_file():
            return path
    have = builtin_agents()
    looked = " and ".join(str(d) for d in agent_dirs()) or "a zip import, which cannot hold it"
    raise InputError(
        f"no built-in guest agent for {platform} in this installation (looked in {looked}; "
        f"built in: {', '.join(have) or 'none'}): set guest.agent_ref to an agent in a "
        "registry (`banger-build file push`) or guest.agent to a banger-vsock-agent binary, "
        f"build it with agents/build {arch} in a checkout (Debian's gcc for that "
        "architecture) and install from there, or set guest.agents = false",
        reason=Reason.AGENT_MISSING,
    )


#: ELF e_machine -> the OCI architecture it runs on.
_ELF_MACHINES = {3: "386", 40: "arm", 62: "amd64", 183: "arm64", 243: "riscv64", 21: "ppc64le"}


def agent_arch_problem(head: bytes, architecture: str) -> str | None:
    """What is wrong with an agent whose file starts with ``head`` (its first 20
    bytes) for an image of ``architecture``, or None: an ELF executable for it."""
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
        return "is not an ELF executable"
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    arch = _ELF_MACHINES.get(machine, f"ELF machine {machine}")
    if arch != architecture:
        return f"is built for {arch}, the image is for {architecture}"
    return None
