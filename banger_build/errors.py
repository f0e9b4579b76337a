"""The error hierarchy of banger-build.

Every failure a user can cause or meet is one of these; anything else that
escapes is a bug. Third-party exceptions (requests, tomllib, tarfile,
zstandard, OSError from subprocesses) are translated once, at the module that
talks to them, with ``raise OurError(...) from exc``.

    BangerError                 reason: machine-readable, asserted by tests
    ├── RecipeError             file:line:col and key path of a recipe/lock problem
    ├── InputError              a local input (file, template, kernel) is missing or wrong
    ├── RegistryError           reference (+ HTTP status) of a registry failure
    ├── LayerError              layer digest + path inside it of a refused/broken layer
    ├── ToolError               an external tool is missing or failed (argv, exit, stderr)
    ├── ImageError              the filesystem could not be built or verified
    ├── StoreError              the store is unusable (lock, permissions, corrupt entry)
    ├── SignatureError          a signature is malformed, untrusted or does not verify
    └── HostError               the build host failed a step: disk full, permission,
                                I/O error, out of memory (step, path, errno's words)

The CLI prints ``banger-build: error: <message>`` and exits 1 for all of them.
"""

from __future__ import annotations

import errno
import os
from enum import StrEnum


class Reason(StrEnum):
    """Why something failed: stable, machine-readable, asserted by tests.

    A ``StrEnum``: each member equals its string value (``Reason.IO == "io"``).
    """

    # general
    ERROR = "error"
    IO = "io"
    DISK_FULL = "disk-full"
    PERMISSION = "permission"
    OUT_OF_MEMORY = "out-of-memory"
    TOO_LARGE = "too-large"  # a recipe, template, manifest or config past its bound
    TOO_DEEP = "too-deep"  # a tree nested past a bound
    INTERRUPTED = "interrupted"
    KILLED = "killed"  # one of several builds' processes, by a signal it could not handle
    TIMEOUT = "timeout"
    BAD_ARGUMENT = "bad-argument"
    # recipe (RecipeError)
    RECIPE_INVALID = "recipe-invalid"
    SYNTAX = "syntax"
    UNKNOWN_KEY = "unknown-key"
    TYPE = "type"
    VALUE = "value"
    MISSING_KEY = "missing-key"
    CONFLICTING_KEYS = "conflicting-keys"
    DUPLICATE_DEST = "duplicate-dest"
    NOT_LOCKED = "not-locked"
    # local inputs (InputError)
    INPUT_INVALID = "input-invalid"
    MISSING_INPUT = "missing-input"
    SHA256_MISMATCH = "sha256-mismatch"
    INPUT_CHANGED = "input-changed"
    NOT_REBUILDABLE = "not-rebuildable"  # a store path's record no longer leads to its inputs
    TEMPLATE_MISSING = "template-missing"
    TEMPLATE_SYNTAX = "template-syntax"
    TEMPLATE_UNDEFINED = "template-undefined"
    TEMPLATE_ERROR = "template-error"
    TEMPLATE_UNSAFE = "template-unsafe"
    TEMPLATE_LIMIT = "template-limit"
    SOURCE_NOT_ALLOWED = "source-not-allowed"
    NOT_A_REGULAR_FILE = "not-a-regular-file"
    SYMLINK_LOOP = "symlink-loop"
    GUEST_TEMPLATES_MISSING = "guest-templates-missing"
    AGENT_MISSING = "agent-missing"  # no built-in guest agent for the recipe's platform
    MODULES_NOT_A_DIRECTORY = "modules-not-a-directory"
    MODULES_VERSION = "modules-version"
    INVALID_MODULES = "invalid-modules"
    NO_MODULES = "no-modules"
    NOT_A_MODULES_TREE = "not-a-modules-tree"  # no modules.order or kernel/, none below
    AMBIGUOUS_MODULES = "ambiguous-modules"  # several lib/modules/<version> below
    CONFIG_MISMATCH = "config-mismatch"
    PLATFORM_MISMATCH = "platform-mismatch"
    UNKNOWN_OWNER = "unknown-owner"
    DEST_IS_DIRECTORY = "dest-is-directory"
    DEST_INVALID = "dest-invalid"
    MIRROR_INVALID = "mirror-invalid"
    INSECURE_INVALID = "insecure-invalid"
    BLOB_SIZE = "blob-size"
    RECIPE_CHANGED = "recipe-changed"
    NO_ROOTFS = "no-rootfs"
    NO_KERNEL = "no-kernel"
    # registries (RegistryError)
    REGISTRY = "registry"
    UNREACHABLE = "unreachable"
    TLS = "tls"
    AUTH = "auth"
    NOT_FOUND = "not-found"
    HTTP_STATUS = "http-status"
    DIGEST_MISMATCH = "digest-mismatch"
    NO_PLATFORM = "no-platform"
    UNSUPPORTED_MEDIA_TYPE = "unsupported-media-type"
    INVALID_MANIFEST = "invalid-manifest"
    INVALID_REFERENCE = "invalid-reference"
    INSECURE = "insecure"
    PROTOCOL = "protocol"
    STALLED = "stalled"
    OFFLINE = "offline"
    NO_MIRROR = "no-mirror"
    PIN_NOT_FOUND = "pin-not-found"
    TOO_MANY_LAYERS = "too-many-layers"
    INVALID_CONFIG = "invalid-config"
    NOT_REPRODUCIBLE = "not-reproducible"  # a registry holds other bytes for a store key
    # layers (LayerError)
    LAYER_INVALID = "layer-invalid"
    CORRUPT = "corrupt"
    DIFF_ID_MISMATCH = "diff-id-mismatch"
    UNSAFE_NAME = "unsafe-name"
    PATH_ESCAPE = "path-escape"
    NAME_TOO_LONG = "name-too-long"
    THROUGH_SYMLINK = "through-symlink"
    NOT_A_DIRECTORY = "not-a-directory"
    BAD_WHITEOUT = "bad-whiteout"
    DEST_IS_SYMLINK = "dest-is-symlink"
    TOO_MANY_SEGMENTS = "too-many-segments"
    AGENT_ARCH_MISMATCH = "agent-arch-mismatch"
    LINK_TOO_LONG = "link-too-long"
    HARDLINK_TARGET = "hardlink-target"
    UNSUPPORTED_TYPE = "unsupported-type"
    BAD_OWNER = "bad-owner"
    UNSAFE_XATTR = "unsafe-xattr"
    BAD_DEVICE = "bad-device"
    HEADER_TOO_LARGE = "header-too-large"
    IMAGE_TOO_LARGE = "image-too-large"
    TOO_MANY_ENTRIES = "too-many-entries"
    DIR_TOO_LARGE = "dir-too-large"
    PATH_TOO_LONG = "path-too-long"
    TOO_MANY_LINKS = "too-many-links"
    XATTR_TOO_LARGE = "xattr-too-large"
    FILE_TOO_LARGE = "file-too-large"
    # external tools (ToolError)
    TOOL_FAILED = "tool-failed"
    TOOL_MISSING = "tool-missing"
    TOOL_TIMEOUT = "tool-timeout"
    TOOL_KILLED = "tool-killed"
    # the image (ImageError)
    IMAGE = "image"
    SIZE_TOO_SMALL = "size-too-small"
    SIZE_TOO_LARGE = "size-too-large"
    HOST_DISK_FULL = "host-disk-full"
    FSCK_FAILED = "fsck-failed"
    # the store (StoreError)
    STORE = "store"
    BLOB_CACHE = "blob-cache"
    OUT_LINK = "out-link"
    NOT_A_STORE_PATH = "not-a-store-path"
    NOT_SUBSTITUTED = "not-substituted"
    SUBSTITUTE_REFUSED = "substitute-refused"
    NOT_BUILT = "not-built"
    # boot (BootError)
    BOOT_FAILED = "boot-failed"
    BOOT_TIMEOUT = "boot-timeout"
    GUEST_PANIC = "guest-panic"
    GUEST_REBOOT = "guest-reboot"
    EXPECT_MISSING = "expect-missing"
    QEMU_FAILED = "qemu-failed"
    NO_KVM = "no-kvm"
    UNSUPPORTED_ARCH = "unsupported-arch"  # no emulator for the image's architecture
    KERNEL_ARCH_MISMATCH = "kernel-arch-mismatch"  # a kernel for another architecture
    AGENT_UNREACHABLE = "agent-unreachable"  # the guest agent did not answer on vsock
    # keys and signatures (InputError for key files and arguments, SignatureError)
    KEY_INVALID = "key-invalid"
    KEY_MISMATCH = "key-mismatch"
    KEY_EXISTS = "key-exists"
    ENVELOPE_INVALID = "envelope-invalid"
    STATEMENT_INVALID = "statement-invalid"
    UNTRUSTED = "untrusted"
    SIGNATURE_INVALID = "signature-invalid"
    STATEMENT_MISMATCH = "statement-mismatch"
    TOO_MANY_REFERRERS = "too-many-referrers"
    INDEX_CONTENTION = "index-contention"
    BUNDLE_INVALID = "bundle-invalid"


