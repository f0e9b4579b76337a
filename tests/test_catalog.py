"""``catalog``: imagecat entries of pushed artifacts, on the real ``docker-registry``.

Artifacts are pushed (and signed) through the CLI; what the entries say is checked
against the store path's own files, the bundle ``bundle`` writes and the manifest
read back with raw HTTP (``tests.support.oci.Pusher``, no code shared with the
client). Forged artifacts are pushed with raw HTTP too.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from banger_build.cli import main
from banger_build.derivation import canonical_json
from banger_build.oci import rootfs
from banger_build.oci.kernel import write_modules_tar
from tests.support.e2e import run_cli, write_recipe
from tests.support.kmod import VSOCK_KO
from tests.support.oci import Pusher, canonical
from tests.support.registry import RegistryServer
from tests.test_kernel_artifact import push_kernel


@pytest.fixture(autouse=True)
def no_user_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never read the real ~/.docker/config.json, nor trusted keys from the environment."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path_factory.mktemp("docker")))
    monkeypatch.delenv("BANGER_BUILD_TRUSTED_KEYS", raising=False)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_pair(tmp_path: Path, name: str) -> tuple[Path, str]:
    secret = tmp_path / f"{name}.key"
    assert main(["key", "generate", name, "-o", str(secret)]) == 0
    return secret, (tmp_path / f"{name}.key.pub").read_text().strip()


def kernel_files(tmp_path: Path) -> str:
    """A [kernel] table staging a kernel, an initrd and a modules directory."""
    k = tmp_path / "k"
    mods = k / "6.1.0-test-amd64"
    (mods / "kernel").mkdir(parents=True)
    (mods / "kernel" / "vsock.ko").write_bytes(VSOCK_KO)
    (mods / "modules.order").write_text("kernel/vsock.ko\n")
    (k / "vmlinuz").write_bytes(b"kernel image " * 1000)
    (k / "initrd.img").write_bytes(b"initrd " * 500)
    return f'[kernel]\npath = "k/vmlinuz"\ninitrd = "k/initrd.img"\nmodules = "{mods}"\n'


def build(directory: Path, image_ref: str, home: Path, extra: str = "", name: str = "") -> Path:
    recipe = write_recipe(directory, image_ref, extra=extra)
    if name:
        recipe.write_text(f'name = "{name}"\n' + recipe.read_text())
    code, out, err = run_cli(home, str(recipe), "--no-link")
    assert code == 0, err
    return Path(out.strip())


def push(home: Path, path: Path, target: str, *extra: str) -> str:
    code, out, err = run_cli(home, "push", "-q", str(path), target, *extra)
    assert code == 0, err
    return out.strip()


def catalog(home: Path, *args: str) -> tuple[int, str, str]:
    return run_cli(home, "catalog", *args)


def refused(home: Path, *args: str) -> str:
    """The one line a refused ``catalog -q`` prints (nothing on stdout, nothing written)."""
    code, out, err = run_cli(home, "catalog", "-q", *args)
    assert code == 1, (out, err)
    assert out == "" and err.startswith("banger-build: error: ") and err.count("\n") == 1, err
    return err


class Pushed:
    """A store path with a staged kernel, pushed and signed as ``REGISTRY/catalog/x:v1``."""

    def __init__(self, tmp_path: Path, image_ref: str, registry: RegistryServer) -> None:
        self.home = tmp_path / "home"
        directory = tmp_path / "r"
        directory.mkdir()
        self.path = build(directory, image_ref, self.home, kernel_files(directory))
        self.secret, self.public = key_pair(tmp_path, "ci-1")
        self.repo = f"catalog/{tmp_path.name[:40].lower().strip('-_.')}"
        self.target = f"{registry.host}/{self.repo}"
        self.ref = push(self.home, self.path, f"{self.target}:v1", "--sign-key", str(self.secret))
        self.pusher = Pusher(registry.url, self.repo)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.key = self.manifest["key"]


@pytest.fixture
def pushed(tmp_path: Path, image_ref: str, registry: RegistryServer) -> Pushed:
    return Pushed(tmp_path, image_ref, registry)


def test_an_entry_says_what_the_store_path_and_its_artifact_hold(
    tmp_path: Path, pushed: Pushed
) -> None:
    out_file = tmp_path / "catalog.json"
    code, out, err = catalog(
        pushed.home, f"{pushed.target}:v1", "-o", str(out_file), "--trusted-key", pushed.public
    )
    assert code == 0, err
    assert out.strip() == str(out_file)
    data = out_file.read_bytes()
    doc = json.loads(data)
    assert data == (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()  # canonical
    assert doc["format"] == 1
    (entry,) = doc["entries"]
    path, m = pushed.path, pushed.manifest
    code, _, err = run_cli(pushed.home, "bundle", "-q", str(path), "-o", str(tmp_path / "b"))
    assert code == 0, err
    bundle = (tmp_path / "b").read_bytes()
    modules = io.BytesIO()
    write_modules_tar(path / "modules", modules)
    manifest_json = (path / "manifest.json").read_bytes()
    rootfs_bytes = (path / "rootfs.ext4").read_bytes()
    annotations = json.loads(
        pushed.pusher.request(
            "GET", f"/v2/{pushed.repo}/manifests/v1", headers={"Accept": rootfs.OCI_MANIFEST}
        ).content
    )["annotations"]
    assert entry == {
        "name": m["name"],
        "ref": pushed.ref,  # what push printed: REGISTRY/REPO@sha256:<artifact manifest>
        "arch": "amd64",
        "created": annotations["org.opencontainers.image.created"],
        "store_key": pushed.key,
        "store_path": path.name,
        "bundle": {
            "digest": f"sha256:{sha256(bundle)}",
            "size": len(bundle),
            "media_type": rootfs.BUNDLE_TYPE,
        },
        "rootfs": {"sha256": sha256(rootfs_bytes), "size": len(rootfs_bytes)},
        "manifest_sha256": sha256(manifest_json),
        "kernel": {
            "files": {
                "vmlinux": {
                    "digest": f"sha256:{sha256((path / 'vmlinux').read_bytes())}",
                    "size": (path / "vmlinux").stat().st_size,
                    "media_type": rootfs.KERNEL_TYPES["vmlinux"],
                },
                "initrd.img": {
                    "digest": f"sha256:{sha256((path / 'initrd.img').read_bytes())}",
                    "size": (path / "initrd.img").stat().st_size,
                    "media_type": rootfs.KERNEL_TYPES["initrd.img"],
                },
                "modules": {
                    "digest": f"sha256:{sha256(modules.getvalue())}",
                    "size": len(modules.getvalue()),
                    "media_type": rootfs.KERNEL_TYPES["modules"],
                },
            }
        },
        "signers": ["ci-1"],
    }
    assert entry["created"].startswith("20") and entry["created"].endswith("Z")
    # every digest in it is one the registry serves
    for digest in (
        entry["bundle"]["digest"],
        *(f["digest"] for f in entry["kernel"]["files"].values()),
    ):
        resp = pushed.pusher.request("HEAD", f"/v2/{pushed.repo}/blobs/{digest}")
        assert resp.status_code == 200


def test_the_same_artifacts_give_the_same_bytes_whatever_the_order(
    tmp_path: Path, image_ref: str, pushed: Pushed
) -> None:
    other = build(tmp_path / "other", image_ref, pushed.home, name="aaa-sorts-first")
    other_ref = push(pushed.home, other, f"{pushed.target}-other:v1")
    by_tag = f"{pushed.target}:v1"
    by_key = f"{pushed.target}:{rootfs.key_tag(pushed.key)}"
    outputs = []
    for refs in ([pushed.ref, other_ref], [other_ref, by_tag, by_key], [by_key, other_ref]):
        code, out, err = catalog(tmp_path / "reader", *refs)  # stdout, an empty home
        assert code == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1] == outputs[2]
    entries = json.loads(outputs[0])["entries"]
    # by name, not by argument: aaa-sorts-first comes first in every run
    assert [e["ref"] for e in entries] == [other_ref, pushed.ref]
    assert entries[0]["name"] == "aaa-sorts-first" < entries[1]["name"]
    assert all("signers" not in e for e in entries)  # no trusted key: signatures not read
    (plain,) = [e for e in entries if e["ref"] == other_ref]
    assert plain["kernel"] is None


def test_a_kernel_artifact_is_named_by_reference_and_digest(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    home = tmp_path / "home"
    kref = f"{registry.host}/kernels/catalog:6.1"
    kdigest = push_kernel(home, kref, tmp_path / "k")
    path = build(tmp_path / "r", image_ref, home, f'[kernel]\nref = "{kref}"\n')
    ref = push(home, path, f"{registry.host}/catalog/with-kernel-ref")
    code, out, err = catalog(home, ref)
    assert code == 0, err
    (entry,) = json.loads(out)["entries"]
    assert entry["kernel"]["artifact"] == {"reference": kref, "digest": kdigest}
    assert set(entry["kernel"]["files"]) == {"vmlinux", "initrd.img"}
    assert entry["kernel"]["files"]["vmlinux"]["digest"] == f"sha256:{sha256(b'kernel')}"


def test_json_events_and_a_result(tmp_path: Path, pushed: Pushed) -> None:
    out_file = tmp_path / "c.json"
    code, out, err = catalog(
        pushed.home, pushed.ref, "--json", "-o", str(out_file), "--trusted-key", pushed.public
    )
    assert code == 0 and err == "", err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["event"] == "step" and pushed.ref in events[0]["message"]
    result = events[-1]
    assert result["event"] == "result"
    assert result["path"] == str(out_file) and result["entries"] == [pushed.ref]
    assert result["signed"] is True
    assert json.loads(out_file.read_text())["entries"][0]["signers"] == ["ci-1"]
    # --json needs a file for the catalog
    code, out, err = catalog(pushed.home, pushed.ref, "--json")
    assert code == 1 and "-o FILE" in err
    assert json.loads(out.splitlines()[-1])["reason"] == "bad-argument"


def test_an_untrusted_or_unsigned_artifact_is_refused_and_nothing_written(
    tmp_path: Path, image_ref: str, pushed: Pushed, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, stranger = key_pair(tmp_path, "stranger")
    out_file = tmp_path / "catalog.json"
    out_file.write_text("the previous catalog\n")
    err = refused(pushed.home, pushed.ref, "-o", str(out_file), "--trusted-key", stranger)
    assert f"error: {pushed.ref}: no valid signature by a trusted key (1 signature found" in err
    assert "trusted keys: stranger" in err and "ci-1" in err, err
    assert out_file.read_text() == "the previous catalog\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".catalog")] == []
    # an unsigned artifact beside a signed one: the whole catalog is refused
    other = build(tmp_path / "other", image_ref, pushed.home, name="unsigned")
    unsigned = push(pushed.home, other, f"{pushed.target}-unsigned")
    err = refused(
        pushed.home, pushed.ref, unsigned, "-o", str(out_file), "--trusted-key", pushed.public
    )
    assert f"error: {unsigned}: no valid signature by a trusted key (0 signatures found" in err
    assert out_file.read_text() == "the previous catalog\n"
    # the environment's trusted keys count as --trusted-key does
    code, out, err = run_cli(pushed.home, "catalog", pushed.ref)
    assert code == 0 and "signers" not in out
    monkeypatch.setenv("BANGER_BUILD_TRUSTED_KEYS", pushed.public)
    code, out, err = run_cli(pushed.home, "catalog", pushed.ref)
    assert code == 0, err
    assert json.loads(out)["entries"][0]["signers"] == ["ci-1"]


def _forge(pushed: Pushed, tag: str, change: Callable[[dict[str, Any]], object]) -> str:
    """Push the artifact's manifest, changed, under ``tag``; its reference."""
    data = pushed.pusher.request(
        "GET", f"/v2/{pushed.repo}/manifests/v1", headers={"Accept": rootfs.OCI_MANIFEST}
    ).content
    body = json.loads(data)
    change(body)
    pushed.pusher.push_manifest(tag, canonical(body), rootfs.OCI_MANIFEST)
    return f"{pushed.target}:{tag}"


