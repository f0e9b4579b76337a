"""Signatures on a real registry (Debian's docker-registry, distribution 2.8): attach as
OCI 1.1 referrers, list through the referrers API or its tag-schema fallback, verify.

Artifacts are pushed with ``tests.support.signing.push_rootfs``; hostile answers a
real registry will not give (a referrers API, a huge index, bytes that are not
their digest) come from a ``FaultProxy`` in front of one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from banger_build.errors import Reason, RegistryError, StoreError
from banger_build.oci.blobs import BlobCache
from banger_build.oci.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor
from banger_build.oci.reference import Reference
from banger_build.oci.referrers import (
    MAX_INDEX,
    MAX_REFERRERS,
    SIGNATURE_TYPE,
    attach,
    fallback_tag,
    list_signatures,
    update_fallback_index,
)
from banger_build.oci.remote import Remote
from banger_build.signing import dsse
from banger_build.signing.attach import sign_and_attach
from banger_build.signing.keys import SecretKey, write_key_pair
from banger_build.signing.statement import statement_for
from banger_build.store import Store, StoreEntry
from tests.support.e2e import run_cli
from tests.support.faultproxy import FaultProxy, Reply, Status
from tests.support.oci import Pusher
from tests.support.registry import RegistryServer, write_docker_config
from tests.support.signing import make_entry, push_rootfs


@pytest.fixture(autouse=True)
def no_user_docker_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never read the real ~/.docker/config.json."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path_factory.mktemp("no-docker-config")))
    monkeypatch.delenv("BANGER_BUILD_TRUSTED_KEYS", raising=False)


_counter = iter(range(1_000_000))


def unique(name: str) -> str:
    return f"sig/{name}-{next(_counter)}-{os.getpid()}"


def remote_for(home: Path, **options: Any) -> Remote:
    from banger_build.oci.options import RegistryOptions

    store = Store(home)
    return Remote(BlobCache(store.blobs, store.temp_roots), RegistryOptions(**options))


class Pushed:
    """One store path pushed as a rootfs artifact, and what it takes to sign it."""

    def __init__(self, tmp_path: Path, host: str, *, rootfs: bytes = b"rootfs " * 5000,
                 kernel: dict[str, bytes] | None = None,
                 modules: dict[str, bytes] | None = None, **options: Any) -> None:  # fmt: skip
        self.home = tmp_path / f"home-{next(_counter)}"
        self.entry: StoreEntry = make_entry(self.home, rootfs=rootfs, kernel=kernel,
                                            modules=modules)  # fmt: skip
        self.remote = remote_for(self.home, **options)
        self.ref = Reference.parse(f"{host}/{unique('rootfs')}:sk-{self.entry.key}")
        self.subject = push_rootfs(self.remote, self.ref, self.entry, tmp_path / "scratch")

    @property
    def by_digest(self) -> str:
        return f"{self.ref.name}@{self.subject.digest}"

    def sign(self, key: SecretKey, tmp_path: Path) -> str:
        path = tmp_path / f"{key.name}-{next(_counter)}.key"
        write_key_pair(key, path)
        return str(sign_and_attach(self.remote, self.ref, self.subject, self.entry, path))


def verify(home: Path, *args: str) -> tuple[int, str, str]:
    return run_cli(home, "verify", *args)


# -- attach, list, verify ------------------------------------------------------------------


def test_sign_attach_list_verify(tmp_path: Path, registry: RegistryServer) -> None:
    art = Pushed(tmp_path, registry.host, kernel={"vmlinux": b"kernel" * 100},
                 modules={"kernel/a.ko": b"module", "modules.dep": b""})  # fmt: skip
    key = SecretKey.generate("ci.example-1")
    sig = art.sign(key, tmp_path)
    # distribution 2.8 has no referrers API: 404, so the tag-schema fallback holds it
    assert art.remote.referrers(art.ref, art.subject.digest, MAX_INDEX) is None
    listing = list_signatures(art.remote, art.ref, art.subject.digest)
    assert listing.via == [f"the tag {fallback_tag(art.subject.digest)}"]
    assert [str(f.digest) for f in listing.found] == [sig] and listing.problems == []
    assert listing.found[0].key == "ci.example-1"
    # the registry's own view (raw HTTP): an OCI index under sha256-<hex> listing it
    raw = Pusher(registry.url, art.ref.repository)
    index = raw.request(
        "GET", f"/v2/{art.ref.repository}/manifests/sha256-{art.subject.digest.hex}",
        headers={"Accept": OCI_INDEX},
    ).json()  # fmt: skip
    assert index["mediaType"] == OCI_INDEX
    assert index["manifests"] == [
        {"mediaType": OCI_MANIFEST, "digest": sig, "size": index["manifests"][0]["size"],
         "artifactType": SIGNATURE_TYPE,
         "annotations": {"dev.banger.signature.key": "ci.example-1"}},
    ]  # fmt: skip
    referrer = raw.request(
        "GET", f"/v2/{art.ref.repository}/manifests/{sig}", headers={"Accept": OCI_MANIFEST}
    ).json()
    assert referrer["subject"] == {
        "mediaType": OCI_MANIFEST, "digest": str(art.subject.digest), "size": art.subject.size,
    }  # fmt: skip
    assert referrer["layers"][0]["mediaType"] == "application/vnd.dsse.envelope.v1+json"
    # verify from another machine (an empty home), by digest and by tag
    for target in (art.by_digest, str(art.ref)):
        code, out, err = verify(tmp_path / "verifier", target, "--trusted-key", str(key.public))
        assert (code, err) == (0, ""), err
        assert out == f"{art.by_digest}: ok (signed by ci.example-1)\n"
    # the same key signing again (another builder) pushes the same referrer: one entry
    assert art.sign(key, tmp_path) == sig
    again = list_signatures(art.remote, art.ref, art.subject.digest)
    assert [str(f.digest) for f in again.found] == [sig]


def test_token_auth_end_to_end(tmp_path: Path, token_registry: RegistryServer) -> None:
    auth = (token_registry.username, token_registry.password)
    config = write_docker_config(tmp_path / "docker", {token_registry.host: auth})
    art = Pushed(tmp_path, token_registry.host, docker_config=config)
    key = SecretKey.generate("ci-1")
    tokens = token_registry.token_server
    assert tokens is not None
    tokens.clear()
    signer = remote_for(tmp_path / "signer", docker_config=config)  # no token cached yet
    sign_and_attach(signer, art.ref, art.subject, art.entry, key)
    repo = art.ref.repository
    assert set(tokens.scopes) == {f"repository:{repo}:pull", f"repository:{repo}:pull,push"}
    # verify with credentials (this registry refuses anonymous pulls)
    os.environ["DOCKER_CONFIG"] = str(config.parent)
    code, out, err = verify(tmp_path / "v", art.by_digest, "--trusted-key", str(key.public))
    assert code == 0, err
    os.environ["DOCKER_CONFIG"] = str(tmp_path / "nothing")
    code, out, err = verify(tmp_path / "v2", art.by_digest, "--trusted-key", str(key.public))
    assert code == 4 and "error: " in err and "HTTP 401" in err and auth[1] not in err


def test_signers_of_one_subject_all_end_up_listed(tmp_path: Path, registry: RegistryServer) -> None:
    """Builders with different keys sign one artifact at the same moment, each from its
    own home: every signature ends up in the fallback index. Several rounds."""
    keys = [SecretKey.generate(f"builder-{i}") for i in range(3)]
    for _ in range(4):
        art = Pushed(tmp_path, registry.host)
        barrier = threading.Barrier(len(keys))
        results: dict[str, str] = {}
        errors: list[BaseException] = []

        def sign(
            key: SecretKey,
            art: Pushed = art,
            barrier: threading.Barrier = barrier,
            results: dict[str, str] = results,
            errors: list[BaseException] = errors,
        ) -> None:
            remote = remote_for(tmp_path / f"builder-home-{key.name}")
            path = tmp_path / f"{key.name}-{next(_counter)}.key"
            write_key_pair(key, path)
            barrier.wait()
            try:
                results[key.name] = str(sign_and_attach(remote, art.ref, art.subject,
                                                        art.entry, path))  # fmt: skip
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=sign, args=(k,)) for k in keys]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [] and len(results) == len(keys)
        listing = list_signatures(art.remote, art.ref, art.subject.digest)
        assert sorted(str(f.digest) for f in listing.found) == sorted(results.values())
        trusted = [arg for k in keys for arg in ("--trusted-key", str(k.public))]
        code, out, err = verify(tmp_path / "v", art.by_digest, *trusted)
        assert code == 0 and err == "" and all(k.name in out for k in keys)


def test_a_lost_index_update_is_written_again(tmp_path: Path, registry: RegistryServer) -> None:
    """Writer B's entry is overwritten by writer A's stale read-modify-write while B
    waits to re-read: B sees it is gone and writes again; both end up listed."""
    art = Pushed(tmp_path, registry.host)
    entry_a = {"mediaType": OCI_MANIFEST, "digest": str(art.subject.digest),
               "size": art.subject.size, "artifactType": "application/vnd.other"}  # fmt: skip
    tag = fallback_tag(art.subject.digest)
    raw = Pusher(registry.url, art.ref.repository)
    clobbered: list[float] = []

    def sleep_and_clobber(seconds: float) -> None:
        if not clobbered:  # A's write, from a read made before B's
            body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry_a]}
            raw.push_manifest(tag, json.dumps(body).encode(), OCI_INDEX)
        clobbered.append(seconds)

    key = SecretKey.generate("b")
    envelope = dsse.sign(statement_for(art.entry), key)
    digest = art.remote.push_bytes(art.ref, envelope)
    from banger_build.oci.referrers import index_entry, signature_manifest

    data = signature_manifest(
        art.subject, Descriptor("application/vnd.dsse.envelope.v1+json", digest, len(envelope)),
        "b",
    )  # fmt: skip
    art.remote.push_bytes(art.ref, b"{}")
    sig, _ = art.remote.push_referrer(art.ref, data, OCI_MANIFEST)
    rounds = update_fallback_index(
        art.remote, art.ref, art.subject.digest, index_entry(sig, data, "b"),
        sleep=sleep_and_clobber,
    )  # fmt: skip
    assert rounds == 2
    index = raw.request("GET", f"/v2/{art.ref.repository}/manifests/{tag}",
                        headers={"Accept": OCI_INDEX}).json()  # fmt: skip
    assert [e["digest"] for e in index["manifests"]] == [str(art.subject.digest), str(sig)]


def test_a_transient_400_on_the_referrer_put_is_retried(
    tmp_path: Path, registry: RegistryServer
) -> None:
    """distribution 2.8 answers 400 (DIGEST_INVALID, MANIFEST_BLOB_UNKNOWN) while
    concurrent pushes rewrite a blob's link file: asked again, it succeeds."""
    art = Pushed(tmp_path, registry.host)
    key = SecretKey.generate("ci-1")
    with FaultProxy(registry.url) as proxy:
        proxy.add(Status(400, "DIGEST_INVALID"), match="/manifests/sha256:", method="PUT",
                  times=2)  # fmt: skip
        ref = Reference(proxy.host, art.ref.repository, "x")
        envelope = dsse.sign(statement_for(art.entry), key)
        remote = remote_for(tmp_path / "p")
        sig = attach(remote, ref, art.subject, envelope, "ci-1", sleep=lambda s: None)
        assert proxy.count("Status") == 2
    found = list_signatures(art.remote, art.ref, art.subject.digest).found
    assert [f.digest for f in found] == [sig]


