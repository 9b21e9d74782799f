"""Verify benchmark (issue 4): all static checks (compile, registry, imports, api,
transformers) over the applied b70-gemma4 workspace of the real vLLM 0.19.0 release,
with two raw baselines measured in the same run:

- `python -m compileall -q` over the same touched files (pyc written to a temp prefix);
- plain `ast.parse` of every .py file of the vllm package (what a check that reads the
  whole tree would pay at least).

Target: static checks <= 3 s (warm download cache: the transformers wheel is fetched
once, before timing). Exit 1 when the target is missed.
"""

from __future__ import annotations

import ast
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stackbuild.checks import CheckContext, treefile  # noqa: E402
from stackbuild.checks import imports as imports_check  # noqa: E402
from stackbuild.recipe import load_recipe  # noqa: E402
from stackbuild.verify import STATIC_CHECKS, run_verify  # noqa: E402
from stackbuild.workspace import apply_recipe  # noqa: E402

RECIPE = os.environ.get("BENCH_RECIPE", "b70-gemma4")
TARGET_S = 3.0
REPEAT = 3


def main() -> int:
    recipe = load_recipe(ROOT / "recipes" / f"{RECIPE}.toml")
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        workdir = Path(tmp) / "ws"
        applied = apply_recipe(recipe, workdir)
        assert applied.manifest is not None, "apply produced no manifest"
        touched = applied.manifest.touched()
        ctx = CheckContext(recipe=recipe, workspace=workdir, touched=touched)
        run_verify(ctx, list(STATIC_CHECKS))  # warm: the transformers wheel lands in the cache

        ours: list[float] = []
        report = None
        for _ in range(REPEAT):
            imports_check._TABLE_CACHE.clear()  # every run parses from scratch, as a fresh process would
            treefile._PARSED.clear()
            t0 = time.perf_counter()
            report = run_verify(ctx, list(STATIC_CHECKS))
            ours.append(time.perf_counter() - t0)
        assert report is not None

        tree = workdir / recipe.checks.registry_source
        py_files = [str(tree / f) for src, files in touched.items() for f in files
                    if f.endswith(".py") and (workdir / src / f).is_file()]
        compileall: list[float] = []
        for _ in range(REPEAT):
            with tempfile.TemporaryDirectory() as prefix:
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "compileall", "-q", *py_files], check=True,
                               env={**os.environ, "PYTHONPYCACHEPREFIX": prefix})
                compileall.append(time.perf_counter() - t0)

        all_py = sorted((tree / "vllm").rglob("*.py"))
        t0 = time.perf_counter()
        for p in all_py:
            ast.parse(p.read_bytes(), filename=str(p))
        parse_all = time.perf_counter() - t0

    best = min(ours)
    print(f"recipe {RECIPE}: {sum(len(v) for v in touched.values())} touched files "
          f"({len(py_files)} Python), {len(recipe.checks.registry)} architectures, "
          f"{len(recipe.checks.model_types)} model types")
    print(f"static checks: best {best:.3f} s, median {statistics.median(ours):.3f} s over {REPEAT} runs "
          f"({report.summary})")
    print("  per check:", ", ".join(f"{name} {s:.3f} s" for name, s in report.timings))
    cbest = min(compileall)
    print(f"raw compileall -q over the same {len(py_files)} files: {cbest:.3f} s; ratio {best / cbest:.2f}x")
    print(f"raw ast.parse of all {len(all_py)} files of the vllm package: {parse_all:.3f} s; "
          f"ratio {best / parse_all:.2f}x")
    ok = best <= TARGET_S
    print(f"target <= {TARGET_S:.1f} s: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
