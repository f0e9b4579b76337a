"""The store cannot be poisoned or raced: inputs are verified as they are copied,
gc beside running builds never removes what they use or print, and stale temp
dirs, partial downloads and temp roots of dead processes are collected."""

from __future__ import annotations

import hashlib
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from banger_build import context
from banger_build.build import BuildOptions, build
from banger_build.errors import BangerError, Reason
from banger_build.fsutil import remove_tree, walk
from banger_build.gc import collect
from banger_build.progress import Reporter
from banger_build.store import Store, live_temp_roots
from tests.support.e2e import run_cli, write_recipe
from tests.support.ext4read import read_image
from tests.support.fakefsck import assert_no_leftovers, fake_e2fsck, gone

REPO = Path(__file__).resolve().parents[1]
#: the module (``banger_build.build`` as an attribute is the API function)
buildmod = importlib.import_module("banger_build.build")


def _options(home: Path, link: Path | None = None) -> BuildOptions:
    return BuildOptions(home=home, out_link=link)


def test_a_source_changed_during_the_build_never_enters_the_store(
    tmp_path: Path, image_ref: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    source = tmp_path / "r" / "hello.txt"
    original = source.read_bytes()

    def tamper(ctx: context.Context) -> None:  # after resolve hashed it, before it is copied
        source.write_bytes(b"evil bytes\n")

    monkeypatch.setattr(buildmod, "BUILD", (tamper, *buildmod.BUILD))
    home = tmp_path / "home"
    with pytest.raises(BangerError) as exc:
        build(recipe, _options(home), Reporter(quiet=True))
    assert exc.value.reason is Reason.INPUT_CHANGED
    assert str(source) in str(exc.value) and "/etc/hello" in str(exc.value)
    assert list((home / "store").iterdir()) == []
    assert list((home / "tmp").iterdir()) == []

    # the original content builds the original key with the original bytes
    monkeypatch.setattr(buildmod, "BUILD", buildmod.BUILD[1:])
    source.write_bytes(original)
    result = build(recipe, _options(home), Reporter(quiet=True))
    assert not result.cached
    image = read_image(result.path / "rootfs.ext4", contents=True)
    assert image["etc/hello"].sha256 == hashlib.sha256(original).hexdigest()


def test_a_kernel_changed_during_the_build_never_enters_the_store(
    tmp_path: Path, image_ref: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = tmp_path / "r" / "vmlinux"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(b"kernel one")
    recipe = write_recipe(tmp_path / "r", image_ref, extra='[kernel]\npath = "vmlinux"\n')

    def tamper(ctx: context.Context) -> None:
        kernel.write_bytes(b"kernel two")

    monkeypatch.setattr(buildmod, "BUILD", (tamper, *buildmod.BUILD))
    with pytest.raises(BangerError) as exc:
        build(recipe, _options(tmp_path / "home"), Reporter(quiet=True))
    assert exc.value.reason is Reason.INPUT_CHANGED and str(kernel) in str(exc.value)
    assert list((tmp_path / "home" / "store").iterdir()) == []


def test_gc_in_a_loop_beside_concurrent_builds(tmp_path: Path, image_ref: str) -> None:
    """Every build succeeds and every path it prints and links exists afterwards."""
    home = tmp_path / "home"
    recipes = []
    for i in range(4):
        recipe = write_recipe(tmp_path / f"r{i}", image_ref)
        (tmp_path / f"r{i}" / "hello.txt").write_text(f"builder {i}\n")  # distinct keys
        recipes.append(recipe)
    stop = threading.Event()
    gc_runs = 0
    gc_errors: list[BaseException] = []

    def gc_loop() -> None:
        nonlocal gc_runs
        store = Store(home)
        while not stop.is_set():
            try:
                collect(store)
                gc_runs += 1
            except BaseException as exc:  # reported by the test
                gc_errors.append(exc)
                return

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    collector = threading.Thread(target=gc_loop)
    collector.start()
    try:
        failures = []
        for _ in range(3):
            procs = []
            for i, recipe in enumerate(recipes):
                link = tmp_path / f"result-{i}"  # removed and remade each round
                argv = [sys.executable, "-m", "banger_build", str(recipe), "-q", "-o", str(link)]
                argv += ["--home", str(home)]
                pipe = subprocess.PIPE
                proc = subprocess.Popen(argv, env=env, stdout=pipe, stderr=pipe, text=True)
                procs.append((link, proc))
            for link, proc in procs:
                out, err = proc.communicate(timeout=300)
                printed = Path(out.strip()) if out.strip() else None
                ok = proc.returncode == 0 and printed is not None and printed.is_dir()
                ok = ok and link.resolve() == printed and (printed / "rootfs.ext4").is_file()
                if not ok:
                    failures.append((proc.returncode, out, err))
            # unroot this round's paths: the next round rebuilds what gc took
            for link, _ in procs:
                link.unlink(missing_ok=True)
    finally:
        stop.set()
        collector.join(60)
    assert gc_errors == []
    assert failures == [], "\n".join(err for _, _, err in failures[:3])
    assert gc_runs > 3


def _hold_temp_dir(home: Path) -> subprocess.Popen[str]:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from banger_build.store import Store\n"
        "s = Store(Path(sys.argv[1]))\n"
        "s.temp_roots.add('ab' * 32)\n"
        "with s.temp_dir('kernel-push') as d:\n"
        "    (d / 'blob').write_bytes(b'x' * 4096)\n"
        "    print(d, flush=True)\n"
        "    time.sleep(600)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(home)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_gc_keeps_what_a_live_process_holds_and_collects_it_after_kill_9(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = Store(home)
    blob = store.blobs / "sha256" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"in use")
    partial = store.blobs / "tmp"
    partial.mkdir()
    (partial / "0123456789abcdef.xyz.part").write_bytes(b"\0" * 100_000)  # a killed pull's
    holder = _hold_temp_dir(home)
    try:
        assert holder.stdout is not None
        held = Path(holder.stdout.readline().strip())
        report = collect(store)
        assert held.is_dir() and blob.exists()  # a live temp dir and a live temp root
        assert not (partial / "0123456789abcdef.xyz.part").exists()
        assert report.tmp_deleted == 1 and report.tmp_bytes >= 100_000
        assert "ab" * 32 in live_temp_roots(store, prune=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    report = collect(store)
    assert not held.exists() and not blob.exists()
    assert report.tmp_deleted == 1 and report.blobs_deleted == 1
    assert list(store.temproots.iterdir()) == []


def test_gc_reports_what_it_cannot_remove_and_goes_on(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs: run the suite as root (CI does)")
    home = tmp_path / "home"
    store = Store(home)
    stale = store.tmp / "build-stale"
    busy = stale / "mnt"
    busy.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(busy)], check=True)
    try:
        (store.tmp / "other-stale").mkdir()
        code, out, err = run_cli(home, "gc")
        assert code == 1, err
        assert f"could not remove {busy}: Device or resource busy" in out
        assert not (store.tmp / "other-stale").exists()
    finally:
        subprocess.run(["umount", str(busy)], check=True)
    assert run_cli(home, "gc")[0] == 0 and not stale.exists()


def test_trees_deeper_than_the_recursion_limit_and_path_max(tmp_path: Path) -> None:
    top = tmp_path / "deep"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for i in range(1500):  # 1500 levels of 200-byte names: 300 KB paths
        name = f"{i:04d}" + "d" * 196
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    assert sum(1 for e in walk(top) if e.is_dir) == 1500
    assert sys.getrecursionlimit() < 1500
    removal = remove_tree(top)
    assert removal.ok and not top.exists()


def test_publish_fsyncs_files_and_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "home")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    with store.build_dir("e" * 32) as work:
        out = work / "out"
        (out / "sub").mkdir(parents=True)
        (out / "rootfs.ext4").write_bytes(b"img")
        (out / "sub" / "f").write_bytes(b"f")
        (out / "manifest.json").write_text("{}")
        monkeypatch.setattr(os, "fsync", fsync)
        final = store.publish(out, "e" * 32, "n")
    names = {Path(p).name for p in synced}
    assert {"rootfs.ext4", "f", "sub", "manifest.json", "out", "store"} <= names
    assert final.is_dir()


