"""Locks that explain themselves, and builds that need no network or only the mirror."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from banger_build.lockfile import Lock
from tests.support.e2e import BASE, UPPER, push, run_cli, write_recipe
from tests.support.registry import RegistryServer


def test_a_pin_no_registry_has_names_the_lock_and_what_to_run(
    tmp_path: Path, image_ref: str
) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    home = tmp_path / "home"
    assert run_cli(home, "lock", str(recipe))[0] == 0
    lock = recipe.with_suffix(".lock")
    pinned = Lock.load(lock).images[0].digest
    lock.write_text(lock.read_text().replace(pinned.hex, "0" * 64))
    code, _, err = run_cli(tmp_path / "empty", str(recipe), "--no-link")
    assert code == 1 and err.count("\n") == 1, err
    assert f"pinned by {lock}" in err and f"banger-build update {recipe} image" in err


def test_no_write_lock_and_lock_file(tmp_path: Path, image_ref: str) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    code, _, err = run_cli(tmp_path / "home", str(recipe), "--no-link", "--no-write-lock")
    assert code == 0 and "not writing" in err and "--no-write-lock" in err
    assert not recipe.with_suffix(".lock").exists()
    elsewhere = tmp_path / "locks" / "ci.lock"
    elsewhere.parent.mkdir()
    code, _, err = run_cli(
        tmp_path / "home", str(recipe), "--no-link", "--lock-file", str(elsewhere)
    )
    assert code == 0 and f"wrote {elsewhere}" in err
    assert not recipe.with_suffix(".lock").exists() and Lock.load(elsewhere).images
    # --locked against that file: everything pinned
    code, _, err = run_cli(
        tmp_path / "home", str(recipe), "--no-link", "--locked", "--lock-file", str(elsewhere)
    )
    assert code == 0, err


def test_a_read_only_checkout_builds_links_and_says_what_it_could_not_write(
    tmp_path: Path, image_ref: str
) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(checkout)], check=True)
    try:
        recipe = write_recipe(checkout, image_ref)
        subprocess.run(["mount", "-o", "remount,ro", str(checkout)], check=True)
        link = tmp_path / "result"
        code, out, err = run_cli(tmp_path / "home", str(recipe), "-o", str(link))
        assert code == 0, err
        assert f"could not write {recipe.with_suffix('.lock')}" in err
        assert Path(out.strip()).is_dir() and link.resolve() == Path(out.strip())
        # lock (the command) must write it: an error
        code, _, err = run_cli(tmp_path / "home", "lock", str(recipe))
        assert code == 1 and "cannot write lock file" in err
    finally:
        subprocess.run(["umount", str(checkout)], check=True)


def test_lock_prune_drops_pins_the_recipe_no_longer_uses(
    tmp_path: Path, registry: RegistryServer
) -> None:
    push(registry, "prune/a", [BASE, UPPER])
    push(registry, "prune/b", [BASE])
    recipe = write_recipe(tmp_path / "r", f"{registry.host}/prune/a:v1")
    home = tmp_path / "home"
    assert run_cli(home, "lock", str(recipe))[0] == 0
    recipe.write_text(recipe.read_text().replace("prune/a:v1", "prune/b:v1"))
    assert run_cli(home, "lock", str(recipe))[0] == 0
    assert len(Lock.load(recipe.with_suffix(".lock")).images) == 2  # a is still pinned
    code, _, err = run_cli(home, "lock", str(recipe), "--prune")
    assert code == 0 and "dropped the unused pin of" in err and "prune/a" in err
    (kept,) = Lock.load(recipe.with_suffix(".lock")).images
    assert kept.ref.endswith("prune/b:v1")


def test_offline_builds_from_the_cache_and_names_what_is_missing(
    tmp_path: Path, image_ref: str
) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    home = tmp_path / "home"
    assert run_cli(home, str(recipe), "--no-link")[0] == 0  # pins and caches it
    (tmp_path / "r" / "hello.txt").write_text("changed offline\n")  # a new key, same image
    code, out, err = run_cli(home, str(recipe), "--no-link", "--offline")
    assert code == 0, err
    code, _, err = run_cli(tmp_path / "empty", str(recipe), "--no-link", "--offline")
    assert code == 1 and "--offline" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("with_mirror", [False, True])
def test_mirror_only_never_asks_the_registry_itself(
    tmp_path: Path, registry: RegistryServer, with_mirror: bool
) -> None:
    push(registry, "library/mirrored", [BASE, UPPER])
    recipe = write_recipe(tmp_path / "r", "nowhere.invalid/library/mirrored:v1")
    args = ["--no-link", "--mirror-only"]
    if with_mirror:
        args += ["--mirror", f"nowhere.invalid={registry.url}"]
    code, _, err = run_cli(tmp_path / "home", str(recipe), *args)
    if with_mirror:
        assert code == 0, err
    else:
        assert code == 1 and "--mirror-only: no mirror is configured for nowhere.invalid" in err
