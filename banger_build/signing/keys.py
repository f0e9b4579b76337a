"""Ed25519 signing keys in Nix's text format.

    secret key file   NAME:BASE64(seed || public)   64 bytes: libsodium's secret key,
                                                    as ``nix key generate-secret`` writes it
    public key        NAME:BASE64(public)           32 bytes, as ``nix key
                                                    convert-secret-to-public`` writes it

``NAME`` names the key (``ci.example.org-1``); it becomes the ``keyid`` of
the signatures the key makes, and trust is given to ``NAME:BASE64`` pairs
(``--trusted-key``, ``BANGER_BUILD_TRUSTED_KEYS``). A key file holds no
newline, like Nix's; surrounding whitespace is ignored when reading.

Secret bytes stay inside ``SecretKey``: its repr and every message name the
key and the file, never the key's text; a secret key file is created
exclusively with mode 0600 and never printed. Malformed keys are
``InputError``s with reason ``key-invalid`` (``key-mismatch`` when a secret
key's public half is not its own, ``key-exists`` when ``generate`` would
overwrite a file).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from banger_build.errors import InputError, Reason

if TYPE_CHECKING:  # cryptography is loaded where a key is made or used, not by every build
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

#: a key name: what Nix accepts (anything before the first ':') narrowed to what is
#: safe in a message, an OCI annotation and a DSSE keyid
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
#: bytes of a key file read (a real one is ~100)
MAX_KEY_FILE = 4096
SEED_SIZE = 32
PUBLIC_SIZE = 32
SIGNATURE_SIZE = 64
ENV_TRUSTED_KEYS = "BANGER_BUILD_TRUSTED_KEYS"


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InputError(
            f"invalid key name {name[:140]!r}: 1-128 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit (e.g. ci.example.org-1)",
            reason=Reason.KEY_INVALID,
        )
    return name


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeError):
        return None


def _raw_public(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _private(seed: bytes | None = None) -> Ed25519PrivateKey:
    """The Ed25519 key of a 32-byte seed, or a new one."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if seed is None:
        return Ed25519PrivateKey.generate()
    return Ed25519PrivateKey.from_private_bytes(seed)


