"""The image source's own logic, without a registry: cache first, limits, the
boundary (what it translates and what it must not), the transport's rules.

Every reference here names a port nobody listens on: a request would end in
``unreachable``, so a test that gets another reason proves none was made.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from banger_build.errors import RegistryError
from banger_build.oci import transport, wire
from banger_build.oci.blobs import BlobCache
from banger_build.oci.manifest import (
    MAX_CONFIG,
    MAX_LAYERS,
    OCI_CONFIG,
    OCI_MANIFEST,
    ManifestError,
    parse_image_manifest,
)
from banger_build.oci.options import RegistryOptions
from banger_build.oci.reference import Digest, Platform, Reference
from banger_build.oci.source import Source
from banger_build.oci.wire import Budget, Meter, WireError
from tests.support.registry import free_port

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def nowhere(tag: str = "v1") -> Reference:
    return Reference.parse(f"127.0.0.1:{free_port()}/src/test:{tag}")


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest())


def desc(data: bytes, media_type: str, size: int | None = None) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "digest": str(digest_of(data)),
        "size": len(data) if size is None else size,
    }


def manifest_bytes(config: dict[str, Any], layers: int = 1) -> bytes:
    layer = desc(b"layer", LAYER)
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config,
        "layers": [layer] * layers,
    }
    return json.dumps(body).encode()


@pytest.fixture
def src(tmp_path: Path) -> Source:
    return Source(BlobCache(tmp_path / "blobs"), RegistryOptions(retries=0))


def cached(src: Source, data: bytes) -> Digest:
    src.cache.put_bytes(digest_of(data), data)
    return digest_of(data)


def test_a_cached_image_needs_no_remote(src: Source) -> None:
    config = b'{"architecture": "amd64", "os": "linux"}'
    cached(src, config)
    digest = cached(src, manifest_bytes(desc(config, OCI_CONFIG)))
    ref = nowhere()
    manifest = src.manifest(ref, digest)
    assert src.config(ref, manifest) == {"architecture": "amd64", "os": "linux"}
    assert src.resolve(ref.with_digest(digest), Platform()) == digest
    assert src._remote is None


def test_layers_past_the_limit_are_refused_with_the_reference(src: Source) -> None:
    config = b"{}"
    digest = cached(src, manifest_bytes(desc(config, OCI_CONFIG), layers=MAX_LAYERS + 1))
    ref = nowhere()
    with pytest.raises(RegistryError) as info:
        src.manifest(ref, digest)
    assert info.value.reason == "too-many-layers"
    assert str(info.value) == (
        f"{ref}: the image has {MAX_LAYERS + 1} layers, more than the limit of {MAX_LAYERS}"
    )
    at_limit = manifest_bytes(desc(config, OCI_CONFIG), layers=MAX_LAYERS)
    assert len(parse_image_manifest(digest_of(at_limit), at_limit).layers) == MAX_LAYERS


def test_a_config_past_the_limit_is_refused_before_it_is_read(src: Source) -> None:
    big = desc(b"{}", OCI_CONFIG, size=MAX_CONFIG + 1)
    ref = nowhere()
    manifest = src.manifest(ref, cached(src, manifest_bytes(big)))
    with pytest.raises(RegistryError) as info:
        src.config(ref, manifest)
    assert info.value.reason == "too-large"  # not "unreachable": nothing was asked
    assert f"more than the limit of {MAX_CONFIG} bytes" in str(info.value)
    assert info.value.reference == str(ref)


@pytest.mark.parametrize("config", [b"not json", b"[1, 2]", b"\xff\xfe"])
def test_a_config_that_is_not_a_json_object(src: Source, config: bytes) -> None:
    cached(src, config)
    ref = nowhere()
    manifest = src.manifest(ref, cached(src, manifest_bytes(desc(config, OCI_CONFIG))))
    with pytest.raises(RegistryError) as info:
        src.config(ref, manifest)
    assert info.value.reason == "invalid-config"
    assert str(info.value).startswith(f"{ref}: the config is not ")


def test_our_own_bugs_are_not_disguised_as_registry_errors(
    src: Source, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ValueError from our code is a bug, not "unexpected response": it propagates."""

    def broken(self: transport.Endpoint, repository: str) -> None:
        raise ValueError("a bug in our URL building")

    monkeypatch.setattr(transport.Endpoint, "container", broken)
    with pytest.raises(ValueError, match="a bug in our URL building"):
        src.resolve(nowhere(), Platform())


def test_no_failure_type_escapes_the_boundary(src: Source) -> None:
    """A refused connection through the whole stack: the user gets a RegistryError."""
    ref = nowhere()
    with pytest.raises(RegistryError) as info:
        src.resolve(ref, Platform())
    assert info.value.reason == "unreachable" and info.value.reference == str(ref)
    assert not isinstance(info.value, ManifestError | WireError)


# -- the transport's rules -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_meter_abandons_a_transfer_slower_than_the_threshold() -> None:
    clock = Clock()
    meter = Meter("http://r.example", low_speed=1000, window=10.0, clock=clock)
    for _ in range(9):  # fast enough: 10 KB per 10 s window
        clock.now += 1.0
        meter.add(1100)
    clock.now += 1.0
    meter.add(1100)  # the window closes above the threshold: a new one starts
    for _ in range(9):  # then a trickle
        clock.now += 1.0
        meter.add(1)
    clock.now += 1.0
    with pytest.raises(WireError) as info:
        meter.add(1)
    assert info.value.reason == "stalled" and info.value.transient
    assert "10 bytes in 10 s" in str(info.value)


def test_the_meter_never_fires_within_the_first_window() -> None:
    clock = Clock()
    meter = Meter("http://r.example", low_speed=1 << 30, window=30.0, clock=clock)
    for _ in range(29):
        clock.now += 1.0
        meter.add(1)  # a small body done within the window is fine, however slow


def test_one_budget_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(wire.time, "sleep", slept.append)
    budget = Budget(3)
    assert [budget.retry() for _ in range(5)] == [True, True, True, False, False]
    assert slept == [0.2, 0.4, 0.8]
