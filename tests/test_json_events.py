"""--json: one JSON event per line on stdout, for CI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support.e2e import run_cli, write_recipe


def _events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def test_a_build_reports_steps_timings_and_its_result(tmp_path: Path, image_ref: str) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    home = tmp_path / "home"
    code, out, err = run_cli(home, str(recipe), "--json", "-o", str(tmp_path / "result"))
    assert code == 0 and err == "", err
    events = _events(out)
    kinds = {e["event"] for e in events}
    assert {"step", "timing", "notice", "result"} <= kinds
    assert all(isinstance(e["t"], float | int) for e in events)
    timings = {e["step"] for e in events if e["event"] == "timing"}
    assert {"flatten layers", "write filesystem", "resolve image"} <= timings
    (result,) = [e for e in events if e["event"] == "result"]
    assert result["status"] == "built" and Path(result["path"]).is_dir()
    assert result["key"] in result["path"] and result["out_link"] == str(tmp_path / "result")
    assert events[-1] is result or events[-1]["event"] != "error"

    code, out, _ = run_cli(home, str(recipe), "--json", "--no-link")
    (again,) = [e for e in _events(out) if e["event"] == "result"]
    assert code == 0 and again["status"] == "cached" and again["path"] == result["path"]


def test_an_error_is_an_event_too(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[image]\nref = "example.org/x:1"\n[rootfs]\nsise = "1GiB"\n')
    code, out, err = run_cli(tmp_path / "home", str(recipe), "--json")
    assert code == 1 and err.startswith("banger-build: error: ")
    *before, event = _events(out)
    assert all(e["event"] in ("step", "timing") for e in before)
    assert event["event"] == "error" and event["reason"] == "unknown-key" and event["exit"] == 1
    assert "rootfs.sise" in event["message"]


def test_json_and_quiet_exclude_each_other(tmp_path: Path, capsys: Any) -> None:
    import pytest

    from banger_build.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["build", "r.toml", "--json", "-q"])
    assert exc.value.code == 2


def test_command_lines_as_hands_type_them(tmp_path: Path, image_ref: str) -> None:
    from banger_build.cli import main

    home = tmp_path / "home"
    one = write_recipe(tmp_path / "a", image_ref)
    two = write_recipe(tmp_path / "b", image_ref, name="other.toml")
    (tmp_path / "b" / "hello.txt").write_text("another\n")
    link = tmp_path / "result"
    # options before the recipe, several recipes: result, result-2
    code, out, err = run_cli(home, "-q", str(one), str(two), "-o", str(link))
    assert code == 0, err
    first, second = out.split()
    assert Path(first) == link.resolve() and Path(second) == (tmp_path / "result-2").resolve()
    assert first != second
    # a shared option before the command
    assert main(["--home", str(home), "ls", "--json"]) == 0
    assert main(["bulid", str(one)]) == 2  # a typo: a suggestion, a usage error


def test_bundle_and_push_report_json_results(tmp_path: Path, image_ref: str, registry: Any) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    home = tmp_path / "home"
    code, out, err = run_cli(home, str(recipe), "--no-link", "-q")
    assert code == 0, err
    path = out.strip()
    code, out, err = run_cli(home, "bundle", path, "-o", str(tmp_path), "--json")
    assert code == 0, err
    (bundled,) = [e for e in _events(out) if e["event"] == "result"]
    assert Path(bundled["path"]).is_file() and bundled["zstd"] and bundled["sha256"]
    target = f"{registry.host}/json/events"
    code, out, err = run_cli(home, "push", path, target, "--json")
    assert code == 0, err
    (pushed,) = [e for e in _events(out) if e["event"] == "result"]
    assert pushed["ref"].startswith(target + "@sha256:") and pushed["path"] == path
    assert pushed["bundle"]["sha256"] == bundled["sha256"]  # the same bytes, pushed


def test_var_and_platform_override_the_recipe(tmp_path: Path, image_ref: str) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    home = tmp_path / "home"
    base = json.loads(run_cli(home, "show", str(recipe))[1])
    code, out, err = run_cli(home, "show", str(recipe), "--var", "what=another unit")
    assert code == 0, err
    changed = json.loads(out)
    assert changed["key"] != base["key"]  # the rendered template changed
    import contextlib
    import io

    from banger_build.cli import main

    rendered = io.StringIO()
    with contextlib.redirect_stdout(rendered):
        assert main(["render", str(recipe), "--var", 'what="quoted"']) == 0
    assert "Description=quoted on" in rendered.getvalue()
    # the image has no arm64 manifest: the override reaches the registry's answer
    code, _, err = run_cli(home, "show", str(recipe), "--platform", "linux/arm64")
    assert code == 1 and "linux/arm64" in err
    for bad in (["--var", "no-equals"], ["--platform", "linux"]):
        code, _, err = run_cli(home, "show", str(recipe), *bad)
        assert code == 1 and err.count("\n") == 1, err
