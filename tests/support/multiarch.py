"""The amd64 and arm64 Debian test images behind one multi-arch OCI index.

Fixture ``multiarch_debian`` (session): the amd64 test image
(``tests.support.debian``) and the arm64 one (``tests.support.debian_arm64``)
are pushed by digest to the session registry, then one OCI image index naming
both (platforms ``linux/amd64`` and ``linux/arm64/v8``) is tagged
``library/debian:bookworm-multiarch``: ``docker.io/library/debian:bookworm-multiarch``
through ``--mirror docker.io=<registry.url>``. The manifests keep their layout
bytes, so their digests are the layouts' own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import debian, debian_arm64

REPO, TAG = debian.REPO, "bookworm-multiarch"
REFERENCE = f"docker.io/{REPO}:{TAG}"
AMD64, ARM64 = "linux/amd64", debian_arm64.PLATFORM


@dataclass(frozen=True)
class MultiArchDebian:
    registry: Any  # tests.support.registry's server object (.url, .host)
    index_digest: str
    manifests: dict[str, str]  # AMD64 and ARM64 -> manifest digest
    layouts: dict[str, Path]  # the same keys -> OCI layout
    reference: str = REFERENCE

    @property
    def mirror(self) -> str:
        """The value for ``--mirror``: ``docker.io=http://127.0.0.1:PORT``."""
        return f"docker.io={self.registry.url}"


def layout_entry(layout: Path) -> dict[str, Any]:
    """The one manifest descriptor of a single-image layout."""
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    return dict(entry)


def push_multiarch(registry_url: str, layouts: dict[str, Path]) -> tuple[str, dict[str, str]]:
    """Push each single-image layout by digest, then an index of them (in the
    order given) tagged ``TAG``; return (index digest, platform -> manifest digest)."""
    from tests.support.oci import OCI_INDEX, Pusher, _push_layout_manifest

    pusher = Pusher(registry_url, REPO)
    entries, digests = [], {}
    for platform, layout in layouts.items():
        desc = layout_entry(layout)
        os_, arch, *variant = platform.split("/")
        entry: dict[str, Any] = {
            "mediaType": desc["mediaType"],
            "digest": desc["digest"],
            "size": desc["size"],
            "platform": {"architecture": arch, "os": os_},
        }
        if variant:
            entry["platform"]["variant"] = variant[0]
        _push_layout_manifest(pusher, layout, entry, 0)
        entries.append(entry)
        digests[platform] = str(entry["digest"])
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    digest = pusher.push_manifest(TAG, debian._canonical(index), OCI_INDEX)
    return digest, digests


@pytest.fixture(scope="session")
def multiarch_debian(
    registry: Any, debian_oci_layout: Path, debian_arm64_layout: Path
) -> MultiArchDebian:
    """The amd64 and arm64 Debian test images in one index: library/debian:bookworm-multiarch."""
    layouts = {AMD64: debian_oci_layout, ARM64: debian_arm64_layout}
    index_digest, manifests = push_multiarch(registry.url, layouts)
    return MultiArchDebian(registry, index_digest, manifests, layouts)
