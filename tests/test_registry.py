"""The registry client against real registries (distribution 2.8) over real HTTP.

Images are pushed by ``tests.support.oci`` (raw requests, no code shared with
the client). Auth, mirrors, digest verification, caching and failure modes
are exercised end to end; a few failure modes a real registry will not
produce on demand (5xx, truncated bodies, a hung server) use a tiny scripted
HTTP server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from banger_build.errors import BangerError, InputError, RegistryError
from banger_build.oci.auth import normalise_scope, parse_challenge
from banger_build.oci.blobs import BlobCache
from banger_build.oci.manifest import Descriptor, ImageManifest
from banger_build.oci.options import RegistryOptions, options_from_env, parse_mirrors
from banger_build.oci.reference import Digest, Platform, Reference
from banger_build.oci.remote import Remote
from banger_build.oci.source import Source
from tests.support.oci import (
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Entry,
    Pusher,
    make_layer,
    push_image,
    push_layout,
    sha256,
)
from tests.support.registry import RegistryServer, free_port, write_docker_config

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")


@pytest.fixture(autouse=True)
def no_user_docker_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never read the real ~/.docker/config.json."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path_factory.mktemp("no-docker-config")))


_counter = iter(range(1_000_000))


def unique(name: str) -> str:
    """A repository name unique within the session (the session registry is shared)."""
    return f"test/{name}-{next(_counter)}-{os.getpid()}"


def small_layers() -> list[bytes]:
    return [
        make_layer([Entry.dir("etc"), Entry.file("etc/os-release", b"ID=test\n")]),
        make_layer([Entry.file("etc/hostname", b"box\n"), Entry.symlink("bin", "usr/bin")]),
    ]


def new_client(tmp_path: Path, **options: Any) -> Source:
    return Source(BlobCache(tmp_path / "blobs"), RegistryOptions(**options))


def ref_of(server: RegistryServer, repo: str, tag: str = "v1") -> Reference:
    return Reference.parse(f"{server.host}/{repo}:{tag}")


def pull_all(client: Source, ref: Reference, platform: Platform = AMD64) -> ImageManifest:
    manifest = client.manifest(ref, client.resolve(ref, platform))
    for desc in (manifest.config, *manifest.layers):
        client.blob(ref, desc)
    return manifest


def all_text(exc: BaseException) -> str:
    """str and repr of an exception and everything it was chained from."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


# ------------------------------------------------------------------ pulling


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_pull_single_manifest(registry: RegistryServer, tmp_path: Path, media: str) -> None:
    layers = small_layers()
    repo = unique(f"single-{media}")
    img = push_image(registry.url, repo, "v1", layers, media=media)
    client = new_client(tmp_path)
    ref = ref_of(registry, repo)
    digest = client.resolve(ref, AMD64)
    assert str(digest) == img.manifest_digest
    manifest = client.manifest(ref, digest)
    assert manifest.digest == digest
    assert manifest.media_type == (OCI_MANIFEST if media == "oci" else DOCKER_MANIFEST)
    assert [str(d.digest) for d in manifest.layers] == list(img.layer_digests)
    assert [d.size for d in manifest.layers] == [len(b) for b in layers]
    assert str(manifest.config.digest) == img.config_digest
    for desc, blob in zip(manifest.layers, layers, strict=True):
        assert client.blob(ref, desc).read_bytes() == blob
    config = json.loads(client.blob(ref, manifest.config).read_bytes())
    assert config["rootfs"]["diff_ids"] == img.config["rootfs"]["diff_ids"]
    # the manifest bytes are cached exactly as served (they are a blob by digest)
    assert client.cache.path(digest).read_bytes() == img.manifest_bytes


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_index_selects_platform(registry: RegistryServer, tmp_path: Path, media: str) -> None:
    repo = unique(f"multi-{media}")
    img = push_image(
        registry.url,
        repo,
        "v1",
        small_layers(),
        media=media,
        platforms=["linux/amd64", "linux/arm64/v8", "linux/arm/v7"],
    )
    assert img.index_digest is not None
    client = new_client(tmp_path)
    ref = ref_of(registry, repo)
    assert str(client.resolve(ref, AMD64)) == img.manifests["linux/amd64"]
    assert str(client.resolve(ref, ARM64)) == img.manifests["linux/arm64/v8"]
    assert (
        str(client.resolve(ref, Platform.parse("linux/arm64/v8")))
        == img.manifests["linux/arm64/v8"]
    )
    assert str(client.resolve(ref, Platform.parse("linux/arm/v7"))) == img.manifests["linux/arm/v7"]
    # the index itself was stored in the cache too
    assert client.cache.get(Digest.parse(img.index_digest)) is not None
    manifest = pull_all(client, ref, ARM64)
    config = json.loads(client.blob(ref, manifest.config).read_bytes())
    assert (config["os"], config["architecture"]) == ("linux", "arm64")


