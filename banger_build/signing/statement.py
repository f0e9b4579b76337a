"""What a signature says: an in-toto Statement v1 about one store path.

    {
      "_type": "https://in-toto.io/Statement/v1",
      "subject": [                                   sorted by name
        {"name": "initrd.img",    "digest": {"sha256": "<hex>"}},   staged kernel files, if any
        {"name": "manifest.json", "digest": {"sha256": "<hex>"}},
        {"name": "rootfs.ext4",   "digest": {"sha256": "<hex>"}},
        {"name": "vmlinux",       "digest": {"sha256": "<hex>"}}
      ],
      "predicateType": "https://banger.dev/rootfs/v1",
      "predicate": {
        "storeKey": "<32 hex>",                      the derivation's hash
        "storePath": "<key>-<name>",
        "image": {"reference": ..., "digest": "sha256:...", "platform": "linux/amd64"},
        "kernel": {"reference": ..., "digest": "sha256:..."}        only for a [kernel] ref
      }
    }

The digests are the raw sha256 of the files, never of a compressed bundle
(what Nix signs is the NAR hash, not the .nar.xz): a signature binds content,
whatever container carried it. ``manifest.json`` binds everything else: the
derivation (so the key), the other outputs, tool versions. The ``modules``
directory a local kernel may stage is a subject by the sha256 of its
deterministic tar (``oci.kernel.write_modules_tar``: sorted, root-owned,
mtime 0, modes 0755/0644, whatever modes the store gave it), the layer
``push`` uploads for it; manifest.json's digest of it is a tree hash of the
source, taken before the store made it read-only, which nothing can check
again.

``statement_for(entry)`` is canonical JSON (sorted keys, no spaces) and a
pure function of the store path (of its ``manifest.json`` bytes, and of the
modules directory when there is one): every builder of a key signs the same
bytes, and Ed25519 being deterministic, one key's signatures of one store
path are identical on every machine.

A manifest.json whose derivation does not hash to its key is refused (never
signed); ``parse_claims`` reads a signed statement back, strictly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger_build.derivation import KEY_CHARS, canonical_json
from banger_build.errors import Reason, StoreError
from banger_build.oci.manifest import MAX_CONFIG
from banger_build.store import MANIFEST, StoreEntry

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://banger.dev/rootfs/v1"
ROOTFS = "rootfs.ext4"
#: the one output that is a directory (a local kernel's lib/modules/<version>, see inputs.py)
MODULES_DIR = "modules"
#: bytes of a manifest.json: it is the pushed artifact's config, bounded like an image config
MAX_STORE_MANIFEST = MAX_CONFIG
#: subjects of one statement (rootfs, manifest, vmlinux, initrd, modules tarball)
MAX_SUBJECTS = 16

_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY = re.compile(rf"[0-9a-f]{{{KEY_CHARS}}}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class StatementError(Exception):
    """A signed statement that is not one of ours (for ``dsse.verify`` to refuse)."""


@dataclass(frozen=True)
class StoreManifest:
    """The facts of a manifest.json that a statement is made of."""

    data: bytes
    sha256: str
    key: str
    name: str
    derivation_key: str  # sha256 of the derivation, as the key should be
    outputs: dict[str, tuple[str, int]]  # name -> (sha256 hex, size)
    image: dict[str, str]
    kernel: dict[str, str] | None

    @property
    def store_path(self) -> str:
        return f"{self.key}-{self.name}"

    @property
    def files(self) -> dict[str, str]:
        """Outputs that are files (every one but the modules directory): name -> sha256."""
        return {n: d for n, (d, _) in self.outputs.items() if n != MODULES_DIR}


@dataclass(frozen=True)
class Claims:
    """A statement read back: what its signer vouches for."""

    subjects: dict[str, str]  # name -> sha256 hex
    store_key: str
    store_path: str
    predicate: dict[str, Any]


# -- the store's side ------------------------------------------------------------------


def _bad(where: str, what: str) -> StoreError:
    return StoreError(f"{where}: {what}", reason=Reason.NOT_A_STORE_PATH)


def _text(obj: Mapping[str, Any], key: str, where: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(where, f"{what} is missing")
    return value


def parse_store_manifest(data: bytes, where: str = MANIFEST) -> StoreManifest:
    """The facts of manifest.json bytes; StoreError (``not-a-store-path``) if malformed."""
    if len(data) > MAX_STORE_MANIFEST:
        raise _bad(where, f"{len(data)} bytes, more than the limit of {MAX_STORE_MANIFEST}")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise _bad(where, "not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad(where, "not a JSON object")
    key = _text(body, "key", where, "the store key")
    name = _text(body, "name", where, "the name")
    if not _KEY.fullmatch(key) or "/" in name or name in (".", ".."):
        raise _bad(where, "the store key or name is malformed")
    derivation = body.get("derivation")
    if not isinstance(derivation, dict):
        raise _bad(where, "the derivation is missing")
    derivation_key = hashlib.sha256(canonical_json(derivation)).hexdigest()[:KEY_CHARS]
    raw_outputs = body.get("outputs")
    if not isinstance(raw_outputs, dict) or ROOTFS not in raw_outputs:
        raise _bad(where, f"no {ROOTFS} among the outputs")
    outputs: dict[str, tuple[str, int]] = {}
    for out_name, out in raw_outputs.items():
        digest = out.get("sha256") if isinstance(out, dict) else None
        size = out.get("size") if isinstance(out, dict) else None
        if (
            not isinstance(digest, str)
            or not _HEX64.fullmatch(digest)
            or isinstance(size, bool)
            or not isinstance(size, int)
            or size < 0
            or out_name in ("", ".", "..", MANIFEST)
            or "/" in out_name
        ):
            raise _bad(where, f"output {out_name[:100]!r} is malformed")
        outputs[out_name] = (digest, size)
    if len(outputs) > MAX_SUBJECTS - 1:
        raise _bad(where, f"{len(outputs)} outputs, more than {MAX_SUBJECTS - 1}")
    image = body.get("image")
    image = image if isinstance(image, dict) else {}
    derived_image = derivation.get("image")
    derived_image = derived_image if isinstance(derived_image, dict) else {}
    image_digest = _text(
        image if "manifest" in image else derived_image, "manifest", where, "the image digest"
    )
    if not _DIGEST.fullmatch(image_digest):
        raise _bad(where, "the image digest is malformed")
    pins = {
        "reference": _text(image, "reference", where, "the image reference"),
        "digest": image_digest,
        "platform": _text(derivation, "platform", where, "the platform"),
    }
    kernel = None
    artifact = body.get("kernel_artifact")
    if isinstance(artifact, dict) and artifact:
        kernel_digest = _text(artifact, "manifest", where, "the kernel digest")
        if not _DIGEST.fullmatch(kernel_digest):
            raise _bad(where, "the kernel digest is malformed")
        kernel = {
            "reference": _text(artifact, "reference", where, "the kernel reference"),
            "digest": kernel_digest,
        }
    return StoreManifest(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        key=key,
        name=name,
        derivation_key=derivation_key,
        outputs=outputs,
        image=pins,
        kernel=kernel,
    )


def read_store_manifest(entry: StoreEntry) -> StoreManifest:
    """An entry's manifest.json, read once (the bytes hashed are the bytes parsed)."""
    where = str(entry.manifest_file)
    try:
        fd = os.open(entry.manifest_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_STORE_MANIFEST + 1)
    except OSError as exc:
        raise _bad(where, f"cannot read it: {exc.strerror}") from exc
    manifest = parse_store_manifest(data, where)
    if manifest.store_path != entry.path.name:
        raise StoreError(
            f"{where} describes {manifest.store_path}, not {entry.path.name}",
            reason=Reason.NOT_A_STORE_PATH,
        )
    return manifest


