"""Inputs from registries and URLs (issue 11, deliverable 5): `[[files]] ref` (a file
artifact `banger-build file push` made) and `[[files]] url` with its required sha256,
`[guest] agent_ref`, the `[[file]]` lock pin, offline rebuilds from the blob cache.

On real parts: the test registry (Debian's docker-registry) and, for URLs, Python's
http.server on loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from banger_build.build import BuildOptions, build
from banger_build.cli import main
from banger_build.errors import RecipeError, RegistryError
from banger_build.limits import Limits
from banger_build.lockfile import FilePin, Lock
from banger_build.oci.blobs import BlobCache
from banger_build.oci.fileartifact import ARTIFACT_TYPE, LAYER_TYPE, TITLE, parse_file_manifest
from banger_build.oci.manifest import ManifestError
from banger_build.oci.options import RegistryOptions
from banger_build.oci.reference import Digest, Platform, Reference
from banger_build.oci.source import Source
from tests.support import elf
from tests.support.e2e import BASE, UPPER, push, run_cli
from tests.support.ext4read import read_image
from tests.support.faultproxy import Cut, FaultProxy, Stall, Status
from tests.support.httpfiles import HttpFiles
from tests.support.registry import RegistryServer

TOOL = b"#!/bin/sh\necho fetched tool\n"
DATA = b"fetched data\n" * 100


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def push_file(home: Path, ref: str, path: Path, *extra: str) -> str:
    """`file push REF FILE`; returns what it printed (REF@sha256:...)."""
    code, out, err = run_cli(home, "file", "push", ref, str(path), *extra)
    assert code == 0, err
    return out.strip()


def a_file(directory: Path, name: str, data: bytes, mode: int = 0o644) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def recipe(directory: Path, image: str, body: str, name: str = "recipe.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".git").mkdir(exist_ok=True)  # the project's root
    path = directory / name
    path.write_text(f'name = "fetched"\n\n[image]\nref = "{image}"\n\n{body}')
    return path


def files_entry(dest: str, **keys: str) -> str:
    lines = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    return f'[[files]]\ndest = "{dest}"\n{lines}\n'


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("banger-build: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- a file artifact -----------------------------------------------------------------


def test_push_then_build_takes_the_file_pins_it_and_records_it(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    home = tmp_path / "home"
    tool = a_file(tmp_path / "f", "tool.sh", TOOL, 0o755)
    fref = f"{registry.host}/files/tool:1"
    printed = push_file(home, fref, tool)
    assert printed.startswith(f"{fref}@sha256:")
    manifest_digest = printed.partition("@")[2]
    r = recipe(tmp_path / "r", image_ref, files_entry("/usr/local/bin/tool", ref=fref))
    code, out, err = run_cli(home, str(r), "--no-link")
    assert code == 0, err
    path = Path(out.strip())
    seen = read_image(path / "rootfs.ext4")
    assert seen["usr/local/bin/tool"].sha256 == sha(TOOL)
    assert seen["usr/local/bin/tool"].mode & 0o7777 == 0o755  # the pushed file's executable bit
    assert Lock.load(r.with_suffix(".lock")).files == (
        FilePin(fref, Digest.parse(manifest_digest)),
    )
    assert f"pinned file {fref} to {manifest_digest}" in err
    record = json.loads((path / "manifest.json").read_text())
    assert record["fetched_files"] == [
        {
            "dest": "/usr/local/bin/tool",
            "sha256": f"sha256:{sha(TOOL)}",
            "reference": fref,
            "manifest": manifest_digest,
            "size": len(TOOL),
        }
    ]
    entry = [f for f in record["derivation"]["files"] if f["dest"] == "/usr/local/bin/tool"]
    assert entry == [
        {"dest": "/usr/local/bin/tool", "kind": "file", "mode": "0755", "owner": "0:0",
         "sha256": sha(TOOL)}
    ]  # fmt: skip


def test_src_ref_and_url_of_the_same_bytes_give_the_same_key(
    tmp_path: Path, image_ref: str, registry: RegistryServer, http_files: HttpFiles
) -> None:
    home = tmp_path / "home"
    local = a_file(tmp_path / "r", "data.bin", DATA)
    fref = f"{registry.host}/files/same:1"
    push_file(home, fref, local)
    url = http_files.put("same.bin", DATA)
    keys = set()
    for n, keys_ in enumerate(
        ({"src": "data.bin"}, {"ref": fref}, {"url": url, "sha256": sha(DATA)})
    ):
        r = recipe(tmp_path / "r", image_ref, files_entry("/data", **keys_), f"r{n}.toml")
        code, out, err = run_cli(home, "show", str(r))
        assert code == 0, err
        keys.add(json.loads(out)["key"])
    assert len(keys) == 1, keys


def test_pushed_manifest_is_a_file_artifact_and_deterministic(
    tmp_path: Path, registry: RegistryServer
) -> None:
    home = tmp_path / "home"
    first = push_file(home, f"{registry.host}/files/det:1", a_file(tmp_path / "a", "x", DATA))
    other = a_file(tmp_path / "b", "x", DATA)
    os.utime(other, (12345, 12345))  # another place and time: the same artifact
    second = push_file(tmp_path / "home2", f"{registry.host}/files/det:2", other)
    digest = first.partition("@")[2]
    assert second.partition("@")[2] == digest
    named = push_file(home, f"{registry.host}/files/det:3", other, "--name", "y")
    assert named.partition("@")[2] != digest  # the name is part of it
    body = json.loads(BlobCache(home / "blobs").path(Digest.parse(digest)).read_bytes())
    assert body["artifactType"] == ARTIFACT_TYPE
    (layer,) = body["layers"]
    assert layer["mediaType"] == LAYER_TYPE and layer["digest"] == f"sha256:{sha(DATA)}"
    assert layer["annotations"] == {
        "org.opencontainers.image.title": "x",
        "vnd.banger.file.mode": "0644",
    }


def test_platform_index_gives_each_platform_its_file(
    tmp_path: Path, registry: RegistryServer
) -> None:
    home = tmp_path / "home"
    fref = f"{registry.host}/files/agent:1"
    amd = a_file(tmp_path / "amd64", "agent", b"amd64 agent", 0o755)
    arm = a_file(tmp_path / "arm64", "agent", b"arm64 agent", 0o755)
    first = push_file(home, fref, amd, "--platform", "linux/amd64")
    push_file(home, fref, arm, "--platform", "linux/arm64")
    again = push_file(home, fref, arm, "--platform", "linux/arm64")  # replaces, keeps amd64
    index = Digest.parse(again.partition("@")[2])
    assert index != Digest.parse(first.partition("@")[2])
    source = Source(BlobCache(tmp_path / "fresh"), RegistryOptions())
    ref = Reference.parse(fref)
    for platform, data in (("linux/amd64", b"amd64 agent"), ("linux/arm64", b"arm64 agent")):
        artifact = source.file(ref, index, Platform.parse(platform))
        assert artifact.layer.digest.hex == sha(data) and artifact.index == index
        assert artifact.executable is True
    with pytest.raises(RegistryError) as info:
        source.file(ref, index, Platform.parse("linux/riscv64"))
    assert info.value.reason == "no-platform" and "no file for platform linux/riscv64" in str(
        info.value
    )
    assert "available: linux/amd64, linux/arm64" in str(info.value)
    # a tag holding one artifact is not turned into an index
    single = f"{registry.host}/files/single:1"
    push_file(home, single, amd)
    code, _, err = run_cli(home, "file", "push", single, str(arm), "--platform", "linux/arm64")
    assert code == 1
    assert "not an index of platforms: push without --platform" in one_line_error(err)


def test_agent_ref_takes_the_agent_of_the_platform(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    home = tmp_path / "home"
    fref = f"{registry.host}/files/guest-agent:1"
    for arch in ("amd64", "arm64"):
        agent = a_file(tmp_path / arch, "banger-vsock-agent", elf.stub(arch, arch.encode()))
        push_file(home, fref, agent, "--platform", f"linux/{arch}")
    r = recipe(tmp_path / "r", image_ref, f'[guest]\nagent_ref = "{fref}"\n')
    code, out, err = run_cli(home, str(r), "--no-link")
    assert code == 0, err
    seen = read_image(Path(out.strip()) / "rootfs.ext4")
    agent = seen["usr/local/bin/banger-vsock-agent"]
    assert (
        agent.sha256 == sha(elf.stub("amd64", b"amd64")) and agent.mode & 0o7777 == 0o755
    )  # the guest set's mode
    (pin,) = Lock.load(r.with_suffix(".lock")).files
    assert pin.ref == fref  # the index's digest: every platform resolves from it offline


def test_offline_rebuild_and_tampering(tmp_path: Path) -> None:
    """Built once, the registry stopped: a check (a rebuild in a temp dir) and a
    build of another key work offline from the blob cache; a blob the registry
    serves with other bytes is refused."""
    home = tmp_path / "home"
    tool = a_file(tmp_path / "f", "tool", TOOL, 0o755)
    with RegistryServer() as server:
        push(server, "e2e/fetch-offline", [BASE, UPPER])
        image = f"{server.host}/e2e/fetch-offline:v1"
        fref = f"{server.host}/files/offline:1"
        push_file(tmp_path / "pusher", fref, tool)
        r = recipe(tmp_path / "r", image, files_entry("/opt/tool", ref=fref))
        code, first, err = run_cli(home, str(r), "-o", str(tmp_path / "result"))  # a gc root
        assert code == 0, err
        # a fresh home against a registry whose copy of the file was tampered with
        server.blob_data_path(f"sha256:{sha(TOOL)}").write_bytes(TOOL.replace(b"echo", b"rm -"))
        code, _, err = run_cli(tmp_path / "fresh", str(r), "--no-link")
        assert code == 1
        line = one_line_error(err)
        assert fref in line and "does not match its digest" in line and sha(TOOL) in line
    assert not server.running
    code, second, err = run_cli(home, str(r), "--no-link", "--offline")
    assert code == 0 and second == first, err
    code, out, err = run_cli(home, "gc")  # the rooted store path keeps its fetched blobs
    assert code == 0 and "deleted 0 store paths" in out, (out, err)
    code, _, err = run_cli(home, "check", str(r), "--offline")
    assert code == 0, err
    code, _, err = run_cli(home, "check", first.strip(), "--offline")
    assert code == 0, err
    other = recipe(tmp_path / "r", image, files_entry("/opt/tool2", ref=fref), "other.toml")
    other.with_suffix(".lock").write_text(r.with_suffix(".lock").read_text())
    code, out, err = run_cli(home, str(other), "--no-link", "--offline")
    assert code == 0, err
    assert read_image(Path(out.strip()) / "rootfs.ext4")["opt/tool2"].sha256 == sha(TOOL)


def test_a_missing_tag_names_the_ref_and_the_status(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    fref = f"{registry.host}/files/nothing:1"
    r = recipe(tmp_path / "r", image_ref, files_entry("/x", ref=fref))
    code, _, err = run_cli(tmp_path / "home", str(r), "--no-link")
    assert code == 1
    line = one_line_error(err)
    assert f"{fref}: HTTP 404: " in line and "not found" in line, line


def test_locked_update_and_a_pinned_digest(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    home = tmp_path / "home"
    fref = f"{registry.host}/files/moving:latest"
    old = push_file(home, fref, a_file(tmp_path / "a", "f", b"old"))
    r = recipe(tmp_path / "r", image_ref, files_entry("/f", ref=fref))
    code, _, err = run_cli(home, str(r), "--no-link", "--locked")
    assert code == 1
    assert "files[0].ref: file" in err and "is not locked" in err
    code, _, err = run_cli(home, "lock", str(r))
    assert code == 0, err
    new = push_file(home, fref, a_file(tmp_path / "b", "f", b"new"))
    code, out, err = run_cli(home, str(r), "--no-link", "--locked")
    assert code == 0, err  # the pin holds: the moved tag is not followed
    assert read_image(Path(out.strip()) / "rootfs.ext4")["f"].sha256 == sha(b"old")
    code, _, err = run_cli(home, "update", str(r), "files")
    assert code == 0, err
    assert f"(was {old.partition('@')[2]})" in err
    assert Lock.load(r.with_suffix(".lock")).files[0].digest == Digest.parse(new.partition("@")[2])
    # a reference by digest needs no pin, and a sha256 pin checks the bytes
    by_digest = recipe(
        tmp_path / "r", image_ref, files_entry("/f", ref=old, sha256=sha(b"new")), "digest.toml"
    )
    code, _, err = run_cli(home, str(by_digest), "--no-link", "--locked")
    assert code == 1
    line = one_line_error(err)
    assert f"has sha256 {sha(b'old')}, but the recipe pins {sha(b'new')}" in line
    assert "digest.toml:" in line and "files[0].ref" in line


def test_lock_prune_drops_a_file_pin_the_recipe_no_longer_uses(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    home = tmp_path / "home"
    first, second = f"{registry.host}/files/prune-a:1", f"{registry.host}/files/prune-b:1"
    push_file(home, first, a_file(tmp_path / "a", "f", b"a"))
    push_file(home, second, a_file(tmp_path / "b", "f", b"b"))
    r = recipe(tmp_path / "r", image_ref, files_entry("/f", ref=first))
    assert run_cli(home, "lock", str(r))[0] == 0
    r.write_text(r.read_text().replace(first, second))
    code, _, err = run_cli(home, "lock", str(r), "--prune")
    assert code == 0, err
    assert f"dropped the unused pin of file {first}" in err
    assert [p.ref for p in Lock.load(r.with_suffix(".lock")).files] == [second]


def test_a_file_over_the_limit_is_refused_before_it_is_fetched(
    tmp_path: Path, image_ref: str, registry: RegistryServer, http_files: HttpFiles
) -> None:
    home = tmp_path / "home"
    fref = f"{registry.host}/files/big:1"
    push_file(tmp_path / "pusher", fref, a_file(tmp_path / "f", "big", DATA))
    options = BuildOptions(home=home, out_link=None, limits=Limits(max_file_input=100))
    r = recipe(tmp_path / "r", image_ref, files_entry("/big", ref=fref))
    with pytest.raises(RecipeError) as info:
        build(r, options)
    assert info.value.reason == "too-large" and info.value.key == "files[0].ref"
    assert f"is {len(DATA)} bytes, more than the limit of 100 bytes" in str(info.value)
    assert BlobCache(home / "blobs").get(Digest(sha(DATA))) is None
    url = http_files.put("big.bin", DATA)
    r = recipe(tmp_path / "u", image_ref, files_entry("/big", url=url, sha256=sha(DATA)))
    with pytest.raises(RegistryError) as rinfo:
        build(r, BuildOptions(home=tmp_path / "home2", out_link=None, limits=options.limits))
    assert rinfo.value.reason == "too-large" and rinfo.value.reference == url
    assert BlobCache(tmp_path / "home2" / "blobs").get(Digest(sha(DATA))) is None


# -- a URL ---------------------------------------------------------------------------


def test_a_url_with_its_sha256_is_fetched_then_offline(
    tmp_path: Path, image_ref: str, http_files: HttpFiles
) -> None:
    home = tmp_path / "home"
    url = http_files.put("tool", TOOL)
    r = recipe(tmp_path / "r", image_ref, files_entry("/opt/tool", url=url, sha256=sha(TOOL)))
    code, out, err = run_cli(home, str(r), "--no-link")
    assert code == 0, err
    path = Path(out.strip())
    tool = read_image(path / "rootfs.ext4")["opt/tool"]
    assert tool.sha256 == sha(TOOL) and tool.mode & 0o7777 == 0o644  # a URL says nothing of modes
    record = json.loads((path / "manifest.json").read_text())
    assert record["fetched_files"] == [
        {"dest": "/opt/tool", "sha256": f"sha256:{sha(TOOL)}", "url": url}
    ]
    assert Lock.load(r.with_suffix(".lock")).files == ()  # the recipe's sha256 is the pin
    http_files.close()
    code, _, err = run_cli(home, "check", str(r), "--offline")
    assert code == 0, err


def test_a_url_serving_other_bytes_is_refused_naming_both_digests(
    tmp_path: Path, image_ref: str, http_files: HttpFiles
) -> None:
    url = http_files.put("tool", TOOL)
    wrong = sha(b"what the recipe expected")
    r = recipe(tmp_path / "r", image_ref, files_entry("/opt/tool", url=url, sha256=wrong))
    code, _, err = run_cli(tmp_path / "home", str(r), "--no-link")
    assert code == 1
    line = one_line_error(err)
    assert line.startswith(f"banger-build: error: {url}: ")
    assert f"with sha256 {sha(TOOL)}, but the recipe pins sha256 {wrong}" in line
    assert not (tmp_path / "home" / "blobs" / "sha256" / sha(TOOL)).exists()  # nothing kept
    assert not (tmp_path / "home" / "blobs" / "sha256" / wrong).exists()


def test_a_url_404_is_one_line_with_the_status(
    tmp_path: Path, image_ref: str, http_files: HttpFiles
) -> None:
    url = f"{http_files.url}/nowhere"
    r = recipe(tmp_path / "r", image_ref, files_entry("/x", url=url, sha256=sha(b"x")))
    code, _, err = run_cli(tmp_path / "home", str(r), "--no-link")
    assert code == 1
    assert one_line_error(err) == f"banger-build: error: {url}: HTTP 404: not found"


def test_plain_http_elsewhere_is_refused_without_a_request(tmp_path: Path, image_ref: str) -> None:
    url = "http://files.example.invalid/tool"
    r = recipe(tmp_path / "r", image_ref, files_entry("/x", url=url, sha256=sha(b"x")))
    code, _, err = run_cli(tmp_path / "home", str(r), "--no-link")
    assert code == 1
    line = one_line_error(err)
    assert "refusing plain HTTP to http://files.example.invalid" in line
    assert "--insecure-registry files.example.invalid" in line


# -- recipe errors (no network) ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "where", "reason", "words"),
    [
        (files_entry("/x", url="https://example.com/x"), "files[0].url", "missing-key",
         "needs sha256: the sha256 of the bytes it serves (no hash, no build"),
        (files_entry("/x", src="a", ref="r.example/f:1"), "files[0].ref", "conflicting-keys",
         "give one of `src`, `ref` and `url`, not both src and ref"),
        ('[[files]]\ndest = "/x"\n', "files[0].src", "missing-key",
         "missing required key 'src' (a file of the project), 'ref'"),
        (files_entry("/x", url="ftp://example.com/x", sha256="0" * 64), "files[0].url", "value",
         "invalid url 'ftp://example.com/x': it must start with https://"),
        (files_entry("/x", url="https://u:p@example.com/x", sha256="0" * 64), "files[0].url",
         "value", "credentials do not belong in a URL"),
        ('[guest]\nagent = "a"\nagent_ref = "r.example/a:1"\n', "guest.agent_ref",
         "conflicting-keys", "not both agent and agent_ref"),
        ('[guest]\nagent_url = "https://example.com/a"\n', "guest.agent_url", "missing-key",
         "needs agent_sha256"),
    ],
)  # fmt: skip
def test_recipe_errors_at_the_key(
    tmp_path: Path, body: str, where: str, reason: str, words: str
) -> None:
    r = recipe(tmp_path, "r.example/image:1", body)
    code, _, err = run_cli(tmp_path / "home", str(r), "--no-link", "--offline")
    assert code == 1
    line = one_line_error(err)
    assert f"{r}:" in line and f": {where}: " in line and words in line, line
    from banger_build.recipe import load_recipe

    with pytest.raises(RecipeError) as info:
        load_recipe(r)
    assert info.value.reason == reason and info.value.line is not None


def test_render_lists_where_fetched_files_come_from(tmp_path: Path) -> None:
    body = files_entry("/opt/b", ref="r.example/f:1") + files_entry(
        "/opt/a", url="https://example.com/a", sha256="0" * 64
    )
    r = recipe(tmp_path, "r.example/image:1", body + '[[files]]\nsrc = "c"\ndest = "/opt/c"\n')
    (tmp_path / "c").write_bytes(b"c")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["render", str(r), "--list"])
    assert code == 0, err.getvalue()
    assert out.getvalue().splitlines() == [
        "/opt/a  ----  0:0  file      from https://example.com/a",
        "/opt/b  ----  0:0  file      from r.example/f:1",
        f"/opt/c  0644  0:0  file      {sha(b'c')}",
    ]


def test_a_url_has_the_registry_clients_bounds(tmp_path: Path, http_files: HttpFiles) -> None:
    """Through a fault proxy in front of the HTTP server: a cut body is retried, a
    stalled one fails within the low-speed window, a 500 is retried then reported
    with its status; nothing partial stays in the cache."""
    data = DATA * 20
    with FaultProxy(http_files.url) as proxy:
        url = http_files.put("big", data).replace(http_files.url, proxy.url)
        digest = Digest(sha(data))
        options = RegistryOptions(retries=2, low_speed_time=1.5, timeout=1.5)
        source = Source(BlobCache(tmp_path / "cache"), options)
        proxy.add(Cut(after=100), match="/big", times=1)
        assert source.url(url, digest, 1 << 20).read_bytes() == data  # the retry got it whole
        source.cache.path(digest).unlink()
        proxy.clear()
        proxy.add(Stall(after=100), match="/big")
        with pytest.raises(RegistryError) as info:
            source.url(url, digest, 1 << 20)
        assert info.value.reason == "timeout" and info.value.reference == url
        assert proxy.count("Stall") == 3  # one total bound: the request and its 2 retries
        proxy.clear()
        proxy.add(Status(500), match="/big")
        with pytest.raises(RegistryError) as info:
            source.url(url, digest, 1 << 20)
        assert info.value.status == 500 and str(info.value).startswith(f"{url}: HTTP 500: ")
    assert not source.cache.path(digest).exists()
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_agent_url_with_its_sha256(tmp_path: Path, image_ref: str, http_files: HttpFiles) -> None:
    data = elf.stub("amd64", b"an agent from a URL")
    url = http_files.put("agent", data)
    body = f'[guest]\nagent_url = "{url}"\nagent_sha256 = "{sha(data)}"\n'
    r = recipe(tmp_path / "r", image_ref, body)
    code, out, err = run_cli(tmp_path / "home", str(r), "--no-link")
    assert code == 0, err
    agent = read_image(Path(out.strip()) / "rootfs.ext4")["usr/local/bin/banger-vsock-agent"]
    assert agent.sha256 == sha(data) and agent.mode & 0o7777 == 0o755


def test_an_agent_for_another_architecture_is_refused(
    tmp_path: Path, image_ref: str, http_files: HttpFiles
) -> None:
    """An arm64 agent in an amd64 image would only fail in the guest: refused at its key."""
    for data, words in (
        (elf.stub("arm64"), "is built for arm64, the image is for amd64"),
        (b"#!/bin/sh\necho not an agent\n", "is not an ELF executable"),
    ):
        url = http_files.put("agent", data)
        body = f'[guest]\nagent_url = "{url}"\nagent_sha256 = "{sha(data)}"\n'
        r = recipe(tmp_path / "r", image_ref, body)
        code, out, err = run_cli(tmp_path / "home", str(r), "--no-link")
        line = one_line_error(err)
        assert code == 1 and out == "" and words in line, err
        assert f"{r}:" in line and "agent_url" in line


# -- the artifact's manifest, parsed -------------------------------------------------


def _manifest(config_type: str, layers: list[dict[str, object]], **extra: object) -> bytes:
    body = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": config_type, "digest": f"sha256:{sha(b'{}')}", "size": 2},
        "layers": layers,
        **extra,
    }
    return json.dumps(body).encode()


def _layer(media_type: str, **annotations: str) -> dict[str, object]:
    out: dict[str, object] = {"mediaType": media_type, "digest": f"sha256:{sha(DATA)}",
                              "size": len(DATA)}  # fmt: skip
    if annotations:
        out["annotations"] = annotations
    return out


def test_what_counts_as_a_file_artifact() -> None:
    digest = Digest("a" * 64)
    # one file pushed by `oras push` (its own artifact type, the empty config): taken, no mode
    titled = _layer("application/vnd.oci.image.layer.v1.tar", **{TITLE: "x"})
    oras = _manifest(
        "application/vnd.oci.empty.v1+json", [titled],
        artifactType="application/vnd.unknown.artifact.v1",
    )  # fmt: skip
    got = parse_file_manifest(digest, oras)
    assert (got.layer.digest.hex, got.name, got.executable) == (sha(DATA), "x", None)
    refused = {
        "a container image": _manifest(
            "application/vnd.oci.image.config.v1+json",
            [_layer("application/vnd.oci.image.layer.v1.tar+gzip")],
        ),
        "2 files": _manifest(
            "application/vnd.oci.empty.v1+json",
            [_layer("application/octet-stream"), _layer("application/octet-stream")],
        ),
        "not application/vnd.banger.file.content.v1": _manifest(
            "application/vnd.oci.empty.v1+json", [_layer("application/octet-stream")],
            artifactType=ARTIFACT_TYPE,
        ),
        "has mode '0777'": _manifest(
            "application/vnd.oci.empty.v1+json",
            [_layer(LAYER_TYPE, **{"vnd.banger.file.mode": "0777"})], artifactType=ARTIFACT_TYPE,
        ),
    }  # fmt: skip
    for words, data in refused.items():
        with pytest.raises(ManifestError) as info:
            parse_file_manifest(digest, data)
        assert words in info.value.message, (words, info.value.message)
