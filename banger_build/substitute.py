"""Substitution: take a store path another machine built and pushed, instead of
building it, when every byte of it checks out.

After the key is computed and the local store misses (under the exclusive key
lock), each substituter is asked for the tag ``sk-<key>`` with one HEAD, all
of them at once and with a short timeout (``PROBE_TIMEOUT``): one that times
out, answers 5xx or refuses is a miss for the rest of the run, with one
warning, never a failure. On a hit, nothing is trusted until it is verified,
in this order:

1. the artifact manifest, fetched by the digest the HEAD named and hashed;
   its type, layer count and sizes bounded (``oci.rootfs``); its store-key
   annotation equal to the key computed here;
2. its config, the store path's manifest.json (bounded, hashed), whose
   derivation hashes to that key and whose key and name are this build's;
3. a signature by a key the substituter is trusted with, binding the store key
   to the raw digests of manifest.json and rootfs.ext4 (an unsigned path is
   refused unless ``accept_unsigned``);
4. the bundle blob (hashed), read strictly: exactly manifest.json (equal to
   the config) then rootfs.ext4, whose raw sha256 must be the signed one;
5. each kernel file's layer (hashed) against the digest manifest.json records.

Only then is the path published (one rename, like a build) and recorded as
substituted, with the source and the signer, in its meta record (``ls``,
``verify``). Nothing unverified ever enters the store; no layer of the base
image is downloaded and no filesystem is built.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from banger_build.config import Substituter
from banger_build.context import Context
from banger_build.errors import BangerError, Reason, StoreError
from banger_build.oci.blobs import BlobCache
from banger_build.oci.kernel import extract_modules
from banger_build.oci.manifest import MAX_CONFIG, Descriptor, ManifestError
from banger_build.oci.options import RegistryOptions
from banger_build.oci.reference import Digest, Reference
from banger_build.oci.rootfs import key_tag, parse_rootfs_manifest
from banger_build.signing.content import max_bundle_size, read_bundle
from banger_build.signing.statement import MODULES_DIR, ROOTFS, parse_store_manifest
from banger_build.signing.verify import Verdict, check_signatures, substitution_record
from banger_build.store import MANIFEST

if TYPE_CHECKING:  # the HTTP stack is imported only when a substituter is asked
    from banger_build.oci.remote import Remote

#: seconds a substituter has to answer the HEAD of ``sk-<key>`` (connect and read):
#: an unreachable one costs about this, once per run
PROBE_TIMEOUT = 1.5


class Refused(BangerError):
    """A substituter's artifact failed a check: it is not used (the build goes on)."""

    reason = Reason.SUBSTITUTE_REFUSED


@dataclass(frozen=True)
class Hit:
    substituter: Substituter
    digest: Digest  # of the artifact manifest, as the HEAD named it

    @property
    def ref(self) -> Reference:
        s = self.substituter
        return Reference(s.registry, s.repository, digest=self.digest)


def _remote(ctx: Context, options: RegistryOptions) -> Remote:
    from banger_build.oci.remote import Remote

    cache = BlobCache(ctx.store.blobs, ctx.store.temp_roots)
    return Remote(cache, options, progress=ctx.reporter.progress)


def probe(ctx: Context, substituters: Sequence[Substituter]) -> list[Hit]:
    """Which substituters have ``sk-<key>``, asked all at once; a failing one is a
    miss with one warning."""
    options = dataclasses.replace(
        ctx.options.registry, timeout=PROBE_TIMEOUT, retries=0, mirrors={}
    )
    tag = key_tag(ctx.key)

    def ask(sub: Substituter) -> Digest | None:
        return _remote(ctx, options).manifest_digest(sub.ref(tag), tag)

    hits: list[Hit] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(substituters))) as pool:
        futures = [pool.submit(ask, sub) for sub in substituters]
        for sub, future in zip(substituters, futures, strict=True):
            try:
                digest = future.result()
            except BangerError as exc:
                ctx.reporter.always(f"substituter {sub} is skipped for this run: {exc}")
                continue
            if digest is not None:
                hits.append(Hit(sub, digest))
    return hits


def substitute(ctx: Context) -> Path | None:
    """The store path of ``ctx``'s key from the first substituter whose artifact
    checks out, published; None when none has it (or none checks out)."""
    substituters = ctx.options.substituters
    if not substituters:
        return None
    ctx.reporter.step(f"asking {len(substituters)} substituter(s) for {key_tag(ctx.key)}")
    for hit in probe(ctx, substituters):
        try:
            return fetch(ctx, hit)
        except BangerError as exc:  # refused, or the registry failed us: build instead
            ctx.reporter.always(f"not substituting from {hit.substituter}: {exc}")
    return None