def _expected(manifest: StoreManifest, trees: Mapping[str, str]) -> dict[str, str]:
    """Subject name -> sha256 a statement of this store path names."""
    if (MODULES_DIR in manifest.outputs) != (MODULES_DIR in trees):
        raise StoreError(
            f"{manifest.store_path}: the digest of the modules directory's tar is needed "
            "exactly when manifest.json records one",
            reason=Reason.NOT_A_STORE_PATH,
        )
    return {**manifest.files, **trees, MANIFEST: manifest.sha256}


def statement_from_manifest(
    manifest: StoreManifest, trees: Mapping[str, str] | None = None
) -> bytes:
    """The canonical statement of a store path; refused when its manifest is inconsistent.
    ``trees``: the sha256 of the modules directory's tar, when the path has one."""
    if manifest.derivation_key != manifest.key:
        raise StoreError(
            f"{manifest.store_path}: manifest.json's derivation hashes to "
            f"{manifest.derivation_key}, not to its key {manifest.key}: refusing to sign "
            "a corrupted store path",
            reason=Reason.CORRUPT,
        )
    digests = _expected(manifest, trees or {})
    predicate: dict[str, Any] = {
        "storeKey": manifest.key,
        "storePath": manifest.store_path,
        "image": manifest.image,
    }
    if manifest.kernel is not None:
        predicate["kernel"] = manifest.kernel
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": n, "digest": {"sha256": digests[n]}} for n in sorted(digests)],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }
    return canonical_json(statement)


