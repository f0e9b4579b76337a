"""A published store path as ``bundle`` and ``push`` read it: its manifest.json
bytes, what they claim, and checks of the files against them.

``read_store_path(path)`` reads ``manifest.json`` once (at most
``MAX_STORE_MANIFEST`` bytes: it becomes an OCI config blob, which consumers
bound to 4 MiB) and keeps the exact bytes: the bundle and the artifact carry
these bytes, never a re-serialisation. It is refused (``not-a-store-path``)
unless it is a JSON object whose ``derivation`` hashes to its ``key`` and
whose ``name`` is the derivation's, with ``rootfs.ext4`` among its outputs:
a manifest.json edited to claim another key never reaches a registry under
that key's tag.

The files are verified as they are read, by whoever reads them (the bundle
writer, the push): a file whose bytes are not the sha256 its manifest.json
records is ``corrupt``. A staged ``modules`` directory is the exception:
its recorded digest is a tree hash of the kernel's source directory, modes
included, taken before the store made the copy read-only, so it cannot be
checked against the store path.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger_build.derivation import KEY_CHARS, Derivation
from banger_build.errors import Reason, StoreError
from banger_build.oci.manifest import MAX_CONFIG
from banger_build.oci.reference import Platform, ReferenceSyntaxError
from banger_build.sources import SourceRefused, hash_regular, open_regular, read_regular
from banger_build.store import MANIFEST

ROOTFS = "rootfs.ext4"
#: the largest manifest.json bundled or pushed (the config bound of ``oci.manifest``)
MAX_STORE_MANIFEST = MAX_CONFIG
_KEY = re.compile(rf"[0-9a-f]{{{KEY_CHARS}}}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: a recipe's name (recipe.py): it becomes a file name, a layer title, an annotation
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


@dataclass(frozen=True)
class Output:
    """One output of a store path, as its manifest.json records it."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class StorePath:
    path: Path
    manifest_bytes: bytes
    key: str
    name: str
    epoch: int
    platform: Platform
    outputs: dict[str, Output]  # name -> output, rootfs.ext4 included

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    @property
    def rootfs(self) -> Output:
        return self.outputs[ROOTFS]

    @property
    def created(self) -> str:
        """The build's epoch as RFC 3339 UTC (never the wall clock)."""
        when = datetime.datetime.fromtimestamp(self.epoch, datetime.UTC)
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")

    def file(self, name: str) -> Path:
        return self.path / name


def _bad(path: Path, what: str) -> StoreError:
    return StoreError(
        f"{path} is not a usable store path: {MANIFEST}: {what}", reason=Reason.NOT_A_STORE_PATH
    )


def _read_manifest(path: Path) -> bytes:
    try:
        return read_regular(path / MANIFEST, MAX_STORE_MANIFEST, MANIFEST)
    except SourceRefused as exc:
        raise _bad(path, exc.detail) from None


def _outputs(path: Path, raw: object) -> dict[str, Output]:
    if not isinstance(raw, dict):
        raise _bad(path, "no outputs object")
    outputs: dict[str, Output] = {}
    for name, item in raw.items():
        sha = item.get("sha256") if isinstance(item, dict) else None
        size = item.get("size") if isinstance(item, dict) else None
        if (
            not isinstance(name, str)
            or name in ("", ".", "..", MANIFEST)
            or "/" in name
            or not isinstance(sha, str)
            or not _SHA256.fullmatch(sha)
            or not isinstance(size, int)
            or isinstance(size, bool)
            or size < 0
        ):
            raise _bad(path, f"output {str(name)[:100]!r} is malformed")
        outputs[name] = Output(name, sha, size)
    if ROOTFS not in outputs:
        raise _bad(path, f"no {ROOTFS} among the outputs")
    return outputs


def read_store_path(path: Path) -> StorePath:
    """The store path in directory ``path`` (a store's or a copy), its manifest.json
    read once and checked for consistency (see the module docstring)."""
    data = _read_manifest(path)
    try:
        body: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise _bad(path, "not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad(path, "not a JSON object")
    key, name, derivation = body.get("key"), body.get("name"), body.get("derivation")
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise _bad(path, "the store key is malformed")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _bad(path, f"the name {str(name)[:100]!r} is not a recipe's name")
    if not isinstance(derivation, dict):
        raise _bad(path, "no derivation")
    try:
        drv = Derivation(derivation)
        computed, drv_name, epoch = drv.key, drv.name, drv.epoch
        platform = Platform.parse(str(derivation["platform"]))
    except (KeyError, TypeError, ValueError, ReferenceSyntaxError) as exc:
        raise _bad(path, f"the derivation is malformed ({exc})") from None
    if computed != key:
        raise _bad(path, f"its derivation hashes to {computed}, not to its key {key}")
    if drv_name != name:
        raise _bad(path, f"its name {name[:100]!r} is not the derivation's")
    return StorePath(path, data, key, name, epoch, platform, _outputs(path, body.get("outputs")))


def damaged(sp: StorePath, name: str, what: str) -> StoreError:
    return StoreError(f"{sp.path / name} is damaged: {what}", reason=Reason.CORRUPT)


def open_output(sp: StorePath, name: str) -> int:
    """A read-only descriptor of output file ``name``: a regular file, opened without
    following a final symlink or waiting on a FIFO; ``corrupt`` otherwise."""
    try:
        return open_regular(sp.file(name), name)
    except SourceRefused as exc:
        raise damaged(sp, name, exc.detail) from None


def hash_output(sp: StorePath, name: str) -> tuple[str, int]:
    """sha256 and size of output file ``name``, checked against manifest.json."""
    try:
        digest, size = hash_regular(sp.file(name), name)
    except SourceRefused as exc:
        raise damaged(sp, name, exc.detail) from None
    error = mismatch(sp, name, digest, size)
    if error is not None:
        raise error
    return digest, size


def mismatch(sp: StorePath, name: str, actual: str, size: int) -> StoreError | None:
    """The error for output ``name`` read as (``actual``, ``size``), None if it matches."""
    want = sp.outputs[name]
    if actual == want.sha256 and size == want.size:
        return None
    return damaged(
        sp,
        name,
        f"its {size} bytes hash to sha256 {actual}, {MANIFEST} records {want.size} bytes "
        f"with sha256 {want.sha256}",
    )
