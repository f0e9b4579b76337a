"""banger-build: a declarative, content-addressed builder of microVM root filesystems.

A recipe (TOML) names an OCI image, a size and files to add; a build pulls the
image, builds an ext4 without root and stores ``rootfs.ext4`` and
``manifest.json`` under ``<home>/store/<key>-<name>``, the key a hash of every
input. The command line is ``banger-build``; the library is this package::

    import banger_build

    result = banger_build.build(
        "recipes/debian.toml", mirrors={"docker.io": "http://127.0.0.1:5000"}
    )
    result.path / "rootfs.ext4"          # the image; result.key, result.status
    banger_build.check(result.path).ok   # rebuilt bit for bit from its recorded inputs
    banger_build.show("recipes/debian.toml")["key"]

``build``, ``check`` and ``show`` (``banger_build.api``) take the command
line's options as keyword arguments; ``build`` makes no ``./result`` unless
given ``out_link``. They return ``BuildResult``, ``CheckResult`` and a dict;
every failure is a ``BangerError`` (one line; ``.reason`` is a stable slug).
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from banger_build.api import build, check, show
from banger_build.errors import BangerError

if TYPE_CHECKING:
    from banger_build.build import CheckResult
    from banger_build.context import BuildResult

__version__ = "0.1.0"

__all__ = [
    "BangerError",
    "BuildResult",
    "CheckResult",
    "__version__",
    "build",
    "check",
    "show",
]

#: The result types live with the builder; importing it costs ~0.1 s, which
#: ``import banger_build`` (and so every CLI command) does not pay until asked.
_LAZY = {"BuildResult": "banger_build.context", "CheckResult": "banger_build.build"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'banger_build' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The package module, keeping ``banger_build.build`` the API function: importing
    the submodule ``banger_build.build`` would otherwise rebind the package's
    attribute ``build`` to that module (``from banger_build.build import ...`` and
    ``sys.modules`` still reach the module)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "build" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
