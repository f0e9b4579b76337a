"""``banger-build verify STORE-PATH|REF... [--trusted-key NAME:BASE64]...``: re-hash and
check signatures, as ``nix store verify`` does.

A STORE-PATH (``./result`` or a path in the store) is re-hashed against its
manifest.json; it is trusted when it was built here, or when it was
substituted and a signature recorded then is by a trusted key. A REF
(``REGISTRY/REPO[:TAG|@DIGEST]``, an artifact ``push`` made) is fetched --
manifest, config, every layer, the bundle decompressed -- re-hashed, and its
signatures (OCI referrers) checked.

One line per finding on stderr, ``TARGET: ok (...)`` on stdout. The exit
status combines bits: 1 corrupted, 2 untrusted, 4 another failure (the
registry, a malformed argument); 0 when every target is fine.

``--json``: one JSON event per line on stdout instead (``progress``), per
finding ``{"event": "finding", "target": T, "kind": "corrupted"|"untrusted"|
"error"|"warning", "bit": 1|2|4|0, "message": ...}``, then per target
``{"event": "result", "target": T, "exit": BITS, "ok": BOOL, "corrupted": BOOL,
"untrusted": BOOL, "error": BOOL, "trusted_as": "signed by K"|"built locally"|"",
"signers": [...]}``; an unusable ``--trusted-key`` is an ``error`` event (exit 4).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from banger_build.commands import common

if TYPE_CHECKING:
    from banger_build.progress import Reporter
    from banger_build.signing.keys import PublicKey
    from banger_build.signing.verify import Verdict

NAME = "verify"
HELP = "re-hash a store path or pushed artifact and check its signatures (exit 1/2/4 bits)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="+", metavar="STORE-PATH|REF",
                   help="a store path (e.g. ./result) or REGISTRY/REPO[:TAG|@DIGEST]")  # fmt: skip
    common.add_trusted_keys(p)
    p.add_argument("--no-contents", action="store_true",
                   help="do not re-hash the content, check only the signatures")  # fmt: skip
    p.add_argument("--no-trust", action="store_true",
                   help="do not check signatures, only re-hash the content")  # fmt: skip
    common.add_output(p)
    common.add_home(p)
    common.add_registry(p)


def _is_path(target: str) -> bool:
    return target.startswith(("/", "./", "../")) or target in (".", "..") or Path(target).exists()


def run(args: argparse.Namespace) -> int:
    from banger_build.errors import BangerError
    from banger_build.progress import report_error
    from banger_build.signing.verify import OTHER

    reporter = common.reporter(args)
    status = 0
    try:
        trusted = common.trusted_keys(args)
    except BangerError as exc:
        print(f"banger-build: error: {exc}", file=sys.stderr)
        report_error(exc.reason, str(exc), OTHER)  # an event with --json
        return OTHER
    for target in args.targets:
        verdict = _verify(args, target, trusted, reporter)
        reporter.done()
        if args.json:
            _report_json(reporter, verdict)
        else:
            _report_text(args, verdict)
        status |= verdict.status
    return status


def _report_text(args: argparse.Namespace, verdict: Verdict) -> None:
    for finding in verdict.findings:
        print(f"banger-build: {finding.line()}", file=sys.stderr)
    if verdict.status == 0:
        how = verdict.trusted_as or ("signatures not checked" if args.no_trust else "")
        print(f"{verdict.target}: ok" + (f" ({how})" if how else ""), flush=True)


def _report_json(reporter: Reporter, verdict: Verdict) -> None:
    from banger_build.progress import JsonReporter
    from banger_build.signing.verify import CORRUPTED, OTHER, UNTRUSTED

    assert isinstance(reporter, JsonReporter)
    for finding in verdict.findings:
        reporter.emit("finding", target=verdict.target, kind=finding.kind, bit=finding.bit,
                      message=finding.text)  # fmt: skip
    bits = verdict.status
    reporter.result(
        target=verdict.target, exit=bits, ok=bits == 0, corrupted=bool(bits & CORRUPTED),
        untrusted=bool(bits & UNTRUSTED), error=bool(bits & OTHER),
        trusted_as=verdict.trusted_as, signers=list(verdict.signers),
    )  # fmt: skip


def _verify(
    args: argparse.Namespace, target: str, trusted: Sequence[PublicKey], reporter: Reporter
) -> Verdict:
    from banger_build.errors import BangerError, InputError, Reason, host_error
    from banger_build.oci.reference import Reference, ReferenceSyntaxError
    from banger_build.signing.verify import OTHER, Verdict, verify_reference, verify_store_path
    from banger_build.store import Store

    options = {"contents": not args.no_contents, "trust": not args.no_trust}
    try:
        store = Store(common.home(args))
        if _is_path(target):
            verdict = verify_store_path(store, Path(target), trusted, **options)
        else:
            try:
                ref = Reference.parse(target)
            except ReferenceSyntaxError as exc:
                raise InputError(
                    f"{target}: neither a path nor a reference ({exc})",
                    reason=Reason.INVALID_REFERENCE,
                ) from None
            remote = common.remote(args, store, reporter.progress)
            verdict = verify_reference(remote, ref, trusted, **options)
    except OSError as exc:
        verdict = Verdict(target)
        verdict.add(OTHER, str(host_error("verify", exc)))
    except BangerError as exc:
        verdict = Verdict(target)
        verdict.add(OTHER, str(exc))
    return verdict
