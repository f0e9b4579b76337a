"""Verify a store path or a pushed artifact: its content, then its signatures.

The verdict is a list of findings, one line each, and an exit status made
as Nix's ``nix store verify`` makes it: bits that combine.

    0  ok
    1  corrupted   content differs from what manifest.json records, manifest.json's
                   derivation does not hash to its key, a bundle is malformed, or (when no
                   signature is good) a trusted key's signature does not verify or vouches
                   for other digests
    2  untrusted   no valid signature by a trusted key for exactly this content
    4  other       the registry failed, the artifact is not a banger rootfs, ...

A store path (``verify_store_path``): its files are re-hashed against
manifest.json's outputs and the derivation against the key. Trust: a path
built on this machine (its meta record names a recipe and no substitution)
is trusted as built, like Nix's locally built paths; a substituted one
needs a valid signature by a trusted key among those recorded when it was
substituted (``META_SUBSTITUTED``, written by substitution through
``substitution_record``); a path with no record is untrusted.

A reference (``verify_reference``): the artifact manifest (parsed strictly
as ``push`` writes it, by ``oci.rootfs``), its config (the manifest.json
bytes) and every layer are fetched and verified against their digests.
The bundle layer is downloaded whole (into the blob cache) and decompressed
to re-hash ``rootfs.ext4``: the signature binds the raw digest, not the
compressed bytes, so nothing short of that ties the layer to what was signed.
Kernel layers are the raw files: their descriptors' digests are compared with
manifest.json and the blobs fetched (verified).
The signatures are the referrers of the artifact manifest (``referrers``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger_build.errors import BangerError, Reason, StoreError
from banger_build.oci.failure import Failure
from banger_build.oci.manifest import Descriptor
from banger_build.oci.reference import Digest, Reference
from banger_build.oci.referrers import list_signatures
from banger_build.oci.rootfs import ARTIFACT_TYPE, RootfsArtifact, parse_rootfs_manifest
from banger_build.signing import dsse
from banger_build.signing.content import (
    hash_outputs,
    max_bundle_size,
    read_bundle,
)
from banger_build.signing.keys import PublicKey
from banger_build.signing.statement import (
    MAX_STORE_MANIFEST,
    MODULES_DIR,
    ROOTFS,
    StoreManifest,
    differences,
    parse_store_manifest,
    read_store_manifest,
    tree_digests,
)
from banger_build.store import MANIFEST, META_SUBSTITUTED, Store, StoreEntry

if TYPE_CHECKING:  # the HTTP stack is imported only by who makes a Remote
    from banger_build.oci.remote import Remote

CORRUPTED = 1
UNTRUSTED = 2
OTHER = 4
#: the pushed artifact's type (``oci.rootfs``), under the name this module gave it first
ROOTFS_ARTIFACT_TYPE = ARTIFACT_TYPE

_KINDS = {CORRUPTED: "corrupted", UNTRUSTED: "untrusted", OTHER: "error", 0: "warning"}


@dataclass(frozen=True)
class Finding:
    bit: int  # CORRUPTED, UNTRUSTED, OTHER, or 0 for a warning
    text: str

    @property
    def kind(self) -> str:
        """``corrupted``, ``untrusted``, ``error`` or ``warning``."""
        return _KINDS[self.bit]

    def line(self) -> str:
        return f"{self.kind}: {self.text}"


@dataclass
class Verdict:
    target: str
    findings: list[Finding] = field(default_factory=list)
    signers: list[str] = field(default_factory=list)
    accepted: list[bytes] = field(default_factory=list)  # the envelopes of ``signers``
    trusted_as: str = ""  # "signed by K", "built locally"; "" when untrusted/unchecked

    @property
    def status(self) -> int:
        bits = 0
        for finding in self.findings:
            bits |= finding.bit
        return bits

    def add(self, bit: int, text: str) -> None:
        self.findings.append(Finding(bit, text))


# -- signatures -------------------------------------------------------------------------


def judge_signatures(
    verdict: Verdict,
    envelopes: Sequence[tuple[str, bytes]],
    trusted: Sequence[PublicKey],
    manifest: StoreManifest,
    trees: Mapping[str, str] | None = None,
) -> None:
    """Add the signers of valid signatures for exactly ``manifest``'s content (and
    ``trees``: the modules directory's tar digest, if any) to ``verdict``, or the
    findings that say why there are none."""
    bad: list[Finding] = []
    for label, envelope in envelopes:
        result = dsse.verify(envelope, trusted)
        if isinstance(result, dsse.Refusal):
            bit = CORRUPTED if result.reason == Reason.SIGNATURE_INVALID else 0
            bad.append(Finding(bit, f"{label}: {result.message}"))
            continue
        found = differences(result.claims, manifest, trees)
        if found:
            bad += [Finding(CORRUPTED, f"{label} by {result.signer}: {d}") for d in found]
            continue
        verdict.accepted.append(envelope)
        if result.signer not in verdict.signers:
            verdict.signers.append(result.signer)
    if verdict.signers:
        # a good signature stands; junk beside it is worth a warning, not a failure
        verdict.findings += [Finding(0, f.text) for f in bad]
        verdict.trusted_as = f"signed by {', '.join(verdict.signers)}"
        return
    verdict.findings += bad
    names = ", ".join(k.name for k in trusted) or "none given"
    count = f"{len(envelopes)} signature{'s' if len(envelopes) != 1 else ''}"
    verdict.add(
        UNTRUSTED,
        f"{verdict.target}: no valid signature by a trusted key ({count} found; "
        f"trusted keys: {names})",
    )


def substitution_record(source: str, signer: str, envelopes: Sequence[bytes]) -> dict[str, Any]:
    """What substitution records in the meta of a path it published: where from, the
    key that vouched for it, and the envelopes (so ``verify`` checks them again)."""
    return {
        "source": source,
        "signer": signer,
        "signatures": [json.loads(envelope) for envelope in envelopes],
    }


def recorded_envelopes(meta: dict[str, Any]) -> list[bytes] | None:
    """The envelopes a substituted path's meta record holds (None: not substituted)."""
    record = meta.get(META_SUBSTITUTED)
    if not isinstance(record, dict):
        return None
    raw = record.get("signatures")
    items = raw if isinstance(raw, list) else []
    return [json.dumps(item, sort_keys=True, separators=(",", ":")).encode() for item in items]


