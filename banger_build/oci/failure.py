"""The one internal failure type of the ``oci`` package.

Below the boundary (``source.Source`` and ``remote.Remote``) a failure is a
``Failure``: a message and a ``Reason``, plus the HTTP status when there was
one. Only the boundary knows the reference the user asked for, so only it
calls ``error_for`` -- once per failure -- and a ``Failure`` never reaches
the rest of the program.
"""

from __future__ import annotations

from banger_build.errors import BangerError, Reason, RegistryError


class Failure(Exception):
    """A failure found below the ``oci`` boundary."""

    def __init__(self, message: str, *, reason: Reason, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.status = status

    def error_for(self, reference: str) -> BangerError:
        """This failure as the user's error about ``reference``."""
        return RegistryError(
            self.message, reference=reference, status=self.status, reason=self.reason
        )
