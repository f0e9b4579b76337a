"""``banger-build verify`` of store paths (re-hash, recorded signatures, Nix's exit bits),
and of a really built store path pushed and signed, end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from banger_build.oci.reference import Reference
from banger_build.signing import dsse
from banger_build.signing.attach import sign_and_attach
from banger_build.signing.keys import SecretKey
from banger_build.signing.statement import statement_for
from banger_build.signing.verify import META_SUBSTITUTED, substitution_record
from banger_build.store import Store, StoreEntry
from tests.support.e2e import run_cli, write_recipe
from tests.support.registry import RegistryServer
from tests.support.signing import make_entry, push_rootfs


@pytest.fixture(autouse=True)
def no_env_keys(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.delenv("BANGER_BUILD_TRUSTED_KEYS", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path_factory.mktemp("no-docker-config")))


def writable(entry: StoreEntry, name: str) -> Path:
    os.chmod(entry.path, 0o755)
    os.chmod(entry.path / name, 0o644)
    return entry.path / name


def substituted(home: Path, key: SecretKey, **kwargs: object) -> StoreEntry:
    """A store path recorded as substituted, with the envelope of ``key``."""
    entry = make_entry(home, built_here=False, **kwargs)  # type: ignore[arg-type]
    envelope = dsse.sign(statement_for(entry), key)
    record = substitution_record("registry.example/r@sha256:" + "1" * 64, key.name, [envelope])
    assert entry.meta_file is not None
    entry.meta_file.write_text(json.dumps({META_SUBSTITUTED: record, "time": 1}))
    return entry


def test_a_path_built_here_verifies(tmp_path: Path) -> None:
    home = tmp_path / "home"
    entry = make_entry(home, kernel={"vmlinux": b"k" * 100})
    code, out, err = run_cli(home, "verify", str(entry.path))
    assert (code, err) == (0, "") and out == f"{entry.path}: ok (built locally)\n"


def test_a_corrupted_file_exits_1_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    entry = make_entry(home, rootfs=b"x" * 10_000)
    rootfs = writable(entry, "rootfs.ext4")
    data = bytearray(rootfs.read_bytes())
    data[5000] ^= 1
    rootfs.write_bytes(bytes(data))
    code, out, err = run_cli(home, "verify", str(entry.path))
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"banger-build: corrupted: {rootfs}: sha256 ")
    assert "manifest.json records" in lines[0]


def test_missing_extra_and_special_files_are_corruption(tmp_path: Path) -> None:
    home = tmp_path / "home"
    entry = make_entry(home, kernel={"vmlinux": b"k"})
    writable(entry, "vmlinux").unlink()
    os.mkfifo(entry.path / "rootfs.ext4.fifo")
    (entry.path / "extra").write_text("x")
    os.unlink(entry.path / "rootfs.ext4")
    os.mkfifo(entry.path / "rootfs.ext4")  # never opened: no hang
    code, _, err = run_cli(home, "verify", str(entry.path))
    assert code == 1
    assert "rootfs.ext4: not a regular file" in err and "vmlinux: No such file" in err
    assert "extra: not among manifest.json's outputs" in err
    assert "rootfs.ext4.fifo: not among" in err


def test_a_tampered_manifest_is_corruption(tmp_path: Path) -> None:
    home = tmp_path / "home"
    entry = make_entry(home)
    path = writable(entry, "manifest.json")
    body = json.loads(path.read_bytes())
    body["derivation"]["epoch"] = 1
    path.write_text(json.dumps(body))
    code, _, err = run_cli(home, "verify", str(entry.path))
    assert code == 1 and "the derivation hashes to" in err and f"not to the key {entry.key}" in err
    path.write_text("{not json")
    code, _, err = run_cli(home, "verify", str(entry.path))
    assert code == 1 and "not valid JSON" in err


def test_substituted_paths_need_a_trusted_signature(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = SecretKey.generate("cache-1")
    entry = substituted(home, key)
    code, out, err = run_cli(home, "verify", str(entry.path), "--trusted-key", str(key.public))
    assert code == 0 and out == f"{entry.path}: ok (signed by cache-1)\n"
    stranger = SecretKey.generate("stranger")
    code, out, err = run_cli(home, "verify", str(entry.path),
                             "--trusted-key", str(stranger.public))  # fmt: skip
    assert code == 2 and "signed by cache-1, none of them a trusted key" in err
    # the environment variable works as the option does
    os.environ["BANGER_BUILD_TRUSTED_KEYS"] = f"{stranger.public},{key.public}"
    try:
        assert run_cli(home, "verify", str(entry.path))[0] == 0
    finally:
        del os.environ["BANGER_BUILD_TRUSTED_KEYS"]
    # corrupted and untrusted at once: both bits
    rootfs = writable(entry, "rootfs.ext4")
    rootfs.write_bytes(b"changed")
    code, _, err = run_cli(home, "verify", str(entry.path))
    assert code == 3 and "corrupted: " in err and "untrusted: " in err


def test_a_path_without_a_record_is_untrusted(tmp_path: Path) -> None:
    home = tmp_path / "home"
    entry = make_entry(home, built_here=False)
    code, _, err = run_cli(home, "verify", str(entry.path))
    assert code == 2 and "neither built here nor substituted" in err
    # a store path of another home: re-hashed, untrusted without a record here
    other = make_entry(tmp_path / "other", name="elsewhere")
    code, out, err = run_cli(home, "verify", str(other.path))
    assert code == 2 and "untrusted: " in err
    code, out, err = run_cli(home, "verify", str(other.path), "--no-trust")
    assert code == 0 and "signatures not checked" in out


def test_bad_arguments_exit_4(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code, _, err = run_cli(home, "verify", str(tmp_path), "--trusted-key", "k:AAAA")
    assert code == 4 and "error: --trusted-key 'k': 3 bytes" in err
    code, _, err = run_cli(home, "verify", str(tmp_path))
    assert code == 4 and "error: " in err and "not a store path" in err
    code, _, err = run_cli(home, "verify", "Not A Reference!")
    assert code == 4 and "neither a path nor a reference" in err
    # several targets: the bits combine
    good = make_entry(home)
    code, _, _ = run_cli(home, "verify", str(good.path), str(tmp_path))
    assert code == 4


def test_a_real_build_pushed_signed_and_verified(
    tmp_path: Path, image_ref: str, registry: RegistryServer
) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    home = tmp_path / "home"
    code, out, err = run_cli(home, str(recipe), "-o", str(tmp_path / "result"))
    assert code == 0, err
    store = Store(home)
    entry = store.entry_of(tmp_path / "result")
    code, out, err = run_cli(home, "verify", str(tmp_path / "result"))
    assert code == 0 and "ok (built locally)" in out
    from banger_build.oci.blobs import BlobCache
    from banger_build.oci.remote import Remote

    remote = Remote(BlobCache(store.blobs, store.temp_roots))
    ref = Reference.parse(f"{registry.host}/signed/debianish:sk-{entry.key}")
    subject = push_rootfs(remote, ref, entry, tmp_path / "scratch")
    key = SecretKey.generate("ci.example-1")
    sign_and_attach(remote, ref, subject, entry, key)
    code, out, err = run_cli(tmp_path / "elsewhere", "verify", str(ref),
                             "--trusted-key", str(key.public))  # fmt: skip
    assert (code, err) == (0, "")
    assert out == f"{ref.name}@{subject.digest}: ok (signed by ci.example-1)\n"


def test_a_substituted_modules_directory_is_checked_by_its_signature(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = SecretKey.generate("cache-1")
    entry = substituted(home, key, modules={"kernel/a.ko": b"module a"})
    code, out, err = run_cli(home, "verify", str(entry.path), "--trusted-key", str(key.public))
    assert code == 0, err
    for d in (entry.path, entry.path / "modules", entry.path / "modules" / "kernel"):
        os.chmod(d, 0o755)
    os.chmod(entry.path / "modules" / "kernel" / "a.ko", 0o644)
    (entry.path / "modules" / "kernel" / "a.ko").write_bytes(b"module b")
    code, out, err = run_cli(home, "verify", str(entry.path), "--trusted-key", str(key.public))
    assert code == 3 and "by cache-1: modules: signed sha256 " in err