# -- a store path -----------------------------------------------------------------------


def _entry(store: Store, path: Path) -> StoreEntry:
    """This store's entry for ``path``, else a store path lying elsewhere (no meta)."""
    try:
        return store.entry_of(path)
    except StoreError:
        real = path.resolve()
        if not (real / MANIFEST).is_file():
            raise
        return StoreEntry.at(real)


def verify_store_path(
    store: Store,
    path: Path,
    trusted: Sequence[PublicKey],
    *,
    contents: bool = True,
    trust: bool = True,
) -> Verdict:
    entry = _entry(store, path)
    verdict = Verdict(str(entry.path))
    locked = entry.meta_file is not None  # ours: hold the key lock shared (gc waits)
    with store.key_lock(entry.key, shared=True) if locked else contextlib.nullcontext():
        try:
            manifest = read_store_manifest(entry)
        except StoreError as exc:
            verdict.add(CORRUPTED, str(exc))
            return verdict
        _check_key(verdict, manifest, str(entry.manifest_file))
        if contents:
            for text in hash_outputs(entry.path, manifest):
                verdict.add(CORRUPTED, text)
        if trust:
            meta = entry.meta()
            envelopes = recorded_envelopes(meta)
            if envelopes is not None:
                labelled = [(f"recorded signature {i + 1}", e) for i, e in enumerate(envelopes)]
                try:
                    trees = tree_digests(entry.path, manifest)
                except BangerError as exc:
                    verdict.add(CORRUPTED, str(exc))
                    return verdict
                judge_signatures(verdict, labelled, trusted, manifest, trees)
            elif isinstance(meta.get("recipe"), str):
                verdict.trusted_as = "built locally"
            else:
                verdict.add(
                    UNTRUSTED,
                    f"{entry.path}: neither built here nor substituted with signatures "
                    "(no record in this store)",
                )
    return verdict


def _check_key(verdict: Verdict, manifest: StoreManifest, where: str) -> None:
    if manifest.derivation_key != manifest.key:
        verdict.add(
            CORRUPTED,
            f"{where}: the derivation hashes to {manifest.derivation_key}, not to the "
            f"key {manifest.key}",
        )


# -- a pushed artifact --------------------------------------------------------------------


def _fetch_bytes(remote: Remote, ref: Reference, desc: Descriptor, limit: int) -> bytes:
    remote.blob(ref, desc)
    data = remote.cache.read(desc.digest, desc.size, limit=limit)
    if data is None:
        raise StoreError(f"{desc.digest} vanished from the blob cache", reason=Reason.BLOB_CACHE)
    return data


#: reasons that say the content is not what it should be (the rest: could not look)
_CORRUPTION = frozenset({Reason.DIGEST_MISMATCH, Reason.BUNDLE_INVALID, Reason.CORRUPT})


@contextlib.contextmanager
def _boundary(verdict: Verdict, ref: Reference, *, content: bool = True) -> Iterator[None]:
    """One step of a reference's check: its error becomes a finding, the check goes on.
    ``content``: the step reads the artifact's content, whose mismatch is corruption
    (a signature listing that fails is not: the content may be fine)."""
    try:
        yield
    except (Failure, BangerError) as exc:
        error = exc.error_for(str(ref)) if isinstance(exc, Failure) else exc
        corrupt = content and error.reason in _CORRUPTION
        verdict.add(CORRUPTED if corrupt else OTHER, str(error))


