"""Torch-free constants of the numerics check: suites, dtypes, pass thresholds. The runner
reads them (validating a recipe's overrides) before it launches the worker in the target
environment, where torch lives."""

from __future__ import annotations

LINEAR = "int4-linear"
MOE = "int4-moe"
SUITES = (LINEAR, MOE)

DTYPE_NAMES = ("fp32", "bf16", "fp16")
METRICS = ("rel", "corr")

# rel: ||out - ref|| / ||ref|| must be below; corr: Pearson correlation must be above
DEFAULT_THRESHOLDS: dict[str, float] = {
    "fp32.rel": 1e-4,
    "bf16.rel": 1e-2,
    "bf16.corr": 0.999,
    "fp16.rel": 1e-2,
    "fp16.corr": 0.999,
}


def merge_thresholds(overrides: dict[str, float] | None = None) -> dict[str, float]:
    """Defaults with overrides applied; KeyError (message as its argument) on an unknown key."""
    merged = dict(DEFAULT_THRESHOLDS)
    for key, value in (overrides or {}).items():
        dtype, _, metric = key.partition(".")
        if dtype not in DTYPE_NAMES or metric not in METRICS:
            raise KeyError(
                f"unknown threshold {key!r}: expected <{'|'.join(DTYPE_NAMES)}>.<rel|corr>"
            )
        merged[key] = float(value)
    return merged
