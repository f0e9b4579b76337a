"""Signatures as OCI 1.1 referrers of an artifact: attach one, list them.

A signature is a small artifact of its own, pushed by digest::

    {"schemaVersion": 2,
     "mediaType": "application/vnd.oci.image.manifest.v1+json",
     "artifactType": "application/vnd.banger.signature.v1+json",
     "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": "sha256:4413...",
                "size": 2, "data": "e30="},
     "layers": [{"mediaType": "application/vnd.dsse.envelope.v1+json", "digest": ..., "size": ...}],
     "subject": <the signed artifact's manifest descriptor>,
     "annotations": {"dev.banger.signature.key": "<key name>"}}

Canonical JSON, so the same envelope on the same subject is the same
manifest digest: two builders signing one store path with one key push the
same referrer, and builders with different keys add one each.

Finding them: registries with the referrers API (OCI distribution 1.1) list
them at ``GET /v2/<repo>/referrers/<digest>`` and say so with an
``OCI-Subject`` header when the referrer is pushed. Debian's docker-registry
(distribution 2.8) has neither (the GET is ``404 page not found``), so the
spec's tag-schema fallback is kept as well: the tag ``sha256-<hex of the
subject digest>`` holds an OCI image index listing the referrers,
maintained by read-modify-write. No registry offers a compare-and-swap on a
tag (distribution 2.8 ignores ``If-Match``), so a writer re-reads the index
after a pause a few times longer than its own read and write took, and
writes again if its entry was lost to a concurrent writer (at most
``INDEX_ATTEMPTS`` rounds, ``index-contention`` past them). Entries of other
tools (other artifact types) are kept as they are.

Listing trusts nothing it is served: the index (of the API or the tag) is
bounded in bytes and entries; each referrer manifest is fetched by digest
(verified, ``MAX_REFERRER_MANIFEST``), must name this subject and hold one
envelope layer of at most ``dsse.MAX_ENVELOPE`` bytes, which is fetched by
digest (verified). A bad entry is reported and skipped, so junk beside a
good signature does not hide it; an index past a bound is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from banger_build.errors import Reason, RegistryError
from banger_build.oci.failure import Failure
from banger_build.oci.manifest import (
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ManifestError,
    descriptor,
)
from banger_build.oci.reference import Digest, Reference

if TYPE_CHECKING:  # the HTTP stack is imported only by who makes a Remote
    from banger_build.oci.remote import Remote

T = TypeVar("T")

SIGNATURE_TYPE = "application/vnd.banger.signature.v1+json"
DSSE_TYPE = "application/vnd.dsse.envelope.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
KEY_ANNOTATION = "dev.banger.signature.key"

#: bytes of a referrers index (API or tag): ~300 bytes an entry, so room for MAX_REFERRERS
MAX_INDEX = 256 << 10
#: entries of one referrers index, every artifact type together
MAX_REFERRERS = 512
#: signatures (our artifact type) fetched for one subject: each costs two requests
MAX_SIGNATURES = 32
#: bytes of one signature manifest (ours are ~700)
MAX_REFERRER_MANIFEST = 64 << 10
#: bytes of one envelope (mirrors signing.dsse.MAX_ENVELOPE; the oci package does not
#: import the signing one)
MAX_ENVELOPE = 64 << 10
#: read-modify-write rounds of the fallback index before giving up
INDEX_ATTEMPTS = 8
#: looks at the index after a write, waiting for it to hold still (two equal reads)
MAX_CHECKS = 4
#: the pause before each look: this many times the slowest request of this update,
#: within [MIN_SETTLE, MAX_SETTLE] seconds, plus up to MIN_SETTLE of jitter
SETTLE_FACTOR = 4.0
MIN_SETTLE = 0.1
MAX_SETTLE = 2.0
#: tries of one manifest PUT that the registry answers 400 (see ``_put``)
PUT_ATTEMPTS = 4


def fallback_tag(subject: Digest) -> str:
    """The tag-schema fallback's tag for ``subject``: ``sha256-<hex>``."""
    return f"sha256-{subject.hex}"


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _desc(d: Descriptor) -> dict[str, Any]:
    return {"mediaType": d.media_type, "digest": str(d.digest), "size": d.size}


