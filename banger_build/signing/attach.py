"""``sign_and_attach``: sign a pushed store path and attach the signature to its artifact.

What ``push --sign-key`` calls once the artifact manifest is in the registry:
the statement of the store path (``statement.statement_for``), a DSSE envelope
signed with the key, attached as a referrer of the artifact manifest
(``oci.referrers.attach``). Before signing, the artifact is checked to be this
store path's: its config must be this manifest.json (the registry is asked
for the manifest by digest, verified), so a wiring mistake can never make a
key vouch for another artifact.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from banger_build.errors import Reason, RegistryError
from banger_build.oci.failure import Failure
from banger_build.oci.manifest import Descriptor, descriptor, media_type_of
from banger_build.oci.reference import Digest, Reference
from banger_build.oci.referrers import attach
from banger_build.signing.dsse import sign
from banger_build.signing.keys import SecretKey, load_secret_key
from banger_build.signing.statement import (
    read_store_manifest,
    statement_from_manifest,
    tree_digests,
)
from banger_build.store import StoreEntry

if TYPE_CHECKING:  # the HTTP stack is imported only by who makes a Remote
    from banger_build.oci.remote import Remote
    from banger_build.progress import Reporter
    from banger_build.publish import PushResult


def _check_subject(remote: Remote, ref: Reference, subject: Descriptor, manifest_sha: str) -> None:
    _, data, _ = remote.manifest(ref, str(subject.digest), subject.digest)
    try:
        _, body = media_type_of(data, subject.media_type)
        config = descriptor(body.get("config"), "config")
    except Failure as exc:
        raise exc.error_for(str(ref)) from None
    if config.digest != Digest(manifest_sha) or len(data) != subject.size:
        raise RegistryError(
            f"{subject.digest} is not the artifact of this store path (its config is "
            f"{config.digest}, the store path's manifest.json is sha256:{manifest_sha}); "
            "not signing it",
            reference=str(ref),
            reason=Reason.STATEMENT_MISMATCH,
        )


def sign_and_attach(
    remote: Remote,
    ref: Reference,
    subject: Descriptor,
    entry: StoreEntry,
    secret_key: Path | SecretKey,
) -> Digest:
    """Sign ``entry`` and attach the signature to ``subject`` (the artifact manifest's
    descriptor) in ``ref``'s repository. Returns the signature manifest's digest."""
    key = secret_key if isinstance(secret_key, SecretKey) else load_secret_key(secret_key)
    manifest = read_store_manifest(entry)
    # refuses a corrupted manifest.json
    statement = statement_from_manifest(manifest, tree_digests(entry.path, manifest))
    _check_subject(remote, ref, subject, hashlib.sha256(manifest.data).hexdigest())
    return attach(remote, ref, subject, sign(statement, key), key.name)


def sign_pushed(
    result: PushResult, *, secret_key: SecretKey, remote: Remote, reporter: Reporter
) -> Digest:
    """``push --sign-key``: sign what ``push`` just pushed (by digest, before any tag)."""
    ref = result.reference
    repository = Reference(ref.registry, ref.repository, digest=result.manifest_digest)
    reporter.step(f"signing {result.name} with {secret_key.name}")
    return sign_and_attach(
        remote, repository, result.manifest_descriptor, StoreEntry.at(result.store_path), secret_key
    )


__all__ = ["sign_and_attach", "sign_pushed"]
