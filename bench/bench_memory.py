"""Benchmark: peak memory per entry of the image, for the flatten + ext4 stages.

Issue 8's bound: a build's peak memory under 1 KiB per entry of the image on
200,000 entries. The layer is generated: small files spread over directories
(200 directories of 1,000 files by default; ``--dirs 1 --files 100000`` puts
100,000 in one directory).

    python bench/bench_memory.py [--dirs 200] [--files 1000] [--tracemalloc]

The pipeline runs in a child process (flatten, size, write ext4, and e2fsck,
a child of its own not counted), whose peak RSS (ru_maxrss) is divided
by the entries of the image. ``--tracemalloc`` adds the Python heap's peak per
stage (about 4x slower). Exit status 1 if the bound is not met.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

BOUND = 1024  # bytes of peak RSS per entry


def make_layer(out: Path, dirs: int, files: int) -> int:
    """A gzip layer of ``dirs`` x ``files`` small files; returns its entries."""
    with (
        open(out, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for d in range(dirs):
            info = tarfile.TarInfo(f"usr/share/d{d:04d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
            for f in range(files):
                data = b"%d\n" % f
                info = tarfile.TarInfo(f"usr/share/d{d:04d}/file-{f:05d}.txt")
                info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return dirs * (files + 1) + 3  # with /, usr and usr/share


CHILD = """
import json, resource, sys, time, tracemalloc
from pathlib import Path
sys.path.insert(0, {repo!r})
from banger_build import ext4
from banger_build.flatten import Flattener, LayerInput
from banger_build.oci.reference import Digest
from banger_build.spool import Spool
work, trace = Path({work!r}), {trace!r}
stages = {{}}
t0 = time.perf_counter()
def mark(name):
    heap = tracemalloc.get_traced_memory()[1] if trace else 0
    stages[name] = {{
        "s": round(time.perf_counter() - t0, 2),
        "rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "heap_peak_mib": round(heap / 2**20, 1),
    }}
if trace:
    tracemalloc.start()
mark("start")
spool = Spool(work / "spool")
f = Flattener(spool, 1)
f.apply(LayerInput(Digest("0" * 64), Path({layer!r})))
mark("flatten")
plan = ext4.plan_size(f.tree, auto=True, size=0)
mark("size")
image = work / "rootfs.ext4"
written = ext4.write_image(
    image, f.tree, spool, plan, fs_uuid=ext4.derived_uuid("b" * 32, "fs-uuid"),
    hash_seed=ext4.derived_uuid("b" * 32, "hash-seed"), epoch=1,
)
inodes = written.inodes
mark("write ext4")
ext4.check_filesystem(image)
mark("fsck")
print(json.dumps({{"inodes": inodes, "stages": stages,
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dirs", type=int, default=200)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--tracemalloc", action="store_true", help="also the Python heap's peak")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="banger-bench-mem-") as tmp_s:
        tmp = Path(tmp_s)
        # in a process of its own: a child's ru_maxrss starts from its parent's RSS
        gen = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); " + (
            "from bench_memory import make_layer; from pathlib import Path; "
            f"print(make_layer(Path({str(tmp / 'layer.tar.gz')!r}), {args.dirs}, {args.files}))"
        )
        made = subprocess.run([sys.executable, "-c", gen], check=True, capture_output=True)
        entries = int(made.stdout)
        (tmp / "work").mkdir()
        code = CHILD.format(
            repo=str(Path(__file__).resolve().parents[1]),
            work=str(tmp / "work"),
            layer=str(tmp / "layer.tar.gz"),
            trace=args.tracemalloc,
        )
        proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    per_entry = out["peak_rss"] / entries
    result = {
        "entries": entries,
        "inodes": out["inodes"],
        "peak_rss_mib": round(out["peak_rss"] / 2**20, 1),
        "peak_rss_bytes_per_entry": round(per_entry),
        "bound_bytes_per_entry": BOUND,
        "stages": out["stages"],
        "bound_met": per_entry < BOUND,
    }
    print(json.dumps(result, indent=2))
    return 0 if result["bound_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
