"""Run banger-build as an unprivileged user (uid/gid 65534, no groups, no root).

The default python3 here lives under /root (pyenv), which other users cannot
read, so the tool is installed (non-editable) into a venv made from Debian's
``/usr/bin/python3`` in a world-readable directory:
``/var/tmp/banger-build-unpriv-<hash16>/venv``, where the hash covers
pyproject.toml, banger_build/**, templates/** and the built guest agents
(agents/out, the package data banger_build/agents). It is built once per
source state (under an flock) and reused across sessions.

Fixtures:

* ``unpriv_venv`` (session): the venv, an ``UnprivVenv``;
* ``unpriv`` (function): an ``Unpriv`` with a fresh directory owned by
  65534 holding HOME (``.home``), XDG_CACHE_HOME (``.cache``) and TMPDIR
  (``.tmp``). ``unpriv.run([...])`` runs ``<venv>/bin/banger-build ...``
  through ``setpriv --reuid=65534 --regid=65534 --clear-groups``;
  ``unpriv.run_cmd([...])`` runs any command the same way;
  ``unpriv.copy_in(src)`` makes a copy of a recipe directory that the user
  can read and write. ``unpriv_venv.user()`` makes another ``Unpriv`` (for
  module or session scoped fixtures).

Missing setpriv or venv support of /usr/bin/python3 fail the test (they are
installed by scripts/setup); they never skip it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
UID = GID = 65534
SYSTEM_PYTHON = Path("/usr/bin/python3")
BASE_ENV = "BANGER_TEST_UNPRIV_DIR"  # parent of the venv dirs; default /var/tmp
DEFAULT_TIMEOUT = 900.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".mypy_cache")


class UnprivError(RuntimeError):
    """The unprivileged environment cannot be set up."""


class UnprivProcessError(subprocess.CalledProcessError):
    """A failed command run as 65534, with its output in the message."""

    def __str__(self) -> str:
        return (
            f"{super().__str__()}\n--- stdout ---\n{self.stdout or ''}"
            f"\n--- stderr ---\n{self.stderr or ''}"
        )


def source_files(repo: Path = REPO_ROOT) -> list[Path]:
    """The files whose content decides the installed package."""
    files = [repo / "pyproject.toml"]
    for top in ("banger_build", "templates"):
        for path in sorted((repo / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append(path)
    return files + built_agents(repo)


def built_agents(repo: Path = REPO_ROOT) -> list[Path]:
    """What agents/build left in agents/out (the package ships them)."""
    return sorted((repo / "agents" / "out").glob("banger-vsock-agent-*"))


def source_hash(repo: Path = REPO_ROOT) -> str:
    h = hashlib.sha256()
    for path in source_files(repo):
        rel = path.relative_to(repo).as_posix().encode()
        data = path.read_bytes()
        h.update(b"%d:%s%d:" % (len(rel), rel, len(data)))
        h.update(data)
    return h.hexdigest()


def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise UnprivError("running tests as another user needs root (setpriv --reuid)")
    if shutil.which("setpriv") is None:
        raise UnprivError("setpriv is missing (apt-get install util-linux)")
    if not SYSTEM_PYTHON.is_file():
        raise UnprivError(f"{SYSTEM_PYTHON} is missing (apt-get install python3)")
    probe = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import venv, ensurepip"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise UnprivError(
            f"{SYSTEM_PYTHON} cannot make venvs (apt-get install python3-venv): "
            f"{probe.stderr.strip()}"
        )


def _safe_dir(path: Path) -> None:
    """Create or accept a root-owned 0755 directory in a world-writable parent."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o755)
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != 0 or st.st_mode & 0o022:
        raise UnprivError(f"{path} exists but is not a root-owned, non-writable directory")
    os.chmod(path, 0o755)


@dataclass(frozen=True)
class UnprivVenv:
    root: Path  # /var/tmp/banger-build-unpriv-<hash16>
    venv: Path
    seconds: float  # time it took to create (0.0 when reused)

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def banger_build(self) -> Path:
        return self.venv / "bin" / "banger-build"

    def user(self) -> Unpriv:
        """A fresh per-user directory (HOME, cache, TMPDIR) owned by 65534."""
        runs = self.root / "runs"
        _safe_dir(runs)
        top = Path(tempfile.mkdtemp(prefix="u-", dir=runs))
        for sub in ("", "home", "cache", "tmp"):
            d = top / sub
            d.mkdir(exist_ok=True)
            os.chown(d, UID, GID)
            os.chmod(d, 0o755 if sub != "tmp" else 0o700)
        return Unpriv(venv=self, top=top)