def test_missing_platform(registry: RegistryServer, tmp_path: Path) -> None:
    repo = unique("noplat")
    push_image(
        registry.url, repo, "v1", small_layers(), platforms=["linux/amd64", "linux/arm64/v8"]
    )
    with pytest.raises(RegistryError) as info:
        new_client(tmp_path).resolve(ref_of(registry, repo), Platform.parse("linux/s390x"))
    assert info.value.reason == "no-platform"
    assert "linux/s390x" in str(info.value)
    assert "linux/amd64" in str(info.value) and "linux/arm64/v8" in str(info.value)


def test_resolve_pinned_digest_and_index_digest(registry: RegistryServer, tmp_path: Path) -> None:
    repo = unique("pinned")
    img = push_image(registry.url, repo, "v1", small_layers(), platforms=["linux/amd64"])
    client = new_client(tmp_path)
    by_index = Reference.parse(f"{registry.host}/{repo}@{img.index_digest}")
    assert str(client.resolve(by_index, AMD64)) == img.manifest_digest
    by_manifest = Reference.parse(f"{registry.host}/{repo}@{img.manifest_digest}")
    assert str(client.resolve(by_manifest, AMD64)) == img.manifest_digest
    # an index is not an image manifest
    with pytest.raises(RegistryError) as info:
        client.manifest(by_index, Digest.parse(str(img.index_digest)))
    assert info.value.reason == "unsupported-media-type"


@pytest.mark.parametrize(
    "compression,media_type",
    [("gzip", OCI_LAYER_GZIP), ("zstd", OCI_LAYER_ZSTD), ("none", OCI_LAYER_TAR)],
)
def test_layer_compressions(
    registry: RegistryServer, tmp_path: Path, compression: str, media_type: str
) -> None:
    layer = make_layer(
        [Entry.dir("opt"), Entry.file("opt/data", os.urandom(3000), mode=0o600)], compression
    )
    repo = unique(f"comp-{compression}")
    push_image(registry.url, repo, "v1", [layer])
    client = new_client(tmp_path)
    ref = ref_of(registry, repo)
    manifest = pull_all(client, ref)
    assert [d.media_type for d in manifest.layers] == [media_type]
    path = client.blob(ref, manifest.layers[0])
    assert path.read_bytes() == layer
    assert path == client.cache.path(Digest.parse(sha256(layer)))


def test_docker_layer_media_type(registry: RegistryServer, tmp_path: Path) -> None:
    repo = unique("dockerlayer")
    push_image(registry.url, repo, "v1", small_layers(), media="docker")
    manifest = pull_all(new_client(tmp_path), ref_of(registry, repo))
    assert {d.media_type for d in manifest.layers} == {DOCKER_LAYER_GZIP}


def test_unsupported_layer_media_type(registry: RegistryServer, tmp_path: Path) -> None:
    repo = unique("helm")
    push_image(
        registry.url,
        repo,
        "v1",
        small_layers(),
        layer_media_types=["application/vnd.cncf.helm.chart.content.v1.tar+gzip", OCI_LAYER_GZIP],
    )
    with pytest.raises(RegistryError) as info:
        new_client(tmp_path).resolve(ref_of(registry, repo), AMD64)
    assert info.value.reason == "unsupported-media-type"
    assert "helm" in str(info.value)


def test_unsupported_config_media_type(registry: RegistryServer, tmp_path: Path) -> None:
    repo = unique("artifact")
    pusher = Pusher(registry.url, repo)
    config = pusher.push_blob(b"{}")
    layer = make_layer([Entry.file("a")])
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.artifact.config+json", **config},
        "layers": [{"mediaType": OCI_LAYER_GZIP, **pusher.push_blob(layer)}],
    }
    data = json.dumps(manifest).encode()
    digest = pusher.push_manifest("v1", data, OCI_MANIFEST)
    client = new_client(tmp_path)
    with pytest.raises(RegistryError) as info:
        client.manifest(ref_of(registry, repo), Digest.parse(digest))
    assert info.value.reason == "unsupported-media-type"


