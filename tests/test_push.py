"""``push``: one OCI artifact per store path, on the real ``docker-registry``.

Pushes go through the CLI (and ``publish.push_store_path``); what landed is
read back with raw HTTP (``tests.support.oci.Pusher``, no code shared with the
client). The request pattern of uploads is observed through
``tests.support.faultproxy``.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from banger_build.cli import main
from banger_build.errors import InputError, Reason, RegistryError
from banger_build.oci import rootfs
from banger_build.oci.blobs import BlobCache
from banger_build.oci.kernel import LAYERS, write_modules_tar
from banger_build.oci.manifest import OCI_MANIFEST, Descriptor, ManifestError
from banger_build.oci.options import RegistryOptions
from banger_build.oci.reference import Digest, Reference
from banger_build.oci.remote import Remote
from banger_build.progress import Reporter
from banger_build.publish import PushResult, PushTarget, parse_target, push_store_path
from banger_build.store import Store
from tests.support.e2e import run_cli, write_recipe
from tests.support.faultproxy import FaultProxy, Lost, Status
from tests.support.kmod import VSOCK_KO
from tests.support.oci import Pusher
from tests.support.registry import RegistryServer, write_docker_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_user_docker_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never read the real ~/.docker/config.json."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path_factory.mktemp("no-docker-config")))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(tmp_path: Path, image_ref: str, home: str = "home", *, kernel: bool = False) -> Path:
    extra = ""
    if kernel:
        k = tmp_path / "k"
        mods = k / "6.1.0-test-amd64"
        (mods / "kernel").mkdir(parents=True, exist_ok=True)
        (mods / "kernel" / "vsock.ko").write_bytes(VSOCK_KO)
        (mods / "modules.order").write_text("kernel/vsock.ko\n")
        (k / "vmlinuz").write_bytes(b"kernel image " * 1000)
        (k / "initrd.img").write_bytes(b"initrd " * 500)
        extra = f'[kernel]\npath = "{k / "vmlinuz"}"\ninitrd = "{k / "initrd.img"}"\n'
        extra += f'modules = "{mods}"\n'
    recipe = write_recipe(tmp_path / "r", image_ref, extra=extra)
    code, out, err = run_cli(
        tmp_path / home, str(recipe), "--no-link", "--allow-source", str(tmp_path)
    )
    assert code == 0, err
    return Path(out.strip())


def reader(server: RegistryServer | FaultProxy, repo: str, auth: bool = False) -> Pusher:
    credentials = None
    if auth and isinstance(server, RegistryServer):
        credentials = (server.username, server.password)
    return Pusher(server.url, repo, credentials)


def get_manifest(pusher: Pusher, target: str) -> tuple[bytes, str]:
    resp = pusher.request(
        "GET", f"/v2/{pusher.repo}/manifests/{target}", headers={"Accept": OCI_MANIFEST}
    )
    return resp.content, resp.headers["Docker-Content-Digest"]


def get_blob(pusher: Pusher, digest: str) -> bytes:
    return pusher.request("GET", f"/v2/{pusher.repo}/blobs/{digest}").content


def tags(pusher: Pusher) -> list[str]:
    resp = pusher.request("GET", f"/v2/{pusher.repo}/tags/list", ok=(200, 404))
    return sorted(resp.json().get("tags") or []) if resp.status_code == 200 else []


_counter = iter(range(1_000_000))


def repo(name: str) -> str:
    return f"push/{name}-{next(_counter)}-{os.getpid()}"


def remote_for(home: Path, **kwargs: object) -> Remote:
    store = Store(home)
    return Remote(BlobCache(store.blobs, store.temp_roots), RegistryOptions(), **kwargs)  # type: ignore[arg-type]


def push_api(home: Path, path: Path, target: str, **kwargs: object) -> PushResult:
    store = Store(home)
    return push_store_path(
        path,
        parse_target(target),
        remote=kwargs.pop("remote", None) or remote_for(home),  # type: ignore[arg-type]
        store=store,
        reporter=Reporter(quiet=True),
        **kwargs,  # type: ignore[arg-type]
    )


# -- the artifact ------------------------------------------------------------------------


def test_push_then_pull_the_artifact_back(
    tmp_path: Path,
    image_ref: str,
    token_registry: RegistryServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = token_registry
    config = write_docker_config(
        tmp_path / "docker", {server.host: (server.username, server.password)}
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(config.parent))
    path = build(tmp_path, image_ref, kernel=True)
    home = tmp_path / "home"
    code, out, err = run_cli(home, "push", str(path), f"{server.host}/banger/img:v1")
    assert code == 0, err
    assert server.password not in out + err
    ref = out.strip()
    assert ref.startswith(f"{server.host}/banger/img@sha256:")
    digest = ref.partition("@")[2]

    pusher = reader(server, "banger/img", auth=True)
    data, header = get_manifest(pusher, digest)
    assert header == digest == f"sha256:{sha256(data)}"
    body = json.loads(data)
    assert data == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()  # canonical
    manifest_json = (path / "manifest.json").read_bytes()
    store_manifest = json.loads(manifest_json)
    key, name = store_manifest["key"], store_manifest["name"]
    epoch = store_manifest["derivation"]["epoch"]
    created = datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert body["schemaVersion"] == 2 and body["mediaType"] == OCI_MANIFEST
    assert body["artifactType"] == "application/vnd.banger.rootfs.v1"
    assert body["config"] == {
        "mediaType": "application/vnd.banger.rootfs.manifest.v1+json",
        "digest": f"sha256:{sha256(manifest_json)}",
        "size": len(manifest_json),
    }
    assert get_blob(pusher, body["config"]["digest"]) == manifest_json  # the exact bytes
    rootfs_sha = sha256((path / "rootfs.ext4").read_bytes())
    import zstandard

    assert body["annotations"] == {
        "org.opencontainers.image.created": created,
        "dev.banger.store.key": key,
        "dev.banger.name": name,
        "dev.banger.arch": "amd64",
        "dev.banger.rootfs.sha256": rootfs_sha,
        "dev.banger.manifest.sha256": sha256(manifest_json),
        "dev.banger.bundle.zstd": f"zstandard {zstandard.__version__} (libzstd "
        + ".".join(map(str, zstandard.ZSTD_VERSION))
        + ")",
        "dev.banger.bundle.params": "format=1,level=3,window_log=27,long=1,checksum=1,"
        "content_size=1,multithreaded=1,api=stream_writer",
    }
    layers = body["layers"]
    titles = [layer["annotations"]["org.opencontainers.image.title"] for layer in layers]
    assert titles == [f"{name}-{key}.tar.zst", "vmlinux", "initrd.img", "modules"]
    assert [layer["mediaType"] for layer in layers] == [
        "application/vnd.banger.rootfs.bundle.v1.tar+zstd",
        LAYERS["vmlinux"],
        LAYERS["initrd.img"],
        LAYERS["modules.tar"],
    ]
    # the bundle layer is the bundle `bundle` writes; the kernel layers are the files
    code, out, err = run_cli(home, "bundle", str(path), "-o", str(tmp_path / "b.tar.zst"))
    assert code == 0, err
    assert get_blob(pusher, layers[0]["digest"]) == (tmp_path / "b.tar.zst").read_bytes()
    assert get_blob(pusher, layers[1]["digest"]) == (path / "vmlinux").read_bytes()
    assert get_blob(pusher, layers[2]["digest"]) == (path / "initrd.img").read_bytes()
    modules_tar = io.BytesIO()
    write_modules_tar(path / "modules", modules_tar)
    assert get_blob(pusher, layers[3]["digest"]) == modules_tar.getvalue()
    for layer in layers:
        assert layer["size"] == len(get_blob(pusher, layer["digest"]))

    assert tags(pusher) == sorted(["v1", f"sk-{key}"])
    for tag in ("v1", f"sk-{key}"):
        assert get_manifest(pusher, tag)[1] == digest
    parsed = rootfs.parse_rootfs_manifest(Digest.parse(digest), data)
    assert parsed.key == key and parsed.rootfs_sha256 == rootfs_sha
    assert list(parsed.kernel) == ["vmlinux", "initrd.img", "modules"]


def test_push_again_uploads_nothing(
    tmp_path: Path, image_ref: str, fault_proxy: FaultProxy
) -> None:
    path = build(tmp_path, image_ref)
    target = f"{fault_proxy.host}/{repo('again')}"
    code, first, err = run_cli(tmp_path / "home", "push", str(path), target)
    assert code == 0, err
    uploads = [(m, p) for m, p, _ in fault_proxy.hits if m in ("POST", "PATCH", "PUT")]
    assert sum(1 for m, p in uploads if m == "PUT" and "/blobs/uploads/" in p) == 2
    assert sum(1 for m, p in uploads if m == "PUT" and "/manifests/" in p) == 2  # digest, sk-
    fault_proxy.clear()
    code, again, err = run_cli(tmp_path / "home", "push", str(path), target)
    assert code == 0, err
    assert again == first
    assert {m for m, _, _ in fault_proxy.hits} == {"HEAD"}, fault_proxy.hits
    result = push_api(tmp_path / "home", path, target)
    assert result.uploaded == () and result.ref == first.strip()


def test_two_homes_push_one_key_concurrently_and_converge(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    target = f"{registry.host}/{repo('converge')}"
    procs = []
    for n, umask in ((1, 0o022), (2, 0o077)):
        top = tmp_path / f"machine{n}"
        (top / "tmp").mkdir(parents=True)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "banger_build",
                    "build",
                    str(recipe),
                    "--no-link",
                    "--push",
                    target,
                    "--home",
                    str(top / "home"),
                ],
                cwd=top,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                umask=umask,
                env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(top / "tmp")},
            )  # fmt: skip
        )
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outs.append(out.splitlines())
    (path1, ref1), (path2, ref2) = outs
    assert Path(path1).name == Path(path2).name  # one key
    assert ref1 == ref2
    pusher = reader(registry, target.partition("/")[2])
    key = Path(path1).name.partition("-")[0]
    assert get_manifest(pusher, f"sk-{key}")[1] == ref1.partition("@")[2]


# -- the key tag ----------------------------------------------------------------------------


def _other_build(path: Path, top: Path, change: Callable[[Path, dict[str, object]], None]) -> Path:
    """A copy of store path ``path`` as another builder might have made it."""
    copy = top / path.name
    shutil.copytree(path, copy)
    copy.chmod(0o755)
    for f in copy.iterdir():
        f.chmod(0o644)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(copy, manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return copy


def _flip_a_byte(copy: Path, manifest: dict[str, object]) -> None:
    image = copy / "rootfs.ext4"
    data = bytearray(image.read_bytes())
    data[2048] ^= 0xFF
    image.write_bytes(bytes(data))
    manifest["outputs"]["rootfs.ext4"]["sha256"] = sha256(bytes(data))  # type: ignore[index]


def test_another_rootfs_under_the_key_tag_is_a_reproducibility_error(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    path = build(tmp_path, image_ref)
    theirs = _other_build(path, tmp_path / "elsewhere", _flip_a_byte)
    target = f"{registry.host}/{repo('oracle')}"
    code, out, err = run_cli(tmp_path / "other-home", "push", str(theirs), target)
    assert code == 0, err
    their_ref = out.strip()
    key = path.name.partition("-")[0]
    their_rootfs = sha256((theirs / "rootfs.ext4").read_bytes())
    our_rootfs = sha256((path / "rootfs.ext4").read_bytes())

    code, out, err = run_cli(tmp_path / "home", "push", str(path), target)
    assert code == 1 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("banger-build: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    err = errors[0]
    assert f"sk-{key}" in err and their_rootfs in err and our_rootfs in err
    assert f"banger-build check {path}" in err
    with pytest.raises(RegistryError) as caught:
        push_api(tmp_path / "home", path, target)
    assert caught.value.reason == Reason.NOT_REPRODUCIBLE
    pusher = reader(registry, target.partition("/")[2])
    assert get_manifest(pusher, f"sk-{key}")[1] == their_ref.partition("@")[2]  # untouched
    assert tags(pusher) == [f"sk-{key}"]


def test_a_key_tag_naming_another_keys_artifact_is_refused(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    path = build(tmp_path, image_ref)
    recipe = write_recipe(tmp_path / "r2", image_ref)
    recipe.write_text(recipe.read_text().replace('what = "test unit"', 'what = "other unit"'))
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 0, err
    other = Path(out.strip())
    assert other.name != path.name  # another key
    target = f"{registry.host}/{repo('hijack')}"
    code, out, err = run_cli(tmp_path / "home", "push", str(other), target)
    assert code == 0, err
    pusher = Pusher(registry.url, target.partition("/")[2])
    data, digest = get_manifest(pusher, out.strip().partition("@")[2])
    key = path.name.partition("-")[0]
    pusher.request(
        "PUT", f"/v2/{pusher.repo}/manifests/sk-{key}", data=data,
        headers={"Content-Type": OCI_MANIFEST},
    )  # fmt: skip
    code, out, err = run_cli(tmp_path / "home", "push", str(path), target)
    assert code == 1 and "another store key" in err and "not overwriting" in err
    assert get_manifest(pusher, f"sk-{key}")[1] == digest


def test_an_equivalent_artifact_under_the_key_tag_is_kept(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    """Same rootfs.ext4, another manifest.json (a builder of another banger-build
    version, say): the key tag stays; ours is pushed by digest."""
    path = build(tmp_path, image_ref)

    def other_tools(copy: Path, manifest: dict[str, object]) -> None:
        manifest["tools"]["banger-build"] = "0.0.1-elsewhere"  # type: ignore[index]

    theirs = _other_build(path, tmp_path / "elsewhere", other_tools)
    target = f"{registry.host}/{repo('kept')}"
    code, out, err = run_cli(tmp_path / "other-home", "push", str(theirs), target)
    assert code == 0, err
    their_digest = out.strip().partition("@")[2]
    code, out, err = run_cli(tmp_path / "home", "push", str(path), f"{target}:mine")
    assert code == 0, err
    ours = out.strip().partition("@")[2]
    assert ours != their_digest and "kept" in err
    pusher = reader(registry, target.partition("/")[2])
    key = path.name.partition("-")[0]
    assert get_manifest(pusher, f"sk-{key}")[1] == their_digest
    assert get_manifest(pusher, "mine")[1] == ours
    assert get_manifest(pusher, ours)[1] == ours


def test_attach_runs_once_the_artifact_exists_and_before_any_tag(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    path = build(tmp_path, image_ref)
    target = f"{registry.host}/{repo('attach')}"
    pusher = reader(registry, target.partition("/")[2])
    seen: list[tuple[str, list[str]]] = []

    def attach(result: PushResult) -> None:
        data, digest = get_manifest(pusher, str(result.manifest_digest))
        assert result.manifest_descriptor == Descriptor(
            OCI_MANIFEST, result.manifest_digest, len(data)
        )
        seen.append((digest, tags(pusher)))

    result = push_api(tmp_path / "home", path, f"{target}:human", attach=attach)
    assert seen == [(str(result.manifest_digest), [])]
    assert result.artifact_type == rootfs.ARTIFACT_TYPE and result.store_path == path
    assert result.key_tag_digest == result.manifest_digest
    assert tags(pusher) == sorted(["human", result.key_tag])


# -- the command's edges -------------------------------------------------------------------


def test_a_bad_sign_key_is_refused_before_anything_is_pushed(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    path = build(tmp_path, image_ref)
    target = f"{registry.host}/{repo('unsigned')}"
    (tmp_path / "key").write_text("not-a-key:c2VjcmV0")
    code, out, err = run_cli(
        tmp_path / "home", "push", str(path), target, "--sign-key", str(tmp_path / "key")
    )
    assert code == 1 and out == ""
    assert "secret key" in err and "c2VjcmV0" not in err
    assert tags(reader(registry, target.partition("/")[2])) == []


def test_push_sign_key_signs_before_any_tag_and_verify_trusts_it(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    target = f"{registry.host}/{repo('signed')}"
    home = tmp_path / "home"
    key = tmp_path / "ci.key"
    assert main(["key", "generate", "ci-1", "-o", str(key)]) == 0
    public = (tmp_path / "ci.key.pub").read_text().strip()
    recipe = write_recipe(tmp_path / "r", image_ref)
    code, out, err = run_cli(
        home, str(recipe), "--no-link", "--push", f"{target}:v1", "--sign-key", str(key)
    )
    assert code == 0, err
    ref = out.splitlines()[1]
    pusher = reader(registry, target.partition("/")[2])
    digest = ref.partition("@")[2]
    assert f"sha256-{digest.partition(':')[2]}" in tags(pusher)  # the signature's index
    assert run_cli(home, "verify", ref, "--trusted-key", public)[0] == 0
    other = tmp_path / "other.key"
    assert main(["key", "generate", "someone-else", "-o", str(other)]) == 0
    untrusted = (tmp_path / "other.key.pub").read_text().strip()
    assert run_cli(home, "verify", ref, "--trusted-key", untrusted)[0] == 2


def test_push_of_an_out_link_signs_the_store_path_it_names(
    tmp_path: Path, image_ref: str, registry: RegistryServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``push ./result --sign-key`` (what a CI job types): the statement is of the store
    path the link names, not of a directory called ``result``."""
    target = f"{registry.host}/{repo('out-link')}"
    home = tmp_path / "home"
    key = tmp_path / "ci.key"
    assert main(["key", "generate", "ci-1", "-o", str(key)]) == 0
    public = (tmp_path / "ci.key.pub").read_text().strip()
    recipe = write_recipe(tmp_path / "r", image_ref)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(home, "-q", str(recipe))  # links ./result
    assert code == 0, err
    code, out, err = run_cli(home, "push", "./result", target, "--sign-key", str(key))
    assert code == 0, err
    ref = out.strip()
    assert run_cli(home, "verify", ref, "--trusted-key", public)[0] == 0