def _install(root: Path, repo: Path) -> None:
    venv = root / "venv"
    src = root / "src"
    for stale in (venv, src):
        if stale.exists():
            shutil.rmtree(stale)
    # A copy of exactly what the hash covers: pip builds in the source tree and
    # must not leave build/ or *.egg-info in the repository others work in.
    src.mkdir(mode=0o755)
    shutil.copy2(repo / "pyproject.toml", src)
    for extra in ("README.md", "LICENSE"):
        if (repo / extra).is_file():
            shutil.copy2(repo / extra, src)
    for top in ("banger_build", "templates"):
        if (repo / top).is_dir():
            shutil.copytree(repo / top, src / top, ignore=_COPY_IGNORE)
    (src / "agents" / "out").mkdir(parents=True)
    for agent in built_agents(repo):
        shutil.copy2(agent, src / "agents" / "out")
    env = {
        "PATH": PATH,
        "HOME": os.environ.get("HOME", "/root"),
        "LC_ALL": "C.UTF-8",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
    }
    for key in (
        "PIP_INDEX_URL",
        "PIP_EXTRA_INDEX_URL",
        "PIP_CACHE_DIR",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "XDG_CACHE_HOME",
    ):
        if key in os.environ:
            env[key] = os.environ[key]
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run_step([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], env, root)
    if _copy_dependencies(venv):
        _place_project(src, venv)  # offline: no index, no build backend needed
    else:
        _run_step([*pip, str(src)], env, root)
    shutil.rmtree(src)
    _make_world_readable(venv)


#: Lists the files of banger-build's runtime dependency closure, as installed.
_CLOSURE = r"""
import json, re
from importlib import metadata
todo, seen, files = ["banger-build"], set(), []
while todo:
    name = todo.pop()
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        continue
    seen.add(key)
    dist = metadata.distribution(name)
    if key != "banger-build":
        files += [str(dist.locate_file(f)) for f in dist.files or []]
    todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in dist.requires or []
             if "extra ==" not in r]
print(json.dumps(files))
"""


def _copy_dependencies(venv: Path) -> bool:
    """Copy the installed dependencies of banger-build from the setup venv (.venv,
    made from the same /usr/bin/python3 by scripts/setup) into ``venv``, so the
    unprivileged venv needs no package index. False when there is no such venv."""
    source = REPO_ROOT / ".venv" / "bin" / "python"
    if not source.exists():
        return False
    proc = subprocess.run(
        [str(source), "-c", _CLOSURE], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return False
    sites = list((REPO_ROOT / ".venv" / "lib").glob("python3.*/site-packages"))
    dests = list((venv / "lib").glob("python3.*/site-packages"))
    if len(sites) != 1 or len(dests) != 1 or sites[0].parent.name != dests[0].parent.name:
        return False
    for name in json.loads(proc.stdout):
        path = Path(name)
        try:
            rel = path.resolve().relative_to(sites[0].resolve())
        except ValueError:
            continue  # console scripts and the like, outside site-packages
        if "__pycache__" in rel.parts or not path.is_file():
            continue
        target = dests[0] / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return True


def _place_project(src: Path, venv: Path) -> None:
    """Install the project as pyproject.toml lays it out (templates/ becomes
    banger_build/templates, agents/out banger_build/agents), with its
    ``banger-build`` console script."""
    (site,) = (venv / "lib").glob("python3.*/site-packages")
    shutil.copytree(src / "banger_build", site / "banger_build", ignore=_COPY_IGNORE)
    shutil.copytree(src / "templates", site / "banger_build" / "templates", ignore=_COPY_IGNORE)
    (site / "banger_build" / "agents").mkdir()
    for agent in sorted((src / "agents" / "out").glob("banger-vsock-agent-*")):
        shutil.copy2(agent, site / "banger_build" / "agents")
    script = venv / "bin" / "banger-build"
    script.write_text(
        f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom banger_build.cli import entry_point\n"
        "sys.exit(entry_point())\n"
    )
    script.chmod(0o755)


def _run_step(cmd: list[str], env: dict[str, str], cwd: Path) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=cwd)
    if proc.returncode != 0:
        raise UnprivError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )


def _make_world_readable(venv: Path) -> None:
    # Everything readable and traversable by 65534, nothing writable by it.
    for dirpath, _dirs, files in os.walk(venv):
        os.chmod(dirpath, 0o755)
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                mode = stat.S_IMODE(os.lstat(p).st_mode)
                os.chmod(p, (mode | 0o444 | (0o111 if mode & 0o100 else 0)) & ~0o022)


def _prune(base: Path, keep: Path, max_age: float = 3 * 86400) -> None:
    """Drop venvs of old source states nobody has used for a few days."""
    for other in base.glob("banger-build-unpriv-*"):
        ok = other / "venv.ok"
        if other == keep or other.is_symlink() or not ok.is_file():
            continue
        if time.time() - ok.stat().st_mtime > max_age and os.lstat(other).st_uid == 0:
            shutil.rmtree(other, ignore_errors=True)


