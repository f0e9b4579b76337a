"""``banger-build init [DIR]``: a starter recipe that builds as it is (against a registry
serving docker.io/library/debian:bookworm, as the quick start's does), a .gitignore for
the out-links, and never an overwritten file."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import pytest

from banger_build.cli import main
from banger_build.inputs import resolve_injected
from banger_build.recipe import load_recipe
from tests.support.e2e import BASE, UPPER, push, run_cli
from tests.support.ext4read import read_image
from tests.support.registry import RegistryServer


def init(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["init", *args])
    return code, out.getvalue(), err.getvalue()


def test_init_writes_a_recipe_a_template_and_a_gitignore(tmp_path: Path) -> None:
    code, out, err = init(str(tmp_path / "My Demo"))
    assert code == 0, err
    recipe = tmp_path / "My Demo" / "recipes" / "My-Demo.toml"
    assert out.splitlines() == [
        f"wrote {recipe}",
        f"wrote {tmp_path / 'My Demo' / 'recipes' / 'templates' / 'motd.j2'}",
        f"wrote {tmp_path / 'My Demo' / '.gitignore'} (/result /result-*: the out-links)",
        f"build it:  banger-build {recipe}",
    ]
    loaded = load_recipe(recipe)
    assert loaded.name == "My-Demo" and str(loaded.image) == "docker.io/library/debian:bookworm"
    rendered = {i.dest: i.data for i in resolve_injected(loaded)}
    assert rendered["/etc/hostname"] == b"my-demo\n"
    assert rendered["/etc/motd"] == (
        b"My-Demo: built by banger-build from docker.io/library/debian:bookworm.\n"
    )
    assert set(rendered) == {"/etc/hostname", "/etc/hosts", "/etc/fstab", "/etc/motd"}
    assert (tmp_path / "My Demo" / ".gitignore").read_text().splitlines()[1:] == [
        "/result", "/result-*",
    ]  # fmt: skip


def test_init_refuses_to_overwrite_and_keeps_a_gitignore(tmp_path: Path) -> None:
    project = tmp_path / "p"
    project.mkdir()
    (project / ".gitignore").write_text("*.pyc")  # no final newline
    code, out, err = init(str(project), "--name", "demo")
    assert code == 0, err
    assert (project / ".gitignore").read_text() == "*.pyc\n/result\n/result-*\n"
    recipe = project / "recipes" / "demo.toml"
    recipe.write_text("# mine\n")
    code, out, err = init(str(project), "--name", "demo")
    assert code == 1 and out == ""
    assert err == (
        f"banger-build: error: not overwriting {recipe}, {project / 'recipes/templates/motd.j2'}: "
        "init starts a project (remove them, or choose another DIR or --name)\n"
    )
    assert recipe.read_text() == "# mine\n"
    assert (project / ".gitignore").read_text() == "*.pyc\n/result\n/result-*\n"
    code, _, err = init(str(project), "--name", "../x")
    assert code == 1 and "--name '../x'" in err


def test_the_starter_recipe_builds_as_it_is_outside_any_checkout(
    tmp_path: Path,
    registry_factory: Callable[..., RegistryServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = registry_factory()
    push(server, "library/debian", [BASE, UPPER], tag="bookworm")
    monkeypatch.chdir(tmp_path)
    code, _, err = init("demo")
    assert code == 0, err
    monkeypatch.chdir(tmp_path / "demo")  # the out-link lands in the project
    mirror = f"docker.io={server.url}"
    code, out, err = run_cli(tmp_path / "home", "recipes/demo.toml", "--mirror", mirror)
    assert code == 0, err
    path = Path(out.strip())
    assert (tmp_path / "demo" / "result").resolve() == path
    seen = read_image(path / "rootfs.ext4")
    assert {"etc/hostname", "etc/hosts", "etc/fstab", "etc/motd"} <= set(seen)
    assert (tmp_path / "demo" / "recipes" / "demo.lock").is_file()  # pinned on first build
