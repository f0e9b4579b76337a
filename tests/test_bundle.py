"""The imagecat bundle: the format byte for byte, real ``zstd -d | tar -x`` gives the
store path's files back, the same bytes from two homes, constant memory, and a
damaged store path is never bundled."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import zstandard

from banger_build import bundle
from banger_build.derivation import Derivation
from banger_build.errors import StoreError
from banger_build.storepath import read_store_path
from tests.support.e2e import run_cli, write_recipe

REPO = Path(__file__).resolve().parents[1]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def built(tmp_path: Path, image_ref: str, home: str = "home") -> Path:
    recipe = write_recipe(tmp_path / "r", image_ref)
    code, out, err = run_cli(tmp_path / home, str(recipe), "--no-link")
    assert code == 0, err
    return Path(out.strip())


def fake_store_path(top: Path, size: int, data_every: int = 256 << 20) -> Path:
    """A store path (consistent manifest.json) with a sparse ``size``-byte image
    holding 64 KiB of random bytes every ``data_every`` bytes."""
    drv = Derivation({"name": "big", "epoch": 1, "platform": "linux/amd64"})
    root = top / f"{drv.key}-big"
    root.mkdir(parents=True)
    image = root / "rootfs.ext4"
    with open(image, "wb") as f:
        f.truncate(size)
        for offset in range(0, size - (64 << 10), data_every):
            f.seek(offset)
            f.write(os.urandom(64 << 10))
    manifest = {
        "format": 1,
        "key": drv.key,
        "name": "big",
        "derivation": drv.data,
        "outputs": {"rootfs.ext4": {"sha256": sha256_file(image), "size": size}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root


def cli(*args: str, env: dict[str, str] | None = None, umask: int | None = None, cwd: Path = REPO):
    """The CLI in a child process (its own umask, environment and resource usage)."""
    return subprocess.run(
        [sys.executable, "-m", "banger_build", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        umask=-1 if umask is None else umask,
        timeout=600,
        check=False,
    )


# -- the format ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 511, 512, 5015, 8**11 - 1, 8**11, 9 << 30])
def test_headers_are_what_pythons_tarfile_writes_in_pax_format(size: int) -> None:
    info = tarfile.TarInfo("rootfs.ext4")
    info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o644, 0, "", ""
    assert bundle.member_header("rootfs.ext4", size) == info.tobuf(tarfile.PAX_FORMAT)
    assert len(bundle.member_header("rootfs.ext4", size)) == (512 if size < 8**11 else 1536)


def test_the_tar_inside_is_tarfiles_archive_of_exactly_the_two_files(
    tmp_path: Path, image_ref: str
) -> None:
    path = built(tmp_path, image_ref)
    sp = read_store_path(path)
    out = io.BytesIO()
    info = bundle.write_bundle(sp, out)
    assert info.size == len(out.getvalue())
    assert info.digest.hex == hashlib.sha256(out.getvalue()).hexdigest()
    frame = zstandard.get_frame_parameters(out.getvalue())
    assert frame.content_size == info.tar_size and frame.has_checksum
    assert frame.window_size <= 1 << bundle.WINDOW_LOG  # smaller for a small tar
    tar = zstandard.ZstdDecompressor().decompress(out.getvalue())
    assert len(tar) == info.tar_size and len(tar) % 10240 == 0

    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("manifest.json", "rootfs.ext4"):
            member = tarfile.TarInfo(name)
            member.size = (path / name).stat().st_size
            member.mode, member.mtime, member.uname, member.gname = 0o644, 0, "", ""
            with open(path / name, "rb") as f:
                tf.addfile(member, f)
    assert tar == expected.getvalue()

    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = tf.getmembers()
    assert [(m.name, m.type, m.mode, m.uid, m.gid, m.mtime, m.uname, m.gname) for m in members] == [
        ("manifest.json", tarfile.REGTYPE, 0o644, 0, 0, 0, "", ""),
        ("rootfs.ext4", tarfile.REGTYPE, 0o644, 0, 0, 0, "", ""),
    ]
    assert all(not m.pax_headers and not m.issparse() for m in members)
    assert info.rootfs_sha256 == sha256_file(path / "rootfs.ext4")
    assert info.manifest_sha256 == sha256_file(path / "manifest.json")


def test_worker_count_and_write_sizes_never_change_the_bytes() -> None:
    """libzstd's multi-threaded output is the same for 1, 2 or 3 workers (what lets
    the count follow the machine), and differs from single-threaded output (why
    the bundle pins multi-threaded mode)."""
    rng = hashlib.sha256(b"seed")
    parts = []
    for i in range(3 << 10):  # 48 MiB: several zstd jobs; text-like, compressible
        rng.update(i.to_bytes(4, "big"))
        parts.append((rng.hexdigest().encode() * 256)[: 16 << 10])
    data = b"".join(parts)
    outs = {w: bundle.compressor(w).compress(data) for w in (1, 2, 3)}
    assert outs[1] == outs[2] == outs[3]
    single = zstandard.ZstdCompressor(level=bundle.LEVEL, write_checksum=True).compress(data)
    assert single != outs[1]
    # the bundle's API path (a stream writer, closed once): the same bytes however the
    # input is cut into writes; a one-shot compress() of the same input differs
    streamed = []
    for step in (1 << 20, 65536, 7_000_003):
        out = io.BytesIO()
        writer = bundle.compressor(2).stream_writer(out, size=len(data), closefd=False)
        for i in range(0, len(data), step):
            writer.write(data[i : i + step])
        writer.close()
        streamed.append(out.getvalue())
    assert streamed[0] == streamed[1] == streamed[2] != outs[1]


# -- the command, with real tools --------------------------------------------------------


def test_zstd_and_tar_give_back_the_store_paths_files(tmp_path: Path, image_ref: str) -> None:
    path = built(tmp_path, image_ref)
    work = tmp_path / "work"
    work.mkdir()
    previous = os.getcwd()
    os.chdir(work)
    try:
        code, out, err = run_cli(tmp_path / "home", "bundle", str(path))
    finally:
        os.chdir(previous)
    assert code == 0, err
    key, _, name = path.name.partition("-")
    expected = f"{name}-{key}.tar.zst"
    assert out.strip() == expected  # the default: in the current directory
    archive = work / expected
    sidecar = (work / f"{expected}.sha256").read_text()
    assert sidecar == f"{sha256_file(archive)}  {expected}\n"
    subprocess.run(["sha256sum", "--check", "--status", sidecar and f"{expected}.sha256"],
                   cwd=work, check=True)  # fmt: skip
    listing = subprocess.run(
        f"zstd -dc {archive} | tar -tv --numeric-owner -f -",
        shell=True, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert [line.split()[0] + " " + line.split()[1] for line in listing] == [
        "-rw-r--r-- 0/0",
        "-rw-r--r-- 0/0",
    ]
    assert [line.split()[-1] for line in listing] == ["manifest.json", "rootfs.ext4"]
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(f"zstd -dc {archive} | tar -x -C {dest} -f -", shell=True, check=True)
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "rootfs.ext4"]
    for file in ("manifest.json", "rootfs.ext4"):
        assert (dest / file).read_bytes() == (path / file).read_bytes()


def test_output_option_and_a_recipe_built_first(tmp_path: Path, image_ref: str) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    out_dir = tmp_path / "bundles"
    out_dir.mkdir()
    code, out, err = run_cli(tmp_path / "home", "bundle", str(recipe), "-o", str(out_dir))
    assert code == 0, err
    made = Path(out.strip())
    assert made.parent == out_dir and made.name.endswith(".tar.zst")
    named = tmp_path / "my.tar.zst"
    code, out, err = run_cli(tmp_path / "home", "bundle", str(recipe), "-o", str(named))
    assert code == 0, err
    assert named.read_bytes() == made.read_bytes()
    assert (tmp_path / "my.tar.zst.sha256").read_text().endswith("  my.tar.zst\n")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_two_homes_give_byte_identical_bundles(tmp_path: Path, image_ref: str) -> None:
    recipe = write_recipe(tmp_path / "r", image_ref)
    made = []
    for n, umask in ((1, 0o022), (2, 0o077)):
        top = tmp_path / f"machine{n}"
        (top / "tmp").mkdir(parents=True)
        env = {"TMPDIR": str(top / "tmp"), "TZ": ["UTC", "Asia/Kolkata"][n - 1]}
        args = ("bundle", str(recipe), "--home", str(top / "home"), "-o", str(top / "b.tar.zst"))
        proc = cli(*args, env=env, umask=umask, cwd=top)
        assert proc.returncode == 0, proc.stderr
        made.append(top / "b.tar.zst")
    assert made[0].read_bytes() == made[1].read_bytes()
    assert (made[0].parent / "b.tar.zst.sha256").read_text() == (
        made[1].parent / "b.tar.zst.sha256"
    ).read_text()
    assert stat.S_IMODE(made[1].stat().st_mode) == 0o600  # the umask is honoured


# -- refusals ----------------------------------------------------------------------------


def _copy(path: Path, top: Path) -> Path:
    copy = top / path.name
    shutil.copytree(path, copy)
    copy.chmod(0o755)
    for f in copy.iterdir():
        f.chmod(0o644)
    return copy


def test_a_damaged_image_is_never_bundled(tmp_path: Path, image_ref: str) -> None:
    copy = _copy(built(tmp_path, image_ref), tmp_path / "copy")
    with open(copy / "rootfs.ext4", "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 1]))
    out = tmp_path / "b.tar.zst"
    code, _, err = run_cli(tmp_path / "home", "bundle", str(copy), "-o", str(out))
    assert code == 1
    assert "rootfs.ext4 is damaged" in err and "sha256" in err
    assert list(tmp_path.glob("*.tar.zst*")) == [] and list(tmp_path.glob(".b.tar.zst*")) == []


@pytest.mark.parametrize("name", ["rootfs.ext4", "manifest.json"])
def test_a_fifo_in_place_of_a_file_is_refused_without_waiting(
    tmp_path: Path, image_ref: str, name: str
) -> None:
    copy = _copy(built(tmp_path, image_ref), tmp_path / "copy")
    (copy / name).unlink()
    os.mkfifo(copy / name)
    started = time.monotonic()
    code, _, err = run_cli(tmp_path / "home", "bundle", str(copy), "-o", str(tmp_path / "b"))
    assert code == 1 and time.monotonic() - started < 5
    assert "FIFO" in err and name in err and "Traceback" not in err


def test_a_manifest_claiming_another_key_is_refused(tmp_path: Path, image_ref: str) -> None:
    copy = _copy(built(tmp_path, image_ref), tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["key"] = "0" * 32
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError) as caught:
        read_store_path(copy)
    assert caught.value.reason == "not-a-store-path" and "hashes to" in str(caught.value)


def test_a_name_that_is_no_recipe_name_is_refused(tmp_path: Path) -> None:
    drv = Derivation({"name": "../../escape", "epoch": 1, "platform": "linux/amd64"})
    root = tmp_path / "sp"
    root.mkdir()
    (root / "rootfs.ext4").write_bytes(b"")
    empty = {"sha256": hashlib.sha256().hexdigest(), "size": 0}
    manifest = {"key": drv.key, "name": "../../escape", "derivation": drv.data,
                "outputs": {"rootfs.ext4": empty}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(tmp_path / "home", "bundle", str(root))
    assert code == 1 and "is not a recipe's name" in err
    assert not list(tmp_path.rglob("*.tar.zst"))


def test_not_a_store_path(tmp_path: Path) -> None:
    code, _, err = run_cli(tmp_path / "home", "bundle", str(tmp_path))
    assert code == 1 and "not a usable store path" in err and "Traceback" not in err


# -- constant memory -----------------------------------------------------------------------


#: the CLI, then its peak RSS from /proc (VmHWM is the process's own; rusage's
#: ru_maxrss would include the forking parent's, which Linux carries across exec)
PEAK_SCRIPT = """
import sys
from banger_build.cli import main
code = main(sys.argv[1:])
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(f"PEAK_KIB={peak}", file=sys.stderr)
sys.exit(code)
"""


def _bundle_rss(path: Path, out: Path, home: Path) -> tuple[int, float]:
    """Peak RSS (bytes) and seconds of ``banger-build bundle`` in a child process."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, "bundle", str(path), "-o", str(out), "-q",
         "--home", str(home)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    peak = [x for x in proc.stderr.splitlines() if x.startswith("PEAK_KIB=")][-1]
    return int(peak.removeprefix("PEAK_KIB=")) * 1024, seconds


