"""Sources lie inside the recipe's project; only regular files are read, and nothing blocks.

Every refusal is an error at the recipe position (file:line:col: key) with a
reason. FIFOs are real FIFOs, /dev/zero and /proc/self/environ the real
ones: each case runs under a timer, so a read that blocks fails the test
instead of hanging it.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from banger_build.cli import main
from banger_build.errors import BangerError, InputError, RecipeError
from banger_build.inputs import hash_tree, resolve_injected, resolve_kernel
from banger_build.lockfile import Lock
from banger_build.recipe import load_recipe
from banger_build.sources import SourceRoots, project_root
from banger_build.tomlpos import MAX_TOML_BYTES

HEAD = '[image]\nref = "debian:bookworm"\n'


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float = 10.0) -> Iterator[None]:
    """Fail (``Hang``) instead of blocking forever."""

    def fire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project (``.git``) with its recipe in recipes/ and a file in files/."""
    root = tmp_path / "project"
    (root / ".git").mkdir(parents=True)
    (root / "recipes").mkdir()
    (root / "files").mkdir()
    (root / "files" / "motd").write_text("hello\n")
    return root


def write(directory: Path, body: str, name: str = "recipe.toml") -> Path:
    path = directory / name
    path.write_text(HEAD + body)
    return path


def file_entry(src: str, dest: str = "/etc/x") -> str:
    return f'[[files]]\nsrc = "{src}"\ndest = "{dest}"\n'


def load_error(path: Path, **kwargs: object) -> RecipeError:
    with deadline(), pytest.raises(RecipeError) as info:
        load_recipe(path, **kwargs)  # type: ignore[arg-type]
    return info.value


def resolve_error(path: Path) -> InputError:
    recipe = load_recipe(path)
    with deadline(), pytest.raises(InputError) as info:
        resolve_injected(recipe)
        resolve_kernel(recipe.kernel, recipe.source_roots)
    return info.value


# -- the project root -------------------------------------------------------------------