def ensure_venv(repo: Path = REPO_ROOT) -> UnprivVenv:
    """Create (once per source hash) or reuse the world-readable venv."""
    _check_prerequisites()
    base = Path(os.environ.get(BASE_ENV) or "/var/tmp")
    root = base / f"banger-build-unpriv-{source_hash(repo)[:16]}"
    _safe_dir(root)
    done = root / "venv.ok"
    if done.is_file():
        os.utime(done)  # in use: keep it from being pruned
        return UnprivVenv(root, root / "venv", 0.0)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file():
            return UnprivVenv(root, root / "venv", 0.0)
        t0 = time.monotonic()
        old = os.umask(0o022)
        try:
            _install(root, repo)
        finally:
            os.umask(old)
        seconds = time.monotonic() - t0
        done.write_text(f"{seconds:.1f}\n")
        os.chmod(done, 0o644)
    _prune(base, keep=root)
    return UnprivVenv(root, root / "venv", seconds)


@dataclass
class Unpriv:
    """One unprivileged user's world: run banger-build or any command as 65534."""

    venv: UnprivVenv
    top: Path
    uid: int = UID
    gid: int = GID

    @property
    def home(self) -> Path:
        return self.top / "home"

    @property
    def cache(self) -> Path:  # XDG_CACHE_HOME; banger-build's home is cache/banger-build
        return self.top / "cache"

    @property
    def tmp(self) -> Path:
        return self.top / "tmp"

    @property
    def work(self) -> Path:
        """Default working directory of commands (the home directory)."""
        return self.home

    def environ(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        base = {
            "PATH": f"{self.venv.venv / 'bin'}:{PATH}",
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.cache),
            "TMPDIR": str(self.tmp),
            "USER": "nobody",
            "LOGNAME": "nobody",
            "LC_ALL": "C.UTF-8",
            "TZ": "UTC",
        }
        base.update(env or {})
        return base

    def run_cmd(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv as 65534:65534 with no supplementary groups; capture text output."""
        cmd = [
            shutil.which("setpriv") or "setpriv",  # found on our PATH, not on ``env``'s
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--",
            *map(str, argv),
        ]
        proc = subprocess.run(
            cmd,
            env=self.environ(env),
            cwd=str(cwd or self.work),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
            input=input if input is not None else "",
        )
        if check and proc.returncode != 0:
            raise UnprivProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def run(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``banger-build *args`` as 65534."""
        return self.run_cmd(
            [self.venv.banger_build, *args],
            env=env,
            cwd=cwd,
            check=check,
            timeout=timeout,
            input=input,
        )

    def copy_in(self, src: str | os.PathLike[str], name: str | None = None) -> Path:
        """Copy a file or directory (e.g. recipes/ or examples/) into the user's
        home, owned by the user (so the tool can write the lock file beside a
        recipe); return the copy's path. Symlinks are kept. Copy what a recipe
        refers to as well: recipes/debian.toml uses ../templates/."""
        src = Path(src)
        dest = self.home / (name or src.name)
        if src.is_dir():
            shutil.copytree(src, dest, symlinks=True, ignore=_COPY_IGNORE)
        else:
            shutil.copy2(src, dest)
        for dirpath, dirs, files in os.walk(dest):
            os.chown(dirpath, self.uid, self.gid)
            for n in dirs + files:
                os.chown(os.path.join(dirpath, n), self.uid, self.gid, follow_symlinks=False)
        os.chown(dest, self.uid, self.gid, follow_symlinks=False)
        return dest

    def cleanup(self) -> None:
        if os.environ.get("BANGER_TEST_KEEP"):
            return
        # The store makes published paths read-only; root removes them anyway.
        shutil.rmtree(self.top, ignore_errors=True)


@pytest.fixture(scope="session")
def unpriv_venv() -> UnprivVenv:
    """The venv holding a non-editable install of the project, readable by 65534."""
    try:
        return ensure_venv()
    except UnprivError as exc:
        pytest.fail(f"cannot run banger-build unprivileged: {exc}", pytrace=False)


@pytest.fixture
def unpriv(unpriv_venv: UnprivVenv) -> Iterator[Unpriv]:
    """banger-build as uid/gid 65534 with a fresh HOME/XDG_CACHE_HOME/TMPDIR."""
    user = unpriv_venv.user()
    try:
        yield user
    finally:
        user.cleanup()


def main(argv: list[str]) -> int:
    """``python -m tests.support.unpriv``: build the venv, print it and a probe."""
    v = ensure_venv()
    u = v.user()
    try:
        ident = u.run_cmd(["id", "-u"]).stdout.strip()
        imp = u.run_cmd([v.python, "-c", "import banger_build, sys; print(banger_build.__file__)"])
        print(f"venv {v.venv} (created in {v.seconds:.1f} s)")
        print(f"id -u as unpriv: {ident}; banger_build from {imp.stdout.strip()}")
    finally:
        u.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
