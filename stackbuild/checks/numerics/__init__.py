"""Kernel numerics: INT4 W4A16 GEMM and MoE kernels against an fp64 reference, with
negative controls that must fail.

    config.py     torch-free constants: suites, dtypes, thresholds
    reference.py  fp64 GPTQ/AWQ dequantisation, GEMM, MoE, metrics
    vectors.py    Int4Case and the seeded vectors that expose layout bugs
    adapters.py   the kernels under test behind fn(case, x) -> Tensor
    controls.py   deliberately wrong kernels every run must catch
    suite.py      adapters x vectors + controls -> NumericsRun
    worker.py     entry point inside the target environment (also standalone)
    runner.py     run_numerics(ctx): the worker as a subprocess -> CheckResult rows

Only config.py and runner.py are imported by stackbuild itself; the rest needs torch and
runs in the worker.
"""

from __future__ import annotations

from stackbuild.checks.numerics.runner import run_numerics

__all__ = ["run_numerics"]
