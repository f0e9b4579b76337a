"""The catalog: imagecat-style entries of pushed rootfs artifacts, for banger to consume.

``banger-build catalog REF...`` reads each artifact ``push`` made (``oci.rootfs``)
and writes one entry per artifact. Format 1, canonical (sorted keys, two-space
indent, UTF-8, a final newline), entries sorted by (name, arch): the same set of
artifacts gives the same bytes whatever order the references come in::

    {
      "format": 1,
      "entries": [
        {
          "name": "debian-bookworm",                  manifest.json's name
          "ref": "REGISTRY/REPO@sha256:...",          the artifact manifest, by digest
          "arch": "amd64",
          "created": "2024-06-10T00:00:00Z",          the build's epoch (never a clock)
          "store_key": "<32 hex>",
          "store_path": "<key>-<name>",
          "bundle": {"digest": "sha256:...", "size": N, "media_type": "..."},
          "rootfs": {"sha256": "<hex>", "size": N},   raw rootfs.ext4, as the bundle holds it
          "manifest_sha256": "<hex>",                 raw manifest.json, the bundle's first member
          "kernel": null | {
            "artifact": {"reference": "...", "digest": "sha256:..."},   [kernel] ref only
            "files": {"vmlinux": {"digest": ..., "size": ..., "media_type": ...}, ...}
          },
          "signers": ["ci-1"]                         only with trusted keys: who vouched
        }
      ]
    }

The bundle and the kernel files are blobs of the entry's repository, fetched by
digest (``REGISTRY/v2/REPO/blobs/<digest>``); banger checks the bundle's digest,
then the raw sha256 of the files it unpacks. A modules directory's layer is its
deterministic tar (``oci.kernel.write_modules_tar``).

Everything in an entry is read from verified bytes: the artifact manifest (by
digest, or against the registry's digest of a tag), parsed strictly, and its
config, the store path's exact manifest.json (bounded, hashed against the
manifest's descriptor). The annotations must agree with that manifest.json
(key, name, arch, created, rootfs and manifest digests; its derivation must
hash to its key) and every staged kernel file must be a layer with the digest
manifest.json records: an artifact whose parts disagree is refused. Bundles are
not downloaded (``banger-build verify REF`` re-hashes one). With trusted keys,
each artifact needs a valid signature by one of them (``signing.verify``) for
exactly this content, else the catalog is refused.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger_build.derivation import Derivation
from banger_build.errors import (
    InputError,
    Reason,
    RegistryError,
    SignatureError,
    StoreError,
    host_error,
)
from banger_build.oci import rootfs
from banger_build.oci.failure import Failure
from banger_build.oci.manifest import Descriptor
from banger_build.oci.reference import Digest, Platform, Reference, ReferenceSyntaxError
from banger_build.progress import Reporter
from banger_build.signing.keys import PublicKey
from banger_build.signing.statement import (
    MAX_STORE_MANIFEST,
    MODULES_DIR,
    ROOTFS,
    StoreManifest,
    parse_store_manifest,
)
from banger_build.signing.verify import Verdict, check_signatures
from banger_build.store import MANIFEST

if TYPE_CHECKING:  # the HTTP stack is imported only by who makes a Remote
    from banger_build.oci.remote import Remote

FORMAT = 1


def parse_ref(text: str) -> Reference:
    """A catalog argument: ``REGISTRY/REPO:TAG`` or ``REGISTRY/REPO[:TAG]@sha256:...``.
    A store path has no place in a registry until it is pushed: refused, saying so."""
    if text.startswith(("/", "./", "../")) or text in (".", "..") or os.path.lexists(text):
        raise InputError(
            f"{text}: a store path is not in a registry: push it (`banger-build push "
            f"{text} REGISTRY/REPO`) and catalog the REGISTRY/REPO@sha256:... it prints",
            reason=Reason.INVALID_REFERENCE,
        )
    try:
        return Reference.parse(text)
    except ReferenceSyntaxError as exc:
        raise InputError(f"{text}: {exc}", reason=Reason.INVALID_REFERENCE) from None


def _bad(ref: Reference, what: str) -> RegistryError:
    return RegistryError(what, reference=str(ref), reason=Reason.INVALID_MANIFEST)


def _config(remote: Remote, ref: Reference, artifact: rootfs.RootfsArtifact) -> bytes:
    """manifest.json's bytes: the artifact's config, fetched and hashed by the blob cache."""
    remote.blob(ref, artifact.config)
    data = remote.cache.read(artifact.config.digest, artifact.config.size, limit=MAX_STORE_MANIFEST)
    if data is None:
        raise StoreError(
            f"{artifact.config.digest} vanished from the blob cache", reason=Reason.BLOB_CACHE
        )
    return data


def _created(manifest: StoreManifest) -> str:
    """The build's epoch (manifest.json's derivation) as ``push`` annotates it."""
    epoch = Derivation(json.loads(manifest.data)["derivation"]).epoch
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _agree(ref: Reference, artifact: rootfs.RootfsArtifact, manifest: StoreManifest) -> None:
    """The artifact's annotations and layers say what its manifest.json says."""
    notes = artifact.annotations
    if manifest.derivation_key != manifest.key:
        raise _bad(
            ref,
            f"its manifest.json's derivation hashes to {manifest.derivation_key}, not to its "
            f"key {manifest.key}",
        )
    try:
        arch = Platform.parse(manifest.image["platform"]).architecture
        created = _created(manifest)
    except (KeyError, TypeError, ValueError, OverflowError, OSError, ReferenceSyntaxError) as exc:
        raise _bad(ref, f"its manifest.json's derivation is malformed ({str(exc)[:200]})") from None
    facts = (
        (rootfs.KEY, manifest.key),
        (rootfs.NAME, manifest.name),
        (rootfs.ARCH, arch),
        (rootfs.CREATED, created),
        (rootfs.ROOTFS_SHA256, manifest.outputs[ROOTFS][0]),
    )
    for annotation, fact in facts:
        if notes[annotation] != fact:
            raise _bad(
                ref,
                f"the annotation {annotation} is {notes[annotation][:100]!r}, its "
                f"manifest.json says {fact!r}",
            )
    staged = set(manifest.outputs) - {ROOTFS}
    if set(artifact.kernel) != staged:
        raise _bad(
            ref,
            f"its kernel layers ({', '.join(artifact.kernel) or 'none'}) are not the files "
            f"manifest.json records ({', '.join(sorted(staged)) or 'none'})",
        )
    for name, digest in manifest.files.items():
        if name != ROOTFS and artifact.kernel[name].digest.hex != digest:
            raise _bad(
                ref,
                f"its {name} layer is {artifact.kernel[name].digest}, manifest.json records "
                f"sha256:{digest}",
            )


