"""Why two builds differ: flatten two derivations to named inputs and compare them.

Inputs are named the way users think of them: ``image.config``, ``image.diff_ids[0]``,
``files[/etc/hostname].sha256``, ``files[/etc/motd].mode``, ``kernel.vmlinux``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Derivation dict -> {input name: scalar}. Lists of files are keyed by dest."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key in sorted(data):
            out.update(flatten(data[key], f"{prefix}.{key}" if prefix else key))
    elif isinstance(data, list) and data and all(isinstance(x, dict) and "dest" in x for x in data):
        for item in data:
            rest = {k: v for k, v in item.items() if k != "dest"}
            out.update(flatten(rest, f"{prefix}[{item['dest']}]"))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            out.update(flatten(item, f"{prefix}[{i}]"))
    else:
        out[prefix] = data
    return out


def _group(name: str) -> str:
    """``files[/etc/x].sha256`` -> ``files[/etc/x]``: the entry a changed field belongs to."""
    return name.rsplit(".", 1)[0] if "]." in name else name


def differences(a: dict[str, Any], b: dict[str, Any]) -> Iterator[str]:
    """Human lines naming each input that differs between derivations a and b."""
    fa, fb = flatten(a), flatten(b)
    groups_a = {_group(k) for k in fa}
    groups_b = {_group(k) for k in fb}
    for group in sorted(groups_a - groups_b):
        if "[" in group:
            yield f"{group}: removed"
    for group in sorted(groups_b - groups_a):
        if "[" in group:
            yield f"{group}: added"
    for key in sorted(set(fa) | set(fb)):
        if _group(key) not in groups_a & groups_b and "[" in _group(key):
            continue
        va, vb = fa.get(key), fb.get(key)
        if va != vb:
            yield f"{key}: {_show(va)} -> {_show(vb)}"


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    return json.dumps(value) if not isinstance(value, str) else value


def store_derivation(path: Path) -> dict[str, Any]:
    """The derivation recorded in a store path's manifest.json."""
    from banger_build.store import StoreEntry

    return StoreEntry.at(path).derivation()
