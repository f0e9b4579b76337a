"""A cached layer blob is hashed while the layers are flattened, not before.

``pull_layers`` hands a cached blob to ``flatten_layers`` unhashed, and a
thread hashes it meanwhile (flatten checks the uncompressed bytes against the
diff_ids itself). A blob damaged in the cache must still never reach the
store: it is removed, fetched again, and the layers are flattened again,
whether the damage made the flatten fail (a byte of the deflate stream) or
not (a byte of the gzip header that inflate ignores); offline, the build
fails naming the blob.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.e2e import BASE, UPPER, push, run_cli, write_recipe
from tests.support.registry import RegistryServer


@dataclass(frozen=True)
class Damaged:
    recipe: Path
    first: Path  # the store path the first build made
    home: Path  # the second home, whose cached first layer is damaged
    blob: Path
    good: bytes  # the blob's bytes before the damage


#: where to flip a byte of the first layer's gzip blob: its header's MTIME field
#: (inflate never reads it) or the middle of the deflate stream (inflate fails)
DAMAGE = {"header": 5, "stream": None}


def _damaged_home(tmp: Path, server: RegistryServer, repo: str, where: str) -> Damaged:
    """A build from ``server`` into one home, then a second home holding the first
    one's blobs with the first layer's damaged in place (same size)."""
    pushed = push(server, repo, [BASE, UPPER])
    recipe = write_recipe(tmp / "r", f"{server.host}/{repo}:v1")
    code, out, err = run_cli(tmp / "first", str(recipe), "--no-link")
    assert code == 0, err
    first = Path(out.strip())
    home = tmp / "second"
    shutil.copytree(tmp / "first" / "blobs", home / "blobs")
    manifest = json.loads((first / "manifest.json").read_text())
    digest = manifest["image"]["layers"][0]["digest"]
    assert digest == pushed.layer_digests[0]
    blob = home / "blobs" / "sha256" / digest.removeprefix("sha256:")
    good = blob.read_bytes()
    data = bytearray(good)
    data[len(data) // 2 if DAMAGE[where] is None else DAMAGE[where]] ^= 0x5A
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    return Damaged(recipe, first, home, blob, good)


@pytest.mark.parametrize("where", DAMAGE)
def test_a_damaged_cached_layer_is_fetched_again(tmp_path: Path, where: str) -> None:
    with RegistryServer() as server:
        d = _damaged_home(tmp_path, server, "cache/damaged", where)
        code, out, err = run_cli(d.home, str(d.recipe), "--no-link")
    assert code == 0, err
    assert "was damaged: fetching it again" in err and "flattening the layers again" in err, err
    second = Path(out.strip())
    assert second.name == d.first.name
    assert (second / "rootfs.ext4").read_bytes() == (d.first / "rootfs.ext4").read_bytes()
    assert d.blob.read_bytes() == d.good  # the cache holds the registry's bytes again
    assert hashlib.sha256(d.good).hexdigest() == d.blob.name


@pytest.mark.parametrize("where", DAMAGE)
def test_offline_a_damaged_cached_layer_fails_the_build_naming_it(
    tmp_path: Path, where: str
) -> None:
    with RegistryServer() as server:
        d = _damaged_home(tmp_path, server, "cache/offline", where)
    code, out, err = run_cli(d.home, str(d.recipe), "--no-link", "--offline")
    assert code != 0 and out == ""
    assert f"sha256:{d.blob.name}" in err, err
    errors = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(errors) == 1 and "--offline" in errors[0], err
    assert not d.blob.exists()  # removed from the cache, never handed out again
    assert not (d.home / "store").exists() or list((d.home / "store").iterdir()) == []
