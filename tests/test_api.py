"""The Python API: ``import banger_build`` gives documented build, check and show,
their result types and the error base class; the library writes nothing into the
caller's directory unless asked."""

from __future__ import annotations

import inspect
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import banger_build
from tests.support.e2e import write_recipe


def test_the_package_exports_a_documented_api() -> None:
    assert set(banger_build.__all__) == {
        "BangerError", "BuildResult", "CheckResult", "__version__", "build", "check", "show",
    }  # fmt: skip
    doc = banger_build.__doc__ or ""
    assert "banger_build.build(" in doc and "out_link" in doc
    for name in banger_build.__all__:
        value = getattr(banger_build, name)
        if name != "__version__":
            assert inspect.getdoc(value), f"{name} has no docstring"
    params = inspect.signature(banger_build.build).parameters
    assert params["out_link"].default is None and params["home"].default is None
    assert params["out_link"].kind is inspect.Parameter.KEYWORD_ONLY


def test_importing_the_package_does_not_load_the_builder() -> None:
    """The CLI imports the package first: --help and ls must not pay for the builder."""
    code = "import sys, banger_build; print(sorted(m for m in sys.modules if m in " \
        "('banger_build.build', 'banger_build.context', 'jinja2')))"  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_build_check_show_from_python(
    tmp_path: Path, image_ref: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    home = tmp_path / "home"
    result = banger_build.build(recipe, home=home)
    assert isinstance(result, banger_build.BuildResult)
    assert result.status == "built" and (result.path / "rootfs.ext4").is_file()
    assert result.path.parent == home / "store" and result.path.name.startswith(result.key)
    assert os.listdir(cwd) == []  # no ./result: the library links only when asked
    # the submodule, once imported, does not replace the function
    from banger_build.build import BuildOptions  # noqa: F401

    progress = io.StringIO()
    again = banger_build.build(
        str(recipe), home=home, out_link=cwd / "out", variables={}, progress=progress
    )
    assert again.status == "cached" and again.path == result.path
    assert (cwd / "out").resolve() == result.path and "resolving" not in progress.getvalue()
    assert banger_build.show(recipe, home=home)["key"] == result.key
    assert banger_build.show(result.path)["derivation"] == result.derivation.data
    checked = banger_build.check(cwd / "out", home=home)
    assert isinstance(checked, banger_build.CheckResult)
    assert checked.ok and checked.path == result.path and checked.differences == ()
    assert banger_build.check(recipe, home=home).ok
    # a variable changes the templates, so the key
    other = banger_build.build(recipe, home=home, variables={"what": "another unit"})
    assert other.key != result.key and other.status == "built"


def test_errors_are_banger_errors_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(banger_build.BangerError) as info:
        banger_build.build(tmp_path / "missing.toml", home=tmp_path / "home")
    assert info.value.reason == "io" and "missing.toml" in str(info.value)
    with pytest.raises(banger_build.BangerError) as info:
        banger_build.build(tmp_path / "r.toml", home=tmp_path / "home", platform="nonsense")
    assert info.value.reason == "bad-argument"
