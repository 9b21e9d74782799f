"""Refresh matrix vs sequential refreshes: the real lunar-lake-moe series tried on four
vLLM source releases (0.19.0, 0.20.0, 0.21.0, 0.23.0; sdists from tests/fixtures).

The baseline is four separate refreshes one after another, each doing what
`stackbuild refresh --to` does after its (shared, no-op) apply: its own refresh
worktree, the new release from the cache's base repository (imported on first use),
its own lookups. Then `refresh_matrix` (`matrix_jobs` processes; `--jobs N` to force),
which reads the old base's names once for every release. Both run with the same cache
state: cold (only the old release's base, which apply imported, is cached), then the
matrix again warm (every release imported). Prints the times and whether every run
gave the same verdicts.

    STACKBUILD_TEST_CACHE=/tmp/tc nice .venv/bin/python benchmarks/bench_refresh.py [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

VERSIONS = ["0.19.0", "0.20.0", "0.21.0", "0.23.0"]
RECIPE = "lunar-lake-moe"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=None, help="matrix processes (default: matrix_jobs)")
    jobs = ap.parse_args().jobs

    import fixtures

    from stackbuild.recipe import load_recipe
    from stackbuild.refresh import _applied_workspace, _matrix_worker, matrix_jobs, refresh_matrix

    tmp = Path(tempfile.mkdtemp(prefix="bench-refresh-"))
    try:
        cache = tmp / "cache"
        for v in VERSIONS:
            d = cache / "sdists" / fixtures.VLLM_SDISTS[v]
            d.mkdir(parents=True)
            (d / f"vllm-{v}.tar.gz").symlink_to(fixtures.vllm_sdist(v))
        os.environ["STACKBUILD_CACHE"] = str(cache)
        root = tmp / "proj"
        shutil.copytree(REPO / "recipes", root / "recipes")
        shutil.copytree(REPO / "patches", root / "patches")
        recipe = load_recipe(root / "recipes" / f"{RECIPE}.toml")
        shas = {v: fixtures.VLLM_SDISTS[v] for v in VERSIONS}
        t = time.perf_counter()
        ws_tree, _ = _applied_workspace(recipe, "vllm", None, lambda _m: None)
        t_apply = time.perf_counter() - t
        old_sha = recipe.source("vllm").sha256

        def forget_new_bases() -> None:  # cold: only what apply imported stays cached
            for b in (cache / "bases").glob("*.git"):
                if b.name != f"{old_sha}.git":
                    shutil.rmtree(b)

        forget_new_bases()
        t = time.perf_counter()
        seq = []
        for i, v in enumerate(VERSIONS):
            seq.append(_matrix_worker(str(recipe.path), f"vllm=={v}", shas[v], str(tmp / f"seq{i}"), str(ws_tree),
                                      str(ws_tree.parent)))
        t_seq = time.perf_counter() - t
        want = [r.to_dict()["patches"] for r in seq]

        runs = []
        for label, cold in (("cold", True), ("warm", False)):
            if cold:
                forget_new_bases()
            t = time.perf_counter()
            m = refresh_matrix(recipe, VERSIONS, jobs=jobs, sha256s=shas)
            runs.append((label, time.perf_counter() - t, m,
                         [r.to_dict()["patches"] if r else None for r in m.results] == want))

        for table in runs[0][2].tables():
            print(table.render())
        n = matrix_jobs(jobs, len(VERSIONS))
        print(f"\napply of the old series (shared, not timed below): {t_apply:.1f} s")
        print(f"sequential, cold: {len(VERSIONS)} separate refreshes one after another: {t_seq:.1f} s")
        for label, secs, _m, same in runs:
            print(f"matrix, {label} ({n} process(es) on {os.cpu_count()} CPUs): {secs:.1f} s  "
                  f"(sequential / matrix {t_seq / secs:.2f}x; same verdicts as sequential: {same})")
        if not all(r[3] for r in runs):
            raise SystemExit("the matrix and the sequential refreshes gave different verdicts")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
