"""Keys, statements and DSSE envelopes, without a registry: known answers, a golden
statement, every way an envelope is refused, and keys that never leak."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import stat
from pathlib import Path

import pytest

from banger_build.cli import main
from banger_build.errors import InputError, Reason, StoreError
from banger_build.signing import dsse
from banger_build.signing.keys import (
    PublicKey,
    SecretKey,
    load_secret_key,
    parse_public_key,
    parse_secret_key,
    parse_trusted_keys,
    write_key_pair,
)
from banger_build.signing.statement import (
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    differences,
    parse_claims,
    parse_store_manifest,
    read_store_manifest,
    statement_for,
)
from tests.support.signing import make_entry

SNAPSHOTS = Path(__file__).parent / "snapshots" / "signing"

# RFC 8032, section 7.1, TEST 1: the key the DSSE test vectors call "A"
SEED_A = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
PUBLIC_A = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
SEED_B = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
PUBLIC_B = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def key_a() -> SecretKey:
    return SecretKey.from_seed("A", SEED_A)


# -- known answers ------------------------------------------------------------------------


def test_pae_known_answers() -> None:
    # the DSSE spec's own example (protocol.md, "Test Vectors")
    assert (
        dsse.pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    # LEN is the byte length of the UTF-8 type, not its characters; an empty body keeps
    # its separator
    assert dsse.pae("application/vnd.ex\u00e4mple+json", b"{}") == (
        b"DSSEv1 29 application/vnd.ex\xc3\xa4mple+json 2 {}"
    )
    assert dsse.pae("application/vnd.in-toto+json", b"") == (
        b"DSSEv1 28 application/vnd.in-toto+json 0 "
    )


def test_ed25519_known_answer() -> None:
    """RFC 8032's key pair; the signature of a statement over its PAE as published in the
    DSSE test vectors (Ed25519 is deterministic: same key, same bytes, same signature)."""
    a = key_a()
    assert a.public.raw == PUBLIC_A
    assert SecretKey.from_seed("B", SEED_B).public.raw == PUBLIC_B
    payload = b'{"_type":"https://in-toto.io/Statement/v1"}'
    envelope = json.loads(dsse.sign(payload, a))
    assert envelope == {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": "application/vnd.in-toto+json",
        "signatures": [
            {
                "keyid": "A",
                "sig": "2WAfaHm5jluo0w+0rk8uVkluELJYWjSmU9x7EUzx+AyteDGJ4/nqyJXfmAUVFIAoQafWm7"
                "AxBZNw5M9ixNHiCA==",
            }
        ],
    }


# -- keys ---------------------------------------------------------------------------------


def test_key_generate_writes_nix_format_files(tmp_path: Path) -> None:
    out = tmp_path / "keys" / "ci.key"
    out.parent.mkdir()
    old = os.umask(0o000)  # the secret key is 0600 whatever the umask
    try:
        code, stdout, stderr = run_cli("key", "generate", "ci.example-1",
                                       "-o", str(out))  # fmt: skip
    finally:
        os.umask(old)
    assert code == 0, stderr
    secret_text = out.read_text()
    pub_text = (tmp_path / "keys" / "ci.key.pub").read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    name, _, data = secret_text.partition(":")
    raw = base64.b64decode(data, validate=True)
    assert name == "ci.example-1" and len(raw) == 64 and "\n" not in secret_text
    assert pub_text == f"ci.example-1:{base64.b64encode(raw[32:]).decode()}"
    assert stdout.strip() == pub_text  # the public key is printed...
    assert data not in stdout + stderr and base64.b64encode(raw[:32]).decode() not in stdout
    key = load_secret_key(out)  # ...and the pair is consistent
    assert str(key.public) == pub_text
    assert "ci.example-1" in repr(key) and data not in repr(key) and data not in str(key.__slots__)


def test_key_generate_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "k"
    assert run_cli("key", "generate", "one", "-o", str(out))[0] == 0
    before = out.read_bytes(), (tmp_path / "k.pub").read_bytes()
    code, _, err = run_cli("key", "generate", "two", "-o", str(out))
    assert code == 1 and "exists; not overwriting" in err
    (tmp_path / "k.pub").unlink()  # only the .pub missing: still refused
    code, _, err = run_cli("key", "generate", "two", "-o", str(out))
    assert code == 1 and before[0] == out.read_bytes()
    # the .pub present but not the secret key: refused too, and nothing is left behind
    lone = tmp_path / "lone"
    (tmp_path / "lone.pub").write_text("x")
    code, _, err = run_cli("key", "generate", "three", "-o", str(lone))
    assert code == 1 and not lone.exists()


def test_key_generate_refuses_a_bad_name(tmp_path: Path) -> None:
    code, _, err = run_cli("key", "generate", "no:colons", "-o",
                           str(tmp_path / "k"))  # fmt: skip
    assert code == 1 and "invalid key name" in err and not (tmp_path / "k").exists()


def test_parse_public_keys() -> None:
    # a real Nix public key parses
    nix = parse_public_key("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=")
    assert nix.name == "cache.nixos.org-1" and len(nix.raw) == 32
    keys = parse_trusted_keys([str(nix), str(nix)], f" {key_a().public} ,,{nix}")
    assert [k.name for k in keys] == ["cache.nixos.org-1", "A"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("no-colon-here", "expected NAME:BASE64"),
        (":AAAA", "expected NAME:BASE64"),
        ("k:not base64!", "not valid base64"),
        ("k:" + base64.b64encode(b"x" * 31).decode(), "31 bytes"),
    ],
)
def test_parse_public_key_errors(text: str, words: str) -> None:
    with pytest.raises(InputError) as info:
        parse_public_key(text)
    assert info.value.reason == Reason.KEY_INVALID and words in str(info.value)


def test_a_secret_key_given_as_trusted_is_refused_without_echoing_it() -> None:
    secret = key_a().text()
    with pytest.raises(InputError) as info:
        parse_trusted_keys([], secret)
    message = str(info.value)
    assert "this is a secret key" in message
    assert secret.partition(":")[2] not in message and secret.partition(":")[2][:12] not in message


def test_secret_key_errors_never_show_the_key(tmp_path: Path) -> None:
    good = key_a().text()
    data = base64.b64decode(good.partition(":")[2])
    mismatched = "A:" + base64.b64encode(data[:32] + PUBLIC_B).decode()
    with pytest.raises(InputError) as info:
        parse_secret_key(mismatched, "key.sec")
    assert info.value.reason == Reason.KEY_MISMATCH
    assert mismatched[2:] not in str(info.value) and mismatched[2:20] not in str(info.value)
    with pytest.raises(InputError) as info:
        parse_secret_key(str(key_a().public), "key.sec")
    assert "is this the .pub file?" in str(info.value)
    big = tmp_path / "big"
    big.write_bytes(b"A:" + b"A" * 10_000)
    with pytest.raises(InputError, match="more than 4096 bytes"):
        load_secret_key(big)
    with pytest.raises(InputError) as info:
        load_secret_key(tmp_path)
    assert info.value.reason == Reason.IO
    assert parse_secret_key(f"  {good}\n", "k").public == key_a().public  # whitespace ok


def test_secret_key_is_not_picklable_or_printable() -> None:
    import pickle

    key = key_a()
    with pytest.raises(TypeError):
        pickle.dumps(key)
    assert repr(key) == "SecretKey('A')"


def test_write_key_pair_is_exclusive_through_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious")
    (tmp_path / "k").symlink_to(target)
    with pytest.raises(InputError):
        write_key_pair(key_a(), tmp_path / "k")
    assert target.read_text() == "precious"


# -- the statement ------------------------------------------------------------------------


def test_statement_golden(tmp_path: Path, snapshot) -> None:  # type: ignore[no-untyped-def]
    """The statement of a fixed store path, byte for byte (canonical JSON): any change
    of the format shows up here as a snapshot diff."""
    entry = make_entry(
        tmp_path / "home",
        rootfs=b"rootfs bytes",
        kernel={"vmlinux": b"kernel bytes", "initrd.img": b"initrd bytes"},
        kernel_artifact={
            "reference": "registry.example/kernels/vmlinux:6.1",
            "manifest": "sha256:" + "ef" * 32,
            "config": "sha256:" + "01" * 32,
        },
    )
    statement = statement_for(entry)
    snapshot.snapshot_dir = SNAPSHOTS
    snapshot.assert_match(statement.decode() + "\n", "statement.json")
    # a pure function of the store path: another home, the same bytes
    again = make_entry(
        tmp_path / "other-home",
        rootfs=b"rootfs bytes",
        kernel={"vmlinux": b"kernel bytes", "initrd.img": b"initrd bytes"},
        kernel_artifact={
            "reference": "registry.example/kernels/vmlinux:6.1",
            "manifest": "sha256:" + "ef" * 32,
            "config": "sha256:" + "01" * 32,
        },
    )
    assert statement_for(again) == statement
    body = json.loads(statement)
    assert body["_type"] == STATEMENT_TYPE and body["predicateType"] == PREDICATE_TYPE
    assert [s["name"] for s in body["subject"]] == [
        "initrd.img", "manifest.json", "rootfs.ext4", "vmlinux",
    ]  # fmt: skip
    manifest_sha = read_store_manifest(entry).sha256
    assert body["subject"][1]["digest"]["sha256"] == manifest_sha
    assert body["predicate"]["storePath"] == entry.path.name


def test_statement_without_kernel_and_with_a_modules_directory(tmp_path: Path) -> None:
    entry = make_entry(tmp_path / "home", rootfs=b"r")
    body = json.loads(statement_for(entry))
    assert [s["name"] for s in body["subject"]] == ["manifest.json", "rootfs.ext4"]
    assert "kernel" not in body["predicate"]
    assert body["predicate"]["image"] == {
        "reference": "registry.example/base/debian:bookworm",
        "digest": "sha256:" + "ab" * 32,
        "platform": "linux/amd64",
    }
    # a modules directory output is covered by manifest.json, not a subject of its own
    manifest = json.loads((entry.path / "manifest.json").read_bytes())
    manifest["outputs"]["modules"] = {"sha256": "00" * 32, "size": 1}
    facts = parse_store_manifest(json.dumps(manifest).encode())
    assert "modules" in facts.outputs and "modules" not in facts.files


def test_statement_refuses_a_corrupted_manifest(tmp_path: Path) -> None:
    entry = make_entry(tmp_path / "home")
    path = entry.manifest_file
    manifest = json.loads(path.read_bytes())
    manifest["derivation"]["epoch"] += 1  # no longer hashes to the key
    os.chmod(entry.path, 0o755)
    os.chmod(path, 0o644)
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="refusing to sign a corrupted store path"):
        statement_for(entry)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m.pop("derivation"), "the derivation is missing"),
        (lambda m: m["outputs"].pop("rootfs.ext4"), "no rootfs.ext4"),
        (lambda m: m["outputs"]["rootfs.ext4"].update(sha256="xyz"), "is malformed"),
        (lambda m: m.update(key="../etc"), "malformed"),
        (lambda m: m["image"].update(manifest="latest"), "image digest"),
    ],
)
def test_malformed_manifests_are_not_store_paths(tmp_path: Path, change, words: str) -> None:  # type: ignore[no-untyped-def]
    entry = make_entry(tmp_path / "home")
    manifest = json.loads(entry.manifest_file.read_bytes())
    change(manifest)
    with pytest.raises(StoreError) as info:
        parse_store_manifest(json.dumps(manifest).encode())
    assert info.value.reason == Reason.NOT_A_STORE_PATH and words in str(info.value)


# -- envelopes ----------------------------------------------------------------------------


def _signed(tmp_path: Path, key: SecretKey | None = None) -> tuple[bytes, bytes]:
    statement = statement_for(make_entry(tmp_path / "home"))
    return statement, dsse.sign(statement, key or key_a())


def test_verify_accepts_a_trusted_signature(tmp_path: Path) -> None:
    statement, envelope = _signed(tmp_path)
    b = SecretKey.from_seed("B", SEED_B).public
    result = dsse.verify(envelope, [b, key_a().public])
    assert isinstance(result, dsse.VerifiedStatement)
    assert result.signer == "A" and result.statement == statement
    assert result.claims == parse_claims(statement)
    assert dsse.sign(statement, key_a()) == envelope  # deterministic


def test_verify_accepts_url_safe_base64_and_no_keyid(tmp_path: Path) -> None:
    _, envelope = _signed(tmp_path)
    body = json.loads(envelope)
    body["payload"] = body["payload"].replace("+", "-").replace("/", "_").rstrip("=")
    body["signatures"][0]["sig"] = body["signatures"][0]["sig"].replace("+", "-")
    del body["signatures"][0]["keyid"]
    result = dsse.verify(json.dumps(body).encode(), [key_a().public])
    assert isinstance(result, dsse.VerifiedStatement) and result.signer == "A"


def refusal(envelope: bytes, trusted: list[PublicKey]) -> dsse.Refusal:
    result = dsse.verify(envelope, trusted)
    assert isinstance(result, dsse.Refusal), result
    return result


def test_verify_refuses_an_untrusted_key(tmp_path: Path) -> None:
    _, envelope = _signed(tmp_path, SecretKey.from_seed("B", SEED_B))
    result = refusal(envelope, [key_a().public])
    assert result.reason == Reason.UNTRUSTED and "signed by B" in result.message
    # the same name with another key is no trust either: the signature does not verify
    impostor = PublicKey("B", PUBLIC_A)
    assert refusal(envelope, [impostor]).reason == Reason.SIGNATURE_INVALID
    assert refusal(envelope, []).reason == Reason.UNTRUSTED


def test_verify_refuses_tampering(tmp_path: Path) -> None:
    statement, envelope = _signed(tmp_path)
    trusted = [key_a().public]
    body = json.loads(envelope)
    forged = statement.replace(b'"rootfs.ext4"', b'"rootfs.ext5"')
    body["payload"] = base64.b64encode(forged).decode()
    assert refusal(json.dumps(body).encode(), trusted).reason == Reason.SIGNATURE_INVALID
    body = json.loads(envelope)
    sig = bytearray(base64.b64decode(body["signatures"][0]["sig"]))
    sig[0] ^= 1
    body["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    result = refusal(json.dumps(body).encode(), trusted)
    assert result.reason == Reason.SIGNATURE_INVALID and "does not verify" in result.message
    body = json.loads(envelope)
    body["payloadType"] = "application/json"  # the signature covers the type too
    assert refusal(json.dumps(body).encode(), trusted).reason == Reason.ENVELOPE_INVALID


@pytest.mark.parametrize(
    "envelope",
    [
        b"not json",
        b"[]",
        b'{"payload": "e30=", "payloadType": "application/vnd.in-toto+json"}',
        b'{"payload": "e30=", "payloadType": "application/vnd.in-toto+json", "signatures": []}',
        b'{"payload": "%%%", "payloadType": "application/vnd.in-toto+json",'
        b' "signatures": [{"sig": "AA=="}]}',
        b'{"payload": "e30=", "payloadType": "application/vnd.in-toto+json",'
        b' "signatures": [{"sig": 5}]}',
        b'{"payload": "e30=", "payloadType": 1, "signatures": [{"sig": "AA=="}]}',
        b" " * (dsse.MAX_ENVELOPE + 1),
    ],
    ids=[
        "text",
        "list",
        "no-signatures",
        "empty-signatures",
        "bad-payload",
        "bad-sig",
        "bad-type",
        "too-large",
    ],  # fmt: skip
)
def test_verify_refuses_malformed_envelopes(envelope: bytes) -> None:
    assert refusal(envelope, [key_a().public]).reason == Reason.ENVELOPE_INVALID


def test_verify_refuses_a_signed_non_statement() -> None:
    envelope = dsse.sign(b'{"_type": "something else"}', key_a())
    result = refusal(envelope, [key_a().public])
    assert result.reason == Reason.STATEMENT_INVALID and "signed by A" in result.message


def test_hostile_keyids_are_shown_safely(tmp_path: Path) -> None:
    _, envelope = _signed(tmp_path)
    body = json.loads(envelope)
    body["signatures"][0]["keyid"] = "evil\nname\x1b[31m" + "x" * 500
    message = refusal(json.dumps(body).encode(), [key_a().public]).message
    assert "\n" not in message and "\x1b" not in message and len(message) < 300


def test_differences_name_each_mismatch(tmp_path: Path) -> None:
    entry = make_entry(tmp_path / "home", rootfs=b"one")
    other = make_entry(tmp_path / "home2", rootfs=b"two", kernel={"vmlinux": b"k"})
    claims = parse_claims(statement_for(other))
    found = differences(claims, read_store_manifest(entry))
    assert any(line.startswith("rootfs.ext4: signed sha256") for line in found)
    assert any("names vmlinux, which the store path does not have" in line for line in found)
    assert differences(parse_claims(statement_for(entry)), read_store_manifest(entry)) == []


def test_a_modules_directory_is_signed_by_its_deterministic_tar(tmp_path: Path) -> None:
    import hashlib
    import io as _io

    from banger_build.oci.kernel import write_modules_tar

    modules = {"kernel/fs/ext4.ko": b"\x7fELF ext4", "modules.dep": b"kernel/fs/ext4.ko:\n"}
    one = make_entry(tmp_path / "one", modules=modules)
    two = make_entry(tmp_path / "two", modules=modules)
    assert statement_for(one) == statement_for(two)  # whatever the home
    tar = _io.BytesIO()
    write_modules_tar(one.path / "modules", tar)
    subjects = {s["name"]: s["digest"]["sha256"] for s in json.loads(statement_for(one))["subject"]}
    assert subjects["modules"] == hashlib.sha256(tar.getvalue()).hexdigest()
    # a changed module changes the statement
    os.chmod(two.path, 0o755)
    for d in (
        two.path / "modules",
        two.path / "modules" / "kernel",
        two.path / "modules" / "kernel" / "fs",
    ):
        os.chmod(d, 0o755)
    ko = two.path / "modules" / "kernel" / "fs" / "ext4.ko"
    os.chmod(ko, 0o644)
    ko.write_bytes(b"\x7fELF evil")
    assert statement_for(two) != statement_for(one)
