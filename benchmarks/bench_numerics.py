"""Numerics benchmark (issue 5): the default numerics suite as `stackbuild verify --only
numerics` runs it on this machine's CPU (a worker subprocess: torch import, vectors, every
built-in adapter that can run here, the patch's layout module, the negative controls),
against the raw baseline measured in the same run: the same fp64 reference dequantisation
and matmuls alone, in this process.

Target: the default suite <= 60 s wall on the 2-core machine. Exit 1 when missed or when
the suite does not pass.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "checks" / "numerics"))

import torch  # noqa: E402
from numerics_helpers import real_layout_source, workspace_with  # noqa: E402

from stackbuild.checks import CheckContext, CheckStatus  # noqa: E402
from stackbuild.checks.numerics import run_numerics  # noqa: E402
from stackbuild.checks.numerics.vectors import (  # noqa: E402
    DEFAULT_SPECS,
    activations,
    dequant_case,
    master_case,
    reference_output,
    routing_for,
)
from stackbuild.recipe import load_recipe  # noqa: E402

TARGET_S = 60.0
RECIPE = "lunar-lake-moe"


def raw_reference_s() -> float:
    """fp64 dequant + matmul (GEMM and MoE) of every default vector, inputs prepared first."""
    torch.set_num_threads(1)  # as the worker runs
    prepared = []
    for spec in DEFAULT_SPECS:
        master = master_case(spec)
        per_m = [
            (
                replace(master, **routing_for(spec, m)),
                activations(m, spec.K, spec.group_size, spec.seed),
            )
            for m in spec.ms
        ]
        prepared.append((master, per_m))
    t0 = time.perf_counter()
    for master, per_m in prepared:
        weights = dequant_case(master)
        for case, x in per_m:
            reference_output(case, x, weights)
    return time.perf_counter() - t0


def main() -> int:
    recipe = load_recipe(RECIPE)
    with tempfile.TemporaryDirectory() as tmp:
        source = real_layout_source()
        workspace = workspace_with(Path(tmp), source) if source else Path(tmp)
        ctx = CheckContext(recipe=recipe, workspace=workspace, options={"device": "cpu"})
        t0 = time.perf_counter()
        results = run_numerics(ctx)
        wall = time.perf_counter() - t0
    baseline = raw_reference_s()

    counts = {s: sum(r.status is s for r in results) for s in CheckStatus}
    failed = [r for r in results if r.status is CheckStatus.FAIL]
    print(
        f"recipe {RECIPE}, suites {', '.join(recipe.checks.numerics) or 'default'}, device cpu, "
        f"patch layout module {'loaded' if source else 'absent'}"
    )
    print(
        f"rows: {counts[CheckStatus.PASS]} pass, {counts[CheckStatus.FAIL]} fail, "
        f"{counts[CheckStatus.SKIP]} skipped"
    )
    print(
        f"default numerics suite wall: {wall:.2f} s  (target {TARGET_S:.0f} s: "
        f"{wall / TARGET_S:.2f}x of target)"
    )
    print(
        f"raw baseline, fp64 reference dequant+matmul alone: {baseline:.3f} s  "
        f"(suite is {wall / baseline:.1f}x the baseline)"
    )
    for r in failed[:5]:
        print(f"FAIL {r.subject}: {r.detail}")
    return 0 if wall <= TARGET_S and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
