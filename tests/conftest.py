"""Shared fixtures. Each support module owns its fixtures; they are plugged in here."""

pytest_plugins = [
    "tests.support.registry",
    "tests.support.faultproxy",
    "tests.support.e2e",
    "tests.support.debian",
    "tests.support.kernel",
    "tests.support.unpriv",
]