def _annotate(name: str, value: str) -> Callable[[dict[str, Any]], object]:
    return lambda body: body["annotations"].update({name: value})


def _drop_initrd(body: dict[str, Any]) -> None:
    body["layers"] = [
        x for x in body["layers"] if x["mediaType"] != rootfs.KERNEL_TYPES["initrd.img"]
    ]


def _initrd_as_vmlinux(body: dict[str, Any]) -> None:
    """The vmlinux layer names the initrd's blob (a real blob, the wrong bytes)."""
    initrd = next(x for x in body["layers"] if x["mediaType"] == rootfs.KERNEL_TYPES["initrd.img"])
    vmlinux = next(x for x in body["layers"] if x["mediaType"] == rootfs.KERNEL_TYPES["vmlinux"])
    vmlinux.update(digest=initrd["digest"], size=initrd["size"])


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_annotate(rootfs.ROOTFS_SHA256, "0" * 64),
         "the annotation dev.banger.rootfs.sha256 is '0000"),
        (_annotate(rootfs.KEY, "0" * 32), "the annotation dev.banger.store.key is '0000"),
        (_annotate(rootfs.NAME, "another"), "the annotation dev.banger.name is 'another'"),
        (_annotate(rootfs.ARCH, "arm64"),
         "the annotation dev.banger.arch is 'arm64', its manifest.json says 'amd64'"),
        (_annotate(rootfs.CREATED, "2001-01-01T00:00:00Z"),
         "the annotation org.opencontainers.image.created is '2001-01-01T00:00:00Z'"),
        (_drop_initrd,
         "its kernel layers (vmlinux, modules) are not the files manifest.json records "
         "(initrd.img, modules, vmlinux)"),
        (_initrd_as_vmlinux, "its vmlinux layer is sha256:"),
        (lambda b: b.update(artifactType="application/vnd.example.other"),
         "is not a banger rootfs artifact"),
    ],
)  # fmt: skip
def test_an_artifact_whose_parts_disagree_is_refused(
    tmp_path: Path, pushed: Pushed, change: Any, words: str
) -> None:
    forged = _forge(pushed, "forged", change)
    err = refused(tmp_path / "reader", forged, "-o", str(tmp_path / "c.json"))
    assert err.startswith(f"banger-build: error: {forged}: "), err
    assert words in err, err
    assert not (tmp_path / "c.json").exists()


