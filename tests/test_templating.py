"""Templates render in Jinja's sandbox, bounded in size, memory and time; any failure
inside one is one clean error naming the recipe position, the template and its line.

Also: the built-in templates are package data, found in a source checkout,
in an installed wheel (built here from the project with the system's
setuptools) and in a zip import.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from banger_build import guest, templating
from banger_build.cli import main
from banger_build.errors import InputError
from banger_build.inputs import resolve_injected
from banger_build.recipe import load_recipe
from banger_build.templating import TemplateJob, render_template, render_templates

REPO = Path(__file__).resolve().parents[1]
ESCAPE = '{{ cycler.__init__.__globals__.os.popen("id").read() }}'


def recipe_with_template(tmp_path: Path, body: str | bytes, name: str = "t.j2") -> Path:
    (tmp_path / name).write_bytes(body if isinstance(body, bytes) else body.encode())
    path = tmp_path / "recipe.toml"
    path.write_text(
        '[image]\nref = "debian:bookworm"\n\n[vars]\nhostname = "box"\n\n'
        f'[[templates]]\nsrc = "{name}"\ndest = "/etc/out"\n'
    )
    return path


def render_error(tmp_path: Path, body: str | bytes) -> InputError:
    path = recipe_with_template(tmp_path, body)
    recipe = load_recipe(path)
    with pytest.raises(InputError) as info:
        resolve_injected(recipe)
    message = str(info.value)
    # the recipe position first, then the template file
    assert message.startswith(f"{path}:8:1: templates[0].src: {tmp_path / 't.j2'}"), message
    assert "\n" not in message
    return info.value


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


# -- the sandbox ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        ESCAPE,
        "{{ self.__init__.__globals__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ recipe.__class__ }}",
        "{% set x = [] %}{{ x.append(1) }}",  # immutable: the recipe's values stay as they are
        "{{ recipe.update({'name': 'evil'}) }}",
    ],
)
def test_sandbox_escapes_are_refused(tmp_path: Path, body: str) -> None:
    err = render_error(tmp_path, body)
    assert err.reason == "template-unsafe" and "sandbox" in str(err)
    assert f"{tmp_path / 't.j2'}:1: " in str(err)


def test_no_command_runs_under_render_or_show(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    body = '{{ cycler.__init__.__globals__.os.system("touch ' + str(marker) + '") }}'
    path = recipe_with_template(tmp_path, body)
    code, out, err = cli("render", str(path))
    assert (code, out) == (1, "") and err.count("\n") == 1 and "sandbox" in err
    code, out, err = cli("render", "--list", str(path))
    assert code == 1 and "sandbox" in err
    assert not marker.exists()


def test_plain_templates_render_as_before(tmp_path: Path) -> None:
    body = (
        "{% macro greet(n) %}hi {{ n }}{% endmacro %}{{ greet(hostname) }}\n"
        "{% for i in range(3) %}{{ i }}{% endfor %} {{ recipe.name | upper }}\n"
        "{{ '%05d' | format(42) }} {{ {'a': 1}.items() | list }}\n"
    )
    path = recipe_with_template(tmp_path, body)
    (item,) = [i for i in resolve_injected(load_recipe(path)) if i.dest == "/etc/out"]
    assert item.data == b"hi box\n012 DEBIAN-BOOKWORM\n00042 [('a', 1)]\n"


# -- any failure: one clean error with file and line --------------------------------------


@pytest.mark.parametrize(
    ("body", "reason", "line", "words"),
    [
        ("ok\n{{ 1/0 }}\n", "template-error", 2, "division by zero"),
        ("{{ undefined_thing }}", "template-undefined", 1, "undefined_thing"),
        ("a\nb\n{% if %}\n", "template-syntax", 3, "template syntax error"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "template-limit", None, "recursion"),
        ('{% include "t.j2" %}', "template-limit", None, "recursion"),
        ('{{ "x" * 10**10 }}', "template-limit", None, "MiB of memory"),
        ('{{ {} | dictsort(by="x") }}', "template-error", 1, "template error"),
        ('{{ "%d" % "x" }}', "template-error", 1, "TypeError"),
        ('{% include "missing.j2" %}', "template-missing", 1, "missing.j2"),
        ('{% include "../etc/passwd" %}', "template-missing", 1, "../etc/passwd"),
    ],
)
def test_any_exception_is_one_clean_error(
    tmp_path: Path, body: str, reason: str, line: int | None, words: str
) -> None:
    err = render_error(tmp_path, body)
    assert err.reason == reason, str(err)
    assert words in str(err)
    if line is not None:
        assert f"t.j2:{line}: " in str(err)


def test_non_utf8_template_names_its_line(tmp_path: Path) -> None:
    err = render_error(tmp_path, b"fine\nalso fine\nbad \xff\xfe byte\n")
    assert err.reason == "template-syntax" and "t.j2:3: " in str(err) and "UTF-8" in str(err)


def test_huge_output_stops_at_the_bound(tmp_path: Path) -> None:
    started = time.monotonic()
    err = render_error(tmp_path, '{% for i in range(100000) %}{{ "y" * 1000 }}{% endfor %}')
    assert err.reason == "template-limit" and "16 MiB" in str(err)
    assert time.monotonic() - started < 10


def test_total_output_of_a_recipe_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(templating, "MAX_RENDERED_TOTAL", 3000)
    (tmp_path / "t.j2").write_text('{{ "z" * 1000 }}')
    jobs = [TemplateJob(f"job{i}", path=tmp_path / "t.j2") for i in range(4)]
    assert len(render_templates(jobs[:3], {})) == 3
    with pytest.raises(InputError) as info:
        render_templates(jobs, {})
    assert info.value.reason == "template-limit" and str(info.value).startswith("job3")


def test_a_template_that_runs_too_long_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(templating, "RENDER_TIMEOUT", 1.0)
    started = time.monotonic()
    loop = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    err = render_error(tmp_path, loop)
    assert err.reason == "template-limit" and "longer than 1 s" in str(err)
    assert time.monotonic() - started < 10


def test_a_renderer_that_dies_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would

    monkeypatch.setattr(templating, "_child", crash)
    (tmp_path / "t.j2").write_text("x")
    with pytest.raises(InputError) as info:
        render_template(tmp_path / "t.j2", {})
    assert info.value.reason == "template-limit" and "SIGKILL" in str(info.value)


@pytest.mark.parametrize("kind", ["directory", "fifo", "dev-zero-link", "too-large"])
def test_template_files_must_be_small_regular_files(tmp_path: Path, kind: str) -> None:
    (tmp_path / ".git").mkdir()
    path = recipe_with_template(tmp_path, "")
    src = tmp_path / "t.j2"
    src.unlink()
    if kind == "directory":
        src.mkdir()
    elif kind == "fifo":
        os.mkfifo(src)
    elif kind == "dev-zero-link":
        (tmp_path / "zero").write_text("x")
        src.symlink_to("zero")  # loads (resolved to zero), then zero becomes /dev/zero
    else:
        src.write_bytes(b"x" * (templating.MAX_TEMPLATE_SOURCE + 1))
    recipe = load_recipe(path)
    if kind == "dev-zero-link":
        (tmp_path / "zero").unlink()
        (tmp_path / "zero").symlink_to("/dev/zero")
    with pytest.raises(InputError) as info:
        resolve_injected(recipe)
    reason = {"too-large": "too-large", "dev-zero-link": "source-not-allowed"}
    assert info.value.reason == reason.get(kind, "not-a-regular-file"), str(info.value)


def test_includes_follow_the_source_rules(tmp_path: Path) -> None:
    (tmp_path / "part.j2").write_text("part {{ hostname }}\n")
    (tmp_path / "fifo.j2").unlink(missing_ok=True)
    os.mkfifo(tmp_path / "fifo.j2")
    (tmp_path / "out.j2").symlink_to("/etc/hostname")
    path = recipe_with_template(tmp_path, '{% include "part.j2" %}')
    (item,) = [i for i in resolve_injected(load_recipe(path)) if i.dest == "/etc/out"]
    assert item.data == b"part box\n"
    for name, reason in (("fifo.j2", "not-a-regular-file"), ("out.j2", "source-not-allowed")):
        err = render_error(tmp_path, f'{{% include "{name}" %}}')
        assert err.reason == reason, str(err)


def test_an_error_inside_an_include_names_the_included_file(tmp_path: Path) -> None:
    (tmp_path / "inner.j2").write_text("fine\n{{ 1/0 }}\n")
    path = recipe_with_template(tmp_path, 'outer\n{% include "inner.j2" %}')
    with pytest.raises(InputError) as info:
        resolve_injected(load_recipe(path))
    assert str(info.value) == (
        f"{path}:8:1: templates[0].src: {tmp_path / 'inner.j2'}:2: "
        "ZeroDivisionError: division by zero"
    )


def test_rendering_leaves_no_process_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forked: list[int] = []
    fork = os.fork

    def recording_fork() -> int:
        pid = fork()
        if pid:
            forked.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", recording_fork)
    monkeypatch.setattr(templating, "RENDER_TIMEOUT", 0.5)
    (tmp_path / "bad.j2").write_text("{{ 1/0 }}")
    (tmp_path / "good.j2").write_text("fine")
    (tmp_path / "slow.j2").write_text(
        "{% for a in range(99999) %}{{ range(99999)|sum }}{% endfor %}"
    )
    for name in ("bad.j2", "good.j2", "slow.j2"):
        with contextlib.suppress(InputError):
            render_template(tmp_path / name, {})
    assert len(forked) == 3
    for pid in forked:  # each one reaped: not even a zombie is left
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


# -- the built-in templates as package data ------------------------------------------------

PROBE = """
import sys
from pathlib import Path
from banger_build import guest
from banger_build.inputs import resolve_injected
from banger_build.recipe import load_recipe
import banger_build
print(banger_build.__file__)
print(guest.template_dir())
items = resolve_injected(load_recipe(Path(sys.argv[1])))
sys.stdout.buffer.write(b"".join(i.data or b"" for i in items))
"""


def probe(tmp_path: Path, pythonpath: Path) -> tuple[str, str, bytes]:
    (tmp_path / "agent").write_bytes(b"agent")
    recipe = tmp_path / "guest.toml"
    recipe.write_text('[image]\nref = "debian:bookworm"\n[guest]\nagent = "agent"\n')
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(recipe)],
        capture_output=True, env=env, cwd=tmp_path, timeout=60, check=True,
    ).stdout  # fmt: skip
    module, where, rendered = out.split(b"\n", 2)
    return module.decode(), where.decode(), rendered


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built into a wheel by Debian's setuptools (no index, no isolation)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("banger_build", "templates"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "agents" / "out").mkdir(parents=True)  # mapped to banger_build/agents
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        ["/usr/bin/python3", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    (whl,) = out.glob("*.whl")
    return whl


def test_the_wheel_carries_the_templates_as_package_data(wheel: Path, tmp_path: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for t in guest.TEMPLATES:
        assert f"banger_build/templates/guest/{t.name}.j2" in names
    assert "banger_build/templates.py" not in names and "banger_build/templating.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    module, where, rendered = probe(tmp_path, site)
    assert module == str(site / "banger_build" / "__init__.py")
    assert where == str(site / "banger_build" / "templates" / "guest")
    assert rendered == probe(tmp_path, REPO)[2]


def test_an_installed_wheel_resolves_builtin_templates_for_a_recipe_anywhere(
    wheel: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    recipe = tmp_path / "elsewhere" / "r.toml"
    recipe.parent.mkdir()
    recipe.write_text(
        '[image]\nref = "debian:bookworm"\n[vars]\nhostname = "far"\n'
        '[[templates]]\nsrc = "builtin:hostname.j2"\ndest = "/etc/hostname"\n'
    )
    script = (
        "import sys; from pathlib import Path; from banger_build.recipe import load_recipe; "
        "from banger_build.inputs import resolve_injected; import banger_build; "
        "print(banger_build.__file__); "
        "print(resolve_injected(load_recipe(Path(sys.argv[1])))[0].data)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(recipe)], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path, timeout=60, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out == [str(site / "banger_build" / "__init__.py"), "b'far\\n'"]


def test_the_checkout_and_a_zip_import_find_the_templates(tmp_path: Path) -> None:
    module, where, rendered = probe(tmp_path, REPO)
    assert module == str(REPO / "banger_build" / "__init__.py")
    assert where == str(REPO / "templates" / "guest")
    archive = tmp_path / "banger.zip"
    with zipfile.ZipFile(archive, "w") as z:  # laid out as an installed package
        for path in sorted((REPO / "banger_build").rglob("*.py")):
            z.write(path, path.relative_to(REPO).as_posix())
        for path in sorted((REPO / "templates").rglob("*.j2")):
            z.write(path, "banger_build/" + path.relative_to(REPO).as_posix())
    module, where, zipped = probe(tmp_path, archive)
    assert module.startswith(str(archive)) and where.startswith(str(archive))
    assert zipped == rendered
