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
    └── StoreError              the store is unusable (lock, permissions, corrupt entry)

The CLI prints ``banger-build: error: <message>`` and exits 1 for all of them.
"""

from __future__ import annotations


class BangerError(Exception):
    """Base class. ``reason`` is a stable, machine-readable slug."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return self.message


class RecipeError(BangerError):
    """A recipe or lock file is invalid. Carries its position and key path."""

    reason = "recipe-invalid"

    def __init__(
        self,
        message: str,
        *,
        file: str,
        line: int | None = None,
        col: int | None = None,
        key: str | None = None,
        reason: str | None = None,
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
    reason = "input-invalid"


class RegistryError(BangerError):
    reason = "registry"

    def __init__(
        self,
        message: str,
        *,
        reference: str,
        status: int | None = None,
        reason: str | None = None,
    ) -> None:
        self.reference = reference
        self.status = status
        prefix = f"{reference}: "
        if status is not None:
            prefix += f"HTTP {status}: "
        super().__init__(prefix + message, reason=reason)


class LayerError(BangerError):
    reason = "layer-invalid"

    def __init__(
        self,
        message: str,
        *,
        layer: str,
        path: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.layer = layer
        self.path = path
        where = f"layer {layer}"
        if path is not None:
            where += f": {path!r}"
        super().__init__(f"{where}: {message}", reason=reason)


class ToolError(BangerError):
    reason = "tool-failed"

    def __init__(
        self,
        message: str,
        *,
        argv: list[str] | None = None,
        returncode: int | None = None,
        stderr: str = "",
        reason: str | None = None,
    ) -> None:
        self.argv = argv or []
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(message, reason=reason)


class ImageError(BangerError):
    reason = "image"


class StoreError(BangerError):
    reason = "store"