def signature_manifest(subject: Descriptor, envelope: Descriptor, key_name: str) -> bytes:
    """The referrer manifest carrying one DSSE envelope (canonical JSON)."""
    empty = Descriptor(EMPTY_TYPE, Digest(hashlib.sha256(EMPTY_JSON).hexdigest()), len(EMPTY_JSON))
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SIGNATURE_TYPE,
        "config": {**_desc(empty), "data": base64.b64encode(EMPTY_JSON).decode()},
        "layers": [_desc(envelope)],
        "subject": _desc(subject),
        "annotations": {KEY_ANNOTATION: key_name},
    }
    return _canonical(body)


def index_entry(digest: Digest, manifest: bytes, key_name: str) -> dict[str, Any]:
    """The fallback index's descriptor of a signature manifest (artifactType and
    annotations copied from it, as the spec asks)."""
    return {
        "mediaType": OCI_MANIFEST,
        "digest": str(digest),
        "size": len(manifest),
        "artifactType": SIGNATURE_TYPE,
        "annotations": {KEY_ANNOTATION: key_name},
    }


# -- parsing (pure; ManifestError for the caller to name the reference) -----------------


def parse_index(data: bytes) -> list[dict[str, Any]]:
    """The entries of a referrers index, each a valid descriptor, at most MAX_REFERRERS."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ManifestError(
            "the referrers index is not valid JSON", reason=Reason.INVALID_MANIFEST
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("manifests"), list):
        raise ManifestError(
            "the referrers index is not an image index", reason=Reason.INVALID_MANIFEST
        )
    media_type = body.get("mediaType", OCI_INDEX)
    if media_type not in INDEX_TYPES:
        raise ManifestError(
            f"the referrers index is a {str(media_type)[:100]}, not an image index",
            reason=Reason.UNSUPPORTED_MEDIA_TYPE,
        )
    entries: list[dict[str, Any]] = body["manifests"]
    if len(entries) > MAX_REFERRERS:
        raise ManifestError(
            f"the referrers index lists {len(entries)} manifests, more than the limit "
            f"of {MAX_REFERRERS}",
            reason=Reason.TOO_MANY_REFERRERS,
        )
    for i, entry in enumerate(entries):
        descriptor(entry, f"referrers index entry {i}")  # raises when malformed
    return entries


def parse_signature_manifest(data: bytes, subject: Digest) -> tuple[Descriptor, str | None]:
    """The envelope layer of a signature manifest that refers to ``subject``, and the
    key name its annotation gives (a hint: only the envelope's signature counts)."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict) or body.get("mediaType") != OCI_MANIFEST:
        raise ManifestError("not an OCI image manifest", reason=Reason.INVALID_MANIFEST)
    if body.get("artifactType") != SIGNATURE_TYPE:
        raise ManifestError(
            f"artifact type {str(body.get('artifactType'))[:100]!r}, not {SIGNATURE_TYPE}",
            reason=Reason.UNSUPPORTED_MEDIA_TYPE,
        )
    if descriptor(body.get("subject"), "subject").digest != subject:
        raise ManifestError(
            f"it refers to another artifact, not {subject}", reason=Reason.INVALID_MANIFEST
        )
    layers = body.get("layers")
    if not isinstance(layers, list) or len(layers) != 1:
        raise ManifestError("it needs exactly one layer", reason=Reason.INVALID_MANIFEST)
    layer = descriptor(layers[0], "the envelope layer")
    if layer.media_type != DSSE_TYPE:
        raise ManifestError(
            f"its layer is a {layer.media_type[:100]}, not {DSSE_TYPE}",
            reason=Reason.UNSUPPORTED_MEDIA_TYPE,
        )
    if layer.size > MAX_ENVELOPE:
        raise ManifestError(
            f"its envelope is {layer.size} bytes, more than the limit of {MAX_ENVELOPE}",
            reason=Reason.TOO_LARGE,
        )
    annotations = body.get("annotations")
    key = annotations.get(KEY_ANNOTATION) if isinstance(annotations, dict) else None
    return layer, key if isinstance(key, str) else None


# -- attaching ---------------------------------------------------------------------------


def _tag_ref(ref: Reference, subject: Digest) -> Reference:
    return Reference(ref.registry, ref.repository, fallback_tag(subject))


def _read_index(remote: Remote, ref: Reference, subject: Digest) -> list[dict[str, Any]]:
    """The fallback index's entries as the registry itself has them ([] when none)."""
    tag_ref = _tag_ref(ref, subject)
    try:
        _, data, _ = remote.manifest(
            tag_ref, fallback_tag(subject), None, limit=MAX_INDEX, upstream=True
        )
    except RegistryError as exc:
        if exc.reason == Reason.NOT_FOUND:
            return []
        raise
    try:
        return parse_index(data)
    except ManifestError as exc:
        raise RegistryError(
            f"the tag {fallback_tag(subject)} does not hold a usable referrers index "
            f"({exc.message}); not overwriting it",
            reference=str(tag_ref),
            reason=exc.reason,
        ) from None


def _listed(entries: list[dict[str, Any]], digest: Digest) -> bool:
    return any(e.get("digest") == str(digest) for e in entries)


def _put(action: Callable[[], T], sleep: Callable[[float], None]) -> T:
    """``action`` (a manifest PUT), again after a pause when the registry answers 400.

    distribution 2.8 rewrites a blob's or manifest's link file in place (truncate, then
    write) each time someone pushes it, so while others push the same ``{}`` config or
    the same signature manifest, the existence check of a PUT can read an empty link
    and answer 400 DIGEST_INVALID / MANIFEST_BLOB_UNKNOWN (seen with 8 concurrent
    signers). The content is there: asking again a moment later succeeds."""
    for attempt in range(PUT_ATTEMPTS):
        try:
            return action()
        except RegistryError as exc:
            if exc.status != 400 or attempt == PUT_ATTEMPTS - 1:
                raise
        sleep(MIN_SETTLE * 2**attempt + random.uniform(0, MIN_SETTLE))
    raise AssertionError("unreachable")


def update_fallback_index(
    remote: Remote,
    ref: Reference,
    subject: Digest,
    entry: dict[str, Any],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Make the fallback index of ``subject`` list ``entry``; returns the rounds it took.

    A round: read, write the index with ``entry`` added (unless listed already), then
    look again after a pause until the index holds still with ``entry`` in it (two
    equal reads, ``MAX_CHECKS`` reads at most). A writer that read before our write
    and writes after it drops our entry; the pause is several times the slowest
    request seen, so its write lands before we look again, and we write again."""
    tag_ref = _tag_ref(ref, subject)
    digest = Digest.parse(entry["digest"])
    slowest = 0.0

    def timed_read() -> list[dict[str, Any]]:
        nonlocal slowest
        started = time.monotonic()
        entries = _read_index(remote, ref, subject)
        slowest = max(slowest, time.monotonic() - started)
        return entries

    for attempt in range(1, INDEX_ATTEMPTS + 1):
        entries = timed_read()
        if not _listed(entries, digest):
            if len(entries) >= MAX_REFERRERS:
                raise RegistryError(
                    f"the referrers index {fallback_tag(subject)} already lists "
                    f"{len(entries)} manifests, the limit",
                    reference=str(tag_ref),
                    reason=Reason.TOO_MANY_REFERRERS,
                )
            body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*entries, entry]}
            data = _canonical(body)
            started = time.monotonic()
            _put(partial(remote.push_manifest, tag_ref, data, OCI_INDEX), sleep)
            slowest = max(slowest, time.monotonic() - started)
        seen: list[dict[str, Any]] | None = None
        for _ in range(MAX_CHECKS):
            sleep(
                min(MAX_SETTLE, max(MIN_SETTLE, SETTLE_FACTOR * slowest))
                + random.uniform(0, MIN_SETTLE)
            )
            current = timed_read()
            if not _listed(current, digest):
                break  # lost to a concurrent writer: another round
            if current == seen:
                return attempt  # still, and listed
            seen = current
        else:
            return attempt  # listed at every look while others kept writing
        sleep(random.uniform(0, min(MAX_SETTLE, MIN_SETTLE * 2**attempt)))
    raise RegistryError(
        f"could not add signature {digest.short} to the referrers index "
        f"{fallback_tag(subject)}: other writers replaced it {INDEX_ATTEMPTS} times running",
        reference=str(tag_ref),
        reason=Reason.INDEX_CONTENTION,
    )


def attach(
    remote: Remote,
    ref: Reference,
    subject: Descriptor,
    envelope: bytes,
    key_name: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Digest:
    """Push ``envelope`` as a referrer of ``subject`` in ``ref``'s repository and make
    it findable (the registry's referrers API, else the fallback index); its digest."""
    if len(envelope) > MAX_ENVELOPE:
        raise RegistryError(
            f"the signature envelope is {len(envelope)} bytes, more than {MAX_ENVELOPE}",
            reference=str(ref),
            reason=Reason.TOO_LARGE,
        )
    envelope_digest = remote.push_bytes(ref, envelope)
    remote.push_bytes(ref, EMPTY_JSON)
    layer = Descriptor(DSSE_TYPE, envelope_digest, len(envelope))
    data = signature_manifest(subject, layer, key_name)
    digest, indexed = _put(lambda: remote.push_referrer(ref, data, OCI_MANIFEST), sleep)
    if not indexed:
        entry = index_entry(digest, data, key_name)
        update_fallback_index(remote, ref, subject.digest, entry, sleep=sleep)
    return digest


# -- listing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """One signature referrer: its manifest digest, the key it names (a hint only,
    unauthenticated) and the envelope's bytes (verified against their digest)."""

    digest: Digest
    key: str | None
    envelope: bytes


@dataclass
class Listing:
    via: list[str] = field(default_factory=list)  # where the referrers were listed
    found: list[Found] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per skipped entry


def _index_sources(remote: Remote, ref: Reference, subject: Digest) -> list[tuple[str, bytes]]:
    sources: list[tuple[str, bytes]] = []
    api = remote.referrers(ref, subject, MAX_INDEX)
    if api is not None:
        sources.append(("the referrers API", api))
    tag = fallback_tag(subject)
    try:
        _, data, _ = remote.manifest(_tag_ref(ref, subject), tag, None, limit=MAX_INDEX)
    except RegistryError as exc:
        if exc.reason != Reason.NOT_FOUND:
            raise
    else:
        sources.append((f"the tag {tag}", data))
    return sources


def _fetch(remote: Remote, ref: Reference, subject: Digest, entry: dict[str, Any]) -> Found:
    desc = descriptor(entry, "referrer")
    if desc.size > MAX_REFERRER_MANIFEST:
        raise ManifestError(
            f"its manifest is {desc.size} bytes, more than the limit of {MAX_REFERRER_MANIFEST}",
            reason=Reason.TOO_LARGE,
        )
    _, data, _ = remote.manifest(ref, str(desc.digest), desc.digest, limit=MAX_REFERRER_MANIFEST)
    layer, key = parse_signature_manifest(data, subject)
    remote.blob(ref, layer)
    envelope = remote.cache.read(layer.digest, layer.size, limit=MAX_ENVELOPE)
    if envelope is None:
        raise Failure("its envelope vanished from the blob cache", reason=Reason.IO)
    return Found(desc.digest, key, envelope)


def list_signatures(remote: Remote, ref: Reference, subject: Digest) -> Listing:
    """Every signature referrer of ``subject`` the registry lists (API and fallback tag).

    An index past a bound raises ``RegistryError``; a bad entry is a problem line."""
    listing = Listing()
    seen: set[str] = set()
    for via, data in _index_sources(remote, ref, subject):
        try:
            entries = parse_index(data)
        except ManifestError as exc:
            raise RegistryError(
                f"{via}: {exc.message}", reference=str(ref), reason=exc.reason
            ) from None
        ours = [e for e in entries if e.get("artifactType") == SIGNATURE_TYPE]
        if len(ours) > MAX_SIGNATURES:
            raise RegistryError(
                f"{via} lists {len(ours)} signatures of {subject.short}, more than the "
                f"limit of {MAX_SIGNATURES}",
                reference=str(ref),
                reason=Reason.TOO_MANY_REFERRERS,
            )
        listing.via.append(via)
        for entry in ours:
            name = str(entry.get("digest"))
            if name in seen:
                continue
            seen.add(name)
            try:
                listing.found.append(_fetch(remote, ref, subject, entry))
            except Failure as exc:  # a malformed entry or manifest, a blob too large
                listing.problems.append(f"signature {name}: {exc.message}")
            except RegistryError as exc:
                listing.problems.append(f"signature {name}: {exc}")
    return listing


__all__ = [
    "DSSE_TYPE",
    "EMPTY_TYPE",
    "KEY_ANNOTATION",
    "SIGNATURE_TYPE",
    "Found",
    "Listing",
    "attach",
    "fallback_tag",
    "list_signatures",
    "parse_index",
    "parse_signature_manifest",
    "signature_manifest",
    "update_fallback_index",
]
