"""Substitution on the real ``docker-registry``: a store path pushed and signed by one
home is taken by another instead of being built, only when every byte checks out."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from banger_build.cli import main
from banger_build.oci import rootfs
from tests.support.e2e import run_cli, write_recipe
from tests.support.oci import Pusher, canonical
from tests.support.registry import RegistryServer


@pytest.fixture(autouse=True)
def no_user_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never read the real ~/.docker/config.json or ~/.config/banger-build."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path_factory.mktemp("docker")))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    for name in ("BANGER_BUILD_SUBSTITUTERS", "BANGER_BUILD_TRUSTED_KEYS"):
        monkeypatch.delenv(name, raising=False)


def _key(tmp_path: Path, name: str) -> tuple[Path, str]:
    secret = tmp_path / f"{name}.key"
    assert main(["key", "generate", name, "-o", str(secret)]) == 0
    return secret, (tmp_path / f"{name}.key.pub").read_text().strip()


def _events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Published:
    """One home built and pushed (signed) the recipe: what another home may take."""

    def __init__(self, tmp_path: Path, image_ref: str, registry: RegistryServer) -> None:
        self.recipe = write_recipe(tmp_path / "r", image_ref)
        self.secret, self.public = _key(tmp_path, "ci-1")
        self.cache = f"{registry.host}/cache/{tmp_path.name[:30].lower().strip('-_.')}"
        code, out, err = run_cli(
            tmp_path / "builder", str(self.recipe), "--no-link", "--push", self.cache,
            "--sign-key", str(self.secret),
        )  # fmt: skip
        assert code == 0, err
        self.path = Path(out.splitlines()[0])
        self.key = self.path.name.split("-")[0]
        self.registry = registry


@pytest.fixture
def published(tmp_path: Path, image_ref: str, registry: RegistryServer) -> Published:
    return Published(tmp_path, image_ref, registry)


def test_an_empty_home_takes_the_signed_path_instead_of_building(
    tmp_path: Path, published: Published
) -> None:
    home = tmp_path / "taker"
    code, out, err = run_cli(
        home, str(published.recipe), "--json", "--no-link",
        "--substituter", published.cache, "--trusted-key", published.public,
    )  # fmt: skip
    assert code == 0, err
    events = _events(out)
    (result,) = [e for e in events if e["event"] == "result"]
    assert result["status"] == "substituted"
    taken = Path(result["path"])
    assert taken.name == published.path.name  # the same store path
    for output in published.path.iterdir():  # every output bit for bit
        assert _sha(taken / output.name) == _sha(output)
    timings = {e["step"] for e in events if e["event"] == "timing"}
    assert "make filesystem" not in timings and "pull layers" not in timings
    built = json.loads((published.path / "manifest.json").read_text())
    for layer in built["image"]["layers"]:  # no layer of the base image
        assert not (home / "blobs" / "sha256" / layer["digest"].split(":")[1]).exists()
    meta = json.loads((home / "meta" / f"{taken.name}.json").read_text())
    assert meta["substituted"]["signer"] == "ci-1"
    assert main(["verify", str(taken), "--home", str(home), "--trusted-key", published.public]) == 0
    code, out, _ = run_cli(home, "ls", "--json")
    assert code == 0 and taken.name in out


def test_an_untrusted_or_unsigned_path_is_built_here_instead(
    tmp_path: Path, published: Published
) -> None:
    _, stranger = _key(tmp_path, "stranger")
    home = tmp_path / "taker"
    code, out, err = run_cli(
        home, str(published.recipe), "--json", "--no-link",
        "--substituter", published.cache, "--trusted-key", stranger,
    )  # fmt: skip
    assert code == 0, err
    (result,) = [e for e in _events(out) if e["event"] == "result"]
    assert result["status"] == "built"  # and identical: the build is reproducible
    assert _sha(Path(result["path"]) / "rootfs.ext4") == _sha(published.path / "rootfs.ext4")
    notices = [e["message"] for e in _events(out) if e["event"] == "notice"]
    assert any("not signed by a trusted key" in n for n in notices)
    # --no-build: nothing trusted to take, nothing may be built
    code, _, err = run_cli(
        tmp_path / "other", str(published.recipe), "--no-link", "--no-build",
        "--substituter", published.cache,
    )  # fmt: skip
    assert code == 1 and "--no-build" in err


def test_accept_unsigned_takes_an_unsigned_path(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    cache = f"{registry.host}/cache/unsigned"
    code, out, err = run_cli(tmp_path / "a", str(recipe), "--no-link", "--push", cache)
    assert code == 0, err
    code, out, err = run_cli(
        tmp_path / "b", str(recipe), "--json", "--no-link", "--substituter", cache,
        "--accept-unsigned",
    )  # fmt: skip
    (result,) = [e for e in _events(out) if e["event"] == "result"]
    assert code == 0 and result["status"] == "substituted", err


def _manifest(published: Published, pusher: Pusher) -> tuple[dict[str, Any], str]:
    data = pusher.request("GET", f"/v2/{pusher.repo}/manifests/{rootfs.key_tag(published.key)}",
                          headers={"Accept": rootfs.OCI_MANIFEST}).content  # fmt: skip
    return json.loads(data), "sha256:" + hashlib.sha256(data).hexdigest()


def test_tampered_artifacts_are_refused_and_nothing_enters_the_store(
    tmp_path: Path, published: Published, registry: RegistryServer
) -> None:
    pusher = Pusher(registry.url, published.cache.partition("/")[2])
    body, _ = _manifest(published, pusher)
    tag = rootfs.key_tag(published.key)

    def attempt(name: str, *extra: str) -> tuple[int, str, str]:
        home = tmp_path / name
        code, out, err = run_cli(
            home, str(published.recipe), "--no-link", "--no-build",
            "--substituter", published.cache, "--trusted-key", published.public, *extra,
        )  # fmt: skip
        assert code == 1 and list((home / "store").iterdir()) == []
        return code, out, err

    # 1. a flipped byte in the bundle, with a manifest that names the flipped blob: the
    # signature (of the original artifact) does not cover this manifest
    bundle = body["layers"][0]
    original = pusher.request("GET", f"/v2/{pusher.repo}/blobs/{bundle['digest']}").content
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    forged = dict(body, layers=[dict(bundle, **pusher.push_blob(bytes(flipped)))])
    pusher.push_manifest(tag, canonical(forged), rootfs.OCI_MANIFEST)
    _, _, err = attempt("flipped")
    assert "not signed by a trusted key" in err
    # ...and even accepted unsigned, the bytes do not check out
    _, _, err = attempt("flipped-unsigned", "--accept-unsigned")
    assert "bundle" in err or "zstd" in err or "sha256" in err

    # 2. another key's artifact re-tagged sk-<key>
    other = dict(body, annotations=dict(body["annotations"], **{rootfs.KEY: "0" * 32}))
    pusher.push_manifest(tag, canonical(other), rootfs.OCI_MANIFEST)
    _, _, err = attempt("retagged", "--accept-unsigned")
    assert f"not {published.key}" in err

    # 3. an extra member in the bundle
    import io
    import tarfile

    import zstandard

    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(original)).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
        extra = tarfile.TarInfo("evil")
        extra.size = 4
        tar.addfile(extra, io.BytesIO(b"evil"))
    blob = zstandard.ZstdCompressor().compress(out.getvalue())
    forged = dict(body, layers=[dict(bundle, **pusher.push_blob(blob))])
    pusher.push_manifest(tag, canonical(forged), rootfs.OCI_MANIFEST)
    _, _, err = attempt("extra", "--accept-unsigned")
    assert "extra member" in err


def test_an_unreachable_substituter_costs_little_and_the_build_goes_on(
    tmp_path: Path, image_ref: str
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = write_recipe(tmp_path / "r", image_ref)
    t0 = time.monotonic()
    code, out, err = run_cli(
        tmp_path / "home", str(recipe), "--json", "--no-link",
        "--substituter", f"127.0.0.1:{port}/cache", "--substituter", "10.255.255.1:5000/cache",
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert code == 0, err
    events = _events(out)
    (result,) = [e for e in events if e["event"] == "result"]
    assert result["status"] == "built"
    skipped = [e["message"] for e in events if e["event"] == "notice" and "skipped" in e["message"]]
    assert len(skipped) == 2
    probe = [e for e in events if e["event"] == "timing" and e["step"] == "substitute"]
    assert probe and probe[0]["seconds"] < 2.0, probe
    assert elapsed < 60