def test_schema1_is_rejected(tmp_path: Path) -> None:
    """Schema 1 (no registry here can serve it any more): parsed from the cache."""
    schema1 = json.dumps(
        {
            "schemaVersion": 1,
            "name": "library/old",
            "tag": "latest",
            "architecture": "amd64",
            "fsLayers": [{"blobSum": "sha256:" + "a" * 64}],
            "history": [{"v1Compatibility": "{}"}],
        }
    ).encode()
    client = new_client(tmp_path)
    digest = Digest(hashlib.sha256(schema1).hexdigest())
    client.cache.put_bytes(digest, schema1)
    ref = Reference.parse("registry.invalid/library/old:latest")
    with pytest.raises(RegistryError) as info:
        client.manifest(ref, digest)
    assert info.value.reason == "unsupported-media-type"
    assert "schema 1" in str(info.value)


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"not json", "invalid-manifest"),
        (b"[1, 2]", "invalid-manifest"),
        (
            json.dumps(
                {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}
            ).encode(),
            "invalid-manifest",
        ),
        (
            json.dumps({"schemaVersion": 2, "mediaType": "application/x-unknown"}).encode(),
            "unsupported-media-type",
        ),
    ],
)
def test_malformed_manifests(tmp_path: Path, body: bytes, reason: str) -> None:
    client = new_client(tmp_path)
    digest = Digest(hashlib.sha256(body).hexdigest())
    client.cache.put_bytes(digest, body)
    with pytest.raises(RegistryError) as info:
        client.manifest(Reference.parse("registry.invalid/x/y:z"), digest)
    assert info.value.reason == reason


def test_push_layout(registry: RegistryServer, tmp_path: Path) -> None:
    """An OCI image layout (as the Debian fixture writes one) pushed as-is."""
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        d = sha256(data)
        (layout / "blobs" / "sha256" / d.split(":")[1]).write_bytes(data)
        return {"digest": d, "size": len(data)}

    layer = make_layer([Entry.file("hello", b"world")])
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {
            "type": "layers",
            "diff_ids": [sha256(make_layer([Entry.file("hello", b"world")], "none"))],
        },
    }
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                **put(json.dumps(config).encode()),
            },
            "layers": [{"mediaType": OCI_LAYER_GZIP, **put(layer)}],
        }
    ).encode()
    mdesc = {
        "mediaType": OCI_MANIFEST,
        **put(manifest),
        "platform": {"architecture": "amd64", "os": "linux"},
    }
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [mdesc],
            }
        )
    )
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    repo = unique("layout")
    assert push_layout(registry.url, repo, "v1", layout) == mdesc["digest"]
    client = new_client(tmp_path)
    ref = ref_of(registry, repo)
    assert str(client.resolve(ref, AMD64)) == mdesc["digest"]
    got = pull_all(client, ref)
    assert client.blob(ref, got.layers[0]).read_bytes() == layer


# --------------------------------------------------------------- verification


def test_tampered_manifest(registry_factory: Callable[..., RegistryServer], tmp_path: Path) -> None:
    server = registry_factory()
    img = push_image(server.url, "tamper/m", "v1", small_layers(), annotations={"note": "aaaaaaaa"})
    data_path = server.blob_data_path(img.manifest_digest)
    data = data_path.read_bytes()
    assert b"aaaaaaaa" in data
    data_path.write_bytes(data.replace(b"aaaaaaaa", b"bbbbbbbb"))  # same length, valid JSON
    client = new_client(tmp_path)
    for ref in (
        ref_of(server, "tamper/m"),
        Reference.parse(f"{server.host}/tamper/m@{img.manifest_digest}"),
    ):
        with pytest.raises(RegistryError) as info:
            client.resolve(ref, AMD64)
        assert info.value.reason == "digest-mismatch", str(info.value)
        assert img.manifest_digest in str(info.value)
    with pytest.raises(RegistryError) as info:
        client.manifest(ref_of(server, "tamper/m"), Digest.parse(img.manifest_digest))
    assert info.value.reason == "digest-mismatch"
    assert client.cache.get(Digest.parse(img.manifest_digest)) is None


