"""fp64 reference for INT4 W4A16 weights: GPTQ and AWQ dequantisation, GEMM and MoE.

Layouts (all little-endian int32 words holding 8 nibbles, nibble i = bits 4i..4i+3):

- GPTQ `qweight` int32 [K/8, N]: nibble i of row r is weight row k = 8r + i (packed along K).
  `scales` [K/G, N]; `zeros` are *effective* zero points, uint8 [K/G, N] (GPTQ v1
  checkpoints store z-1; convert before building a case), or None: symmetric, z = 8.
  `g_idx` int [K] (act-order): row k uses group g_idx[k] instead of k // G.
- AWQ `qweight` int32 [K, N/8] packed along N in the order (0, 2, 4, 6, 1, 3, 5, 7):
  nibble i of word j holds column 8j + AWQ_ORDER[i]. `qzeros` int32 [K/G, N/8], same order.

W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n];  y = x @ W  (x: [M, K], y: [M, N]).

MoE follows vLLM's fused_moe convention: w13 (GPTQ [E, K/8, 2N]) maps hidden K to 2N;
the first N output columns are the gate, the next N the up projection;
h = silu(gate) * up; w2 (GPTQ [E, N/8, K]) maps N back to K;
out[m] = sum_j topk_weights[m, j] * (h_{e_j}(x[m]) @ W2[e_j]) with e_j = topk_ids[m, j].

Only torch is imported: this module runs inside the target environment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import merge_thresholds

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SYMMETRIC_ZERO = 8


def unpack_gptq(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K/8, N] -> int64 [K, N], nibble i of row r becoming row 8r + i."""
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=qweight.device)
    nib = (words.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF  # [K/8, 8, N]
    return nib.reshape(-1, qweight.shape[-1])


def pack_gptq(q: torch.Tensor) -> torch.Tensor:
    """int [K, N] with values 0..15 -> int32 [K/8, N] (inverse of unpack_gptq)."""
    k, n = q.shape
    if k % 8:
        raise ValueError(f"K={k} is not a multiple of 8")
    q = q.to(torch.int64).reshape(k // 8, 8, n)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64).view(1, 8, 1)
    words = (q << shifts).sum(dim=1)
    return _to_int32(words)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> int64 [R, N] in AWQ's interleaved nibble order."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    r, n8 = packed.shape
    out = torch.empty(r, n8, 8, dtype=torch.int64, device=packed.device)
    for i, col in enumerate(AWQ_ORDER):
        out[:, :, col] = (words >> (4 * i)) & 0xF
    return out.reshape(r, n8 * 8)


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """int [R, N] -> int32 [R, N/8] (inverse of unpack_awq)."""
    r, n = q.shape
    if n % 8:
        raise ValueError(f"N={n} is not a multiple of 8")
    q = q.to(torch.int64).reshape(r, n // 8, 8)
    words = torch.zeros(r, n // 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        words |= q[:, :, col] << (4 * i)
    return _to_int32(words)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    words = words & 0xFFFFFFFF
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def group_index(k: int, group_size: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    if g_idx is not None:
        return g_idx.to(torch.int64).cpu()
    return torch.arange(k, dtype=torch.int64) // group_size


def dequant_q(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unpacked q [K, N] -> fp64 W [K, N]."""
    k = q.shape[0]
    g = group_index(k, group_size, g_idx)
    s = scales.cpu().to(torch.float64)[g]
    z = (
        torch.full_like(s, float(SYMMETRIC_ZERO))
        if zeros is None
        else zeros.cpu().to(torch.float64)[g]
    )
    return (q.cpu().to(torch.float64) - z) * s


def dequant_gptq(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    return dequant_q(unpack_gptq(qweight.cpu()), scales, zeros, group_size, g_idx)


def per_expert(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
) -> torch.Tensor:
    """`fn(q, s, z)` on each expert's slice of [E, ...] tensors, stacked back to [E, ...]."""
    return torch.stack(
        [fn(qweight[e], scales[e], None if zeros is None else zeros[e]) for e in range(qweight.shape[0])]
    )


def dequant_awq(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    zeros = unpack_awq(qzeros.cpu()) if qzeros is not None else None
    return dequant_q(unpack_awq(qweight.cpu()), scales, zeros, group_size)


def awq_to_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AWQ (qweight [K, N/8], qzeros [K/G, N/8]) -> GPTQ (qweight [K/8, N], zeros uint8 [K/G, N])."""
    q = unpack_awq(qweight.cpu())
    zeros = unpack_awq(qzeros.cpu()).to(torch.uint8) if qzeros is not None else None
    return pack_gptq(q), zeros


def gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp64 x [M, K] @ W [K, N]."""
    return x.cpu().to(torch.float64) @ w.to(torch.float64)


def moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """fp64 MoE: x [M, K], w13 [E, K, 2N], w2 [E, N, K] (dequantised), routing [M, topk]."""
    x64 = x.cpu().to(torch.float64)
    ids = topk_ids.cpu().to(torch.int64)
    wts = topk_weights.cpu().to(torch.float64)
    n = w2.shape[1]
    out = torch.zeros(x64.shape[0], w2.shape[2], dtype=torch.float64)
    for e in torch.unique(ids).tolist():
        rows, slots = (ids == e).nonzero(as_tuple=True)
        h = x64[rows] @ w13[e].to(torch.float64)
        act = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
        out.index_add_(0, rows, (act @ w2[e].to(torch.float64)) * wts[rows, slots].unsqueeze(1))
    return out


# ---------------------------------------------------------------- comparison


class ZeroReferenceError(ValueError):
    """The reference output is all zeros: every comparison against it is meaningless."""


@dataclass(frozen=True)
class Metrics:
    max_abs: float
    rel: float  # ||out - ref|| / ||ref||
    corr: float  # Pearson correlation of the flattened outputs

    def to_dict(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "rel": self.rel, "corr": self.corr}


def compare(out: torch.Tensor, ref: torch.Tensor) -> Metrics:
    """Metrics of `out` against the fp64 `ref`. Raises ZeroReferenceError on a zero reference,
    and ValueError on a shape mismatch."""
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    o = out.detach().cpu().to(torch.float64).flatten()
    r = ref.detach().cpu().to(torch.float64).flatten()
    ref_norm = float(torch.linalg.vector_norm(r))
    if ref_norm == 0.0 or not torch.isfinite(torch.tensor(ref_norm)):
        raise ZeroReferenceError(f"reference norm is {ref_norm}: the vectors hide every bug")
    if not torch.isfinite(o).all():
        return Metrics(max_abs=float("inf"), rel=float("inf"), corr=float("nan"))
    diff = o - r
    rel = float(torch.linalg.vector_norm(diff)) / ref_norm
    oc, rc = o - o.mean(), r - r.mean()
    denom = float(torch.linalg.vector_norm(oc)) * float(torch.linalg.vector_norm(rc))
    corr = float((oc * rc).sum()) / denom if denom > 0 else float("nan")
    return Metrics(max_abs=float(diff.abs().max()), rel=rel, corr=corr)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
thresholds = merge_thresholds


def verdict(metrics: Metrics, dtype: str, limits: dict[str, float]) -> tuple[bool, str]:
    """(passed, why) for one comparison under the thresholds of `dtype`. NaN fails."""
    reasons = []
    rel_max = limits.get(f"{dtype}.rel")
    if rel_max is not None and not metrics.rel < rel_max:
        reasons.append(f"rel err {metrics.rel:.3g} >= {rel_max:g}")
    corr_min = limits.get(f"{dtype}.corr")
    if corr_min is not None and not metrics.corr > corr_min:
        reasons.append(f"corr {metrics.corr:.6g} <= {corr_min:g}")
    return (not reasons, "; ".join(reasons))
