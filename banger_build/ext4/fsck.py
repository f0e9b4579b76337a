"""``e2fsck -fn``: the independent check of an image (``--fsck``, and every image
the test suite makes)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from banger_build.errors import ImageError, Reason, ToolError
from banger_build.run import run

#: e2fsck's exit status bits (e2fsck(8)); with -n nothing is ever corrected.
_FSCK_UNCORRECTED = 4
_FSCK_OPERATIONAL = 8


def check_filesystem(image: Path) -> None:
    """``e2fsck -fn``: an independent check before anything is published.

    Only exit status 4 ("errors left uncorrected") is a verdict on the image;
    a signal or status 8 and above (operational error, usage, cancelled,
    library) means e2fsck could not check it, and says so.
    """
    proc = run(["e2fsck", "-fn", os.fspath(image)], check=False)
    code = proc.returncode
    if code == 0:
        return
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip().splitlines()
    tail = "\n".join(out[-15:])
    if code < 0:
        raise ToolError(
            f"e2fsck was killed by {_signal_name(-code)} while checking the image; "
            "the image was not checked",
            argv=["e2fsck", "-fn", os.fspath(image)],
            returncode=code,
        )
    if code >= _FSCK_OPERATIONAL:
        raise ToolError(
            f"e2fsck could not check the image (exit status {code}):\n{tail}",
            argv=["e2fsck", "-fn", os.fspath(image)],
            returncode=code,
        )
    raise ImageError(
        "e2fsck -fn found problems in the built image:\n" + tail, reason=Reason.FSCK_FAILED
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