def test_tampered_blob(registry_factory: Callable[..., RegistryServer], tmp_path: Path) -> None:
    server = registry_factory()
    layers = small_layers()
    img = push_image(server.url, "tamper/b", "v1", layers)
    client = new_client(tmp_path)
    ref = ref_of(server, "tamper/b")
    manifest = client.manifest(ref, client.resolve(ref, AMD64))
    path = server.blob_data_path(img.layer_digests[0])
    evil = bytearray(path.read_bytes())
    evil[len(evil) // 2] ^= 0xFF
    path.write_bytes(bytes(evil))
    with pytest.raises(RegistryError) as info:
        client.blob(ref, manifest.layers[0])
    assert info.value.reason == "digest-mismatch"
    assert img.layer_digests[0] in str(info.value)
    assert not client.cache.path(manifest.layers[0].digest).exists()
    assert list(client.cache.tmp.iterdir()) == []
    # A blob whose size disagrees with the manifest is refused as well.
    wrong = Descriptor(OCI_LAYER_GZIP, manifest.layers[1].digest, manifest.layers[1].size + 7)
    with pytest.raises(RegistryError) as info:
        client.blob(ref, wrong)
    assert info.value.reason == "digest-mismatch"


@pytest.mark.parametrize("damage", ["empty", "corrupt"])
def test_damaged_cache_entry_is_fetched_again(
    registry: RegistryServer, tmp_path: Path, damage: str
) -> None:
    repo = unique("refetch")
    layers = small_layers()
    push_image(registry.url, repo, "v1", layers)
    ref = ref_of(registry, repo)
    manifest = pull_all(new_client(tmp_path), ref)
    path = BlobCache(tmp_path / "blobs").path(manifest.layers[0].digest)
    path.write_bytes(b"" if damage == "empty" else b"\0" * len(layers[0]))
    client = new_client(tmp_path)
    assert client.blob(ref, manifest.layers[0]).read_bytes() == layers[0]


def test_cache_hit_needs_no_network(
    registry_factory: Callable[..., RegistryServer], tmp_path: Path
) -> None:
    server = registry_factory()
    img = push_image(
        server.url, "cached/img", "v1", small_layers(), platforms=["linux/amd64", "linux/arm64/v8"]
    )
    ref = ref_of(server, "cached/img")
    manifest = pull_all(new_client(tmp_path), ref)
    server.stop()
    client = new_client(tmp_path)
    again = client.manifest(ref, Digest.parse(img.manifest_digest))
    assert again == manifest
    for desc in (again.config, *again.layers):
        assert client.blob(ref, desc).is_file()
    # a pinned reference resolves from the cache (index and manifest cached)
    pinned = Reference.parse(f"{server.host}/cached/img@{img.index_digest}")
    assert str(client.resolve(pinned, AMD64)) == img.manifest_digest
    # a tag needs the registry
    with pytest.raises(RegistryError) as info:
        client.resolve(ref, AMD64)
    assert info.value.reason == "unreachable"


# -------------------------------------------------------------------- auth


def test_basic_auth_with_docker_config(
    basic_registry: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = (basic_registry.username, basic_registry.password)
    img = push_image(basic_registry.url, "private/app", "v1", small_layers(), auth=auth)
    ref = ref_of(basic_registry, "private/app")
    # explicit config file, inline base64 auth
    config = write_docker_config(tmp_path / "explicit", {basic_registry.host: auth})
    manifest = pull_all(new_client(tmp_path / "a", docker_config=config), ref)
    assert str(manifest.digest) == img.manifest_digest
    # $DOCKER_CONFIG, username/password fields, URL-style key
    config_dir = tmp_path / "env"
    write_docker_config(config_dir, {f"http://{basic_registry.host}": auth}, inline_auth=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    assert pull_all(new_client(tmp_path / "b"), ref) == manifest


def test_basic_auth_without_credentials(basic_registry: RegistryServer, tmp_path: Path) -> None:
    ref = ref_of(basic_registry, "private/none")
    with pytest.raises(RegistryError) as info:
        new_client(tmp_path).resolve(ref, AMD64)
    assert info.value.status == 401
    assert info.value.reason == "auth"
    assert "no credentials" in str(info.value)


def test_basic_auth_wrong_password(basic_registry: RegistryServer, tmp_path: Path) -> None:
    secret = "wr0ng-Secret-Value"
    config = write_docker_config(tmp_path, {basic_registry.host: ("tester", secret)})
    client = new_client(tmp_path, docker_config=config)
    with pytest.raises(RegistryError) as info:
        client.resolve(ref_of(basic_registry, "private/app"), AMD64)
    assert info.value.status == 401
    assert info.value.reason == "auth"
    assert "HTTP 401" in str(info.value)
    assert secret not in all_text(info.value)
    assert secret not in repr(client) and secret not in repr(
        client.remote._auth.creds.get(basic_registry.host)
    )


def test_token_auth_scopes_per_repository_and_push_after_pull(
    token_registry: RegistryServer, tmp_path: Path
) -> None:
    auth = (token_registry.username, token_registry.password)
    imgs = {
        r: push_image(
            token_registry.url,
            f"team/{r}",
            "v1",
            [make_layer([Entry.file(r, r.encode() * 100)])],
            auth=auth,
        )
        for r in ("alpha", "beta")
    }
    tokens = token_registry.token_server
    assert tokens is not None
    tokens.clear()
    config = write_docker_config(tmp_path, {token_registry.host: auth})
    client = new_client(tmp_path, docker_config=config)
    pulled = {}
    for r, img in imgs.items():
        ref = ref_of(token_registry, f"team/{r}")
        pulled[r] = pull_all(client, ref)
        assert str(pulled[r].digest) == img.manifest_digest
    # push after pull: alpha's image into beta under a new tag
    target = ref_of(token_registry, "team/beta", "copied")
    source = ref_of(token_registry, "team/alpha")
    m = pulled["alpha"]
    for desc in (m.config, *m.layers):
        client.remote.push_blob(target, client.blob(source, desc), desc.digest, desc.size)
    data = client.cache.path(m.digest).read_bytes()
    assert client.remote.push_manifest(target, data, m.media_type) == m.digest
    # one token per scope, each fetched once despite many requests
    assert sorted(tokens.scopes) == [
        "repository:team/alpha:pull",
        "repository:team/beta:pull",
        "repository:team/beta:pull,push",
    ]
    assert all(r.username == "tester" for r in tokens.requests)
    # independently confirm the push
    check = Pusher(token_registry.url, "team/beta", auth)
    resp = check.request("GET", "/v2/team/beta/manifests/copied", headers={"Accept": OCI_MANIFEST})
    assert sha256(resp.content) == str(m.digest)


def test_token_auth_anonymous_pull(
    registry_factory: Callable[..., RegistryServer], tmp_path: Path
) -> None:
    server = registry_factory("token", anonymous_pull=True)
    push_image(server.url, "pub/img", "v1", small_layers(), auth=(server.username, server.password))
    pull_all(new_client(tmp_path), ref_of(server, "pub/img"))
    assert server.token_server is not None
    assert [r.username for r in server.token_server.requests][-1] is None


def test_token_auth_wrong_password(token_registry: RegistryServer, tmp_path: Path) -> None:
    secret = "not-The-Password-42"
    config = write_docker_config(tmp_path, {token_registry.host: ("tester", secret)})
    with pytest.raises(RegistryError) as info:
        new_client(tmp_path, docker_config=config).resolve(
            ref_of(token_registry, "team/alpha"), AMD64
        )
    assert info.value.status == 401
    assert info.value.reason == "auth"
    assert secret not in all_text(info.value)


def test_docker_hub_credentials_key(tmp_path: Path) -> None:
    config = write_docker_config(tmp_path, {"https://index.docker.io/v1/": ("hubuser", "pw")})
    client = new_client(tmp_path, docker_config=config)
    creds = client.remote._auth.creds.get("docker.io")
    assert creds is not None and creds.username == "hubuser"
    assert "pw" not in repr(creds)


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push",error="insufficient_scope"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
        "error": "insufficient_scope",
    }
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})
    assert normalise_scope("repository:a/b:push,pull registry:catalog:*") == (
        "repository:a/b:pull,push registry:catalog:*"
    )


