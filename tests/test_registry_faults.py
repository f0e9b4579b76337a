"""Registry faults, injected by a proxy in front of the real ``docker-registry``.

Each case asserts the error a user reads (the reference, the host that
failed, the HTTP status where there is one, the reason) and that it comes
in bounded time -- generous bounds: these are not benchmarks, they catch a
hang or a nested retry loop (the old client held a stalled blob ~8 min).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from banger_build.errors import RegistryError
from banger_build.oci.blobs import BlobCache
from banger_build.oci.options import RegistryOptions
from banger_build.oci.reference import Platform, Reference
from banger_build.oci.source import Source
from tests.support.faultproxy import (
    Cut,
    FaultProxy,
    Redirect,
    Stall,
    Status,
    Trickle,
    TrickleHeaders,
)
from tests.support.oci import Entry, PushedImage, make_layer, push_image
from tests.support.registry import RegistryServer, free_port, write_docker_config

AMD64 = Platform("linux", "amd64")
REPO_ROOT = Path(__file__).resolve().parents[1]
_counter = itertools.count()


@pytest.fixture(autouse=True)
def no_user_docker_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path_factory.mktemp("no-docker-config")))


def image(registry: RegistryServer, name: str, size: int = 64_000, **kw: Any) -> PushedImage:
    """An image with one incompressible layer of about ``size`` bytes."""
    layer = make_layer([Entry.file("data", os.urandom(size))])
    repo = f"faults/{name}-{next(_counter)}-{os.getpid()}"
    return push_image(registry.url, repo, "v1", [layer], **kw)


def source(tmp_path: Path, **options: Any) -> Source:
    return Source(BlobCache(tmp_path / "blobs"), RegistryOptions(**options))


def via(proxy: FaultProxy, img: PushedImage) -> Reference:
    return Reference.parse(f"{proxy.host}/{img.repo}:v1")


def failing(call: Callable[[], object]) -> tuple[RegistryError, float]:
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        call()
    return info.value, time.monotonic() - start


def all_text(exc: BaseException) -> str:
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def leftovers(src: Source) -> list[str]:
    tmp = src.cache.tmp
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


# -- slow senders ------------------------------------------------------------------


def test_a_trickled_blob_is_abandoned_within_the_stall_window(
    fault_proxy: FaultProxy, registry: RegistryServer, tmp_path: Path
) -> None:
    img = image(registry, "trickle")
    ref = via(fault_proxy, img)
    src = source(tmp_path, low_speed=1024, low_speed_time=2.0, retries=0)
    manifest = src.manifest(ref, src.resolve(ref, AMD64))
    fault_proxy.add(Trickle(0.25), match=f"/blobs/{img.layer_digests[0]}")
    err, elapsed = failing(lambda: src.blob(ref, manifest.layers[0]))
    assert err.reason == "stalled", str(err)
    assert err.reference == str(ref) and str(err).startswith(f"{ref}: ")
    assert f"transfer from {fault_proxy.url} stalled" in str(err)
    assert "less than 1024 bytes/s for 2 s" in str(err)
    assert 1.5 < elapsed < 8
    assert not src.cache.path(manifest.layers[0].digest).exists() and leftovers(src) == []


def test_a_byte_every_five_seconds_fails_in_about_the_window_per_attempt(
    fault_proxy: FaultProxy, registry: RegistryServer, tmp_path: Path
) -> None:
    """The issue's trickle: one total bound over both attempts, not a hang."""
    img = image(registry, "trickle5")
    ref = via(fault_proxy, img)
    src = source(tmp_path, low_speed_time=2.0, retries=1)
    manifest = src.manifest(ref, src.resolve(ref, AMD64))
    fault_proxy.add(Trickle(5.0), match=f"/blobs/{img.layer_digests[0]}")
    err, elapsed = failing(lambda: src.blob(ref, manifest.layers[0]))
    assert err.reason in ("timeout", "stalled"), str(err)
    assert str(ref) in str(err) and fault_proxy.url in str(err)
    assert fault_proxy.count("Trickle") == 2  # one retry, then the bound
    assert elapsed < 12


def test_a_trickled_manifest_is_abandoned(
    fault_proxy: FaultProxy, registry: RegistryServer, tmp_path: Path
) -> None:
    img = image(registry, "trickle-manifest")
    fault_proxy.add(Trickle(0.2), match="/manifests/v1")
    ref = via(fault_proxy, img)
    err, elapsed = failing(
        lambda: source(tmp_path, low_speed_time=1.5, retries=0).resolve(ref, AMD64)
    )
    assert err.reason == "stalled", str(err)
    assert err.reference == str(ref)
    assert elapsed < 8


def test_trickled_response_headers_are_cut_off(
    fault_proxy: FaultProxy, registry: RegistryServer, tmp_path: Path
) -> None:
    """A byte of headers every 0.2 s never trips a per-read timeout; the headers'
    own deadline does."""
    img = image(registry, "trickle-headers")
    fault_proxy.add(TrickleHeaders(0.2), match="/manifests/v1")
    ref = via(fault_proxy, img)
    err, elapsed = failing(lambda: source(tmp_path, timeout=2.0, retries=0).resolve(ref, AMD64))
    assert err.reason == "timeout", str(err)
    assert f"{fault_proxy.url} stopped responding" in str(err)
    assert 1.5 < elapsed < 8


