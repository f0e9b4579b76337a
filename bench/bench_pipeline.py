"""Benchmark: banger-build's flatten + ext4 stages against a peer, in one run.

The peer is what a root user would do by hand: GNU ``tar -xpf`` of each layer
(no whiteout handling, no checks) and a plain ``mkfs.ext4 -d`` of the result.
We report wall time and peak memory of both, and their ratios:

    python bench/bench_pipeline.py [--layers L1.tar.gz L2 ...] [--repeat 3]

Without ``--layers`` it packs a real tree (``/usr`` of this machine, first
N files) into one gzip layer, so it runs anywhere. Targets: flatten within
2x of GNU tar, the whole pipeline within 3x of tar+mkfs, and peak RSS under
256 MiB regardless of image size (layers are streamed).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {"flatten_vs_tar": 2.0, "pipeline_vs_tar_mkfs": 3.0, "peak_rss_mib": 256}


def make_layer(src: Path, out: Path, limit: int, max_file: int = 1 << 20) -> Path:
    count = 0
    with (
        open(out, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for name in sorted(filenames) + dirnames:
                path = os.path.join(dirpath, name)
                if os.path.isfile(path) and os.path.getsize(path) > max_file:
                    continue
                try:
                    tar.add(path, arcname=os.path.relpath(path, src.parent), recursive=False)
                except OSError:
                    continue
                count += 1
            if count >= limit:
                break
    return out


PEER = """
import json, resource, subprocess, time
from pathlib import Path
root = Path({work!r}) / "peer-root"
root.mkdir()
t0 = time.perf_counter()
for layer in {layers!r}:
    subprocess.run(["tar", "-xpf", layer, "-C", str(root)], check=True)
t_tar = time.perf_counter() - t0
size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
image = Path({work!r}) / "peer.ext4"
with open(image, "wb") as f:
    f.truncate(max(64 << 20, size * 2))
subprocess.run(["mkfs.ext4", "-F", "-q", "-d", str(root), str(image)], check=True,
               env={{"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}})
t_all = time.perf_counter() - t0
print(json.dumps({{"tar": t_tar, "all": t_all,
                  "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}}))
"""


def _child(code: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


OURS = """
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from banger_build import ext4
from banger_build.flatten import Flattener, LayerInput
from banger_build.oci.reference import Digest
work = Path({work!r})
t0 = time.perf_counter()
f = Flattener(work / "staging", 1)
for i, p in enumerate({layers!r}):
    f.apply(LayerInput(Digest({digests!r}[i]), Path(p)))
t_flat = time.perf_counter() - t0
plan = ext4.plan_size(f.tree, auto=True, size=0)
image = work / "ours.ext4"
ext4.make_filesystem(image, work / "staging", plan, key="b" * 32, epoch=1, workdir=work)
extra = ext4.assign_inodes(image, f.tree, epoch=1)
ext4.make_special_nodes(image, f.tree, epoch=1)
ext4.apply_metadata(image, f.tree, extra, epoch=1, workdir=work)
ext4.check_filesystem(image)
t_all = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tools = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({{"flatten": t_flat, "all": t_all, "rss": rss, "tools": tools}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", nargs="*", type=Path)
    ap.add_argument("--files", type=int, default=10000, help="files in the generated layer")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="banger-bench-") as tmp_s:
        tmp = Path(tmp_s)
        layers = args.layers or [make_layer(Path("/usr"), tmp / "usr.tar.gz", args.files)]
        digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in layers]
        rows = []
        for _ in range(args.repeat):
            for d in ("ours", "peer"):
                shutil.rmtree(tmp / d, ignore_errors=True)
                (tmp / d).mkdir()
            code = OURS.format(
                repo=str(Path(__file__).resolve().parents[1]),
                work=str(tmp / "ours"),
                layers=[str(p) for p in layers],
                digests=digests,
            )
            ours = _child(code)
            peer = _child(PEER.format(work=str(tmp / "peer"), layers=[str(p) for p in layers]))
            t_tar, t_peer, peer_rss = peer["tar"], peer["all"], peer["rss"]
            rows.append(
                (ours["flatten"], ours["all"], ours["rss"], t_tar, t_peer, ours["tools"], peer_rss)
            )
        best = [min(r[i] for r in rows) for i in range(7)]
        result = {
            "layers": [str(p) for p in layers],
            "ours_flatten_s": round(best[0], 3),
            "peer_tar_s": round(best[3], 3),
            "flatten_vs_tar": round(best[0] / best[3], 2),
            "ours_pipeline_s": round(best[1], 3),
            "peer_tar_mkfs_s": round(best[4], 3),
            "pipeline_vs_tar_mkfs": round(best[1] / best[4], 2),
            "peak_rss_mib": round(best[2] / 1024, 1),
            "peak_rss_tools_mib": round(best[5] / 1024, 1),
            "peer_peak_rss_mib": round(best[6] / 1024, 1),
        }
        result["targets_met"] = all(
            result[k] <= v
            for k, v in TARGETS.items()  # type: ignore[operator]
        )
        print(json.dumps(result, indent=2))
        return 0 if result["targets_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