class PublicKey:
    """A trusted (or trustable) key: its name and 32 raw bytes."""

    __slots__ = ("_key", "name", "raw")

    def __init__(self, name: str, raw: bytes) -> None:
        if len(raw) != PUBLIC_SIZE:
            raise InputError(
                f"public key {name}: {len(raw)} bytes, expected {PUBLIC_SIZE}",
                reason=Reason.KEY_INVALID,
            )
        self.name = check_name(name)
        self.raw = bytes(raw)
        self._key: Ed25519PublicKey | None = None  # made on first verify

    def __str__(self) -> str:
        """``NAME:BASE64``, the text form (a public key is not a secret)."""
        return f"{self.name}:{base64.b64encode(self.raw).decode()}"

    def __repr__(self) -> str:
        return f"PublicKey({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and (self.name, self.raw) == (other.name, other.raw)

    def __hash__(self) -> int:
        return hash((self.name, self.raw))

    def verify(self, signature: bytes, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if len(signature) != SIGNATURE_SIZE:
            return False
        if self._key is None:
            self._key = Ed25519PublicKey.from_public_bytes(self.raw)
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


class SecretKey:
    """A signing key. Its bytes never leave this object except into a key file."""

    __slots__ = ("_key", "name", "public")

    def __init__(self, name: str, key: Ed25519PrivateKey) -> None:
        self.name = check_name(name)
        self._key = key
        self.public = PublicKey(name, _raw_public(key.public_key()))

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        return cls(name, _private())

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> SecretKey:
        """The key of a 32-byte seed (RFC 8032's private key): tests' known answers."""
        return cls(name, _private(seed))

    def __repr__(self) -> str:
        return f"SecretKey({self.name!r})"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a secret key is not serialisable (write it with write_key_pair)")

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def text(self) -> str:
        """``NAME:BASE64(seed || public)``: the key file's content, for ``write_key_pair``."""
        seed = self._key.private_bytes_raw()
        return f"{self.name}:{base64.b64encode(seed + self.public.raw).decode()}"


# -- parsing ---------------------------------------------------------------------------


def parse_public_key(text: str, where: str = "trusted key") -> PublicKey:
    """``NAME:BASE64`` of a 32-byte Ed25519 public key. Messages never echo the key."""
    name, sep, data = text.strip().partition(":")
    shown = f"{where} {name[:140]!r}" if sep else where
    if not sep or not name:
        raise InputError(
            f"{where}: expected NAME:BASE64 (a public key as `banger-build key generate` "
            "writes it to FILE.pub)",
            reason=Reason.KEY_INVALID,
        )
    check_name(name)
    raw = _b64decode(data)
    if raw is not None and len(raw) == SEED_SIZE + PUBLIC_SIZE:
        raise InputError(
            f"{shown}: this is a secret key; give its public half (FILE.pub), and keep "
            "the secret key secret",
            reason=Reason.KEY_INVALID,
        )
    if raw is None or len(raw) != PUBLIC_SIZE:
        what = "not valid base64" if raw is None else f"{len(raw)} bytes"
        raise InputError(
            f"{shown}: {what}, expected the base64 of a {PUBLIC_SIZE}-byte Ed25519 public key",
            reason=Reason.KEY_INVALID,
        )
    return PublicKey(name, raw)


def parse_trusted_keys(texts: Iterable[str], env: str | None = None) -> tuple[PublicKey, ...]:
    """Keys from repeated ``--trusted-key`` values and ``env`` (comma-separated), deduplicated."""
    found: list[PublicKey] = []
    items = [(text, "--trusted-key") for text in texts]
    if env:
        items += [(part, ENV_TRUSTED_KEYS) for part in env.split(",") if part.strip()]
    for text, where in items:
        key = parse_public_key(text, where)
        if key not in found:
            found.append(key)
    return tuple(found)


def parse_secret_key(text: str, where: str) -> SecretKey:
    """``NAME:BASE64(seed || public)``; the public half must be the seed's own."""
    name, sep, data = text.strip().partition(":")
    if not sep or not name:
        raise InputError(
            f"{where}: not a secret key (expected NAME:BASE64, as `banger-build key "
            "generate` writes it)",
            reason=Reason.KEY_INVALID,
        )
    check_name(name)
    raw = _b64decode(data)
    if raw is None or len(raw) != SEED_SIZE + PUBLIC_SIZE:
        what = "not valid base64" if raw is None else f"{len(raw)} bytes"
        hint = " (is this the .pub file?)" if raw is not None and len(raw) == PUBLIC_SIZE else ""
        raise InputError(
            f"{where}: secret key {name!r}: {what}, expected the base64 of "
            f"{SEED_SIZE + PUBLIC_SIZE} bytes{hint}",
            reason=Reason.KEY_INVALID,
        )
    key = SecretKey(name, _private(raw[:SEED_SIZE]))
    if key.public.raw != raw[SEED_SIZE:]:
        raise InputError(
            f"{where}: secret key {name!r}: its public half does not belong to it "
            "(a damaged or hand-edited key file)",
            reason=Reason.KEY_MISMATCH,
        )
    return key


def load_secret_key(path: Path) -> SecretKey:
    """The secret key in file ``path`` (a regular file of at most ``MAX_KEY_FILE`` bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise InputError(
            f"cannot read the secret key {path}: {exc.strerror}", reason=Reason.MISSING_INPUT
        ) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{path}: the secret key is not a regular file", reason=Reason.IO)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise InputError(
            f"{path}: not a secret key (more than {MAX_KEY_FILE} bytes)",
            reason=Reason.KEY_INVALID,
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise InputError(
            f"{path}: not a secret key (not ASCII text)", reason=Reason.KEY_INVALID
        ) from None
    return parse_secret_key(text, str(path))


# -- writing ---------------------------------------------------------------------------


def public_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a new file exclusively (never through an existing file or symlink), fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # what the umask took away, for the .pub; 0600 stays 0600
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_key_pair(key: SecretKey, path: Path) -> Path:
    """Write ``path`` (the secret key, 0600) and ``path.pub``; neither may exist yet.

    Returns the public key's path. Nothing is left behind on failure.
    """
    pub = public_path(path)
    for target in (path, pub):
        if os.path.lexists(target):
            raise InputError(
                f"{target} exists; not overwriting a key (remove it first)",
                reason=Reason.KEY_EXISTS,
            )
    try:
        _create(path, key.text().encode("ascii"), 0o600)
    except FileExistsError:
        raise InputError(
            f"{path} exists; not overwriting a key (remove it first)", reason=Reason.KEY_EXISTS
        ) from None
    try:
        _create(pub, str(key.public).encode("ascii"), 0o644)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        if isinstance(exc, FileExistsError):
            raise InputError(
                f"{pub} exists; not overwriting a key (remove it first)",
                reason=Reason.KEY_EXISTS,
            ) from None
        raise
    return pub


__all__ = [
    "ENV_TRUSTED_KEYS",
    "PublicKey",
    "SecretKey",
    "check_name",
    "load_secret_key",
    "parse_public_key",
    "parse_secret_key",
    "parse_trusted_keys",
    "public_path",
    "write_key_pair",
]
