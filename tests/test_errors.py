"""The error tree: reasons are enum members, never free strings."""

from __future__ import annotations

import re
from pathlib import Path

import banger_build
from banger_build.errors import (
    BangerError,
    ImageError,
    InputError,
    LayerError,
    Reason,
    RecipeError,
    RegistryError,
    StoreError,
    ToolError,
)

PACKAGE = Path(banger_build.__file__).parent


def test_reasons_are_enum_members_everywhere() -> None:
    free = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"reason\s*=\s*[\"']", line):
                free.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert free == []


def test_reason_values_are_unique_slugs() -> None:
    values = [r.value for r in Reason]
    assert len(values) == len(set(values))
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", v) for v in values)
    assert Reason.MISSING_INPUT == "missing-input"  # a StrEnum: equal to its string


def test_each_error_class_has_its_default_reason() -> None:
    assert BangerError("x").reason is Reason.ERROR
    assert RecipeError("x", file="r.toml").reason is Reason.RECIPE_INVALID
    assert InputError("x").reason is Reason.INPUT_INVALID
    assert RegistryError("x", reference="r").reason is Reason.REGISTRY
    assert LayerError("x", layer="sha256:0").reason is Reason.LAYER_INVALID
    assert ToolError("x").reason is Reason.TOOL_FAILED
    assert ImageError("x").reason is Reason.IMAGE
    assert StoreError("x").reason is Reason.STORE
    assert InputError("x", reason=Reason.IO).reason is Reason.IO