def test_build_push_prints_the_path_then_the_ref(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    target = f"{registry.host}/{repo('build')}:latest"
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link", "--push", target)
    assert code == 0, err
    path, ref = out.splitlines()
    assert Path(path).is_dir() and ref.startswith(target.rpartition(":")[0] + "@sha256:")
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link", "--sign-key", "k")
    assert code == 1 and "--push" in err


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("127.0.0.1:5000/x@sha256:" + "a" * 64, "not to a digest"),
        ("127.0.0.1:5000/UPPER", "invalid"),
        ("", "invalid"),
    ],
)
def test_push_targets_that_are_refused(text: str, problem: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_target(text)
    assert caught.value.reason == Reason.INVALID_REFERENCE and problem in str(caught.value)


def test_push_target_tags() -> None:
    assert parse_target("r.example:5000/a/b") == PushTarget("r.example:5000", "a/b", None)
    assert parse_target("r.example:5000/a/b:v1").tag == "v1"
    assert parse_target("r.example/a/b:latest").tag == "latest"


# -- the registry client: HEAD and chunked uploads -------------------------------------------


def test_manifest_digest_is_a_head(tmp_path: Path, image_ref: str, fault_proxy: FaultProxy) -> None:
    path = build(tmp_path, image_ref)
    name = repo("head")
    code, out, err = run_cli(tmp_path / "home", "push", str(path), f"{fault_proxy.host}/{name}:t")
    assert code == 0, err
    client = remote_for(tmp_path / "home")
    ref = Reference(fault_proxy.host, name, "t")
    fault_proxy.clear()
    assert str(client.manifest_digest(ref, "t")) == out.strip().partition("@")[2]
    assert client.manifest_digest(ref, "nope") is None
    assert [m for m, _, _ in fault_proxy.hits] == ["HEAD", "HEAD"]


def _blob(tmp_path: Path, size: int) -> tuple[Path, Digest]:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, Digest(sha256(data))


def _uploads(proxy: FaultProxy) -> list[tuple[str, str]]:
    return [(m, what) for m, p, what in proxy.hits if "/blobs/uploads/" in p]


def test_a_large_blob_goes_up_in_chunks(tmp_path: Path, fault_proxy: FaultProxy) -> None:
    path, digest = _blob(tmp_path, (5 << 20) + 123)
    name = repo("chunks")
    ref = Reference(fault_proxy.host, name, "x")
    seen: list[tuple[str, int, int | None]] = []
    client = remote_for(tmp_path / "home", chunk_size=1 << 20, progress=lambda *a: seen.append(a))
    assert client.push_blob(ref, path, digest, path.stat().st_size) is True
    assert _uploads(fault_proxy) == [("POST", "forward")] + [("PATCH", "forward")] * 6 + [
        ("PUT", "forward")
    ]
    assert get_blob(Pusher(fault_proxy.url, name), str(digest)) == path.read_bytes()
    assert seen[-1] == (digest.short, path.stat().st_size, path.stat().st_size)
    fault_proxy.clear()
    assert client.push_blob(ref, path, digest, path.stat().st_size) is False
    assert [m for m, _, _ in fault_proxy.hits] == ["HEAD"]


def test_chunks_with_token_auth(
    tmp_path: Path, token_registry: RegistryServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = token_registry
    config = write_docker_config(
        tmp_path / "docker", {server.host: (server.username, server.password)}
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(config.parent))
    path, digest = _blob(tmp_path, (3 << 20) + 5)
    client = remote_for(tmp_path / "home", chunk_size=1 << 20)
    assert client.push_blob(Reference(server.host, "tok/chunks", "x"), path, digest, (3 << 20) + 5)
    assert get_blob(reader(server, "tok/chunks", auth=True), str(digest)) == path.read_bytes()
    assert server.token_server is not None
    assert "repository:tok/chunks:pull,push" in server.token_server.scopes


def test_a_registry_refusing_chunks_gets_one_put(tmp_path: Path, fault_proxy: FaultProxy) -> None:
    path, digest = _blob(tmp_path, 3 << 20)
    name = repo("refused")
    fault_proxy.add(Status(405, "chunks? no"), match="/blobs/uploads/", method="PATCH")
    client = remote_for(tmp_path / "home", chunk_size=1 << 20)
    assert client.push_blob(Reference(fault_proxy.host, name, "x"), path, digest, 3 << 20)
    assert _uploads(fault_proxy) == [
        ("POST", "forward"),
        ("PATCH", "Status"),
        ("POST", "forward"),
        ("PUT", "forward"),
    ]
    assert get_blob(Pusher(fault_proxy.url, name), str(digest)) == path.read_bytes()


def test_a_lost_chunk_answer_starts_the_upload_over(
    tmp_path: Path, fault_proxy: FaultProxy
) -> None:
    """The registry took chunk 2 but its answer was lost: sent again, the chunk is
    refused (distribution cancels the session, 404), and the upload starts over."""
    path, digest = _blob(tmp_path, 3 << 20)
    name = repo("lost")
    fault_proxy.add(Lost(), match="/blobs/uploads/", method="PATCH", after=1, times=1)
    client = remote_for(tmp_path / "home", chunk_size=1 << 20)
    assert client.push_blob(Reference(fault_proxy.host, name, "x"), path, digest, 3 << 20)
    assert _uploads(fault_proxy) == [
        ("POST", "forward"),
        ("PATCH", "forward"),
        ("PATCH", "Lost"),
        ("PATCH", "forward"),  # the same chunk again: 404 BLOB_UPLOAD_INVALID
        ("POST", "forward"),
        *[("PATCH", "forward")] * 3,
        ("PUT", "forward"),
    ]
    assert get_blob(Pusher(fault_proxy.url, name), str(digest)) == path.read_bytes()


# -- parsing --------------------------------------------------------------------------------


def _artifact(**changes: object) -> bytes:
    config = Descriptor(rootfs.CONFIG_TYPE, Digest("c" * 64), 100)
    bundle = Descriptor(rootfs.BUNDLE_TYPE, Digest("b" * 64), 1000)
    annotations = {name: "x" for name in rootfs.REQUIRED}
    annotations.update({rootfs.KEY: "0" * 32, rootfs.ROOTFS_SHA256: "a" * 64,
                        rootfs.MANIFEST_SHA256: "c" * 64})  # fmt: skip
    body = json.loads(
        rootfs.manifest_bytes(
            config,
            ("b.tar.zst", bundle),
            [("vmlinux", Descriptor(LAYERS["vmlinux"], Digest("d" * 64), 5))],
            annotations,
        )
    )
    body.update(changes)
    return json.dumps(body).encode()


def test_parse_rootfs_manifest() -> None:
    parsed = rootfs.parse_rootfs_manifest(Digest("e" * 64), _artifact())
    assert parsed.key == "0" * 32 and parsed.rootfs_sha256 == "a" * 64
    assert list(parsed.kernel) == ["vmlinux"] and parsed.bundle.size == 1000


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"artifactType": "application/vnd.banger.kernel.v1"}, "not a banger rootfs artifact"),
        ({"mediaType": "application/vnd.oci.image.index.v1+json"}, "not an OCI image manifest"),
        ({"layers": []}, "0 layers"),
        ({"layers": [{"mediaType": "x", "digest": "sha256:" + "1" * 64, "size": 1}]}, "layer 0"),
        ({"annotations": {}}, "missing or malformed"),
    ],
)
def test_parse_rootfs_manifest_refuses(changes: dict[str, object], words: str) -> None:
    with pytest.raises(ManifestError) as caught:
        rootfs.parse_rootfs_manifest(Digest("e" * 64), _artifact(**changes))
    assert words in caught.value.message


def test_parse_rootfs_manifest_refuses_a_config_that_is_not_the_annotated_manifest() -> None:
    body = json.loads(_artifact())
    body["config"]["digest"] = "sha256:" + "9" * 64
    with pytest.raises(ManifestError) as caught:
        rootfs.parse_rootfs_manifest(Digest("e" * 64), json.dumps(body).encode())
    assert "the annotations say manifest.json is" in caught.value.message
