"""DSSE envelopes (https://github.com/secure-systems-lab/dsse): sign and verify.

    {"payload": BASE64(statement), "payloadType": "application/vnd.in-toto+json",
     "signatures": [{"keyid": NAME, "sig": BASE64(Ed25519(PAE(type, statement)))}]}

    PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body

with LEN the decimal byte length. ``sign`` writes canonical JSON (sorted
keys, no spaces, standard base64), so one key signing one statement always
gives the same envelope bytes. ``verify`` accepts standard and URL-safe
base64, as the spec requires, and answers with a ``VerifiedStatement`` or a
``Refusal`` whose reason says which of three things went wrong:

    envelope-invalid    not a DSSE envelope (or past a bound), or not our payload type
    untrusted           no signature whose keyid names a trusted key
    signature-invalid   a trusted key's signature does not verify: tampered or corrupted
    statement-invalid   a valid signature over something that is not our statement

The keyid only narrows which keys are tried (DSSE: it is not authenticated);
a signature without one is tried against every trusted key. A key's text
never appears in a refusal.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass

from banger_build.errors import Reason, SignatureError
from banger_build.signing.keys import NAME_RE as _NAME
from banger_build.signing.keys import PublicKey, SecretKey
from banger_build.signing.statement import Claims, StatementError, parse_claims

PAYLOAD_TYPE = "application/vnd.in-toto+json"
#: bytes of one envelope (a statement is ~1 KiB, a signature 88 characters)
MAX_ENVELOPE = 64 << 10
#: signatures in one envelope
MAX_SIGNATURES = 16


def _shown(keyid: str | None) -> str:
    """A keyid as a message may show it (it comes from an untrusted envelope)."""
    if keyid is None:
        return "(no keyid)"
    return keyid if _NAME.fullmatch(keyid) else ascii(keyid[:60])


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


@dataclass(frozen=True)
class VerifiedStatement:
    """A statement with a valid signature by ``signer`` (a trusted key's name)."""

    signer: str
    statement: bytes
    claims: Claims


@dataclass(frozen=True)
class Refusal:
    """Why an envelope was not accepted."""

    reason: Reason
    message: str

    def error(self) -> SignatureError:
        return SignatureError(self.message, reason=self.reason)


def sign(statement: bytes, key: SecretKey) -> bytes:
    """A DSSE envelope of ``statement`` with one signature by ``key``."""
    sig = key.sign(pae(PAYLOAD_TYPE, statement))
    envelope = {
        "payload": base64.b64encode(statement).decode("ascii"),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [{"keyid": key.name, "sig": base64.b64encode(sig).decode("ascii")}],
    }
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()


def _b64(text: object) -> bytes | None:
    """Standard or URL-safe base64 (padding optional); None if it is neither."""
    if not isinstance(text, str):
        return None
    data = text.replace("-", "+").replace("_", "/")
    data += "=" * (-len(data) % 4)
    try:
        return base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeError):
        return None


@dataclass(frozen=True)
class _Signature:
    keyid: str | None
    sig: bytes


def _parse(envelope: bytes) -> tuple[str, bytes, list[_Signature]] | Refusal:
    def bad(why: str) -> Refusal:
        return Refusal(Reason.ENVELOPE_INVALID, f"not a DSSE envelope: {why}")

    if len(envelope) > MAX_ENVELOPE:
        return bad(f"{len(envelope)} bytes, more than the limit of {MAX_ENVELOPE}")
    try:
        body = json.loads(envelope)
    except (ValueError, UnicodeDecodeError):
        return bad("not valid JSON")
    if not isinstance(body, dict):
        return bad("not a JSON object")
    payload_type = body.get("payloadType")
    payload = _b64(body.get("payload"))
    raw = body.get("signatures")
    if not isinstance(payload_type, str) or payload is None:
        return bad("no payloadType or no base64 payload")
    if not isinstance(raw, list) or not raw or len(raw) > MAX_SIGNATURES:
        return bad(f"it needs 1 to {MAX_SIGNATURES} signatures")
    signatures = []
    for item in raw:
        if not isinstance(item, dict):
            return bad("a signature is not an object")
        keyid, sig = item.get("keyid"), _b64(item.get("sig"))
        if sig is None or (keyid is not None and not isinstance(keyid, str)):
            return bad("a signature has no base64 sig or a keyid that is not a string")
        signatures.append(_Signature(keyid or None, sig))
    if payload_type != PAYLOAD_TYPE:
        return bad(f"payload type {payload_type[:100]!r}, expected {PAYLOAD_TYPE}")
    return payload_type, payload, signatures


def verify(envelope: bytes, trusted: Sequence[PublicKey]) -> VerifiedStatement | Refusal:
    """The statement of ``envelope`` if a trusted key signed it, else why not."""
    parsed = _parse(envelope)
    if isinstance(parsed, Refusal):
        return parsed
    payload_type, payload, signatures = parsed
    message = pae(payload_type, payload)
    failed: list[str] = []
    for signature in signatures:
        candidates = [k for k in trusted if signature.keyid in (None, k.name)]
        for key in candidates:
            if key.verify(signature.sig, message):
                try:
                    claims = parse_claims(payload)
                except StatementError as exc:
                    return Refusal(Reason.STATEMENT_INVALID, f"signed by {key.name}, but {exc}")
                return VerifiedStatement(key.name, payload, claims)
        if candidates:
            failed.append(_shown(signature.keyid))
    if failed:
        return Refusal(
            Reason.SIGNATURE_INVALID,
            f"the signature by {', '.join(sorted(set(failed)))} does not verify "
            "(the envelope was tampered with or corrupted)",
        )
    names = sorted({_shown(s.keyid) for s in signatures})
    return Refusal(Reason.UNTRUSTED, f"signed by {', '.join(names)}, none of them a trusted key")


__all__ = [
    "MAX_ENVELOPE",
    "PAYLOAD_TYPE",
    "Refusal",
    "VerifiedStatement",
    "pae",
    "sign",
    "verify",
]