class BangerError(Exception):
    """Base class. ``reason`` is a stable, machine-readable slug."""

    reason: Reason = Reason.ERROR

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return self.message


class RecipeError(BangerError):
    """A recipe or lock file is invalid. Carries its position and key path."""

    reason = Reason.RECIPE_INVALID

    def __init__(
        self,
        message: str,
        *,
        file: str,
        line: int | None = None,
        col: int | None = None,
        key: str | None = None,
        reason: Reason | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.col = col
        self.key = key
        where = file
        if line is not None:
            where += f":{line}:{col if col is not None else 1}"
        text = f"{where}: {key}: {message}" if key else f"{where}: {message}"
        super().__init__(text, reason=reason)
        self.detail = message


class InputError(BangerError):
    reason = Reason.INPUT_INVALID


class RegistryError(BangerError):
    reason = Reason.REGISTRY

    def __init__(
        self,
        message: str,
        *,
        reference: str,
        status: int | None = None,
        reason: Reason | None = None,
    ) -> None:
        self.reference = reference
        self.status = status
        prefix = f"{reference}: "
        if status is not None:
            prefix += f"HTTP {status}: "
        super().__init__(prefix + message, reason=reason)


class LayerError(BangerError):
    reason = Reason.LAYER_INVALID

    def __init__(
        self,
        message: str,
        *,
        layer: str,
        path: str | None = None,
        reason: Reason | None = None,
    ) -> None:
        self.layer = layer
        self.path = path
        where = f"layer {layer}"
        if path is not None:
            where += f": {path!r}"
        super().__init__(f"{where}: {message}", reason=reason)


class ToolError(BangerError):
    reason = Reason.TOOL_FAILED

    def __init__(
        self,
        message: str,
        *,
        argv: list[str] | None = None,
        returncode: int | None = None,
        stderr: str = "",
        reason: Reason | None = None,
    ) -> None:
        self.argv = argv or []
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(message, reason=reason)


class ImageError(BangerError):
    reason = Reason.IMAGE


class StoreError(BangerError):
    reason = Reason.STORE


class SignatureError(BangerError):
    """A signature envelope is malformed, signed by no trusted key, or does not verify."""

    reason = Reason.SIGNATURE_INVALID


class HostError(BangerError):
    """The build host failed a step (its disk, permissions, memory), not an input."""

    reason = Reason.IO


_ERRNO_REASONS = {
    errno.ENOSPC: Reason.DISK_FULL,
    errno.EDQUOT: Reason.DISK_FULL,
    errno.EACCES: Reason.PERMISSION,
    errno.EPERM: Reason.PERMISSION,
    errno.EROFS: Reason.PERMISSION,
}


def host_error(step: str, exc: OSError) -> HostError:
    """``step: path: words (ENAME)`` for an OSError a step did not expect."""
    where = "".join(
        f"{os.fsdecode(name)}: "
        for name in (exc.filename, exc.filename2)
        if name is not None and not isinstance(name, int)
    )
    words = exc.strerror or str(exc) or type(exc).__name__
    code = (
        f" ({errno.errorcode[exc.errno]})"
        if exc.errno is not None and exc.errno in errno.errorcode
        else ""
    )
    reason = _ERRNO_REASONS.get(exc.errno or 0, Reason.IO)
    return HostError(f"{step}: {where}{words}{code}", reason=reason)
