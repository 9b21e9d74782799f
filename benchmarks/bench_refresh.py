"""Refresh matrix vs sequential refreshes: the real lunar-lake-moe series tried on four
vLLM source releases (0.19.0, 0.20.0, 0.21.0, 0.23.0; sdists from tests/fixtures),
once through `refresh_matrix` (a process per release) and once as four refreshes one
after another (the baseline), in the same run. Prints both and the ratio."""

from __future__ import annotations

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
    import fixtures

    from stackbuild.recipe import load_recipe
    from stackbuild.refresh import _applied_workspace, _matrix_worker, refresh_matrix

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

        t = time.perf_counter()
        seq = []
        for i, v in enumerate(VERSIONS):
            seq.append(_matrix_worker(str(recipe.path), f"vllm=={v}", shas[v], str(tmp / f"seq{i}"), str(ws_tree), str(ws_tree.parent)))
        t_seq = time.perf_counter() - t

        t = time.perf_counter()
        m = refresh_matrix(recipe, VERSIONS, jobs=os.cpu_count() or 2, sha256s=shas)
        t_mat = time.perf_counter() - t

        for table in m.tables():
            print(table.render())
        same = [r.to_dict()["patches"] if r else None for r in m.results] == [r.to_dict()["patches"] for r in seq]
        print(f"\napply of the old series (shared, not timed below): {t_apply:.1f} s")
        print(f"sequential: 4 refreshes one after another: {t_seq:.1f} s")
        print(f"matrix ({os.cpu_count()} processes):            {t_mat:.1f} s")
        print(f"ratio sequential / matrix: {t_seq / t_mat:.2f}x  (same verdicts: {same})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
