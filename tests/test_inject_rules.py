"""Recipe files as people expect: the executable bit of a source, a destination that
is a symlink in the image, owner names checked right after the flatten."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.support.e2e import run_cli
from tests.support.ext4read import read_image


def _recipe(directory: Path, image_ref: str, entries: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".git").mkdir(exist_ok=True)
    recipe = directory / "recipe.toml"
    recipe.write_text(f'[image]\nref = "{image_ref}"\n{entries}')
    return recipe


def _build(tmp: Path, recipe: Path, *args: str) -> tuple[int, str, str]:
    return run_cli(tmp / "home", str(recipe), "--no-link", *args)


def test_the_executable_bit_of_a_source_is_kept_when_no_mode_is_given(
    tmp_path: Path, image_ref: str
) -> None:
    src = tmp_path / "r"
    src.mkdir()
    for name, mode in (("tool", 0o755), ("data", 0o644), ("user-x", 0o700), ("pinned", 0o755)):
        (src / name).write_text(name)
        os.chmod(src / name, mode)
    recipe = _recipe(
        src,
        image_ref,
        """
[[files]]
src = "tool"
dest = "/usr/local/bin/tool"
[[files]]
src = "data"
dest = "/etc/data"
[[files]]
src = "user-x"
dest = "/usr/local/bin/user-x"
[[files]]
src = "pinned"
dest = "/etc/pinned"
mode = "0600"
""",
    )
    code, out, err = _build(tmp_path, recipe)
    assert code == 0, err
    seen = read_image(Path(out.strip()) / "rootfs.ext4", contents=False)
    assert seen["usr/local/bin/tool"].mode & 0o7777 == 0o755
    assert seen["etc/data"].mode & 0o7777 == 0o644
    assert seen["usr/local/bin/user-x"].mode & 0o7777 == 0o755  # git's bit: the owner's x
    assert seen["etc/pinned"].mode & 0o7777 == 0o600  # the recipe's mode wins
    code, out, err = run_cli(tmp_path / "home", "show", str(recipe))
    files = {f["dest"]: f["mode"] for f in json.loads(out)["derivation"]["files"]}
    assert files["/usr/local/bin/tool"] == "0755" and files["/etc/data"] == "0644"


def test_a_dest_that_is_a_symlink_in_the_image_needs_replace(
    tmp_path: Path, image_ref: str
) -> None:
    """The image has /bin -> usr/bin: a file there would silently drop the link."""
    src = tmp_path / "r"
    src.mkdir()
    (src / "f").write_text("f")
    entry = '\n[[files]]\nsrc = "f"\ndest = "/bin"\n'
    recipe = _recipe(src, image_ref, entry)
    code, out, err = _build(tmp_path, recipe)
    assert code == 1 and out == ""
    line = err.strip().splitlines()[-1]
    assert f"{recipe}:6:1: files[0].dest:" in line and "/bin" in line
    assert "symlink there (-> usr/bin)" in line and "replace = true" in line
    code, _, err = run_cli(tmp_path / "home", "--json", str(recipe), "--no-link")
    events = [json.loads(x) for x in _.splitlines() if x.startswith("{")]
    assert any(e.get("reason") == "dest-is-symlink" for e in events), events

    recipe = _recipe(src, image_ref, entry + "replace = true\n")
    code, out, err = _build(tmp_path, recipe)
    assert code == 0, err
    seen = read_image(Path(out.strip()) / "rootfs.ext4", contents=False)
    assert seen["bin"].type == "reg"
    # through the link (a directory of the image) is no replacement: no flag needed
    recipe = _recipe(src, image_ref, '\n[[files]]\nsrc = "f"\ndest = "/bin/f"\n')
    code, out, err = _build(tmp_path, recipe)
    assert code == 0, err
    seen = read_image(Path(out.strip()) / "rootfs.ext4", contents=False)
    assert seen["bin"].type == "symlink" and seen["usr/bin/f"].type == "reg"


def test_an_unknown_owner_is_refused_right_after_the_flatten_at_its_position(
    tmp_path: Path, image_ref: str
) -> None:
    src = tmp_path / "r"
    src.mkdir()
    (src / "f").write_text("f")
    recipe = _recipe(
        src, image_ref, '\n[[files]]\nsrc = "f"\ndest = "/etc/f"\nowner = "nobody:root"\n'
    )
    code, out, err = run_cli(tmp_path / "home", "--json", str(recipe), "--no-link")
    events = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    error = next(e for e in events if e["event"] == "error")
    assert error["reason"] == "unknown-owner" and "files[0].owner" in error["message"]
    assert f"{recipe}:7:1" in error["message"] and "'nobody'" in error["message"]
    steps = [e["step"] for e in events if e["event"] == "timing"]
    assert steps[-2:] == ["flatten layers", "check owners"], steps  # nothing after it ran