# ------------------------------------------------------------------- errors


def test_not_found_names_reference_and_status(registry: RegistryServer, tmp_path: Path) -> None:
    ref = ref_of(registry, unique("missing"), "nope")
    with pytest.raises(RegistryError) as info:
        new_client(tmp_path).resolve(ref, AMD64)
    err = info.value
    assert err.status == 404 and err.reason == "not-found"
    assert err.reference == str(ref)
    assert str(ref) in str(err) and "HTTP 404" in str(err)
    assert "MANIFEST_UNKNOWN" in str(err) or "NAME_UNKNOWN" in str(err)
    assert isinstance(err, BangerError)


def test_missing_blob(registry: RegistryServer, tmp_path: Path) -> None:
    repo = unique("noblob")
    push_image(registry.url, repo, "v1", small_layers())
    ghost = Descriptor(OCI_LAYER_GZIP, Digest("0" * 64), 10)
    with pytest.raises(RegistryError) as info:
        new_client(tmp_path).blob(ref_of(registry, repo), ghost)
    assert (info.value.status, info.value.reason) == (404, "not-found")


def test_connection_refused_fails_fast(tmp_path: Path) -> None:
    port = free_port()
    ref = Reference.parse(f"127.0.0.1:{port}/some/image:v1")
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        new_client(tmp_path).resolve(ref, AMD64)
    assert time.monotonic() - start < 5
    assert info.value.reason == "unreachable"
    assert "refused" in str(info.value).lower()


# ------------------------------------------------------------------- mirrors