# -- refusals ------------------------------------------------------------------------------


def test_untrusted_and_unsigned_exit_2(tmp_path: Path, registry: RegistryServer) -> None:
    art = Pushed(tmp_path, registry.host)
    other = SecretKey.generate("someone-else")
    code, out, err = verify(tmp_path / "v", art.by_digest, "--trusted-key", str(other.public))
    assert code == 2 and out == ""
    assert f"untrusted: {art.by_digest}: no valid signature by a trusted key (0 signatures" in err
    art.sign(SecretKey.generate("stranger"), tmp_path)
    code, out, err = verify(tmp_path / "v", art.by_digest, "--trusted-key", str(other.public))
    assert code == 2 and "signed by stranger, none of them a trusted key" in err
    assert len(err.strip().splitlines()) == 2  # one line per finding
    code, _, err = verify(tmp_path / "v", art.by_digest)  # no trusted key at all
    assert code == 2 and "trusted keys: none given" in err
    # the content check alone passes
    code, out, _ = verify(tmp_path / "v", art.by_digest, "--no-trust")
    assert code == 0 and "ok (signatures not checked)" in out


def test_a_tampered_envelope_is_refused(tmp_path: Path, registry: RegistryServer) -> None:
    art = Pushed(tmp_path, registry.host)
    key = SecretKey.generate("ci-1")
    envelope = json.loads(dsse.sign(statement_for(art.entry), key))
    payload = base64.b64decode(envelope["payload"])
    envelope["payload"] = base64.b64encode(payload.replace(b"linux/amd64", b"linux/arm64")).decode()
    attach(art.remote, art.ref, art.subject, json.dumps(envelope).encode(), "ci-1")
    code, out, err = verify(tmp_path / "v", art.by_digest, "--trusted-key", str(key.public))
    assert code == 3 and out == ""  # corrupted | untrusted
    assert "corrupted: signature sha256:" in err and "does not verify" in err
    # a good signature beside it stands; the bad one is a warning
    art.sign(key, tmp_path)
    code, out, err = verify(tmp_path / "v", art.by_digest, "--trusted-key", str(key.public))
    assert code == 0 and "ok (signed by ci-1)" in out and "warning: " in err


