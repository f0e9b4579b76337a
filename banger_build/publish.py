"""``push``: one store path to a registry as one OCI artifact (``oci.rootfs``).

    read manifest.json (``storepath``) -> HEAD sk-<key>: another rootfs there? stop
      -> bundle into a store temp dir (rootfs.ext4 verified as it is read)
      -> kernel files (verified) -> canonical manifest -> upload missing blobs
      -> PUT the manifest by digest -> attach (signatures) -> PUT TAG -> PUT sk-<key>

The manifest is a pure function of the store path (and the zstd library: see
``bundle``), so builders of one key push one digest. ``sk-<key>`` is written
last, once everything it names exists (and is signed, when asked), and is
never moved: when it already names another artifact, that artifact must hold
the same rootfs.ext4 (else the push stops with ``not-reproducible``, naming
both digests) and is kept; the new artifact is then pushed by digest (and
TAG). Registries have no compare-and-swap for tags: two first pushes of a key
racing with different bytes can still both write it; the tag is checked again
just before it is written to keep that window small.

The bundle is written to a temp dir of the store first and uploaded from
there: it is a tenth of the image, and it lets an upload be retried and
chunked without compressing twice.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from banger_build import bundle
from banger_build.errors import InputError, Reason, RegistryError, StoreError, host_error
from banger_build.fsutil import hash_file
from banger_build.oci import rootfs
from banger_build.oci.failure import Failure
from banger_build.oci.kernel import write_modules_tar
from banger_build.oci.manifest import MAX_MANIFEST, OCI_MANIFEST, Descriptor
from banger_build.oci.reference import Digest, Reference, ReferenceSyntaxError
from banger_build.progress import Reporter
from banger_build.store import MANIFEST, Store

if TYPE_CHECKING:  # the HTTP stack is imported by whoever makes the Remote
    from banger_build.oci.remote import Remote
from banger_build.storepath import ROOTFS, StorePath, hash_output, read_store_path


@dataclass(frozen=True)
class PushTarget:
    """``REGISTRY/REPO[:TAG]``: where to push, and the human tag if one was given."""

    registry: str
    repository: str
    tag: str | None

    def at(self, tag: str | None = None, digest: Digest | None = None) -> Reference:
        return Reference(self.registry, self.repository, tag, digest)

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f":{self.tag}" if self.tag else "")


def parse_target(text: str) -> PushTarget:
    """``REGISTRY/REPO[:TAG]`` (no digest); InputError ``invalid-reference`` otherwise."""
    try:
        ref = Reference.parse(text)
    except ReferenceSyntaxError as exc:
        raise InputError(f"{text}: {exc}", reason=Reason.INVALID_REFERENCE) from None
    if ref.digest is not None:
        raise InputError(
            f"{text}: push to REGISTRY/REPO[:TAG], not to a digest",
            reason=Reason.INVALID_REFERENCE,
        )
    tagged = ":" in text.rsplit("/", 1)[-1]  # Reference says "latest" when none was given
    return PushTarget(ref.registry, ref.repository, ref.tag if tagged else None)


@dataclass(frozen=True)
class PushResult:
    """What a push made: the subject a signature attaches to is ``manifest_descriptor``."""

    reference: Reference  # REGISTRY/REPO@sha256:...
    manifest_descriptor: Descriptor  # the artifact manifest (OCI image manifest)
    artifact_type: str
    store_path: Path
    store_key: str
    name: str
    rootfs_sha256: str
    manifest_sha256: str
    bundle: bundle.BundleInfo
    tag: str | None  # the human tag, if any
    key_tag: str  # sk-<key>
    key_tag_digest: Digest | None  # what sk-<key> names (None: not written yet)
    uploaded: tuple[Digest, ...]  # blobs this push uploaded (the registry lacked them)

    @property
    def manifest_digest(self) -> Digest:
        return self.manifest_descriptor.digest

    @property
    def ref(self) -> str:
        """``REGISTRY/REPO@sha256:...``, what ``push`` prints."""
        return str(self.reference)


#: runs once the artifact exists by digest, before any tag names it (signing)
Attach = Callable[[PushResult], None]


def _not_reproducible(ref: Reference, sp: StorePath, theirs: rootfs.RootfsArtifact) -> Exception:
    return RegistryError(
        f"not reproducible: it names artifact {theirs.digest}, whose rootfs.ext4 is "
        f"sha256:{theirs.rootfs_sha256}; {sp.path} has rootfs.ext4 sha256:{sp.rootfs.sha256} "
        f"from the same inputs (`banger-build check {sp.path}` rebuilds it and shows what "
        "differs)",
        reference=str(ref),
        reason=Reason.NOT_REPRODUCIBLE,
    )


def check_key_tag(remote: Remote, ref: Reference, digest: Digest, sp: StorePath) -> None:
    """The artifact ``digest`` that ``ref`` (sk-<key>) names must be one of ``sp``'s
    key with the same rootfs.ext4: read by digest (verified; from the blob cache when
    it holds it, as after our own push), parsed strictly."""
    try:
        data = remote.cache.read(digest, limit=MAX_MANIFEST)
        if data is None:
            _, data, _ = remote.manifest(ref, str(digest), digest)
        theirs = rootfs.parse_rootfs_manifest(digest, data)
    except Failure as exc:
        raise exc.error_for(str(ref)) from exc
    if theirs.key != sp.key:
        raise RegistryError(
            f"names artifact {digest} of another store key ({theirs.key}): not overwriting it",
            reference=str(ref),
            reason=Reason.INVALID_MANIFEST,
        )
    if theirs.rootfs_sha256 != sp.rootfs.sha256:
        raise _not_reproducible(ref, sp, theirs)


@dataclass(frozen=True)
class _Blob:
    title: str
    path: Path
    desc: Descriptor


def _kernel_layers(sp: StorePath, tmp: Path) -> list[_Blob]:
    """The staged kernel files, in ``KERNEL_TYPES`` order, each checked against the
    sha256 manifest.json records (a modules directory goes as ``kernel push``'s tar)."""
    names = [n for n in sp.outputs if n != ROOTFS]
    for name in names:
        if name not in rootfs.KERNEL_TYPES:
            raise StoreError(
                f"{sp.path}: output {name[:100]!r} is none of {ROOTFS} and the kernel files "
                f"({', '.join(rootfs.KERNEL_TYPES)}): this banger-build cannot push it",
                reason=Reason.NOT_A_STORE_PATH,
            )
    layers = []
    for name, media_type in rootfs.KERNEL_TYPES.items():
        if name not in sp.outputs:
            continue
        path = sp.file(name)
        if name == "modules" and stat.S_ISDIR(path.lstat().st_mode):
            path = tmp / "modules.tar"
            with open(path, "wb") as out:
                write_modules_tar(sp.file(name), out)
            hexdigest, size = hash_file(path)
        else:
            hexdigest, size = hash_output(sp, name)
        layers.append(_Blob(name, path, Descriptor(media_type, Digest(hexdigest), size)))
    return layers


def _annotations(sp: StorePath, info: bundle.BundleInfo) -> dict[str, str]:
    return {
        rootfs.CREATED: sp.created,
        rootfs.KEY: sp.key,
        rootfs.NAME: sp.name,
        rootfs.ARCH: sp.platform.architecture,
        rootfs.ROOTFS_SHA256: info.rootfs_sha256,
        rootfs.MANIFEST_SHA256: info.manifest_sha256,
        rootfs.ZSTD: bundle.zstd_version(),
        rootfs.ZSTD_PARAMS: bundle.zstd_params(),
    }


def push_store_path(
    path: Path,
    target: PushTarget,
    *,
    remote: Remote,
    store: Store,
    reporter: Reporter,
    attach: Attach | None = None,
) -> PushResult:
    """Push the store path ``path`` (held by the caller: it must not change) to
    ``target``; see the module docstring for the order of things. An out-link
    (``./result``) is resolved once, here: the store path's name is its key and name."""
    try:
        return _push(path.resolve(), target, remote, store, reporter, attach)
    except OSError as exc:  # the host's files: the store path, the temp dir
        raise host_error("push", exc) from exc


def _push(
    path: Path,
    target: PushTarget,
    remote: Remote,
    store: Store,
    reporter: Reporter,
    attach: Attach | None,
) -> PushResult:
    sp = read_store_path(path)
    key_ref = target.at(rootfs.key_tag(sp.key))
    reporter.step(f"pushing {sp.name} (key {sp.key}) to {target}")
    before = remote.manifest_digest(key_ref, rootfs.key_tag(sp.key))
    if before is not None:
        check_key_tag(remote, key_ref, before, sp)  # before compressing anything
    with store.temp_dir("push") as tmp:
        info = bundle.write_bundle_file(
            sp, tmp / bundle.bundle_name(sp.name, sp.key), reporter.progress, sidecar=False
        )
        reporter.done()
        config_path = tmp / MANIFEST
        config_path.write_bytes(sp.manifest_bytes)
        config = Descriptor(
            rootfs.CONFIG_TYPE, Digest(info.manifest_sha256), len(sp.manifest_bytes)
        )
        blobs = [
            _Blob(MANIFEST, config_path, config),
            _Blob(info.file_name, tmp / info.file_name,
                  Descriptor(rootfs.BUNDLE_TYPE, info.digest, info.size)),
            *_kernel_layers(sp, tmp),
        ]  # fmt: skip
        data = rootfs.manifest_bytes(
            config,
            (blobs[1].title, blobs[1].desc),
            [(b.title, b.desc) for b in blobs[2:]],
            _annotations(sp, info),
        )
        digest = Digest(hashlib.sha256(data).hexdigest())
        uploaded = []
        for blob in blobs:
            if remote.push_blob(target.at(), blob.path, blob.desc.digest, blob.desc.size):
                uploaded.append(blob.desc.digest)
        reporter.done()
    if before != digest:
        remote.push_manifest(target.at(digest=digest), data, OCI_MANIFEST)
    result = PushResult(
        reference=target.at(digest=digest),
        manifest_descriptor=Descriptor(OCI_MANIFEST, digest, len(data)),
        artifact_type=rootfs.ARTIFACT_TYPE,
        store_path=sp.path,
        store_key=sp.key,
        name=sp.name,
        rootfs_sha256=info.rootfs_sha256,
        manifest_sha256=info.manifest_sha256,
        bundle=info,
        tag=target.tag,
        key_tag=rootfs.key_tag(sp.key),
        key_tag_digest=before,
        uploaded=tuple(uploaded),
    )
    if attach is not None:
        attach(result)
    if target.tag is not None:
        remote.push_manifest(target.at(target.tag), data, OCI_MANIFEST)
    now = before if before == digest else remote.manifest_digest(key_ref, result.key_tag)
    if now is None:
        remote.push_manifest(key_ref, data, OCI_MANIFEST)
        now = digest
    elif now != digest:
        if now != before:
            check_key_tag(remote, key_ref, now, sp)  # another push of the key won the race
        reporter.note(
            f"{result.key_tag} names {now}, an artifact of the same rootfs.ext4 "
            "(another zstd or manifest.json): kept"
        )
    return replace(result, key_tag_digest=now)