def test_project_root_is_the_nearest_git_else_the_recipe_dir(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    assert project_root(deep / "r.toml") == deep.resolve()
    (tmp_path / "a" / ".git").mkdir()
    assert project_root(deep / "r.toml") == (tmp_path / "a").resolve()
    (tmp_path / "a" / "b" / ".git").write_text("gitdir: /elsewhere\n")  # a worktree's .git file
    assert project_root(deep / "r.toml") == (tmp_path / "a" / "b").resolve()


def test_sources_inside_the_project_load_and_resolve(project: Path) -> None:
    (project / "templates").mkdir()
    (project / "templates" / "t.j2").write_text("{{ recipe.name }}\n")
    (project / "files" / "link").symlink_to("motd")  # a symlink inside the project: fine
    path = write(
        project / "recipes",
        file_entry("../files/motd")
        + file_entry("../files/link", "/etc/y")
        + '[[templates]]\nsrc = "../templates/t.j2"\ndest = "/etc/t"\n',
    )
    recipe = load_recipe(path)
    assert recipe.files[1].src == (project / "files" / "motd").resolve()  # symlinks resolved
    items = {i.dest: i for i in resolve_injected(recipe)}
    assert items["/etc/t"].data == b"debian-bookworm\n"


@pytest.mark.parametrize(
    ("src", "why"),
    [
        ("/etc/passwd", "outside"),
        ("../../outside.txt", "outside"),
        ("link-out", "outside"),  # a symlink inside the project pointing out of it
        ("/proc/self/environ", "/proc"),
        ("/dev/zero", "/dev"),
        ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys"),
        ("/dev/stdin", "never a source"),  # -> /proc/self/fd/0 -> whatever it is
    ],
)
def test_sources_outside_the_project_are_refused_at_their_position(
    project: Path, src: str, why: str
) -> None:
    (project.parent / "outside.txt").write_text("not yours\n")
    (project / "recipes" / "link-out").symlink_to(project.parent / "outside.txt")
    path = write(project / "recipes", file_entry(src))
    err = load_error(path)
    assert (err.reason, err.key, err.line, err.col) == ("source-not-allowed", "files[0].src", 4, 1)
    assert why in err.detail
    assert str(err).startswith(f"{path}:4:1: files[0].src: ")


@pytest.mark.parametrize(
    ("body", "key", "line"),
    [
        ('[[templates]]\nsrc = "/etc/hostname"\ndest = "/x"\n', "templates[0].src", 4),
        ('[guest]\nagent = "/bin/sh"\n', "guest.agent", 4),
        (
            '[guest]\nagent = "../files/motd"\n[guest.templates]\n'
            '"banger-first-boot" = "/etc/passwd"\n',
            "guest.templates.banger-first-boot",
            6,
        ),
        ('[kernel]\npath = "/boot/vmlinuz"\n', "kernel.path", 4),
        ('[kernel]\npath = "../files/motd"\ninitrd = "/proc/cmdline"\n', "kernel.initrd", 5),
        ('[kernel]\npath = "../files/motd"\nmodules = "/lib/modules"\n', "kernel.modules", 5),
    ],
)
def test_every_kind_of_source_is_checked(project: Path, body: str, key: str, line: int) -> None:
    err = load_error(write(project / "recipes", body))
    assert (err.reason, err.key, err.line) == ("source-not-allowed", key, line)


def test_allow_source_widens_the_root_but_never_to_proc(project: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "kernels"
    elsewhere.mkdir()
    (elsewhere / "vmlinuz").write_bytes(b"kernel")
    path = write(project / "recipes", f'[kernel]\npath = "{elsewhere / "vmlinuz"}"\n')
    assert load_error(path).reason == "source-not-allowed"
    recipe = load_recipe(path, source_roots=[elsewhere])
    (staged,) = resolve_kernel(recipe.kernel, recipe.source_roots)
    assert staged.source == (elsewhere / "vmlinuz").resolve() and staged.size == 6
    environ = write(project / "recipes", file_entry("/proc/self/environ"), "environ.toml")
    err = load_error(environ, source_roots=[Path("/")])
    assert err.reason == "source-not-allowed" and "/proc" in err.detail


def test_allow_source_on_the_command_line(project: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "shared"
    elsewhere.mkdir()
    (elsewhere / "t.j2").write_text("shared {{ recipe.name }}\n")
    path = write(
        project / "recipes", f'[[templates]]\nsrc = "{elsewhere / "t.j2"}"\ndest = "/etc/t"\n'
    )
    code, out, err = cli("render", str(path))
    assert code == 1 and out == "" and "source-not-allowed" not in err
    assert err.count("\n") == 1 and f"{path}:4:1: templates[0].src: " in err
    assert "--allow-source" in err
    code, out, err = cli("render", str(path), "--allow-source", str(elsewhere))
    assert code == 0, err
    assert "shared debian-bookworm" in out


# -- regular files only, and nothing blocks -------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "directory", "loop", "socket"])
@pytest.mark.parametrize("section", ["files", "templates", "agent", "kernel"])
def test_non_regular_sources_are_errors_at_their_position(
    project: Path, kind: str, section: str
) -> None:
    target = project / "recipes" / "src"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "loop":
        target.symlink_to("src")
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
        sock.close()
    body, key = {
        "files": (file_entry("src"), "files[0].src"),
        "templates": ('[[templates]]\nsrc = "src"\ndest = "/x"\n', "templates[0].src"),
        "agent": ('[guest]\nagent = "src"\n', "guest.agent"),
        "kernel": ('[kernel]\npath = "src"\n', "kernel.path"),
    }[section]
    path = write(project / "recipes", body)
    if kind == "loop":  # refused while loading: it cannot be resolved at all
        err: BangerError = load_error(path)
        assert (err.reason, err.key, err.line) == ("symlink-loop", key, 4)  # type: ignore[attr-defined]
        return
    err = resolve_error(path)
    assert err.reason == "not-a-regular-file"
    assert str(err).startswith(f"{path}:4:1: {key}: ")
    assert {"fifo": "FIFO", "directory": "directory", "socket": "socket"}[kind] in str(err)


def test_a_source_replaced_by_a_fifo_after_loading_does_not_block(project: Path) -> None:
    src = project / "recipes" / "data"
    src.write_text("regular at load time\n")
    recipe = load_recipe(write(project / "recipes", file_entry("data")))
    src.unlink()
    os.mkfifo(src)
    with deadline(), pytest.raises(InputError) as info:
        resolve_injected(recipe)
    assert info.value.reason == "not-a-regular-file"


def test_a_source_turned_into_a_symlink_out_of_the_project_after_loading(
    project: Path, tmp_path: Path
) -> None:
    src = project / "recipes" / "data"
    src.write_text("mine\n")
    recipe = load_recipe(write(project / "recipes", file_entry("data")))
    src.unlink()
    src.symlink_to("/etc/passwd")
    with pytest.raises(InputError) as info:
        resolve_injected(recipe)
    assert info.value.reason == "source-not-allowed"


def test_a_regular_file_on_proc_is_never_read_even_from_a_bind_of_root(project: Path) -> None:
    """/proc/self/environ is S_ISREG: the /proc rule, not the file type, keeps it out."""
    assert os.path.isfile("/proc/self/environ")
    roots = SourceRoots((Path("/"),))
    with pytest.raises(Exception) as info:
        roots.check(Path("/proc/self/environ"))
    assert "never a source" in str(info.value)


# -- the recipe and lock files themselves --------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "huge"])
def test_the_recipe_file_must_be_a_small_regular_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "recipe.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path = Path("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_text(HEAD + "# " + "x" * MAX_TOML_BYTES + "\n")
    err = load_error(path)
    assert err.reason == ("too-large" if kind == "huge" else "io")
    assert str(err).startswith(f"{path}: ")
    code, out, stderr = cli("render", str(path))
    assert code == 1 and out == "" and stderr.count("\n") == 1


def test_a_lock_file_that_is_a_fifo_is_an_error(tmp_path: Path) -> None:
    lock = tmp_path / "recipe.lock"
    os.mkfifo(lock)
    with deadline(), pytest.raises(RecipeError) as info:
        Lock.load(lock)
    assert info.value.reason == "io" and "FIFO" in str(info.value)


# -- the modules tree -------------------------------------------------------------------------


def _old_hash_tree(root: Path) -> str:
    """The digest as os.walk computed it (the store keys of existing paths depend on it)."""
    import hashlib
    import stat

    from banger_build.fsutil import hash_file

    sha = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = os.fsencode(path.relative_to(root))
            st = path.lstat()
            sha.update(b"%s\0%o\0" % (rel, st.st_mode))
            if stat.S_ISLNK(st.st_mode):
                sha.update(os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                sha.update(hash_file(path)[0].encode())
            sha.update(b"\0")
    return sha.hexdigest()


def test_hash_tree_is_unchanged_and_needs_no_recursion(tmp_path: Path) -> None:
    tree = tmp_path / "6.1.0-x"
    (tree / "kernel" / "net" / "z").mkdir(parents=True)
    (tree / "kernel" / "a.ko").write_bytes(b"a")
    (tree / "kernel" / "net" / "vsock.ko").write_bytes(b"v" * 5000)
    (tree / "kernel" / "net" / "z" / "last").write_bytes(b"")
    (tree / "build").symlink_to("/usr/src/linux-headers")
    (tree / "dirlink").symlink_to("kernel")  # never followed
    (tree / "modules.order").write_text("kernel/a.ko\n")
    os.mkfifo(tree / "fifo")  # hashed by its mode, never opened
    with deadline():
        assert hash_tree(tree)[0] == _old_hash_tree(tree)
    deep = tmp_path / "deep"
    path = deep
    deep.mkdir()
    for _ in range(1200):  # deeper than Python's recursion limit
        path = path / "d"
        path.mkdir()
    try:
        hash_tree(deep)
    finally:  # without recursion (shutil.rmtree, pytest's cleanup, would recurse)
        while path != tmp_path:
            path.rmdir()
            path = path.parent


def test_modules_version_reads_bounded_and_never_follows_symlinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lzma

    from banger_build import inputs, kmodules

    mods = tmp_path / "modules"
    (mods / "kernel").mkdir(parents=True)
    monkeypatch.setattr(kmodules, "MAX_MODULE_BYTES", 1 << 20)
    # a decompression bomb: 8 MiB of zeros, then the vermagic past the bound
    (mods / "kernel" / "a.ko.xz").write_bytes(lzma.compress(bytes(8 << 20) + b"vermagic=6.1 "))
    os.mkfifo(mods / "kernel" / "b.ko")  # a FIFO named like a module: never opened
    (mods / "source").symlink_to("/usr/src")  # headers outside: never scanned
    with deadline(), pytest.raises(InputError) as info:
        inputs.modules_version(mods)
    assert info.value.reason == "modules-version"
    (mods / "kernel" / "c.ko").write_bytes(b"\0vermagic=6.1.0-test SMP\0")
    assert inputs.modules_version(mods) == "6.1.0-test"


def test_a_cli_source_error_is_one_line(project: Path, tmp_path: Path) -> None:
    path = write(project / "recipes", file_entry("/etc/shadow"))
    proc = subprocess.run(
        [sys.executable, "-m", "banger_build", "render", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"banger-build: error: {path}:4:1: files[0].src: /etc/shadow is outside the recipe's "
        f"project {project.resolve()}: sources must lie inside it (allow another directory "
        "with --allow-source DIR)"
    ]
