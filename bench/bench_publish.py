"""Benchmark: bundle and push of the Debian fixture's store path, in one run.

Builds recipes/debian.toml from the cached Debian test image (see
tests/support/debian.py; built on first use) served by a local
``docker-registry``, then measures, each in a child process of the CLI:

- ``bundle``: time, bundle size, peak RSS (VmHWM), against the image's size;
- ``push`` to an empty repository (every blob uploaded, the bundle in chunks);
- ``push`` again (nothing uploaded: the bundle is made again to learn its
  digest, then HEADs only);
- ``push`` to a registry behind token auth, for the cost of tokens.

    python bench/bench_publish.py [--repeat 3] [--json]

Prints one line per measure (the best of --repeat) and, with --json, the
figures as JSON. Needs the test support (docker-registry, the Debian image).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: the CLI, then its own peak RSS (ru_maxrss would include the forking parent's)
PEAK = """
import sys
from banger_build.cli import main
code = main(sys.argv[1:])
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(f"PEAK_KIB={peak}", file=sys.stderr)
sys.exit(code)
"""


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[str, float, int]:
    """stdout, seconds and peak RSS (bytes) of one CLI run in a child process."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"banger-build {' '.join(args)} failed:\n{proc.stderr}")
    peak = [x for x in proc.stderr.splitlines() if x.startswith("PEAK_KIB=")][-1]
    return proc.stdout.strip(), seconds, int(peak.removeprefix("PEAK_KIB=")) * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from tests.support.debian import debian_layout
    from tests.support.oci import push_layout
    from tests.support.registry import RegistryServer, write_docker_config

    layout = debian_layout()
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp, RegistryServer() as mirror:
        work = Path(tmp)
        push_layout(mirror.url, "library/debian", "bookworm", layout)
        recipe_dir = work / "project"
        (recipe_dir / ".git").mkdir(parents=True)
        for name in ("recipes", "templates", "agents"):
            subprocess.run(["cp", "-a", str(REPO / name), str(recipe_dir / name)], check=True)
        recipe = recipe_dir / "recipes" / "debian.toml"
        home = work / "home"
        base = ("--home", str(home))
        path, build_s, _ = cli(
            str(recipe), "--no-link", "--mirror", f"docker.io={mirror.url}", *base
        )
        image = Path(path) / "rootfs.ext4"
        figures["image_bytes"] = image.stat().st_size
        figures["image_allocated_bytes"] = image.stat().st_blocks * 512
        figures["cold_build_s"] = round(build_s, 2)

        best: dict[str, tuple[float, int]] = {}
        out = work / "b.tar.zst"
        for _ in range(args.repeat):
            _, seconds, rss = cli("bundle", path, "-o", str(out), "-q", *base)
            best["bundle"] = min(best.get("bundle", (seconds, rss)), (seconds, rss))
        figures["bundle_bytes"] = out.stat().st_size
        figures["bundle_s"], figures["bundle_peak_rss"] = best["bundle"]

        with RegistryServer() as target, RegistryServer("token") as secured:
            for n in range(args.repeat):
                ref = f"{target.host}/bench/debian{n}:v1"
                _, seconds, rss = cli("push", path, ref, "-q", *base)
                best["push"] = min(best.get("push", (seconds, rss)), (seconds, rss))
                _, seconds, rss = cli("push", path, ref, "-q", *base)
                best["push_again"] = min(best.get("push_again", (seconds, rss)), (seconds, rss))
            config = write_docker_config(
                work / "docker", {secured.host: (secured.username, secured.password)}
            )
            for n in range(args.repeat):
                ref = f"{secured.host}/bench/debian{n}:v1"
                _, seconds, rss = cli(
                    "push", path, ref, "-q", *base, env={"DOCKER_CONFIG": str(config.parent)}
                )
                best["push_token"] = min(best.get("push_token", (seconds, rss)), (seconds, rss))
        for name in ("push", "push_again", "push_token"):
            figures[f"{name}_s"], figures[f"{name}_peak_rss"] = best[name]

    mb = 1e6
    print(
        f"image {figures['image_bytes'] / mb:.1f} MB "  # type: ignore[operator]
        f"({figures['image_allocated_bytes'] / mb:.1f} MB allocated), "  # type: ignore[operator]
        f"cold build {figures['cold_build_s']} s"
    )
    print(
        f"bundle: {figures['bundle_bytes'] / mb:.1f} MB in "  # type: ignore[operator]
        f"{figures['bundle_s']:.2f} s, peak RSS {figures['bundle_peak_rss'] >> 20} MiB"  # type: ignore[operator]
    )
    for name, what in (
        ("push", "push to an empty repository"),
        ("push_again", "push again (nothing uploaded)"),
        ("push_token", "push with token auth"),
    ):
        print(
            f"{what}: {figures[f'{name}_s']:.2f} s, "
            f"peak RSS {figures[f'{name}_peak_rss'] >> 20} MiB"  # type: ignore[operator]
        )
    if args.json:
        print(json.dumps(figures, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
