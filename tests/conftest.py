"""Shared fixtures. Each support module owns its fixtures; they are plugged in here."""

import os

pytest_plugins = [
    "tests.support.registry",
    "tests.support.faultproxy",
    "tests.support.httpfiles",
    "tests.support.e2e",
    "tests.support.debian",
    "tests.support.agent",
    "tests.support.debian_arm64",
    "tests.support.debian_trixie",
    "tests.support.multiarch",
    "tests.support.kernel",
    "tests.support.bootkernel",
    "tests.support.unpriv",
]

# Every image the suite builds is checked by e2fsck -fn, the independent checker,
# before it is stored (banger-build's --fsck); a red e2fsck fails the build.
os.environ["BANGER_BUILD_FSCK"] = "1"