def tree_digests(path: os.PathLike[str] | str, manifest: StoreManifest) -> dict[str, str]:
    """The sha256 of the deterministic tar of each directory output of store path
    ``path`` (the modules directory, if any), as ``push`` uploads it."""
    if MODULES_DIR not in manifest.outputs:
        return {}
    from banger_build.oci.kernel import write_modules_tar

    sink = _HashSink()
    try:
        write_modules_tar(Path(path) / MODULES_DIR, sink)  # type: ignore[arg-type]
    except OSError as exc:
        raise StoreError(
            f"{path}: cannot read the modules directory: {exc.strerror or exc}",
            reason=Reason.NOT_A_STORE_PATH,
        ) from exc
    return {MODULES_DIR: sink.sha.hexdigest()}


class _HashSink:
    """A write-only file that hashes what is written to it (tarfile's stream target)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return len(data)

    def flush(self) -> None:
        pass


def statement_for(entry: StoreEntry) -> bytes:
    """The statement a signature of store path ``entry`` signs (canonical JSON)."""
    manifest = read_store_manifest(entry)
    return statement_from_manifest(manifest, tree_digests(entry.path, manifest))


# -- the verifier's side ---------------------------------------------------------------


def parse_claims(payload: bytes) -> Claims:
    """A signed statement's claims; ``StatementError`` when it is not one of ours."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise StatementError("the statement is not valid JSON") from None
    if not isinstance(body, dict) or body.get("_type") != STATEMENT_TYPE:
        raise StatementError(f"not an in-toto statement ({STATEMENT_TYPE})")
    if body.get("predicateType") != PREDICATE_TYPE:
        raise StatementError(
            f"predicate type {str(body.get('predicateType'))[:100]!r}, not {PREDICATE_TYPE}"
        )
    raw = body.get("subject")
    if not isinstance(raw, list) or not raw or len(raw) > MAX_SUBJECTS:
        raise StatementError(f"the statement needs 1 to {MAX_SUBJECTS} subjects")
    subjects: dict[str, str] = {}
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        digest = item.get("digest") if isinstance(item, dict) else None
        hexdigest = digest.get("sha256") if isinstance(digest, dict) else None
        if not isinstance(name, str) or not isinstance(hexdigest, str):
            raise StatementError("a subject has no name or sha256 digest")
        if not _HEX64.fullmatch(hexdigest) or name in subjects:
            raise StatementError(f"subject {name[:100]!r} is malformed or repeated")
        subjects[name] = hexdigest
    predicate = body.get("predicate")
    if not isinstance(predicate, dict):
        raise StatementError("the statement has no predicate")
    key, path = predicate.get("storeKey"), predicate.get("storePath")
    if not isinstance(key, str) or not _KEY.fullmatch(key) or not isinstance(path, str):
        raise StatementError("the predicate has no store key or store path")
    if ROOTFS not in subjects or MANIFEST not in subjects:
        raise StatementError(f"the statement does not name {ROOTFS} and {MANIFEST}")
    return Claims(subjects, key, path, predicate)


def differences(
    claims: Claims, manifest: StoreManifest, trees: Mapping[str, str] | None = None
) -> list[str]:
    """How a signed statement differs from what ``manifest`` says and ``trees`` (the
    modules directory's tar digest, when there is one) ([] when it matches)."""
    found: list[str] = []
    if claims.store_key != manifest.key or claims.store_path != manifest.store_path:
        found.append(
            f"the signature is for store path {claims.store_path}, not {manifest.store_path}"
        )
    expected = {**manifest.files, **(trees or {}), MANIFEST: manifest.sha256}
    for name in sorted(set(claims.subjects) | set(expected)):
        signed, actual = claims.subjects.get(name), expected.get(name)
        if signed == actual:
            continue
        if signed is None:
            found.append(f"{name} is not signed")
        elif actual is None:
            found.append(f"the signature names {name}, which the store path does not have")
        else:
            found.append(f"{name}: signed sha256 {signed}, actual {actual}")
    return found


__all__ = [
    "MAX_STORE_MANIFEST",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "Claims",
    "StatementError",
    "StoreManifest",
    "differences",
    "parse_claims",
    "parse_store_manifest",
    "read_store_manifest",
    "statement_for",
    "statement_from_manifest",
    "tree_digests",
]
