"""Negative controls: deliberately wrong kernels that every numerics run must catch.

Each reproduces a bug seen in the wild (DESIGN.md): vllm-xpu-kernels 0.1.4 decoding INT4
nibbles as FP4 E2M1, a missing K<->N transpose (the [K, N] buffer read as [N, K]), and a
zero point of 0 instead of 8. Controls return fp64; the suite rounds the output to each
dtype of the run and judges it under that dtype's thresholds. A control that passes the thresholds means the vectors or the
comparison hide that class of bug: the harness is broken and the check fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import reference as ref
from .vectors import LINEAR, Int4Case

# FP4 E2M1: sign bit 3, two exponent bits, one mantissa bit
E2M1 = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float64,
)


def _fp4(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g: int,
    g_idx: torch.Tensor | None,
) -> torch.Tensor:
    groups = ref.group_index(q.shape[0], g, g_idx)
    return E2M1[q] * scales.to(torch.float64)[groups]


def _no_transpose(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g: int,
    g_idx: torch.Tensor | None,
) -> torch.Tensor:
    k, n = q.shape
    return ref.dequant_q(q.contiguous().reshape(n, k).t(), scales, zeros, g, g_idx)


def _zero_point_0(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g: int,
    g_idx: torch.Tensor | None,
) -> torch.Tensor:
    return ref.dequant_q(q, scales, torch.zeros_like(scales, dtype=torch.uint8), g, g_idx)


Corruption = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, int, torch.Tensor | None], torch.Tensor
]


@dataclass(frozen=True)
class Control:
    name: str
    fn: Callable[[Int4Case, torch.Tensor], torch.Tensor]
    what: str


def _control(name: str, corrupt: Corruption) -> Callable[[Int4Case, torch.Tensor], torch.Tensor]:
    def dequant(
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        case: Int4Case,
        g_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return corrupt(ref.unpack_gptq(qweight), scales.cpu(), zeros, case.group_size, g_idx)

    def fn(case: Int4Case, x: torch.Tensor) -> torch.Tensor:
        key = f"control-{name}"
        if case.suite == LINEAR:
            assert case.qweight is not None and case.scales is not None
            if key not in case.scratch:
                case.scratch[key] = dequant(case.qweight, case.scales, case.zeros, case, case.g_idx)
            return ref.gemm(x, case.scratch[key])
        assert case.w13_qweight is not None and case.w13_scales is not None
        assert case.w2_qweight is not None and case.w2_scales is not None
        assert case.topk_ids is not None and case.topk_weights is not None
        if key not in case.scratch:
            def dq(q: torch.Tensor, sc: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
                return dequant(q, sc, z, case)

            w13 = ref.per_expert(dq, case.w13_qweight, case.w13_scales, case.w13_zeros)
            w2 = ref.per_expert(dq, case.w2_qweight, case.w2_scales, case.w2_zeros)
            case.scratch[key] = (w13, w2)
        w13, w2 = case.scratch[key]
        return ref.moe(x, w13, w2, case.topk_ids, case.topk_weights)

    return fn


CONTROLS: tuple[Control, ...] = (
    Control("fp4-e2m1", _control("fp4-e2m1", _fp4), "nibbles decoded as FP4 E2M1"),
    Control(
        "skipped-transpose",
        _control("skipped-transpose", _no_transpose),
        "the K<->N transpose skipped",
    ),
    Control(
        "zero-point-0",
        _control("zero-point-0", _zero_point_0),
        "zero point 0 instead of 8 (or the checkpoint's)",
    ),
)
