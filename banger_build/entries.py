"""The resolved entries of a recipe, and where in the recipe each comes from.

A leaf module (it imports only ``errors``): the derivation hashes these
entries, the build writes exactly them, and a step that finds a problem with
one late (an owner the image does not define, a ``dest`` under a file)
raises ``entry.where.error(...)``, an error at the recipe position that
caused it.

    Where     file:line:col and key path of a value in a recipe
    Injected  one path the recipe puts into the image (file, rendered template, symlink)
    Staged    a file or directory staged beside rootfs.ext4 (kernel, initrd, modules)

The ``where`` fields are left out of equality and of ``as_dict``: they say
where an entry was written, not what it is, so two recipes that differ only
in layout give equal entries and the same store key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banger_build.errors import BangerError, InputError, Reason, RecipeError


@dataclass(frozen=True)
class Where:
    """Where a value sits in its file, for errors raised after loading."""

    file: str
    line: int | None
    col: int | None
    key: str

    def __str__(self) -> str:
        pos = f":{self.line}:{self.col if self.col is not None else 1}" if self.line else ""
        return f"{self.file}{pos}: {self.key}"

    def error(self, message: str, reason: Reason) -> RecipeError:
        """A ``RecipeError`` at this position: ``file:line:col: key: message``."""
        return RecipeError(
            message,
            file=self.file,
            line=self.line,
            col=self.col,
            key=self.key or None,
            reason=reason,
        )


def error_at(where: Where | None, message: str, reason: Reason) -> BangerError:
    """The error for a recipe entry: at its position when it has one."""
    return where.error(message, reason) if where is not None else InputError(message, reason=reason)


@dataclass(frozen=True)
class Injected:
    """One path the recipe puts into the image, root-owned unless it says otherwise."""

    dest: str
    kind: str  # "file" | "template" | "symlink"
    mode: int
    owner: str
    sha256: str  # of the bytes written (or of the link target)
    source: Path | None = None  # file inputs: copied from here
    data: bytes | None = None  # templates: the rendered bytes
    target: str = ""  # symlinks
    #: the entry's ``dest`` key (the [guest] table or key for the built-in set): for
    #: problems with the destination in the image (under a file, a directory there...)
    where: Where | None = field(default=None, compare=False)
    #: the entry's ``owner`` key (its ``dest`` when the owner is the default): for
    #: an owner the image's /etc/passwd or /etc/group does not define
    owner_where: Where | None = field(default=None, compare=False)
    #: may replace a symlink the image has at ``dest`` (``replace = true``); it shapes
    #: no byte, only whether the build goes on, so it is not in ``as_dict``
    replace: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dest": self.dest, "kind": self.kind, "owner": self.owner}
        if self.kind == "symlink":
            out["target"] = self.target
        else:
            out["mode"] = f"{self.mode:04o}"
            out["sha256"] = self.sha256
        return out


@dataclass(frozen=True)
class Staged:
    """A file or directory staged beside rootfs.ext4 (kernel, initrd, modules)."""

    name: str
    source: Path
    sha256: str
    size: int
    #: the recipe key it comes from (kernel.path, kernel.initrd, kernel.modules or kernel.ref)
    where: Where | None = field(default=None, compare=False)
