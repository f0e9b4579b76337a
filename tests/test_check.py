"""--check: rebuild from scratch and compare; a one-byte metadata change is found and named."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.e2e import run_cli, write_recipe
from tests.support.ext4read import read_image, sha256_file
from tests.support.kmod import VSOCK_KO


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


def test_check_of_a_store_path_rebuilds_its_recorded_inputs_after_the_recipe_changed(
    tmp_path: Path, image_ref: str
) -> None:
    """`check ./result` rebuilds what the path records (image by its manifest digest,
    size, name...), not what the edited recipe says now."""
    recipe = write_recipe(tmp_path / "r", image_ref)
    code, out, err = run_cli(tmp_path / "home", str(recipe), "-o", str(tmp_path / "result"))
    assert code == 0, err
    path = Path(out.strip())
    text = recipe.read_text().replace(image_ref, image_ref.rsplit(":", 1)[0] + ":gone")
    recipe.write_text('name = "renamed"\n' + text + '\n[rootfs]\nsize = "64MiB"\n')
    (tmp_path / "r" / "new.txt").write_text("a file the recipe gained\n")
    with recipe.open("a") as f:
        f.write('[[files]]\nsrc = "new.txt"\ndest = "/etc/new"\n')
    code, out, err = run_cli(tmp_path / "home", "check", str(tmp_path / "result"))
    assert code == 0, err
    assert out == f"ok: {path} is reproducible (rebuilt bit for bit)\n"
    code, _, err = run_cli(tmp_path / "home", "check", str(path), "--offline", "-q")
    assert code == 0, err  # the image's blobs are in the cache: no registry needed


def test_check_of_a_store_path_whose_source_changed_says_so_in_one_line(
    tmp_path: Path, image_ref: str
) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 0, err
    path = Path(out.strip())
    (tmp_path / "r" / "hello.txt").write_text("edited since\n")
    code, out, err = run_cli(tmp_path / "home", "check", str(path), "-q")
    assert code == 1 and out == ""
    [line] = err.splitlines()
    assert line.startswith(f"banger-build: error: cannot rebuild {path} from its recorded inputs")
    assert "the bytes of /etc/hello (a file, sha256" in line
    assert f"{recipe} does not give those bytes any more" in line
    # the recipe as given, from somewhere else, supplies the bytes
    other = write_recipe(tmp_path / "elsewhere", image_ref)
    code, out, err = run_cli(tmp_path / "home", "check", str(path), "--recipe", str(other))
    assert code == 0 and "reproducible" in out, err
    recipe.unlink()
    code, out, err = run_cli(tmp_path / "home", "check", str(path), "-q")
    assert code == 1 and len(err.splitlines()) == 1
    assert "its recipe no longer loads" in err


def test_check_of_a_tampered_store_path_names_what_differs(tmp_path: Path, image_ref: str) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    code, out, _ = run_cli(tmp_path / "home", str(recipe), "--no-link")
    path = Path(out.strip())
    _tamper_mode(path / "rootfs.ext4", "etc/shadow", 0o100644)
    recipe.write_text(recipe.read_text() + '\n[rootfs]\nsize = "64MiB"\n')  # no matter
    code, out, err = run_cli(tmp_path / "home", "check", str(path))
    assert code == 1, err
    assert f"FAILED: {path} differs" in out and "/etc/shadow: mode 644 vs 640\n" in out


def test_check_of_a_store_path_with_a_local_kernel_and_its_modules(
    tmp_path: Path, image_ref: str
) -> None:
    kdir = tmp_path / "k"
    mods = kdir / "6.1.0-test-amd64"
    (mods / "kernel").mkdir(parents=True)
    (mods / "kernel" / "vsock.ko").write_bytes(VSOCK_KO)
    (kdir / "vmlinuz").write_bytes(b"kernel")
    kernel = f'[kernel]\npath = "{kdir / "vmlinuz"}"\nmodules = "{mods}"\ninstall_modules = true\n'
    recipe = write_recipe(tmp_path / "r", image_ref, extra=kernel)
    allow = ("--allow-source", str(kdir))
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link", *allow)
    assert code == 0, err
    path = Path(out.strip())
    recipe.write_text(recipe.read_text().replace("install_modules = true", ""))
    code, out, err = run_cli(tmp_path / "home", "check", str(path), *allow)
    assert code == 0 and "reproducible" in out, out
    (kdir / "vmlinuz").write_bytes(b"another kernel")
    code, out, err = run_cli(tmp_path / "home", "check", str(path), *allow)
    assert code == 1 and len(err.splitlines()) == 1
    assert "kernel vmlinux (sha256" in err and "does not give those bytes any more" in err