def _signers(
    remote: Remote,
    ref: Reference,
    digest: Digest,
    artifact: rootfs.RootfsArtifact,
    manifest: StoreManifest,
    trusted: Sequence[PublicKey],
) -> list[str]:
    """The trusted keys whose valid signatures vouch for exactly this content."""
    trees = {}
    if MODULES_DIR in artifact.kernel:
        trees[MODULES_DIR] = artifact.kernel[MODULES_DIR].digest.hex
    verdict = Verdict(target=str(ref))
    check_signatures(verdict, remote, ref, digest, trusted, manifest, trees)
    if not verdict.signers:
        # the last finding says "REF: no valid signature by a trusted key (N found; ...)";
        # those before it, why each signature found was not good enough
        *why, last = [f.text for f in verdict.findings]
        detail = f": {'; '.join(why[-3:])}" if why else ""
        raise SignatureError(f"{last}{detail}", reason=Reason.UNTRUSTED)
    return sorted(verdict.signers)


def _descriptor(desc: Descriptor) -> dict[str, Any]:
    return {"digest": str(desc.digest), "size": desc.size, "media_type": desc.media_type}


def entry_for(remote: Remote, ref: Reference, trusted: Sequence[PublicKey] = ()) -> dict[str, Any]:
    """The catalog entry of the artifact ``ref`` names (see the module docstring); with
    ``trusted``, only when one of those keys signed it."""
    try:
        target = str(ref.digest) if ref.digest is not None else str(ref.tag)
        digest, data, _ = remote.manifest(ref, target, ref.digest)
        artifact = rootfs.parse_rootfs_manifest(digest, data)
        config = _config(remote, ref, artifact)
    except Failure as exc:
        raise exc.error_for(str(ref)) from exc
    at = Reference(ref.registry, ref.repository, digest=digest)
    manifest = parse_store_manifest(config, f"{at}: its config ({MANIFEST})")
    _agree(ref, artifact, manifest)
    kernel: dict[str, Any] | None = None
    if artifact.kernel or manifest.kernel is not None:
        kernel = {"files": {n: _descriptor(d) for n, d in artifact.kernel.items()}}
        if manifest.kernel is not None:
            kernel["artifact"] = dict(manifest.kernel)
    entry: dict[str, Any] = {
        "name": manifest.name,
        "ref": str(at),
        "arch": artifact.annotations[rootfs.ARCH],
        "created": artifact.annotations[rootfs.CREATED],
        "store_key": manifest.key,
        "store_path": manifest.store_path,
        "bundle": _descriptor(artifact.bundle),
        "rootfs": {"sha256": manifest.outputs[ROOTFS][0], "size": manifest.outputs[ROOTFS][1]},
        "manifest_sha256": manifest.sha256,
        "kernel": kernel,
    }
    if trusted:
        entry["signers"] = _signers(remote, ref, digest, artifact, manifest, trusted)
    return entry


def make_catalog(
    remote: Remote,
    refs: Sequence[Reference],
    reporter: Reporter,
    trusted: Sequence[PublicKey] = (),
) -> dict[str, Any]:
    """The catalog of ``refs``: one entry per artifact, sorted by (name, arch). Two
    references to one artifact make one entry; two artifacts of one name and arch
    are refused (banger would not know which one the name means)."""
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    given: dict[tuple[str, str], Reference] = {}
    for ref in refs:
        reporter.step(f"reading {ref}")
        entry = entry_for(remote, ref, trusted)
        slot = (entry["name"], entry["arch"])
        if slot in entries and entries[slot]["ref"] != entry["ref"]:
            raise InputError(
                f"{given[slot]} and {ref} are two artifacts named {slot[0]} for {slot[1]} "
                f"({entries[slot]['ref']}, {entry['ref']}): a catalog names each image once "
                "per architecture",
                reason=Reason.BAD_ARGUMENT,
            )
        entries[slot], given[slot] = entry, ref
        signed = f", signed by {', '.join(entry['signers'])}" if "signers" in entry else ""
        reporter.note(f"{entry['name']} ({entry['arch']}): {entry['ref']}{signed}")
    return {"format": FORMAT, "entries": [entries[slot] for slot in sorted(entries)]}


def render(catalog: dict[str, Any]) -> bytes:
    """The catalog's bytes: canonical and readable (sorted keys, indented, newline)."""
    return (json.dumps(catalog, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def write_catalog(dest: Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` through a temp file beside it (fsynced, renamed): a
    failure never leaves a partial catalog."""
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
    except OSError as exc:
        raise host_error("catalog", exc) from exc


__all__ = [
    "FORMAT",
    "entry_for",
    "make_catalog",
    "parse_ref",
    "render",
    "write_catalog",
]