def verify_reference(
    remote: Remote,
    ref: Reference,
    trusted: Sequence[PublicKey],
    *,
    contents: bool = True,
    trust: bool = True,
) -> Verdict:
    verdict = Verdict(str(ref))
    try:
        target = str(ref.digest) if ref.digest is not None else str(ref.tag)
        digest, data, _ = remote.manifest(ref, target, ref.digest)
        verdict.target = f"{ref.name}@{digest}"
        artifact = parse_rootfs_manifest(digest, data)
        config = _fetch_bytes(remote, ref, artifact.config, MAX_STORE_MANIFEST)
    except Failure as exc:
        verdict.add(OTHER, str(exc.error_for(str(ref))))
        return verdict
    except BangerError as exc:
        verdict.add(OTHER, str(exc))
        return verdict
    try:
        manifest = parse_store_manifest(config, f"{verdict.target}: the config (manifest.json)")
    except StoreError as exc:
        verdict.add(CORRUPTED, str(exc))
        return verdict
    _check_key(verdict, manifest, f"{verdict.target}: manifest.json")
    if contents:
        _check_layers(verdict, remote, ref, artifact, manifest)
    if trust:
        modules = artifact.kernel.get(MODULES_DIR)
        trees = {MODULES_DIR: modules.digest.hex} if modules is not None else {}
        check_signatures(verdict, remote, ref, digest, trusted, manifest, trees)
    return verdict


def check_signatures(
    verdict: Verdict,
    remote: Remote,
    ref: Reference,
    subject: Digest,
    trusted: Sequence[PublicKey],
    manifest: StoreManifest,
    trees: Mapping[str, str] | None = None,
) -> None:
    """The signatures attached to artifact ``subject`` that vouch, by a trusted key, for
    exactly ``manifest`` (the artifact's verified config) and ``trees`` (the digest of
    its modules layer, when the store path has a modules directory): ``verdict.signers`` and
    ``verdict.accepted`` (for ``substitution_record``), else the findings why not.
    Substitution calls this with the store path's manifest.json before trusting a byte
    of the bundle, whose rootfs.ext4 must then hash to ``manifest.outputs``."""
    envelopes: list[tuple[str, bytes]] = []
    with _boundary(verdict, ref, content=False):
        listing = list_signatures(remote, ref, subject)
        verdict.findings += [Finding(0, p) for p in listing.problems]
        envelopes = [(f"signature {f.digest}", f.envelope) for f in listing.found]
    judge_signatures(verdict, envelopes, trusted, manifest, trees)


def _check_layers(
    verdict: Verdict,
    remote: Remote,
    ref: Reference,
    artifact: RootfsArtifact,
    manifest: StoreManifest,
) -> None:
    where = verdict.target
    limit = max_bundle_size(manifest)
    if artifact.bundle.size > limit:
        verdict.add(
            CORRUPTED,
            f"{where}: the bundle is {artifact.bundle.size} bytes, more than a bundle of "
            f"this store path can be ({limit})",
        )
    else:
        with _boundary(verdict, ref):
            bundle = read_bundle(remote.blob(ref, artifact.bundle), manifest)
            if bundle.manifest != manifest.data:
                verdict.add(CORRUPTED, f"{where}: the bundle's manifest.json is not the config")
            recorded = manifest.outputs[ROOTFS]
            if (bundle.rootfs_sha256, bundle.rootfs_size) != recorded:
                verdict.add(
                    CORRUPTED,
                    f"{where}: {ROOTFS} in the bundle has sha256 {bundle.rootfs_sha256} "
                    f"({bundle.rootfs_size} bytes), manifest.json records {recorded[0]} "
                    f"({recorded[1]} bytes)",
                )
    wanted = {n: d for n, d in manifest.files.items() if n != ROOTFS}
    for name in sorted(set(wanted) | set(artifact.kernel)):
        layer = artifact.kernel.get(name)
        if name == MODULES_DIR and MODULES_DIR in manifest.outputs and layer is not None:
            # the directory's tar: only the signature names its digest (judged there)
            with _boundary(verdict, ref):
                remote.blob(ref, layer)
        elif layer is None:
            verdict.add(CORRUPTED, f"{where}: {name} is not in the artifact")
        elif name not in wanted:
            verdict.add(CORRUPTED, f"{where}: layer {name} is not an output of the store path")
        elif (layer.digest.hex, layer.size) != (wanted[name], manifest.outputs[name][1]):
            verdict.add(
                CORRUPTED,
                f"{where}: layer {name} is {layer.digest} ({layer.size} bytes), "
                f"manifest.json records sha256:{wanted[name]}",
            )
        else:
            with _boundary(verdict, ref):
                remote.blob(ref, layer)  # the registry's bytes, verified against the digest


__all__ = [
    "CORRUPTED",
    "META_SUBSTITUTED",
    "OTHER",
    "ROOTFS_ARTIFACT_TYPE",
    "UNTRUSTED",
    "Finding",
    "check_signatures",
    "Verdict",
    "judge_signatures",
    "recorded_envelopes",
    "substitution_record",
    "verify_reference",
    "verify_store_path",
]