def test_a_signature_of_other_content_is_refused(tmp_path: Path, registry: RegistryServer) -> None:
    """A valid signature by a trusted key, of another store path's statement (another
    rootfs), attached to this artifact: the digests do not match."""
    art = Pushed(tmp_path, registry.host)
    key = SecretKey.generate("ci-1")
    other = make_entry(tmp_path / "other", rootfs=b"another rootfs")
    attach(art.remote, art.ref, art.subject, dsse.sign(statement_for(other), key), "ci-1")
    code, _, err = verify(tmp_path / "v", art.by_digest, "--trusted-key", str(key.public))
    assert code == 3
    assert "corrupted: signature sha256:" in err and "by ci-1: rootfs.ext4: signed sha256 " in err
    # and sign_and_attach refuses to sign an artifact that is not the entry's
    with pytest.raises(RegistryError) as info:
        sign_and_attach(art.remote, art.ref, art.subject, other, key)
    assert info.value.reason == Reason.STATEMENT_MISMATCH


def test_corrupted_registry_content_exits_1(
    tmp_path: Path, registry_factory: Callable[..., RegistryServer]
) -> None:
    server = registry_factory()
    art = Pushed(tmp_path, server.host)
    key = SecretKey.generate("ci-1")
    art.sign(key, tmp_path)
    manifest = json.loads((server.blob_data_path(str(art.subject.digest))).read_bytes())
    bundle = server.blob_data_path(manifest["layers"][0]["digest"])
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.write_bytes(bytes(data))
    code, out, err = verify(tmp_path / "v", art.by_digest, "--trusted-key", str(key.public))
    assert code == 1 and out == "" and "corrupted: " in err and "does not match its digest" in err
    assert len(err.strip().splitlines()) == 1