def fetch(ctx: Context, hit: Hit) -> Path:
    """Verify ``hit``'s artifact in full into a temp dir, then publish it."""
    remote = _remote(ctx, ctx.options.registry)
    ref, sub = hit.ref, hit.substituter
    ctx.reporter.step(f"substituting {ctx.derivation.name} from {ref}")
    digest, data, _ = remote.manifest(ref, str(hit.digest), hit.digest)
    try:
        artifact = parse_rootfs_manifest(digest, data)
    except ManifestError as exc:
        raise Refused(f"{ref}: {exc.message}") from exc
    if artifact.key != ctx.key:
        raise Refused(f"{ref}: the artifact is of key {artifact.key}, not {ctx.key}")
    if artifact.config.size > MAX_CONFIG:
        raise Refused(f"{ref}: manifest.json is {artifact.config.size} bytes")
    config = remote.blob(ref, artifact.config).read_bytes()
    manifest = parse_store_manifest(config, f"{ref} manifest.json")
    if (manifest.key, manifest.derivation_key, manifest.name) != (
        ctx.key,
        ctx.key,
        ctx.derivation.name,
    ):
        raise Refused(
            f"{ref}: its manifest.json is of {manifest.store_path} (derivation key "
            f"{manifest.derivation_key}), not of {ctx.key}-{ctx.derivation.name}"
        )
    trees = {}
    if MODULES_DIR in artifact.kernel:
        trees[MODULES_DIR] = artifact.kernel[MODULES_DIR].digest.hex
    verdict = Verdict(target=str(ref))
    if sub.trusted_keys:
        check_signatures(verdict, remote, ref, digest, sub.trusted_keys, manifest, trees)
    if not verdict.signers and not sub.accept_unsigned:
        why = "; ".join(f.text for f in verdict.findings[-3:]) or "no trusted key is configured"
        raise Refused(f"{ref}: not signed by a trusted key ({why})")
    bundle_limit = max_bundle_size(manifest)
    if artifact.bundle.size > bundle_limit:
        raise Refused(f"{ref}: the bundle is {artifact.bundle.size} bytes (at most {bundle_limit})")
    with ctx.store.build_dir(ctx.key) as work:
        out = work / "out"
        out.mkdir()
        bundle = read_bundle(remote.blob(ref, artifact.bundle), manifest, rootfs_to=out / ROOTFS)
        if bundle.manifest != config:
            raise Refused(f"{ref}: the bundle's manifest.json is not the artifact's config")
        if (bundle.rootfs_sha256, bundle.rootfs_size) != manifest.outputs[ROOTFS]:
            raise Refused(
                f"{ref}: {ROOTFS} has sha256 {bundle.rootfs_sha256}, the signed "
                f"manifest.json records {manifest.outputs[ROOTFS][0]}"
            )
        (out / MANIFEST).write_bytes(config)
        _stage_kernel(remote, ref, artifact.kernel, manifest.files, out)
        missing = sorted(set(manifest.outputs) - {p.name for p in out.iterdir()})
        if missing:
            raise Refused(f"{ref}: the artifact lacks {', '.join(missing)}")
        path = ctx.store.publish(out, ctx.key, ctx.derivation.name)
    signer = verdict.signers[0] if verdict.signers else ""
    record = substitution_record(str(ref), signer, verdict.accepted)
    ctx.store.entry(path).write_meta(ctx.recipe.path, substituted=record)
    trust = f"signed by {signer}" if signer else "unsigned (accepted)"
    ctx.reporter.step(f"substituted {path.name} from {sub} ({trust})")
    return path


def _stage_kernel(
    remote: Remote, ref: Reference, layers: dict[str, Descriptor], files: dict[str, str], out: Path
) -> None:
    """Each kernel layer (verified against its descriptor by the blob cache) staged
    under its name; a file's bytes must be the ones manifest.json records."""
    for name, desc in layers.items():
        blob = remote.blob(ref, desc)
        if name == MODULES_DIR:  # the signed tar of the directory
            extract_modules(blob, out / MODULES_DIR)
            continue
        if files.get(name) != desc.digest.hex:
            raise Refused(f"{ref}: its {name} layer is not the file manifest.json records")
        shutil.copyfile(blob, out / name)


def require(ctx: Context) -> None:
    """``--no-build``: a path no substituter has is an error, not a build."""
    raise StoreError(
        f"{ctx.derivation.name} (key {ctx.key}) is in no store and no substituter, and "
        "--no-build forbids building it",
        reason=Reason.NOT_SUBSTITUTED,
    )