def test_docker_io_mirror(registry: RegistryServer, tmp_path: Path) -> None:
    name = unique("hubimg").replace("test/", "")
    img = push_image(registry.url, f"library/{name}", "stable", small_layers())
    client = new_client(tmp_path, mirrors={"docker.io": (registry.url,)})
    ref = Reference.parse(f"{name}:stable")
    assert str(ref) == f"docker.io/library/{name}:stable"
    assert client.remote.endpoint_urls(ref) == [registry.url, "https://registry-1.docker.io"]
    assert str(client.resolve(ref, AMD64)) == img.manifest_digest
    pull_all(client, ref)


def test_mirror_fallback_in_order(registry: RegistryServer, tmp_path: Path) -> None:
    repo = unique("fallback")
    img = push_image(registry.url, repo, "v1", small_layers())
    dead = f"http://127.0.0.1:{free_port()}"
    upstream_host = f"127.0.0.1:{free_port()}"  # also dead: the mirror must serve it
    client = new_client(tmp_path, mirrors={upstream_host: (dead, registry.url)})
    ref = Reference.parse(f"{upstream_host}/{repo}:v1")
    assert str(client.resolve(ref, AMD64)) == img.manifest_digest


def test_every_endpoint_failing_names_them_all(tmp_path: Path) -> None:
    dead1, dead2 = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    upstream = f"127.0.0.1:{free_port()}"
    client = new_client(tmp_path, mirrors={upstream: (dead1, dead2)}, retries=1)
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        client.resolve(Reference.parse(f"{upstream}/x/y:v1"), AMD64)
    assert time.monotonic() - start < 5
    text = str(info.value)
    for base in (dead1, dead2, f"http://{upstream}"):
        assert base in text
    assert info.value.reason == "unreachable"


def test_non_loopback_http_mirror_refused(tmp_path: Path) -> None:
    client = new_client(tmp_path, mirrors={"docker.io": ("http://192.0.2.10:5000",)})
    ref = Reference.parse("debian:bookworm")
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        client.resolve(ref, AMD64)
    assert time.monotonic() - start < 1  # refused before any connection
    assert info.value.reason == "insecure"
    assert "192.0.2.10:5000" in str(info.value)
    allowed = new_client(
        tmp_path,
        mirrors={"docker.io": ("http://192.0.2.10:5000",)},
        insecure=frozenset({"192.0.2.10:5000"}),
    )
    assert allowed.remote.endpoint_urls(ref)[0] == "http://192.0.2.10:5000"


def test_upstream_urls() -> None:
    up = Remote.upstream_url
    assert up("docker.io") == "https://registry-1.docker.io"
    assert up("ghcr.io") == "https://ghcr.io"
    assert up("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert up("localhost:5000") == "http://localhost:5000"
    assert up("[::1]:5000") == "http://[::1]:5000"
    assert up("registry.lan:5000") == "https://registry.lan:5000"
    assert up("registry.lan:5000", frozenset({"registry.lan:5000"})) == "http://registry.lan:5000"
    assert up("registry.lan:5000", frozenset({"registry.lan"})) == "http://registry.lan:5000"


def test_parse_mirrors() -> None:
    assert parse_mirrors(
        [
            "docker.io=http://127.0.0.1:5000",
            "docker.io=https://mirror.example/",
            "ghcr.io=https://m.example",
        ]
    ) == {
        "docker.io": ("http://127.0.0.1:5000", "https://mirror.example"),
        "ghcr.io": ("https://m.example",),
    }
    assert parse_mirrors(["index.docker.io=http://localhost:5000"]) == {
        "docker.io": ("http://localhost:5000",)
    }


@pytest.mark.parametrize(
    "spec",
    [
        "docker.io",
        "=http://x",
        "docker.io=",
        "docker.io=ftp://x",
        "docker.io=127.0.0.1:5000",
        "docker.io=http://x/path",
        "bad host=http://x",
        "docker.io=http://user:hunter2@x",
    ],
)
def test_parse_mirrors_invalid(spec: str) -> None:
    with pytest.raises(InputError) as info:
        parse_mirrors([spec])
    assert info.value.reason == "mirror-invalid"
    assert "hunter2" not in str(info.value)


def test_options_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "BANGER_BUILD_MIRRORS", "docker.io=http://127.0.0.1:6000, quay.io=https://q.example"
    )
    monkeypatch.setenv("BANGER_BUILD_INSECURE_REGISTRIES", "reg.lan:5000,other.lan")
    opts = options_from_env(["docker.io=http://127.0.0.1:5000"], ["third.lan"])
    assert opts.mirrors == {
        "docker.io": ("http://127.0.0.1:5000", "http://127.0.0.1:6000"),  # CLI first
        "quay.io": ("https://q.example",),
    }
    assert opts.insecure == frozenset({"reg.lan:5000", "other.lan", "third.lan"})
    monkeypatch.setenv("BANGER_BUILD_MIRRORS", "nonsense")
    with pytest.raises(InputError):
        options_from_env([], [])


