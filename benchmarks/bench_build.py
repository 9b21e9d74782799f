"""Benchmark `stackbuild build` (target empty, the patched vLLM 0.19.0):

- a cold build, i.e. a cache miss (workspace check, syncing the build copy, pip,
  hashing, bill of materials), against `pip wheel` alone on the same tree with the
  same environment: ratio, target <= 1.1. The first build of a workspace also copies
  the whole tree out of it (about 2 s here); it is printed on its own line;
- a cache hit: target <= 1 s.

Runs are interleaved and the best of `--repeat` is kept, because the machine is shared
(the same `pip wheel` varies by 20-30 % from run to run here); stackbuild's own share
(everything but pip, from the build's progress lines) is printed too, as it does not
depend on that noise.
Usage: python benchmarks/bench_build.py [--repeat N]
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fixtures import VLLM_SDISTS, vllm_sdist, vllm_tree  # noqa: E402

from stackbuild.build import build, sync_build_tree  # noqa: E402
from stackbuild.buildcache import builds_dir  # noqa: E402
from stackbuild.recipe import load_recipe  # noqa: E402
from stackbuild.workspace import apply_recipe  # noqa: E402

VERSION = "0.19.0"
TARGET_RATIO = 1.1
TARGET_HIT_S = 1.0


def _project(root: Path) -> Path:
    rel = "vllm/version.py"
    text = (vllm_tree(VERSION) / rel).read_text()
    new = text.replace("\n\ndef _prev_minor_version_was", "\n\nSTACKBUILD_BENCH = True\n\n\ndef _prev_minor_version_was", 1)
    patch = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), f"a/{rel}", f"b/{rel}"))
    (root / "recipes").mkdir(parents=True)
    (root / "patches").mkdir()
    (root / "patches" / "bench.patch").write_text(patch)
    recipe = root / "recipes" / "bench.toml"
    recipe.write_text(
        f'platform = "lunar-lake"\n[sources.vllm]\npypi = "vllm=={VERSION}"\nsha256 = "{VLLM_SDISTS[VERSION]}"\n\n'
        f'[[patches]]\nfile = "patches/bench.patch"\nsource = "vllm"\n'
        f'sha256 = "{hashlib.sha256(patch.encode()).hexdigest()}"\n\n[build]\ntarget_device = "empty"\n'
    )
    return recipe


def _pip_alone(tree: Path, work: Path, version: str) -> float:
    """The documented command by hand, on a fresh copy of the same tree."""
    src = work / "src"
    sync_build_tree(tree, src)  # not timed: the tree is on disk and clean, as a plain `pip wheel` user has it
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "VLLM_TARGET_DEVICE": "empty", "VLLM_VERSION_OVERRIDE": version}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
                   cwd=src, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def _pip_seconds(progress_lines: list[str]) -> float:
    """pip's own time inside a build, from the progress line that closes it."""
    for line in reversed(progress_lines):
        m = re.match(r"pip wheel \(vllm\): done in ([0-9.]+)s", line)
        if m:
            return float(m.group(1))
    raise AssertionError("no 'done in' progress line from the build")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        t = Path(tmp)
        os.environ["STACKBUILD_CACHE"] = str(t / "cache")
        seeded = t / "cache" / "sdists" / VLLM_SDISTS[VERSION]
        seeded.mkdir(parents=True)
        shutil.copyfile(vllm_sdist(VERSION), seeded / f"vllm-{VERSION}.tar.gz")
        recipe = load_recipe(_project(t / "proj"))
        workdir = t / "proj" / "work" / "bench"
        assert apply_recipe(recipe, workdir).ok  # not timed: both sides start from the applied workspace
        cold: list[float] = []
        alone: list[float] = []
        version = ""
        first = 0.0
        overhead: list[float] = []
        for i in range(args.repeat + 1):
            if i % 2 == 0 and version:  # alternate which side runs first: the one after finds warmer caches
                alone.append(_pip_alone(workdir / "vllm", t / "alone", version))
            shutil.rmtree(builds_dir(), ignore_errors=True)  # a miss every time
            said: list[str] = []
            t0 = time.perf_counter()
            r = build(recipe, workdir, progress=said.append)
            took = time.perf_counter() - t0
            pip_inside = _pip_seconds(said)
            assert not r.cache_hit and r.version
            if i == 0:
                first = took  # the workspace's first build also copies the whole tree out of it
            else:
                cold.append(took)
                overhead.append(took - pip_inside)
            if i % 2 == 1 or not version:
                alone.append(_pip_alone(workdir / "vllm", t / "alone", r.version))
            version = r.version
        hits = []
        for _ in range(5):
            t0 = time.perf_counter()
            r = build(recipe, workdir)
            hits.append(time.perf_counter() - t0)
            assert r.cache_hit
    best_cold, best_alone, best_hit = min(cold), min(alone), min(hits)
    ratio = best_cold / best_alone
    print(f"first build of a workspace (copies the tree): {first:.2f}s, ratio {first / best_alone:.3f}")
    print(f"build (vllm {VERSION} empty, patched): cold {best_cold:.2f}s (runs: {', '.join(f'{c:.2f}' for c in cold)})")
    print(f"pip wheel alone, same tree:           {best_alone:.2f}s (runs: {', '.join(f'{a:.2f}' for a in alone)})")
    print(f"stackbuild's own time in a cold build (all but pip): {min(overhead):.2f}s best, "
          f"{max(overhead):.2f}s worst; against pip alone that is {1 + min(overhead) / best_alone:.3f}")
    print(f"ratio cold/pip: {ratio:.3f} (target <= {TARGET_RATIO}) {'ok' if ratio <= TARGET_RATIO else 'OVER'}")
    print(f"cache hit: {best_hit * 1000:.0f} ms best, {max(hits) * 1000:.0f} ms worst of {len(hits)} "
          f"(target <= {TARGET_HIT_S:.0f} s) {'ok' if max(hits) <= TARGET_HIT_S else 'OVER'}")
    return 0 if ratio <= TARGET_RATIO and max(hits) <= TARGET_HIT_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
