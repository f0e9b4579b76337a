"""Memory per entry of the image: what bounds a build's peak (issue 8: under 1 KiB).

Not timing-based: tracemalloc counts the Python heap while a real layer of
many small files spread over directories is flattened, sized and written as
ext4. bench/bench_memory.py measures the whole pipeline's peak RSS on
200,000 entries.
"""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from pathlib import Path

from banger_build import ext4
from banger_build.flatten import Flattener
from banger_build.spool import Spool
from tests.support.ext4read import fsck
from tests.support.tarlayer import MTIME, layer_from_tar

DIRS, FILES = 100, 200
#: Bytes of Python heap per entry allowed at the peak; measured about 350.
BOUND = 1024


def _layer(tmp: Path) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in range(DIRS):
            info = tarfile.TarInfo(f"usr/share/d{d:03d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(info)
            for f in range(FILES):
                data = b"%d\n" % f
                info = tarfile.TarInfo(f"usr/share/d{d:03d}/file-{f:05d}.txt")
                info.size, info.mode, info.mtime = len(data), 0o644, MTIME + f
                tar.addfile(info, io.BytesIO(data))
    return layer_from_tar(tmp, raw.getvalue(), "none").path


def test_flatten_size_and_write_stay_under_a_kib_per_entry(tmp_path: Path) -> None:
    layer = layer_from_tar(tmp_path, _layer(tmp_path).read_bytes(), "none")
    entries = DIRS * (FILES + 1) + 3  # and /, usr, usr/share
    image = tmp_path / "img"
    tracemalloc.start()
    try:
        with Spool(tmp_path / "spool") as spool:
            f = Flattener(spool, 1)
            f.apply(layer)
            plan = ext4.plan_size(f.tree, auto=True, size=0)
            written = ext4.write_image(
                image,
                f.tree,
                spool,
                plan,
                fs_uuid=ext4.derived_uuid("k", "fs-uuid"),
                hash_seed=ext4.derived_uuid("k", "hash-seed"),
                epoch=1,
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written.inodes == entries + 1 + 9  # lost+found, and the reserved 1..10 but 2
    assert fsck(image).returncode == 0
    assert peak / entries < BOUND, f"{peak / entries:.0f} bytes per entry"