# ------------------------------------------------------------------- pushing


def test_push_blob_streams_and_skips_existing(registry: RegistryServer, tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 123)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    digest = Digest(hashlib.sha256(data).hexdigest())
    seen: list[tuple[str, int, int | None]] = []
    client = Source(
        BlobCache(tmp_path / "blobs"), RegistryOptions(), progress=lambda *a: seen.append(a)
    )
    repo = unique("pushed")
    ref = ref_of(registry, repo)
    client.remote.push_blob(ref, path, digest, len(data))
    assert seen and seen[-1][1] == len(data)
    r = requests.get(f"{registry.url}/v2/{repo}/blobs/{digest}", timeout=10)
    assert r.status_code == 200 and r.content == data
    seen.clear()
    client.remote.push_blob(ref, path, digest, len(data))
    assert seen == []  # HEAD found it: nothing uploaded
    with pytest.raises(InputError):
        client.remote.push_blob(ref, path, digest, len(data) + 1)
    # a wrong digest is refused by the registry, and reported
    with pytest.raises(RegistryError) as info:
        client.remote.push_blob(ref, path, Digest("5" * 64), len(data))
    assert info.value.status == 400 and "DIGEST_INVALID" in str(info.value)


def test_push_manifest_then_pull(registry: RegistryServer, tmp_path: Path) -> None:
    layers = small_layers()
    repo = unique("ourpush")
    ref = ref_of(registry, repo)
    client = new_client(tmp_path)
    descs = []
    for i, blob in enumerate(layers):
        p = tmp_path / f"l{i}"
        p.write_bytes(blob)
        d = Digest(hashlib.sha256(blob).hexdigest())
        client.remote.push_blob(ref, p, d, len(blob))
        descs.append({"mediaType": OCI_LAYER_GZIP, "digest": str(d), "size": len(blob)})
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    cp = tmp_path / "config"
    cp.write_bytes(config)
    cd = Digest(hashlib.sha256(config).hexdigest())
    client.remote.push_blob(ref, cp, cd, len(config))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": str(cd),
                "size": len(config),
            },
            "layers": descs,
        }
    ).encode()
    digest = client.remote.push_manifest(ref, manifest, OCI_MANIFEST)
    assert str(digest) == sha256(manifest)
    fresh = new_client(tmp_path / "fresh")
    assert fresh.resolve(ref, AMD64) == digest
    got = pull_all(fresh, ref)
    assert [str(d.digest) for d in got.layers] == [d["digest"] for d in descs]


# ------------------------------------------------- scripted failure modes


@dataclass
class Script:
    """Responses of a fake registry, by request path."""

    routes: dict[str, list[Callable[[BaseHTTPRequestHandler], None]]] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)


def reply(
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    send: bytes | None = None,
) -> Callable[[BaseHTTPRequestHandler], None]:
    """A response; ``send`` overrides the bytes actually written (to truncate)."""

    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body if send is None else send)
        h.wfile.flush()
        if send is not None:
            h.close_connection = True

    return respond


def stall(body: bytes, after: int, seconds: float) -> Callable[[BaseHTTPRequestHandler], None]:
    """Headers and ``after`` bytes of ``body``, then silence."""

    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[:after])
        h.wfile.flush()
        time.sleep(seconds)
        h.close_connection = True

    return respond


def hang(seconds: float) -> Callable[[BaseHTTPRequestHandler], None]:
    def respond(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        h.close_connection = True

    return respond


@pytest.fixture
def scripted() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            script.hits.append(self.path)
            queue = script.routes.get(self.path)
            if not queue:
                reply(404, b'{"errors":[{"code":"NOT_FOUND","message":"no route"}]}')(self)
                return
            action = queue.pop(0) if len(queue) > 1 else queue[0]
            action(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", script
    server.shutdown()
    server.server_close()


def scripted_manifest() -> tuple[bytes, Digest]:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + "1" * 64,
                "size": 2,
            },
            "layers": [],
        }
    ).encode()
    return body, Digest(hashlib.sha256(body).hexdigest())