def test_signal_in_a_build_leaves_no_temp_dir_and_no_child(tmp_path: Path, image_ref: str) -> None:
    """SIGTERM and SIGHUP while e2fsck runs (--fsck): exit 128+n, the tool's whole
    process group gone, the build's temp dir removed, nothing in the store."""
    marker = tmp_path / "fsck-started"
    fake = fake_e2fsck(
        tmp_path, f"sleep 600 &\necho $$ $! > {marker}\nwait\n"
    )  # a child of its own, like a real tool's helpers
    recipe = write_recipe(tmp_path / "r", image_ref)
    env = {**os.environ, "PYTHONPATH": str(REPO), **fake}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        marker.unlink(missing_ok=True)
        home = tmp_path / f"home-{sig.name}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "banger_build", str(recipe), "--no-link", "--fsck",
             "--home", str(home)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate()
        time.sleep(0.2)
        pids = [int(p) for p in marker.read_text().split()]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + sig, err
        assert f"interrupted by {sig.name}" in err and "Traceback" not in err
        for pid in pids:
            assert gone(pid)
        assert_no_leftovers(home)


def test_an_interrupted_gc_never_leaves_a_path_that_looks_built(tmp_path: Path) -> None:
    """gc takes a path out of the store in one rename: if its removal stops half
    way (here a mount point it cannot remove), the store has no trace of it and a
    rebuild publishes afresh."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs: run the suite as root (CI does)")
    store = Store(tmp_path / "home")
    key = "f" * 32
    with store.build_dir(key) as work:
        out = work / "out"
        (out / "mnt").mkdir(parents=True)
        (out / "manifest.json").write_text("{}")
        (out / "rootfs.ext4").write_bytes(b"img")
        path = store.publish(out, key, "n")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(path / "mnt")], check=True)
    try:
        report = collect(store)
        assert report.failures and "Device or resource busy" in report.failures[0]
        assert store.lookup(key, "n") is None and not path.exists()
        with store.build_dir(key) as work:  # the key builds again
            out = work / "out"
            out.mkdir()
            (out / "manifest.json").write_text("{}")
            assert store.publish(out, key, "n") == path
    finally:
        busy = next(store.tmp.glob(f"gc-{path.name}-*"))
        subprocess.run(["umount", str(busy / "mnt")], check=True)
    collect(store, older_than=3600)  # the rebuilt path is new: kept; the leftover goes
    assert list(store.tmp.iterdir()) == [] and path.exists()


def test_a_store_path_without_its_manifest_is_collected_and_rebuilt(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    broken = store.path_for("a" * 32, "n")
    (broken / "sub").mkdir(parents=True)
    os.chmod(broken, 0o555)
    assert store.lookup("a" * 32, "n") is None
    with store.build_dir("a" * 32) as work:  # publish clears it under the key lock
        out = work / "out"
        out.mkdir()
        (out / "manifest.json").write_text("{}")
        assert store.publish(out, "a" * 32, "n") == broken
    other = store.path_for("b" * 32, "n")
    other.mkdir()
    report = collect(store)
    assert not other.exists() and report.tmp_deleted == 1 and report.failures == []


def test_gc_through_another_spelling_of_the_home_keeps_rooted_paths(
    tmp_path: Path, image_ref: str
) -> None:
    real = tmp_path / "real-home"
    real.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(real)
    recipe = write_recipe(tmp_path / "r", image_ref)
    code, out, err = run_cli(alias, str(recipe), "-o", str(tmp_path / "result"), "-q")
    assert code == 0, err
    assert run_cli(real, "gc")[0] == 0
    assert (tmp_path / "result" / "rootfs.ext4").is_file()
    assert run_cli(alias, "check", str(tmp_path / "result"), "-q")[0] == 0
