"""Benchmark: substitution against a cold build of the Debian fixture, in one run.

Issue 9's target: from a clean home, ``banger-build recipes/debian.toml
--substituter R --trusted-key K`` gives the store path the pushing machine
built, bit for bit, without downloading a layer of the base image, in under
half the cold build's time. Measured here on the real Debian test image
(tests/support/debian.py; built on first use), served as
docker.io/library/debian:bookworm by a local ``docker-registry`` (the
mirror), with a second one as the binary cache; each step a child process of
the CLI, timed from its start to its exit:

a. cold build of recipes/debian.toml from a clean home (blob cache empty);
b. ``push --sign-key`` of that store path to the empty cache registry;
c. the same recipe with ``--substituter``/``--trusted-key`` from another clean
   home.

Bytes downloaded are what the registries' access logs say they sent in
answer to GETs (manifests and blobs; the mirror's and the cache's apart).
Checked: (c) reports ``status: substituted`` and ran no ``make filesystem``
step; it fetched no base-image layer (the mirror's log and the home's blob
cache); every output file of (c) has the sha256 of (a)'s.

    python bench/bench_substitute.py [--repeat N] [--json]

With ``--repeat``, (a) and (c) run N times each, each from a fresh home, and
the best time counts. Prints a table; exits 1 when a check fails or the
ratio (c)/(a) is not under ``TARGET``. Needs the test support (docker-registry,
the Debian image: root on its first use).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: substitution must take under this fraction of the cold build's time
TARGET = 0.5

#: the CLI, then its own peak RSS (ru_maxrss would include the forking parent's)
PEAK = """
import sys
from banger_build.cli import main
code = main(sys.argv[1:])
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(f"PEAK_KIB={peak}", file=sys.stderr)
sys.exit(code)
"""


@dataclass(frozen=True)
class Run:
    stdout: str
    seconds: float
    peak: int  # bytes

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    @property
    def result(self) -> dict[str, Any]:
        (found,) = [e for e in self.events if e["event"] == "result"]
        return found


#: set in main: an empty DOCKER_CONFIG and XDG_CONFIG_HOME (no user config or credentials)
ISOLATED: dict[str, str] = {}


def cli(*args: str) -> Run:
    """One CLI run in a child process (no user config, no user credentials)."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **ISOLATED},
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"banger-build {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}")
    peak = [x for x in proc.stderr.splitlines() if x.startswith("PEAK_KIB=")][-1]
    return Run(proc.stdout.strip(), seconds, int(peak.removeprefix("PEAK_KIB=")) * 1024)


def digests(store_path: Path) -> dict[str, str]:
    """sha256 of every file under a store path (modules included), by relative path."""
    out = {}
    for path in sorted(store_path.rglob("*")):
        if path.is_file() and not path.is_symlink():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out[str(path.relative_to(store_path))] = h.hexdigest()
    return out


@dataclass(frozen=True)
class Traffic:
    total: int  # body bytes of every GET answered
    layers: int  # of those, base-image layer blobs
    layer_gets: int
    requests: int


