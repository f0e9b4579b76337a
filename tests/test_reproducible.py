"""Bit-for-bit reproducibility of recipes/debian.toml across users and environments.

One baseline build as root from an empty home; then one build per variation,
each from an empty home, each compared output by output (sha256 of every
file in the store path, rootfs.ext4 and manifest.json included).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.debian import DebianImage
from tests.support.unpriv import Unpriv

REPO = Path(__file__).resolve().parents[1]
COPY = ("recipes", "templates", "agents")

pytestmark = pytest.mark.slow


def _digests(store_path: Path) -> dict[str, str]:
    out = {}
    for path in sorted(store_path.rglob("*")):
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out[str(path.relative_to(store_path))] = h.hexdigest()
    return out


def _workdir(top: Path) -> Path:
    top.mkdir(parents=True, exist_ok=True)
    (top / ".git").mkdir(exist_ok=True)  # a project, as the checkout is
    for name in COPY:
        if (REPO / name).exists():
            shutil.copytree(
                REPO / name, top / name, symlinks=True, ignore=shutil.ignore_patterns("*.lock")
            )
    return top / "recipes" / "debian.toml"


def _build_as_root(
    top: Path,
    home: Path,
    mirror: str,
    env: dict[str, str] | None = None,
    umask: int | None = None,
    work: Path | None = None,
) -> Path:
    """Build a copy of recipes/debian.toml made in ``work`` (default ``top``)."""
    recipe = _workdir(work or top)
    environ = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "banger_build", str(recipe), "--home", str(home), "--no-link",
         "--mirror", mirror],
        env=environ, capture_output=True, text=True, check=False, timeout=900,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


@pytest.fixture(scope="module")
def baseline(
    debian_image_and_agent: DebianImage, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    top = tmp_path_factory.mktemp("baseline")
    path = _build_as_root(top, top / "home", debian_image_and_agent.mirror)
    return _digests(path)


#: No tool on PATH at all (e2fsprogs included) and no --fsck: the writer is all a
#: build needs.
NO_E2FSPROGS = {"PATH": "/nonexistent", "BANGER_BUILD_FSCK": "0"}

VARIANTS: dict[str, dict[str, object]] = {
    "tz": {"env": {"TZ": "Pacific/Chatham"}},
    "locale": {"env": {"LC_ALL": "C.UTF-8", "LANG": "de_DE.UTF-8"}},
    "umask": {"umask": 0o077},
    "home-path": {"home": "a home/with spaces/and 'quotes'"},
    "tmpfs": {"top": Path("/dev/shm")},  # home, builds and TMPDIR on tmpfs, not disk
    "no-e2fsprogs": {"env": NO_E2FSPROGS},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_bytes_when(
    variant: str, baseline: dict[str, str], debian_image_and_agent: DebianImage, tmp_path: Path
) -> None:
    spec = VARIANTS[variant]
    top = tmp_path
    if "top" in spec:
        top = Path(str(spec["top"])) / f"banger-repro-{os.getpid()}"
    env: dict[str, str] = {"TMPDIR": str(top), **spec.get("env", {})}  # type: ignore[dict-item]
    try:
        # the recipe's copy stays in tmp_path: /dev (and so /dev/shm) is never a source
        path = _build_as_root(
            top, top / str(spec.get("home", "home")), debian_image_and_agent.mirror, env,
            spec.get("umask"),
            work=tmp_path,
        )  # type: ignore[arg-type]  # fmt: skip
        assert _digests(path) == baseline
    finally:
        if top != tmp_path:
            shutil.rmtree(top, ignore_errors=True)


def test_same_bytes_as_an_unprivileged_user_without_e2fsprogs(
    baseline: dict[str, str], debian_image_and_agent: DebianImage, unpriv: Unpriv
) -> None:
    (unpriv.home / ".git").mkdir()  # a project, as the checkout is
    for name in COPY:
        if (REPO / name).exists():
            unpriv.copy_in(REPO / name, name)
    for lock in (unpriv.home / "recipes").glob("*.lock"):
        lock.unlink()
    proc = unpriv.run(
        [
            str(unpriv.home / "recipes" / "debian.toml"),
            "--no-link",
            "--mirror",
            debian_image_and_agent.mirror,
        ],
        timeout=900,
        env=NO_E2FSPROGS,
    )
    assert _digests(Path(proc.stdout.strip())) == baseline


def test_source_date_epoch_is_honoured_and_recorded(
    baseline: dict[str, str], debian_image_and_agent: DebianImage, tmp_path: Path
) -> None:
    path = _build_as_root(
        tmp_path,
        tmp_path / "home",
        debian_image_and_agent.mirror,
        {"SOURCE_DATE_EPOCH": "1234567890"},
    )
    manifest = (path / "manifest.json").read_text()
    assert '"epoch": 1234567890' in manifest
    assert _digests(path)["rootfs.ext4"] != baseline["rootfs.ext4"]