def test_a_bundle_whose_rootfs_differs_exits_1(tmp_path: Path, registry: RegistryServer) -> None:
    """A well-formed bundle (its digest is the layer's) holding another rootfs."""
    import io
    import tarfile

    import zstandard

    home = tmp_path / "h"
    entry = make_entry(home, rootfs=b"A" * 4096)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("manifest.json", (entry.path / "manifest.json").read_bytes()),
                           ("rootfs.ext4", b"B" * 4096)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    remote = remote_for(home)
    ref = Reference.parse(f"{registry.host}/{unique('swapped')}:v1")
    bundle = zstandard.ZstdCompressor().compress(raw.getvalue())
    subject = push_rootfs(remote, ref, entry, tmp_path / "s", bundle=bundle)
    key = SecretKey.generate("ci-1")
    sign_and_attach(remote, ref, subject, entry, key)
    code, _, err = verify(tmp_path / "v", f"{ref.name}@{subject.digest}",
                          "--trusted-key", str(key.public))  # fmt: skip
    assert code == 1
    assert f"rootfs.ext4 in the bundle has sha256 {hashlib.sha256(b'B' * 4096).hexdigest()}" in err


# -- the referrers API and hostile indexes ----------------------------------------------------


def _index(entries: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


def _proxied(tmp_path: Path, registry: RegistryServer) -> tuple[Pushed, SecretKey, str]:
    art = Pushed(tmp_path, registry.host)
    key = SecretKey.generate("ci-1")
    return art, key, art.sign(key, tmp_path)


def test_the_referrers_api_is_used_when_there_is_one(
    tmp_path: Path, registry: RegistryServer
) -> None:
    art, key, sig = _proxied(tmp_path, registry)
    sig_manifest = (
        Pusher(registry.url, art.ref.repository)
        .request(
            "GET", f"/v2/{art.ref.repository}/manifests/{sig}", headers={"Accept": OCI_MANIFEST}
        )
        .content
    )
    entry = {"mediaType": OCI_MANIFEST, "digest": sig, "size": len(sig_manifest),
             "artifactType": SIGNATURE_TYPE}  # fmt: skip
    with FaultProxy(registry.url) as proxy:
        proxy.add(Reply(200, _index([entry]), (("Content-Type", OCI_INDEX),)),
                  match=f"/referrers/{art.subject.digest}")  # fmt: skip
        proxy.add(Status(404), match=f"/manifests/{fallback_tag(art.subject.digest)}")
        remote = remote_for(tmp_path / "p")
        ref = Reference(proxy.host, art.ref.repository, None, art.subject.digest)
        listing = list_signatures(remote, ref, art.subject.digest)
        assert listing.via == ["the referrers API"]
        assert [str(f.digest) for f in listing.found] == [sig]
        code, out, err = verify(tmp_path / "v", str(ref), "--trusted-key", str(key.public))
        assert code == 0, err
        assert proxy.count("Reply", "/referrers/") == 2


def test_a_registry_that_indexes_referrers_gets_no_fallback_tag(
    tmp_path: Path, registry: RegistryServer
) -> None:
    """``OCI-Subject`` in the answer to the referrer's PUT: the registry keeps the
    referrers API itself, so no ``sha256-<hex>`` tag is written."""
    art = Pushed(tmp_path, registry.host)
    key = SecretKey.generate("ci-1")
    envelope = dsse.sign(statement_for(art.entry), key)
    with FaultProxy(registry.url) as proxy:
        remote = remote_for(tmp_path / "p")
        ref = Reference(proxy.host, art.ref.repository, "x")
        # the PUT of the signature manifest (by digest) answered as a 1.1 registry would
        proxy.add(Reply(201, b"", (("OCI-Subject", str(art.subject.digest)),)),
                  match="/manifests/sha256:", method="PUT")  # fmt: skip
        attach(remote, ref, art.subject, envelope, "ci-1")
        assert proxy.count("Reply") == 1
        assert not [h for h in proxy.hits if fallback_tag(art.subject.digest) in h[1]]


def test_hostile_fallback_indexes_are_bounded_and_refused(
    tmp_path: Path, registry: RegistryServer
) -> None:
    art, key, sig = _proxied(tmp_path, registry)
    tag_path = f"/manifests/{fallback_tag(art.subject.digest)}"
    trusted = ("--trusted-key", str(key.public))
    with FaultProxy(registry.url) as proxy:
        target = f"{proxy.host}/{art.ref.repository}@{art.subject.digest}"
        # huge: refused at the bound, never read whole
        huge = b" " * (MAX_INDEX + 1)
        proxy.add(Reply(200, huge, (("Content-Type", OCI_INDEX),)), match=tag_path)
        code, _, err = verify(tmp_path / "v", target, *trusted)
        assert code == 6 and f"more than the limit of {MAX_INDEX}" in err
        proxy.clear()
        # bytes that are not the digest the registry claims for them
        body = _index([])
        fake = "sha256:" + hashlib.sha256(b"something else").hexdigest()
        proxy.add(Reply(200, body, (("Docker-Content-Digest", fake),)), match=tag_path)
        code, _, err = verify(tmp_path / "v", target, *trusted)
        assert code == 6 and "does not match its digest" in err
        proxy.clear()
        # wrong digests: entries that are missing, not signatures of this subject, or
        # served as other bytes -- each skipped with a reason, none trusted
        other = "sha256:" + "0" * 64
        entries = [
            {"mediaType": OCI_MANIFEST, "digest": other, "size": 10,
             "artifactType": SIGNATURE_TYPE},
            {"mediaType": OCI_MANIFEST, "digest": str(art.subject.digest),
             "size": art.subject.size, "artifactType": SIGNATURE_TYPE},
            {"mediaType": OCI_MANIFEST, "digest": sig, "size": 700,
             "artifactType": SIGNATURE_TYPE},
        ]  # fmt: skip
        proxy.add(Reply(200, _index(entries)), match=tag_path)
        proxy.add(Reply(200, b'{"schemaVersion": 2}'), match=f"/manifests/{sig}")
        code, _, err = verify(tmp_path / "v", target, *trusted)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 4, err
        assert f"warning: signature {other}: " in lines[0] and "not found" in lines[0]
        assert "artifact type 'application/vnd.banger.rootfs.v1'" in lines[1]
        assert "does not match its digest" in lines[2]
        assert "untrusted: " in lines[3] and "(0 signatures found" in lines[3]
        proxy.clear()
        # too many entries
        many = [entries[2]] * (MAX_REFERRERS + 1)
        proxy.add(Reply(200, _index(many)), match=tag_path)
        code, _, err = verify(tmp_path / "v", target, *trusted)
        assert code == 6 and f"more than the limit of {MAX_REFERRERS}" in err
        # and a writer refuses to clobber it
        ref = Reference(proxy.host, art.ref.repository, "x")
        with pytest.raises(RegistryError) as info:
            attach(remote_for(tmp_path / "w"), ref, art.subject, b"{}", "ci-1")
        assert info.value.reason == Reason.TOO_MANY_REFERRERS
        proxy.clear()
        proxy.add(Reply(200, b'{"not": "an index"}'), match=tag_path)
        with pytest.raises(RegistryError, match="not overwriting it"):
            attach(remote_for(tmp_path / "w"), ref, art.subject, b"{}", "ci-1")


def test_too_many_signatures_on_a_real_registry(tmp_path: Path, registry: RegistryServer) -> None:
    """distribution checks an index's entries exist, not that they are few: a tag listing
    one real signature 40 times is accepted by the registry and refused by us."""
    art, key, sig = _proxied(tmp_path, registry)
    raw = Pusher(registry.url, art.ref.repository)
    size = len(raw.request("GET", f"/v2/{art.ref.repository}/manifests/{sig}",
                           headers={"Accept": OCI_MANIFEST}).content)  # fmt: skip
    entry = {"mediaType": OCI_MANIFEST, "digest": sig, "size": size,
             "artifactType": SIGNATURE_TYPE}  # fmt: skip
    raw.push_manifest(fallback_tag(art.subject.digest), _index([entry] * 40), OCI_INDEX)
    code, _, err = verify(tmp_path / "v", art.by_digest, "--trusted-key", str(key.public))
    assert code == 6 and "lists 40 signatures" in err and "limit of 32" in err


def test_signing_refuses_a_corrupted_store_path(tmp_path: Path, registry: RegistryServer) -> None:
    art = Pushed(tmp_path, registry.host)
    path = art.entry.manifest_file
    os.chmod(art.entry.path, 0o755)
    os.chmod(path, 0o644)
    body = json.loads(path.read_bytes())
    body["derivation"]["size"] = "4GiB"
    path.write_text(json.dumps(body))
    with pytest.raises(StoreError, match="refusing to sign"):
        art.sign(SecretKey.generate("k"), tmp_path)
    assert list_signatures(art.remote, art.ref, art.subject.digest).found == []
