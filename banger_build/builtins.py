"""Built-in templates: package data any recipe names as ``builtin:NAME``.

The project's top-level ``templates/`` directory is the data package
``banger_build.templates`` once installed (pyproject maps it there), read
through ``importlib.resources`` (a zip import included); a source checkout
(an editable install, or the checkout on PYTHONPATH) has it beside the package.

    builtin:hostname.j2                       templates/hostname.j2 ({{ hostname }})
    builtin:hosts.j2, builtin:fstab.j2        /etc/hosts, /etc/fstab for a microVM
    builtin:guest/banger-network.service.j2   a template of the guest set (``guest.py``)

``[[templates]] src`` and the values of ``[guest.templates]`` take them, so a
recipe outside the checkout uses the same templates as ``recipes/debian.toml``.
Like any template, a built-in one enters the derivation by the sha256 of the
bytes it renders to, never by where the package is installed: the same recipe
has the same key from a checkout, a wheel or a zip.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from banger_build.errors import InputError, Reason

PREFIX = "builtin:"
SUFFIX = ".j2"


class UnknownBuiltin(ValueError):
    """A ``builtin:`` name that no built-in template has (the message says which do)."""


@dataclass(frozen=True)
class Builtin:
    """A built-in template: ``name`` is its "/"-separated path under ``templates/``."""

    name: str

    def __str__(self) -> str:
        return PREFIX + self.name

    def file(self) -> Traversable:
        return data_dir().joinpath(*self.name.split("/"))


def data_dir() -> Traversable:
    """The built-in templates' directory: installed package data, else the checkout's."""
    package = resources.files("banger_build")
    installed = package / "templates"
    if installed.is_dir():
        return installed
    looked = str(installed)
    if isinstance(package, Path):  # not in a zip: maybe a source checkout
        checkout = package.parent / "templates"
        if checkout.is_dir():
            return checkout
        looked += f" and {checkout}"
    raise InputError(
        f"the built-in templates are missing (looked in {looked}): the installation is incomplete",
        reason=Reason.GUEST_TEMPLATES_MISSING,
    )


def names() -> list[str]:
    """Every built-in template's name, sorted ("guest/..." ones included)."""
    found: list[str] = []
    stack: list[tuple[str, Traversable]] = [("", data_dir())]
    while stack:
        prefix, directory = stack.pop()
        for child in directory.iterdir():
            if child.is_dir():
                stack.append((f"{prefix}{child.name}/", child))
            elif child.name.endswith(SUFFIX):
                found.append(prefix + child.name)
    return sorted(found)


def parse(name: str) -> Builtin:
    """``NAME`` of ``builtin:NAME`` -> the template; UnknownBuiltin if there is none."""
    parts = name.split("/")
    if not name.endswith(SUFFIX) or any(p in ("", ".", "..") for p in parts):
        raise UnknownBuiltin(_unknown(name))
    found = Builtin(name)
    if not found.file().is_file():
        raise UnknownBuiltin(_unknown(name))
    return found


def _unknown(name: str) -> str:
    available = names()
    close = difflib.get_close_matches(name, available, n=1, cutoff=0.6)
    hint = f"did you mean {PREFIX}{close[0]}? " if close else ""
    return f"no built-in template {PREFIX}{name} ({hint}there are: {', '.join(available)})"
