"""Lock file semantics (lock, update, --locked), show and why, against a real registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.support.e2e import BASE, run_cli, write_recipe
from tests.support.oci import Entry, make_layer, push_image
from tests.support.registry import RegistryServer


def _push(registry: RegistryServer, repo: str, marker: bytes) -> str:
    pushed = push_image(
        registry.url, repo, "v1", [make_layer([*BASE, Entry.file("marker", marker)])]
    )
    return pushed.manifest_digest  # type: ignore[no-any-return]


def test_locked_without_a_lock_names_the_input(tmp_path: Path, registry: RegistryServer) -> None:
    _push(registry, "lock/none", b"1")
    recipe = write_recipe(tmp_path / "r", f"{registry.host}/lock/none:v1")
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--locked", "--no-link")
    assert code == 1 and out == ""
    assert f"{recipe}:3:1: image.ref:" in err and "is not locked" in err
    assert not recipe.with_suffix(".lock").exists()


def test_lock_then_locked_build_then_update(tmp_path: Path, registry: RegistryServer) -> None:
    first = _push(registry, "lock/flow", b"1")
    recipe = write_recipe(tmp_path / "r", f"{registry.host}/lock/flow:v1")
    lock = recipe.with_suffix(".lock")
    code, _, err = run_cli(tmp_path / "home", "lock", str(recipe))
    assert code == 0 and first in lock.read_text() and "wrote" in err
    code, out, _ = run_cli(tmp_path / "home", "lock", str(recipe))
    assert code == 0 and "up to date" in out

    code, built, err = run_cli(tmp_path / "home", str(recipe), "--locked", "--no-link")
    assert code == 0, err

    second = _push(registry, "lock/flow", b"2")  # the tag moves
    before = lock.read_bytes()
    code, again, _ = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert again == built and lock.read_bytes() == before  # a build never re-resolves a pin

    code, _, err = run_cli(tmp_path / "home", "update", str(recipe), "image")
    assert code == 0 and second in lock.read_text() and f"(was {first})" in err
    code, rebuilt, _ = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert code == 0 and rebuilt != built


def test_a_build_adding_a_pin_to_an_existing_lock_says_so(
    tmp_path: Path, registry: RegistryServer
) -> None:
    _push(registry, "lock/a", b"a")
    digest_b = _push(registry, "lock/b", b"b")
    recipe = write_recipe(tmp_path / "r", f"{registry.host}/lock/a:v1")
    assert run_cli(tmp_path / "home", "lock", str(recipe))[0] == 0
    recipe.write_text(recipe.read_text().replace("lock/a:v1", "lock/b:v1"))
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--no-link", "--print-out-paths")
    assert code == 0 and "updated" in err and digest_b in err  # even with progress off
    assert out.count("\n") == 1  # stdout is still just the store path
    assert digest_b in recipe.with_suffix(".lock").read_text()


def test_show_prints_the_derivation_and_the_key_of_the_build(
    tmp_path: Path, registry: RegistryServer
) -> None:
    _push(registry, "show/x", b"x")
    recipe = write_recipe(tmp_path / "r", f"{registry.host}/show/x:v1")
    code, out, err = run_cli(tmp_path / "home", "show", str(recipe))
    assert code == 0, err
    shown = json.loads(out)
    assert shown["built"] is False and "ext4" in shown["derivation"]
    code, path, _ = run_cli(tmp_path / "home", str(recipe), "--no-link")
    assert (
        Path(path.strip()).name
        == f"{shown['key']}-{shown['name']}"
        == Path(shown["store_path"]).name
    )


def test_why_names_a_changed_tag_digest_template_and_mode(
    tmp_path: Path, registry: RegistryServer
) -> None:
    first = _push(registry, "why/x", b"1")
    a = write_recipe(tmp_path / "a", f"{registry.host}/why/x:v1")
    assert run_cli(tmp_path / "home", "lock", str(a))[0] == 0
    # b: same recipe dir copied, then the tag moves and b is locked to the new digest
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    b = tmp_path / "b" / a.name
    second = _push(registry, "why/x", b"2")
    assert run_cli(tmp_path / "home", "update", str(b))[0] == 0
    code, out, err = run_cli(
        tmp_path / "home", "why", str(a.with_suffix(".lock")), str(b.with_suffix(".lock"))
    )
    assert code == 1, err  # like diff: inputs differ
    # the image is known by its content: its config and its layers' diff_ids changed
    assert first != second
    assert "image.config: sha256:" in out and "image.diff_ids[0]: sha256:" in out

    # a changed template and a changed mode, same image pin
    shutil.copy(a.with_suffix(".lock"), b.with_suffix(".lock"))
    (tmp_path / "b" / "unit.j2").write_text("[Unit]\nDescription=changed\n")
    b.write_text(b.read_text().replace('mode = "0640"', 'mode = "0600"'))
    code, out, err = run_cli(tmp_path / "home", "why", str(a), str(b))
    assert code == 1, err
    assert "files[/lib/systemd/system/test.service].sha256:" in out
    assert "files[/etc/hello].mode: 0640 -> 0600" in out
    assert "image." not in out

    # a store path against the recipe it came from: no difference
    code, path, _ = run_cli(tmp_path / "home", str(a), "--no-link")
    code, out, _ = run_cli(tmp_path / "home", "why", path.strip(), str(a))
    assert code == 0 and out.startswith("no difference")
    # show takes the store path too: its recorded derivation, resolving nothing
    code, shown, err = run_cli(tmp_path / "home", "show", path.strip())
    assert code == 0, err
    by_path, by_recipe = (
        json.loads(shown),
        json.loads(run_cli(tmp_path / "home", "show", str(a))[1]),
    )
    assert by_path["key"] == by_recipe["key"] and by_path["derivation"] == by_recipe["derivation"]
    assert by_path["store_path"] == path.strip() and by_path["origin"] == "built"