def test_memory_does_not_grow_with_the_image(tmp_path: Path) -> None:
    small = fake_store_path(tmp_path / "s", 256 << 20, data_every=16 << 20)
    large = fake_store_path(tmp_path / "l", 1 << 30, data_every=16 << 20)
    rss_small, _ = _bundle_rss(small, tmp_path / "s.tar.zst", tmp_path / "home")
    rss_large, seconds = _bundle_rss(large, tmp_path / "l.tar.zst", tmp_path / "home")
    print(f"peak RSS {rss_small >> 20} MiB (256 MiB image), {rss_large >> 20} MiB "
          f"(1 GiB image, {seconds:.1f} s)")  # fmt: skip
    # ~30 MiB per zstd worker (at most 4) and the interpreter: under a third of the image
    assert rss_large < 320 << 20
    assert rss_large - rss_small < 48 << 20


@pytest.mark.slow
def test_an_image_of_8_gib_or_more_gets_a_pax_size_header(tmp_path: Path) -> None:
    """Past the 11 octal digits of a ustar size field: GNU tar reads the pax record
    and gets the image back bit for bit; memory stays flat."""
    size = (8 << 30) + 4096
    path = fake_store_path(tmp_path / "sp", size, data_every=1 << 30)
    out = tmp_path / "big.tar.zst"
    rss, seconds = _bundle_rss(path, out, tmp_path / "home")
    print(f"8 GiB image: bundle {out.stat().st_size >> 20} MiB in {seconds:.1f} s, "
          f"peak RSS {rss >> 20} MiB")  # fmt: skip
    assert rss < 320 << 20
    listing = subprocess.run(
        f"zstd -dc {out} | tar -tv -f -", shell=True, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert [line.split()[2] for line in listing] == [
        str((path / "manifest.json").stat().st_size),
        str(size),
    ]
    digest = subprocess.run(
        f"zstd -dc {out} | tar -xO -f - rootfs.ext4 | sha256sum",
        shell=True, capture_output=True, text=True, check=True,
    ).stdout.split()[0]  # fmt: skip
    assert (
        digest
        == json.loads((path / "manifest.json").read_text())["outputs"]["rootfs.ext4"]["sha256"]
    )