def traffic(server: Any, since: int, layers: set[str]) -> Traffic:
    """What ``server`` sent since its ``since``-th logged request."""
    got = server.accesses()[since:]
    gets = [a for a in got if a.method == "GET"]
    hits = [a for a in gets if a.path.rsplit("/", 1)[-1] in layers and "/blobs/" in a.path]
    return Traffic(sum(a.size for a in gets), sum(a.size for a in hits), len(hits), len(got))


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of (a) and (c); best counts")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()

    from tests.support.debian import debian_layout, read_manifest
    from tests.support.oci import push_layout
    from tests.support.registry import RegistryServer

    layout = debian_layout()
    base_layers = {str(layer["digest"]) for layer in read_manifest(layout)[0]["layers"]}
    base_bytes = sum(int(layer["size"]) for layer in read_manifest(layout)[0]["layers"])
    failures: list[str] = []
    figures: dict[str, Any] = {"repeat": args.repeat, "target_ratio": TARGET}
    with (
        tempfile.TemporaryDirectory(prefix="bench-substitute-") as tmp,
        RegistryServer(access_log=True) as mirror,
        RegistryServer(access_log=True) as cache,
    ):
        work = Path(tmp)
        for name in ("docker", "config"):
            (work / name).mkdir()
        ISOLATED.update(DOCKER_CONFIG=str(work / "docker"), XDG_CONFIG_HOME=str(work / "config"))
        for name in ("BANGER_BUILD_SUBSTITUTERS", "BANGER_BUILD_TRUSTED_KEYS"):
            os.environ.pop(name, None)
        push_layout(mirror.url, "library/debian", "bookworm", layout)
        project = work / "project"
        (project / ".git").mkdir(parents=True)  # a project, as the checkout is
        for name in ("recipes", "templates", "agents"):
            shutil.copytree(REPO / name, project / name, symlinks=True,
                            ignore=shutil.ignore_patterns("*.lock"))  # fmt: skip
        recipe = str(project / "recipes" / "debian.toml")
        source = ("--no-link", "--json", "--mirror", f"docker.io={mirror.url}")

        # (a) cold builds, each from a clean home (the first writes the lock: all
        # runs, substitutions included, then resolve the same pins)
        cold: list[tuple[Run, Traffic]] = []
        for n in range(args.repeat):
            since = len(mirror.accesses())
            run = cli(recipe, *source, "--home", str(work / f"builder{n}"))
            cold.append((run, traffic(mirror, since, base_layers)))
            if run.result["status"] != "built":
                failures.append(f"cold build {n}: status {run.result['status']}")
        built_run, built_traffic = min(cold, key=lambda c: c[0].seconds)
        built = Path(cold[0][0].result["path"])
        built_digests = digests(built)
        for n, (run, _) in enumerate(cold[1:], 1):
            if digests(Path(run.result["path"])) != built_digests:
                failures.append(f"cold build {n} differs from cold build 0")

        # (b) push and sign to the empty cache
        cli("key", "generate", "bench-ci-1", "-o", str(work / "ci.key"))  # not timed
        public = (work / "ci.key.pub").read_text().strip()
        substituter = f"{cache.host}/bench/debian"
        secret = str(work / "ci.key")
        push = cli("push", str(built), f"{substituter}:bookworm", "--sign-key", secret,
                   "-q", "--home", str(work / "builder0"))  # fmt: skip
        artifact_ref = push.stdout.splitlines()[-1]
        artifact = requests.get(
            f"{cache.url}/v2/bench/debian/manifests/{artifact_ref.partition('@')[2]}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
            timeout=30,
        ).json()  # the cache was empty: its blobs are what the push uploaded
        bundle_bytes = int(artifact["layers"][0]["size"])
        uploaded = sum(int(d["size"]) for d in [artifact["config"], *artifact["layers"]])
        rootfs_bytes = (built / "rootfs.ext4").stat().st_size

        # (c) substitution, each from a clean home
        subs: list[tuple[Run, Traffic, Traffic, Path]] = []
        for n in range(args.repeat):
            home = work / f"taker{n}"
            since_m, since_c = len(mirror.accesses()), len(cache.accesses())
            run = cli(recipe, *source, "--substituter", substituter, "--trusted-key", public,
                      "--home", str(home))  # fmt: skip
            subs.append((run, traffic(mirror, since_m, base_layers),
                         traffic(cache, since_c, base_layers), home))  # fmt: skip
            result = run.result
            taken = Path(result["path"])
            if result["status"] != "substituted":
                failures.append(f"substitution {n}: status {result['status']}, not substituted")
            if taken.name != built.name:
                failures.append(f"substitution {n}: store path {taken.name}, not {built.name}")
            if digests(taken) != built_digests:
                failures.append(f"substitution {n}: outputs differ from the cold build's")
            steps = {e["step"] for e in run.events if e["event"] == "timing"}
            if "make filesystem" in steps or "pull layers" in steps:
                failures.append(f"substitution {n}: it built ({sorted(steps)})")
            cached = [d for d in base_layers if (home / "blobs" / "sha256" / d[7:]).exists()]
            if subs[-1][1].layer_gets or cached:
                failures.append(f"substitution {n}: base-image layers downloaded ({cached})")
        sub_run, sub_mirror, sub_cache, _ = min(subs, key=lambda s: s[0].seconds)

    sub_step = sum(
        e["seconds"] for e in sub_run.events if e["event"] == "timing" and e["step"] == "substitute"
    )
    ratio = sub_run.seconds / built_run.seconds
    if ratio >= TARGET:
        failures.append(f"substitution took {ratio:.2f} of the cold build, target < {TARGET}")
    figures.update(
        store_path=built.name,
        outputs=sorted(built_digests),
        rootfs_bytes=rootfs_bytes,
        bundle_bytes=bundle_bytes,
        push_uploaded=uploaded,
        base_layer_bytes=base_bytes,
        cold_build_s=round(built_run.seconds, 2),
        cold_build_peak_rss=built_run.peak,
        cold_build_downloaded=built_traffic.total,
        cold_build_layer_bytes=built_traffic.layers,
        push_sign_s=round(push.seconds, 2),
        push_sign_peak_rss=push.peak,
        artifact=artifact_ref,
        substitute_s=round(sub_run.seconds, 2),
        substitute_peak_rss=sub_run.peak,
        substitute_step_s=round(sub_step, 2),
        substitute_downloaded_cache=sub_cache.total,
        substitute_downloaded_mirror=sub_mirror.total,
        substitute_layer_bytes=sub_mirror.layers + sub_cache.layers,
        ratio=round(ratio, 3),
        cold_all_s=[round(c[0].seconds, 2) for c in cold],
        substitute_all_s=[round(s[0].seconds, 2) for s in subs],
        failures=failures,
    )
    rows = [
        ("(a) cold build", built_run.seconds, mb(built_traffic.total), built_traffic.layers,
         built_run.peak),
        ("(b) push + sign", push.seconds, f"up {mb(uploaded)}", 0, push.peak),
        ("(c) substitution", sub_run.seconds, mb(sub_cache.total + sub_mirror.total),
         sub_mirror.layers + sub_cache.layers, sub_run.peak),
    ]  # fmt: skip
    print(f"{built.name}: outputs {', '.join(sorted(built_digests))}; "
          f"base image layers {mb(base_bytes)}; best of {args.repeat}")  # fmt: skip
    print(f"{'step':<18} {'time':>8} {'downloaded':>12} {'base layers':>12} {'peak RSS':>9}")
    for name, seconds, moved, layer_bytes, peak in rows:
        print(f"{name:<18} {seconds:7.2f}s {moved:>12} {mb(layer_bytes):>12} "
              f"{peak >> 20:>5} MiB")  # fmt: skip
    print(f"rootfs.ext4 {mb(rootfs_bytes)}, bundle {mb(bundle_bytes)}")
    print(f"substitution: {mb(sub_cache.total)} from the cache, {mb(sub_mirror.total)} from the "
          f"mirror (image manifest and config); its substitute step {sub_step:.2f}s")  # fmt: skip
    verdict = "met" if ratio < TARGET else "MISSED"
    print(
        f"substitution / cold build = {ratio:.3f} (target < {TARGET}: {verdict}); "
        f"identical outputs: {'no' if any('differ' in f for f in failures) else 'yes'}"
    )
    for failure in failures:
        print(f"FAIL: {failure}")
    if args.json:
        print(json.dumps(figures, indent=2, sort_keys=True))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
