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
from pathlib import Path

import pytest

from tests.support.e2e import BASE, UPPER, push, run_cli, write_recipe
from tests.support.registry import RegistryServer

#: where to flip a byte of the first layer's gzip blob: its header's MTIME field
#: (inflate never reads it) or the middle of the deflate stream (inflate fails)
DAMAGE = {"header": 5, "stream": None}


def _first_layer(home: Path, store_path: Path) -> Path:
    manifest = json.loads((store_path / "manifest.json").read_text())
    digest = manifest["image"]["layers"][0]["digest"].removeprefix("sha256:")
    return home / "blobs" / "sha256" / digest


def _damage(blob: Path, where: int | None) -> None:
    data = bytearray(blob.read_bytes())
    at = len(data) // 2 if where is None else where
    data[at] ^= 0x5A
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))


@pytest.mark.parametrize("where", DAMAGE)
def test_a_damaged_cached_layer_is_fetched_again(tmp_path: Path, where: str) -> None:
    with RegistryServer() as server:
        pushed = push(server, "cache/damaged", [BASE, UPPER])
        recipe = write_recipe(tmp_path / "r", f"{server.host}/cache/damaged:v1")
        code, out, err = run_cli(tmp_path / "first", str(recipe), "--no-link")
        assert code == 0, err
        first = Path(out.strip())
        # a second home with the first one's blobs, one of them damaged (same size)
        home = tmp_path / "second"
        shutil.copytree(tmp_path / "first" / "blobs", home / "blobs")
        blob = _first_layer(home, first)
        good = blob.read_bytes()
        _damage(blob, DAMAGE[where])
        code, out, err = run_cli(home, str(recipe), "--no-link")
        assert code == 0, err
        assert "was damaged: fetching it again" in err, err
        second = Path(out.strip())
        assert second.name == first.name
        assert (second / "rootfs.ext4").read_bytes() == (first / "rootfs.ext4").read_bytes()
        assert blob.read_bytes() == good  # the cache holds the registry's bytes again
        assert hashlib.sha256(good).hexdigest() == blob.name
        assert pushed.layer_digests[0] == f"sha256:{blob.name}"


@pytest.mark.parametrize("where", DAMAGE)
def test_offline_a_damaged_cached_layer_fails_the_build_naming_it(
    tmp_path: Path, where: str
) -> None:
    with RegistryServer() as server:
        push(server, "cache/offline", [BASE, UPPER])
        recipe = write_recipe(tmp_path / "r", f"{server.host}/cache/offline:v1")
        code, out, err = run_cli(tmp_path / "first", str(recipe), "--no-link")
        assert code == 0, err
        first = Path(out.strip())
    home = tmp_path / "second"
    shutil.copytree(tmp_path / "first" / "blobs", home / "blobs")
    blob = _first_layer(home, first)
    _damage(blob, DAMAGE[where])
    code, out, err = run_cli(home, str(recipe), "--no-link", "--offline")
    assert code != 0 and out == ""
    assert f"sha256:{blob.name}" in err, err
    errors = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(errors) == 1 and "--offline" in errors[0], err
    assert not blob.exists()  # removed from the cache, never handed out again
    assert not (home / "store").exists() or list((home / "store").iterdir()) == []
