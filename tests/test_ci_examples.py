"""The CI examples (examples/ci/*.yml) run as written against the local registry.

Each file is parsed (PyYAML) and played twice, as its platform would run it:

* a push to main, in an empty runner (its own HOME, checkout and store): every
  step runs; the registry cache is empty, so the job builds, checks, boots,
  pushes and signs, and writes catalog.json;
* a pull request from a fork, in another empty runner with no secrets: the
  main-only steps (GitHub: ``if:``; GitLab: the rule that sets PUBLISH) do not
  run, and the build substitutes the path main pushed instead of building it.

What runs is the shell the platform would run: each GitHub ``run:`` block that
calls banger-build, or the GitLab job's ``script`` (one shell, as the runner
does), in ``bash -euo pipefail`` (the platforms' ``-eo pipefail``, plus ``-u``:
a variable this test does not provide fails the step). ``banger-build`` is this
worktree's CLI (a shim on PATH that logs each call). What does not run, and is
asserted to be exactly that: ``uses:`` actions, and the setup that needs the
platform (installing packages, the KVM udev rule, ``docker login``, GitLab's
``before_script``).

The CI variables are the YAML's own, except those naming this site, which get
local values: RECIPE (a small recipe staging a kernel, with its lock),
BANGER_CACHE (a repository of the local ``docker-registry``), BANGER_TRUSTED_KEY
and the secret key (GitHub: the secret's text; GitLab: a File variable, the
path of the key file), BOOT_EXPECT (what this test's image prints on boot).
GitHub's ``${{ secrets.* }}`` are the secret on main and empty on forks;
any other ``${{ }}`` in a value that reaches a step fails the test.

The boot step runs in both variants: in the fast one against a stand-in
``qemu-system-x86_64`` on PATH that prints the expected text and records its
arguments (``boot`` itself runs for real: the store path's kernel, the copy of
rootfs.ext4, the console watcher); in the slow one (``-m slow``) the recipe is
a busybox image with the cached Debian test kernel and initramfs
(tests/support/kernel.py, built with apt on first use, hence slow) and qemu
boots it for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import pytest
import yaml

from banger_build.cli import main
from banger_build.oci import rootfs
from tests.support.e2e import BASE, UPPER, push, write_recipe
from tests.support.oci import Pusher, push_image
from tests.support.registry import RegistryServer

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "ci"

GITHUB_MAIN_ONLY = "github.event_name == 'push' && github.ref == 'refs/heads/main'"
GITLAB_MAIN_RULE = (
    '$CI_PIPELINE_SOURCE == "push" && $CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH '
    '&& $CI_PROJECT_PATH == "your-group/your-project"'
)
GITLAB_MR_RULE = '$CI_PIPELINE_SOURCE == "merge_request_event"'
#: the GitHub steps that need the platform, not run here
GITHUB_SETUP = {
    "Install banger-build, e2fsprogs and qemu",
    "Let the runner's user use KVM",
    "Log in to the registry (main only)",
}
#: the variables that name this site: local values replace the YAML's
LOCAL = ("RECIPE", "BOOT_EXPECT", "BANGER_CACHE", "BANGER_TRUSTED_KEY")
SECRET = "BANGER_SIGN_KEY"
BOOT_TEXT = "ci-example: the image is up"


@dataclass
class Step:
    name: str
    script: str
    env: dict[str, str]
    expand: bool = False  # GitLab expands $VARS in variables' values; GitHub does not


@dataclass
class Run:
    """One played pipeline: what each step printed, and the banger-build calls."""

    outputs: list[tuple[str, str, str]] = field(default_factory=list)  # name, out, err
    calls: list[list[str]] = field(default_factory=list)
    seconds: float = 0.0

    def events(self) -> list[dict[str, Any]]:
        found = []
        for _, out, _ in self.outputs:
            for line in out.splitlines():
                if line.startswith('{"event"'):
                    found.append(json.loads(line))
        return found

    def text(self) -> str:
        return "\n".join(out + err for _, out, err in self.outputs)


@dataclass
class Site:
    """This machine's stand-ins for the CI platform's world."""

    tmp: Path
    project: Path  # the repository being checked out
    shim: Path  # a directory holding `banger-build`
    calls: Path  # the shim's log
    fake_qemu: Path | None  # a directory holding `qemu-system-x86_64`, or None
    local: dict[str, str]  # LOCAL's values
    secret_text: str
    secret_file: Path

    def path(self) -> str:
        dirs = [str(self.shim)] + ([str(self.fake_qemu)] if self.fake_qemu else [])
        return ":".join([*dirs, "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin",
                         "/sbin", "/bin"])  # fmt: skip


# -- reading the examples ------------------------------------------------------------


def load(name: str) -> dict[Any, Any]:
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(doc, dict)
    return doc


def _values(raw: dict[str, Any], site: Site, main_branch: bool) -> dict[str, str]:
    """A YAML env/variables block: local values for LOCAL, GitHub secrets as the
    platform gives them, every other value as written."""
    values = {}
    for name, value in raw.items():
        text = str(value)
        if name in LOCAL:
            text = site.local[name]
        elif text.startswith("${{ secrets.") and text.endswith("}}"):
            assert main_branch, f"{name}: a secret in a step that forks run"
            text = site.secret_text if name == SECRET else "not-for-this-test"
        assert "${{" not in text, f"{name}: {text} (an expression this test cannot give)"
        values[name] = text
    return values


def github_steps(doc: dict[Any, Any], site: Site, main_branch: bool) -> list[Step]:
    on = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` as true
    assert on == {"push": {"branches": ["main"]}, "pull_request": None}
    assert doc["defaults"] == {"run": {"shell": "bash"}}
    assert set(LOCAL) <= set(doc["env"])
    (job,) = doc["jobs"].values()
    env = _values(doc["env"], site, main_branch)
    steps, setup = [], set()
    for step in job["steps"]:
        condition = step.get("if")
        assert condition in (None, GITHUB_MAIN_ONLY), condition
        raw_env = step.get("env", {})
        if any("secrets." in str(v) for v in raw_env.values()):
            assert condition == GITHUB_MAIN_ONLY, f"{step.get('name')}: a secret on forks"
        if "run" not in step:
            assert "uses" in step
            continue
        assert "${{" not in step["run"], step["name"]
        if "banger-build" not in step["run"]:
            setup.add(step["name"])
            continue
        if condition is not None and not main_branch:
            continue
        steps.append(Step(step["name"], step["run"], {**env, **_values(raw_env, site, True)}))
    assert setup == GITHUB_SETUP
    return steps


def gitlab_steps(doc: dict[Any, Any], site: Site, main_branch: bool) -> list[Step]:
    assert set(LOCAL) <= set(doc["variables"])
    job = doc["rootfs"]
    main_rule, mr_rule = job["rules"]
    assert main_rule == {"if": GITLAB_MAIN_RULE, "variables": {"PUBLISH": "yes"}}
    assert mr_rule == {"if": GITLAB_MR_RULE}
    rule = main_rule if main_branch else mr_rule
    env = _values({**doc["variables"], **rule.get("variables", {})}, site, main_branch)
    if main_branch:  # a project variable of type File: the path of a file holding it
        env[SECRET] = str(site.secret_file)
    script = "\n".join(job["script"])
    assert "banger-build" not in "\n".join(job["before_script"]).replace("banger-build==", "")
    return [Step("rootfs: script", script, env, expand=True)]


# -- playing them ----------------------------------------------------------------------


def play(site: Site, example: str, runner: str, main_branch: bool) -> Run:
    """Play ``example`` in a fresh runner (its own HOME and checkout)."""
    base = site.tmp / runner
    home, checkout, temp = base / "home", base / "checkout", base / "runner-temp"
    home.mkdir(parents=True)
    temp.mkdir()
    (base / "docker").mkdir()
    shutil.copytree(site.project, checkout, symlinks=True)
    platform = {
        "PATH": site.path(),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "CI": "true",
        "DOCKER_CONFIG": str(base / "docker"),  # no credentials: the local registry needs none
        "XDG_CONFIG_HOME": str(base / "config"),
        "RUNNER_TEMP": str(temp),
        "CI_PROJECT_DIR": str(checkout),
    }
    doc = load(example)
    if example.startswith("github"):
        steps = github_steps(doc, site, main_branch)
    else:
        steps = gitlab_steps(doc, site, main_branch)
    site.calls.write_text("")
    run = Run()
    started = time.monotonic()
    for i, step in enumerate(steps):
        env = dict(platform)
        for name, value in step.env.items():
            env[name] = Template(value).substitute(env) if step.expand else value
        script = base / f"step-{i}.sh"
        script.write_text(step.script)
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-euo", "pipefail", str(script)],
            cwd=checkout, env=env, capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        run.outputs.append((step.name, proc.stdout, proc.stderr))
        assert proc.returncode == 0, f"{example} {runner}: {step.name}:\n{proc.stderr[-4000:]}"
    run.seconds = time.monotonic() - started
    run.calls = [json.loads(line) for line in site.calls.read_text().splitlines()]
    return run


SHIM = """#!{python}
import json, os, sys
with open({log!r}, "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
sys.path.insert(0, {repo!r})
from banger_build.cli import entry_point
sys.exit(entry_point())
"""

FAKE_QEMU = """#!/bin/sh
# stands in for qemu: records its arguments, prints what the image would print
printf '%s\\n' "$*" >> {log}
echo 'Linux version 6.1.0 (a stand-in for qemu)'
echo '{text}'
"""


def make_site(tmp: Path, registry: RegistryServer, example: str, *, kernel: Path | None) -> Site:
    """The project (recipe, lock, kernel files), the keys and the stand-ins; ``kernel``:
    a directory with a real vmlinuz and initrd.img to boot with qemu (else fakes)."""
    project = tmp / "project"
    (project / ".git").mkdir(parents=True)  # a repository: the recipe's sources live in it
    kdir = project / "kernel"
    kdir.mkdir()
    if kernel is None:
        image = push(registry, f"ci-examples/fast-{os.getpid()}", [BASE, UPPER])
        (kdir / "vmlinuz").write_bytes(b"a kernel image " * 100)
        (kdir / "initrd.img").write_bytes(b"an initramfs " * 100)
        expect = BOOT_TEXT
    else:
        from tests.test_boot import MARKER, busybox_layer

        image = push_image(registry.url, f"ci-examples/busybox-{os.getpid()}", "v1",
                           [busybox_layer()])  # fmt: skip
        shutil.copyfile(kernel / "vmlinuz", kdir / "vmlinuz")
        shutil.copyfile(kernel / "initrd.img", kdir / "initrd.img")
        expect = MARKER  # its /sbin/init prints it, then powers off
    ref = f"{registry.host}/{image.repo}:{image.tag}"
    kernel_table = '\n[kernel]\npath = "kernel/vmlinuz"\ninitrd = "kernel/initrd.img"\n'
    if kernel is None:  # files, a template, a symlink: the e2e recipe
        recipe = write_recipe(project, ref, extra=kernel_table, name="rootfs.toml")
    else:  # busybox has no /etc/passwd for the e2e recipe's owners: the image as it is
        recipe = project / "rootfs.toml"
        recipe.write_text(
            f'version = 1\nname = "ci-busybox"\n\n[image]\nref = "{ref}"\n{kernel_table}'
        )
    setup_home = tmp / "setup-home"
    assert main(["lock", str(recipe), "--home", str(setup_home)]) == 0  # as committed
    assert (project / "rootfs.lock").is_file()
    secret = tmp / "ci-1.key"
    assert main(["key", "generate", "ci-1", "-o", str(secret)]) == 0
    shim = tmp / "bin"
    shim.mkdir()
    calls = tmp / "calls.jsonl"
    (shim / "banger-build").write_text(
        SHIM.format(python=sys.executable, log=str(calls), repo=str(REPO))
    )
    (shim / "banger-build").chmod(0o755)
    fake = None
    if kernel is None:
        fake = tmp / "fake-qemu"
        fake.mkdir()
        (fake / "qemu-system-x86_64").write_text(
            FAKE_QEMU.format(log=tmp / "qemu-args.log", text=BOOT_TEXT)
        )
        (fake / "qemu-system-x86_64").chmod(0o755)
    cache = f"{registry.host}/ci-examples/{Path(example).stem}-{os.getpid()}-{tmp.name[-12:]}"
    return Site(
        tmp=tmp,
        project=project,
        shim=shim,
        calls=calls,
        fake_qemu=fake,
        local={
            "RECIPE": "rootfs.toml",
            "BOOT_EXPECT": expect,
            "BANGER_CACHE": cache.lower(),
            "BANGER_TRUSTED_KEY": (tmp / "ci-1.key.pub").read_text().strip(),
        },
        secret_text=secret.read_text().strip(),
        secret_file=secret,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tags(registry: RegistryServer, cache: str) -> list[str]:
    repo = cache.partition("/")[2]
    resp = Pusher(registry.url, repo).request("GET", f"/v2/{repo}/tags/list", ok=(200, 404))
    return sorted(resp.json().get("tags") or []) if resp.status_code == 200 else []


def result_of(run: Run) -> dict[str, Any]:
    (result,) = [e for e in run.events() if e["event"] == "result"]
    return result


@pytest.mark.parametrize("example", ["github-actions.yml", "gitlab-ci.yml"])
@pytest.mark.parametrize("boot", ["stand-in-qemu", pytest.param("qemu", marks=pytest.mark.slow)])
def test_main_builds_pushes_and_signs_then_a_fork_substitutes(
    tmp_path: Path,
    registry: RegistryServer,
    request: pytest.FixtureRequest,
    example: str,
    boot: str,
) -> None:
    kernel = None
    if boot == "qemu":
        kernel = request.getfixturevalue("debian_kernel_files").vmlinuz.parent
    site = make_site(tmp_path, registry, example, kernel=kernel)
    cache = site.local["BANGER_CACHE"]
    assert tags(registry, cache) == []

    # -- a push to main: built, checked, booted, pushed, signed, catalogued
    main_run = play(site, example, "main", main_branch=True)
    assert [c[0] for c in main_run.calls] == ["build", "check", "boot", "push", "catalog"]
    built = result_of(main_run)
    assert built["status"] == "built"
    path = Path(built["path"])
    assert "is reproducible" in main_run.text()
    if site.fake_qemu is not None:
        booted = (tmp_path / "qemu-args.log").read_text().splitlines()[-1].split()
        kernel_arg = tmp_path / "main" / "checkout" / booted[booted.index("-kernel") + 1]
        assert kernel_arg.resolve() == path / "vmlinux"  # ./result/vmlinux
        assert "-drive" in booted  # a copy of rootfs.ext4, not the store's
    catalog = json.loads((tmp_path / "main" / "checkout" / "catalog.json").read_text())
    (entry,) = catalog["entries"]
    assert entry["store_path"] == path.name and entry["signers"] == ["ci-1"]
    assert entry["ref"].startswith(f"{cache}@sha256:")
    digest = entry["ref"].partition("@sha256:")[2]
    # the key tag, and the signature's fallback referrers index (no referrers API here)
    assert tags(registry, cache) == sorted([rootfs.key_tag(built["key"]), f"sha256-{digest}"])
    assert entry["rootfs"]["sha256"] == sha256(path / "rootfs.ext4")
    assert set(entry["kernel"]["files"]) == {"vmlinux", "initrd.img"}
    assert (
        main(["verify", entry["ref"], "--home", str(tmp_path / "verifier"),
              "--trusted-key", site.local["BANGER_TRUSTED_KEY"]])
        == 0
    )  # fmt: skip
    pushed = tags(registry, cache)

    # -- a pull request from a fork, no secrets: the signed path is substituted
    fork_run = play(site, example, "fork", main_branch=False)
    assert [c[0] for c in fork_run.calls] == ["build", "check", "boot"]
    taken = result_of(fork_run)
    assert taken["status"] == "substituted", fork_run.text()[-3000:]
    assert Path(taken["path"]).name == path.name
    assert str(tmp_path / "fork") in taken["path"]  # the fork's own store
    for output in ("rootfs.ext4", "manifest.json", "vmlinux", "initrd.img"):
        assert sha256(Path(taken["path"]) / output) == sha256(path / output)
    timings = {e["step"] for e in fork_run.events() if e["event"] == "timing"}
    assert "make filesystem" not in timings and "pull layers" not in timings
    assert "is reproducible" in fork_run.text()
    assert not (tmp_path / "fork" / "checkout" / "catalog.json").exists()
    assert tags(registry, cache) == pushed  # the fork pushed nothing

    for run in (main_run, fork_run):
        assert site.secret_text.split(":")[1] not in run.text()  # the secret reaches no log
        assert "boot ok under" in run.text()
        if site.fake_qemu is None:  # a real boot: the initramfs mounted the image
            assert "banger-initrd: mounted /dev/vda (rw)" in run.text()
            assert site.local["BOOT_EXPECT"] in run.text()
    booted_lines = [x for x in main_run.text().splitlines() if "boot ok under" in x]
    print(booted_lines[-1].strip())
    print(
        f"{example} ({boot}): main {main_run.seconds:.1f} s (built, checked, booted, pushed, "
        f"signed, catalogued), fork {fork_run.seconds:.1f} s (substituted, checked, booted)"
    )