def test_a_config_that_is_not_the_store_paths_manifest_is_refused(
    tmp_path: Path, pushed: Pushed
) -> None:
    manifest = json.loads((pushed.path / "manifest.json").read_bytes())
    manifest["derivation"]["epoch"] += 1  # the derivation no longer hashes to the key
    config = json.dumps(manifest).encode()

    def change(body: dict[str, Any]) -> None:
        body["config"].update(pushed.pusher.push_blob(config))
        body["annotations"][rootfs.MANIFEST_SHA256] = sha256(config)

    forged = _forge(pushed, "forged-config", change)
    err = refused(tmp_path / "reader", forged)
    assert f"{forged}: its manifest.json's derivation hashes to" in err

    # a consistent forgery (key = the hash of its derivation) with a junk epoch: one
    # bounded line, not a traceback nor the junk
    manifest["derivation"]["epoch"] = "9" * 100 + "x" * 100_000
    key = sha256(canonical_json(manifest["derivation"]))[:32]
    manifest["key"] = key
    config = json.dumps(manifest).encode()

    def consistent(body: dict[str, Any]) -> None:
        change(body)
        body["annotations"][rootfs.KEY] = key

    forged = _forge(pushed, "forged-epoch", consistent)
    err = refused(tmp_path / "reader", forged)
    assert f"{forged}: its manifest.json's derivation is malformed (invalid literal" in err
    assert len(err) < 600