def test_a_stalled_blob_has_one_total_retry_bound(
    fault_proxy: FaultProxy, registry: RegistryServer, tmp_path: Path
) -> None:
    img = image(registry, "stall")
    ref = via(fault_proxy, img)
    src = source(tmp_path, low_speed_time=1.5, retries=2)
    manifest = src.manifest(ref, src.resolve(ref, AMD64))
    fault_proxy.add(Stall(after=1000), match=f"/blobs/{img.layer_digests[0]}")
    err, elapsed = failing(lambda: src.blob(ref, manifest.layers[0]))
    assert err.reason == "timeout", str(err)
    assert str(ref) in str(err) and "stopped sending" in str(err)
    assert fault_proxy.count("Stall") == 3  # the retries of one request, not retries of retries
    assert elapsed < 3 * 1.5 + 6
    assert leftovers(src) == []


# -- broken answers ----------------------------------------------------------------


def test_a_cut_body_is_retried_then_refused(
    fault_proxy: FaultProxy, registry: RegistryServer, tmp_path: Path
) -> None:
    img = image(registry, "cut")
    ref = via(fault_proxy, img)
    src = source(tmp_path, retries=2)
    manifest = src.manifest(ref, src.resolve(ref, AMD64))
    layer = manifest.layers[0]
    match = f"/blobs/{img.layer_digests[0]}"
    fault_proxy.add(Cut(after=10_000), match=match, times=1)
    assert src.blob(ref, layer).stat().st_size == layer.size  # the retry got it whole
    assert fault_proxy.count("Cut") == 1 and fault_proxy.count("forward", match) == 1
    src.cache.path(layer.digest).unlink()
    fault_proxy.clear()
    fault_proxy.add(Cut(after=10_000), match=match)
    err, elapsed = failing(lambda: src.blob(ref, layer))
    assert err.reason == "interrupted", str(err)
    assert f"transfer from {fault_proxy.url} was interrupted" in str(err)
    assert fault_proxy.count("Cut") == 3 and elapsed < 10
    assert not src.cache.path(layer.digest).exists() and leftovers(src) == []


def test_server_errors_are_retried_then_reported_with_the_status(
    fault_proxy: FaultProxy, registry: RegistryServer, tmp_path: Path
) -> None:
    img = image(registry, "five-hundred")
    ref = via(fault_proxy, img)
    fault_proxy.add(Status(500), match="/manifests/v1", times=2)
    assert str(source(tmp_path, retries=3).resolve(ref, AMD64)) == img.manifest_digest
    fault_proxy.clear()
    fault_proxy.add(Status(503, "disk on fire"), match="/manifests/v1")
    err, elapsed = failing(lambda: source(tmp_path, retries=2).resolve(ref, AMD64))
    assert (err.status, err.reason) == (503, "http-status")
    assert str(err).startswith(f"{ref}: HTTP 503: ") and "disk on fire" in str(err)
    assert fault_proxy.count("Status") == 3 and elapsed < 10


def test_a_redirect_to_a_refusing_port_names_the_target(
    fault_proxy: FaultProxy, registry: RegistryServer, tmp_path: Path
) -> None:
    img = image(registry, "redirect")
    ref = via(fault_proxy, img)
    src = source(tmp_path, retries=0)
    manifest = src.manifest(ref, src.resolve(ref, AMD64))
    dead = f"http://127.0.0.1:{free_port()}"
    fault_proxy.add(Redirect(dead), match="/blobs/")
    err, elapsed = failing(lambda: src.blob(ref, manifest.layers[0]))
    assert err.reason == "unreachable", str(err)
    assert f"cannot connect to {dead} (redirected from {fault_proxy.url})" in str(err)
    assert "refused" in str(err).lower()
    assert f"cannot connect to {fault_proxy.url}" not in str(err)
    assert elapsed < 5


def test_credentials_do_not_follow_a_redirect_to_another_host(
    basic_registry: RegistryServer, tmp_path: Path
) -> None:
    """Stripped by design; the message says so instead of "not accepted"."""
    auth = (basic_registry.username, basic_registry.password)
    img = image(basic_registry, "creds", auth=auth)
    with FaultProxy(basic_registry.url) as proxy:
        config = write_docker_config(tmp_path / "docker", {proxy.host: auth})
        src = source(tmp_path, docker_config=config, retries=0)
        ref = via(proxy, img)
        manifest = src.manifest(ref, src.resolve(ref, AMD64))  # the proxy passes credentials on
        other = f"localhost:{basic_registry.port}"  # the same registry by another name
        proxy.add(Redirect(f"http://{other}"), match="/blobs/")
        err, _ = failing(lambda: src.blob(ref, manifest.layers[0]))
    assert (err.status, err.reason) == (401, "auth")
    text = str(err)
    assert f"redirected to http://{other}" in text
    assert f"the credentials for {proxy.host} were not sent to {other}" in text
    assert "not accepted" not in text
    assert basic_registry.password not in all_text(err)


# -- the blob cache ------------------------------------------------------------------


def test_a_full_blob_cache_names_the_reference_and_the_cache(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """ENOSPC while a layer is written (a 2 MiB tmpfs as the home, a 3 MiB layer)."""
    img = image(registry, "enospc", size=3 << 20)
    ref = f"{registry.host}/{img.repo}:v1"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[image]\nref = "{ref}"\n')
    home = tmp_path / "home"
    home.mkdir()
    script = (
        f'mount -t tmpfs -o size=2m tmpfs "{home}" && '
        f'exec "{sys.executable}" -m banger_build "{recipe}" --no-link --home "{home}"'
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"banger-build: error: {ref}: cannot write sha256:"), line
    assert f"to the blob cache {home}/blobs: No space left on device" in line
    assert "Traceback" not in proc.stderr
