"""The store: atomic publish, read-only entries, locks, out-links."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from banger_build.errors import StoreError
from banger_build.store import MANIFEST, Store, set_out_link


def _built(store: Store, key: str) -> Path:
    with store.build_dir(key) as work:
        out = work / "out"
        out.mkdir()
        (out / "rootfs.ext4").write_bytes(b"img")
        (out / MANIFEST).write_text("{}")
        return store.publish(out, key, "name")


def test_publish_is_one_rename_and_read_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    path = _built(store, "a" * 32)
    assert path == store.path_for("a" * 32, "name") and store.lookup("a" * 32, "name") == path
    assert path.stat().st_mode & 0o777 == 0o555
    assert (path / "rootfs.ext4").stat().st_mode & 0o777 == 0o444
    assert list(store.tmp.iterdir()) == []  # the build dir is gone


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    with pytest.raises(RuntimeError), store.build_dir("b" * 32) as work:
        (work / "out").mkdir()
        (work / "out" / "partial").write_bytes(b"x")
        os.chmod(work / "out", 0o555)
        raise RuntimeError("boom")
    assert list(store.tmp.iterdir()) == [] and list(store.store.iterdir()) == []
    assert store.lookup("b" * 32, "name") is None


def test_losing_a_publish_race_uses_the_winner(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    first = _built(store, "c" * 32)
    second = _built(store, "c" * 32)
    assert first == second and (first / "rootfs.ext4").read_bytes() == b"img"


def test_lock_serialises_builds_of_one_key(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    events: list[str] = []
    waited = threading.Event()

    def other() -> None:
        with store.key_lock("d" * 32, on_wait=waited.set):
            events.append("other")

    with store.key_lock("d" * 32):
        t = threading.Thread(target=other)
        t.start()
        assert waited.wait(5)
        time.sleep(0.1)
        events.append("first")
    t.join(5)
    assert events == ["first", "other"]


def test_out_link_replaces_links_but_never_files(tmp_path: Path) -> None:
    target1, target2 = tmp_path / "t1", tmp_path / "t2"
    target1.mkdir()
    target2.mkdir()
    link = tmp_path / "result"
    set_out_link(link, target1)
    set_out_link(link, target2)
    assert os.readlink(link) == str(target2)
    real = tmp_path / "real"
    real.write_text("mine")
    with pytest.raises(StoreError):
        set_out_link(real, target1)
    assert real.read_text() == "mine"


def test_an_out_link_in_a_missing_directory_makes_it(tmp_path: Path) -> None:
    """`-o out/debian` from a fresh checkout: out/ is made, as `mkdir -p` would."""
    target = tmp_path / "t"
    target.mkdir()
    set_out_link(tmp_path / "out" / "deeper" / "debian", target)
    assert os.readlink(tmp_path / "out" / "deeper" / "debian") == str(target)
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError) as info:
        set_out_link(tmp_path / "file" / "link", target)
    assert info.value.reason == "out-link" and "cannot create out-link" in str(info.value)
