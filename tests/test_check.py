"""--check: rebuild from scratch and compare; a one-byte metadata change is found and named."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.e2e import run_cli, write_recipe
from tests.support.ext4read import read_image, sha256_file


def _tamper_mode(image: Path, path: str, mode: int) -> None:
    """Change one inode's mode in place (as the store owner could, by accident)."""
    ino = read_image(image, contents=False)[path].ino
    os.chmod(image.parent, 0o755)
    os.chmod(image, 0o644)
    subprocess.run(
        ["debugfs", "-w", "-R", f"sif <{ino}> mode 0{mode:o}", str(image)],
        check=True, capture_output=True,
    )  # fmt: skip
    os.chmod(image, 0o444)
    os.chmod(image.parent, 0o555)


def test_check_passes_on_a_clean_build_and_changes_nothing(tmp_path: Path, image_ref: str) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    code, out, err = run_cli(tmp_path / "home", str(recipe), "-o", str(tmp_path / "result"))
    assert code == 0, err
    path = Path(out.strip())
    before = sha256_file(path / "rootfs.ext4")
    code, out, err = run_cli(tmp_path / "home", "build", "--check", str(recipe))
    assert code == 0, err + out
    assert out.startswith(f"ok: {path}")
    code, out, err = run_cli(tmp_path / "home", "check", str(tmp_path / "result"))
    assert code == 0 and "reproducible" in out, err
    assert sha256_file(path / "rootfs.ext4") == before
    assert list((tmp_path / "home" / "tmp").iterdir()) == []


def test_check_names_the_altered_file_and_what_differs(tmp_path: Path, image_ref: str) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    code, out, _ = run_cli(tmp_path / "home", str(recipe), "--no-link")
    path = Path(out.strip())
    _tamper_mode(path / "rootfs.ext4", "etc/shadow", 0o100644)  # was 0640
    tampered = sha256_file(path / "rootfs.ext4")
    code, out, err = run_cli(tmp_path / "home", "check", str(recipe))
    assert code == 1, err
    assert "FAILED" in out and "rootfs.ext4: sha256" in out
    assert "/etc/shadow: mode 644 vs 640\n" in out  # only the mode, nothing else
    assert sha256_file(path / "rootfs.ext4") == tampered  # the store is left alone


def test_check_of_something_never_built(tmp_path: Path, image_ref: str) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    code, _, err = run_cli(tmp_path / "home", "check", str(recipe))
    assert code == 1 and "build it before checking it" in err