def test_arguments_that_are_refused_before_any_request(tmp_path: Path, pushed: Pushed) -> None:
    err = refused(tmp_path / "reader", pushed.ref, str(pushed.path))
    assert f"{pushed.path}: a store path is not in a registry: push it" in err
    err = refused(tmp_path / "reader", "./result")
    assert "a store path is not in a registry" in err
    err = refused(tmp_path / "reader", "Bad Ref")
    assert "Bad Ref: invalid image reference" in err
    err = refused(tmp_path / "reader", f"{pushed.target}:no-such-tag")
    assert f"{pushed.target}:no-such-tag: HTTP 404" in err


def test_two_artifacts_of_one_name_are_refused(
    tmp_path: Path, image_ref: str, pushed: Pushed
) -> None:
    recipe = write_recipe(tmp_path / "r2", image_ref)  # the same name, another file's content
    (tmp_path / "r2" / "hello.txt").write_text("another hello\n")
    code, out, err = run_cli(pushed.home, str(recipe), "--no-link")
    assert code == 0, err
    second = Path(out.strip())
    assert second.name != pushed.path.name and second.name[32:] == pushed.path.name[32:]
    ref = push(pushed.home, second, f"{pushed.target}-second")
    err = refused(tmp_path / "reader", pushed.ref, ref)
    assert f"{pushed.ref} and {ref} are two artifacts named" in err
    assert "once per architecture" in err