def test_retries_server_errors(scripted: tuple[str, Script], tmp_path: Path) -> None:
    host, script = scripted
    body, digest = scripted_manifest()
    path = "/v2/x/y/manifests/v1"
    script.routes[path] = [
        reply(503, b"busy"),
        reply(429, b"slow down", {"Retry-After": "0"}),
        reply(200, body, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": str(digest)}),
    ]
    client = new_client(tmp_path)
    assert client.resolve(Reference.parse(f"{host}/x/y:v1"), AMD64) == digest
    assert script.hits.count(path) == 3


def test_persistent_server_error(scripted: tuple[str, Script], tmp_path: Path) -> None:
    host, script = scripted
    path = "/v2/x/y/manifests/v1"
    script.routes[path] = [reply(500, b'{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}')]
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        new_client(tmp_path, retries=2).resolve(Reference.parse(f"{host}/x/y:v1"), AMD64)
    assert time.monotonic() - start < 5
    assert (info.value.status, info.value.reason) == (500, "http-status")
    assert "disk on fire" in str(info.value)
    assert script.hits.count(path) == 3


def test_wrong_content_digest_header(scripted: tuple[str, Script], tmp_path: Path) -> None:
    host, script = scripted
    body, _ = scripted_manifest()
    script.routes["/v2/x/y/manifests/v1"] = [
        reply(
            200, body, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": "sha256:" + "2" * 64}
        )
    ]
    with pytest.raises(RegistryError) as info:
        new_client(tmp_path).resolve(Reference.parse(f"{host}/x/y:v1"), AMD64)
    assert info.value.reason == "digest-mismatch"


def test_truncated_blob_leaves_nothing(scripted: tuple[str, Script], tmp_path: Path) -> None:
    host, script = scripted
    data = os.urandom(200_000)
    digest = Digest(hashlib.sha256(data).hexdigest())
    path = f"/v2/x/y/blobs/{digest}"
    script.routes[path] = [reply(200, data, send=data[:50_000])]
    client = new_client(tmp_path, retries=1)
    with pytest.raises(RegistryError) as info:
        client.blob(
            Reference.parse(f"{host}/x/y:v1"), Descriptor(OCI_LAYER_GZIP, digest, len(data))
        )
    assert info.value.reason == "interrupted", str(info.value)
    assert not client.cache.path(digest).exists()
    assert list(client.cache.tmp.iterdir()) == []
    assert script.hits.count(path) == 2  # retried once
    # and a good answer afterwards is accepted
    script.routes[path] = [reply(200, data)]
    assert (
        client.blob(
            Reference.parse(f"{host}/x/y:v1"), Descriptor(OCI_LAYER_GZIP, digest, len(data))
        ).read_bytes()
        == data
    )


def test_read_timeout(scripted: tuple[str, Script], tmp_path: Path) -> None:
    host, script = scripted
    script.routes["/v2/x/y/manifests/v1"] = [hang(3)]
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        new_client(tmp_path, timeout=0.5, retries=0).resolve(
            Reference.parse(f"{host}/x/y:v1"), AMD64
        )
    assert time.monotonic() - start < 2.5
    assert info.value.reason == "timeout"


def test_unused_port_is_really_closed() -> None:
    """Sanity check for the refused-connection tests."""
    port = free_port()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))


def test_stalled_blob_times_out(scripted: tuple[str, Script], tmp_path: Path) -> None:
    host, script = scripted
    data = os.urandom(100_000)
    digest = Digest(hashlib.sha256(data).hexdigest())
    script.routes[f"/v2/x/y/blobs/{digest}"] = [stall(data, 10_000, 3)]
    client = new_client(tmp_path, timeout=0.5, retries=0)
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        client.blob(
            Reference.parse(f"{host}/x/y:v1"), Descriptor(OCI_LAYER_GZIP, digest, len(data))
        )
    assert time.monotonic() - start < 2.5
    assert info.value.reason == "timeout", str(info.value)
    assert not client.cache.path(digest).exists()


def test_credentials_from_a_docker_credential_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from banger_build.oci.auth import CredentialStore
    from banger_build.run import find_tool

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-testhelper"
    helper.write_text(
        '#!/bin/sh\nread server\n[ "$server" = "registry.example:5000" ] || exit 1\n'
        'printf \'{"Username": "alice", "Secret": "s3cret"}\'\n'
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    find_tool.cache_clear()
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {"credHelpers": {"registry.example:5000": "testhelper"}, "credsStore": "absent-helper"}
        )
    )
    store = CredentialStore(config)
    creds = store.get("registry.example:5000")
    assert creds is not None and creds.username == "alice"
    assert creds.basic() == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert "s3cret" not in repr(creds)
    assert store.get("other.example") is None  # credsStore's helper is not installed
