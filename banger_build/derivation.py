"""The derivation: every input that shapes the output, as an explicit dict.

The store key is sha256 over the canonical JSON (sorted keys, no spaces,
UTF-8) of this dict. What goes in: a format version, the name, the platform,
the image's config digest and its layers' uncompressed digests (diff_ids: the
same image recompressed or re-pushed has the same key), the kernel files' digests,
where the modules are installed and the format of the indexes generated for them
(``depmod.FORMAT``: the files depmod would write come from the modules' bytes alone),
every injected path as (dest, kind, mode, owner, sha256), the size policy, the
epoch used for timestamps, and the ext4 writer's parameters and format version
(nothing of the host's tools: the writer is banger-build's own). What stays
out: the recipe's path, comments, the clock, registry hosts and mirrors,
credentials.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from banger_build import depmod, ext4
from banger_build.entries import Injected, Staged
from banger_build.inputs import modules_version
from banger_build.oci.manifest import ImageManifest
from banger_build.oci.reference import Digest
from banger_build.recipe import Recipe

#: Bump when the meaning of a derivation field changes.
DERIVATION_FORMAT = 3
#: Bump when the builder would write different bytes for the same derivation.
OUTPUT_FORMAT = 4
#: Characters of the key used in store paths (128 bits).
KEY_CHARS = 32


@dataclass(frozen=True)
class Derivation:
    data: dict[str, Any]

    def canonical(self) -> bytes:
        return canonical_json(self.data)

    @property
    def key(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()[:KEY_CHARS]

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def epoch(self) -> int:
        return int(self.data["epoch"])


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def derive(
    recipe: Recipe,
    manifest: ImageManifest,
    *,
    diff_ids: Sequence[Digest],
    injected: tuple[Injected, ...],
    kernel: tuple[Staged, ...],
    epoch: int,
    kernel_version: str | None = None,
) -> Derivation:
    """``kernel_version``: the modules version a ``[kernel] ref`` artifact declares."""
    return Derivation(
        {
            "format": DERIVATION_FORMAT,
            "output_format": OUTPUT_FORMAT,
            "name": recipe.name,
            "platform": str(recipe.platform),
            # the image by its content: how its layers were compressed or pushed
            # does not change the key (the manifest digest is in manifest.json)
            "image": {
                "config": str(manifest.config.digest),
                "diff_ids": [str(d) for d in diff_ids],
            },
            "kernel": {k.name: {"sha256": k.sha256, "size": k.size} for k in kernel},
            **_modules_install(recipe, kernel, kernel_version),
            "files": [i.as_dict() for i in injected],
            "size": recipe.size.text,
            "epoch": epoch,
            "ext4": ext4.PARAMS,
        }
    )


def _modules_install(
    recipe: Recipe, kernel: tuple[Staged, ...], artifact_version: str | None
) -> dict[str, Any]:
    """Where the kernel's modules go in the image, when the recipe installs them, and
    the format of the indexes generated for them (``depmod.FORMAT``)."""
    k = recipe.kernel
    if k is None or not k.install_modules:
        return {}
    if k.ref is not None:
        if not artifact_version:
            return {}  # resolve_kernel_artifact refuses this before deriving
        version = artifact_version
    else:
        tree = next((s.source for s in kernel if s.name == "modules"), None)
        if tree is None:
            return {}
        version = modules_version(tree)  # the tree resolve_kernel found
    return {"modules_install": f"/lib/modules/{version}", "modules_index": depmod.FORMAT}
