"""Recipe v1: load a TOML recipe into a frozen ``Recipe``, or fail with file:line:col.

(Skeleton: the data types below are the contract the rest of the package uses.
``load_recipe`` is being implemented.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banger_build.reference import Platform, Reference


@dataclass(frozen=True)
class Where:
    """Where a value sits in its file, for errors raised after loading."""

    file: str
    line: int | None
    col: int | None
    key: str


@dataclass(frozen=True)
class SizeSpec:
    """``auto``, ``auto+512MiB`` or a fixed size such as ``4GiB``."""

    text: str
    auto: bool
    bytes: int  # the fixed size, or the extra headroom added to auto


@dataclass(frozen=True)
class FileSpec:
    src: Path  # absolute, resolved relative to the recipe's directory
    dest: str  # absolute, normalised guest path
    mode: int
    owner: str  # "uid:gid", numbers or names resolved from the image
    sha256: str | None
    where: Where


@dataclass(frozen=True)
class TemplateSpec:
    src: Path
    dest: str
    mode: int
    owner: str
    where: Where


@dataclass(frozen=True)
class SymlinkSpec:
    dest: str
    target: str
    owner: str
    where: Where


@dataclass(frozen=True)
class KernelSpec:
    path: Path
    initrd: Path | None
    modules: Path | None
    where: Where


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    image: Reference
    platform: Platform
    size: SizeSpec
    kernel: KernelSpec | None
    files: tuple[FileSpec, ...]
    templates: tuple[TemplateSpec, ...]
    symlinks: tuple[SymlinkSpec, ...]
    vars: Mapping[str, Any] = field(default_factory=dict)
    image_where: Where | None = None


def load_recipe(path: Path) -> Recipe:
    raise NotImplementedError
