"""Seeded test vectors chosen to expose INT4 layout bugs.

Inputs that hide bugs (measured, DESIGN.md): constant q, all q = 8, symmetric q on square
shapes, zero-mean activations per group, x = 0. So every vector here has:
all 16 nibble values, weights and scales varying along both K and N, K != N, activations
with non-zero group means, M = 1 and batches (8, 33), group sizes 32..256, symmetric and
asymmetric zero points, an act-order (g_idx) case, an AWQ case, and MoE batches routed to
all 16 experts.

Scales, activations and routing weights are rounded to bfloat16-representable values, so
the fp32, bf16 and fp16 cases of one spec hold the same numbers and share one fp64
reference: errors come from the kernel, not from casting the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import reference as ref
from .config import LINEAR, MOE, SUITES


@dataclass(frozen=True, eq=False)
class Int4Case:
    """One INT4 weight set (GPTQ form) in one activation dtype; see reference.py for layouts.

    Linear: qweight int32 [K/8, N], scales [K/G, N] (dtype), zeros uint8 [K/G, N] effective
    zero points or None (symmetric, 8), g_idx int32 [K] or None. AWQ specs also carry the
    original AWQ tensors (awq_qweight [K, N/8], awq_qzeros [K/G, N/8]); their GPTQ form is
    derived by the reference.
    MoE (suite int4-moe, K = hidden, N = intermediate): w13_* GPTQ [E, K/8, 2N] (first N
    columns gate, next N up), w2_* GPTQ [E, N/8, K], topk_ids int32 [M, topk],
    topk_weights float32 [M, topk]; the routing belongs to the activations of one M, so
    MoE cases are per M.
    All tensors are on the CPU; `device` is the device the run selected. `scratch` lets an
    adapter memoise prepared (converted) weights: it is shared by the cases of one spec and
    dtype (every M), so nothing that depends on x or the routing may go there.
    """

    name: str
    suite: str
    fmt: str  # "gptq" | "awq"
    K: int
    N: int
    group_size: int
    dtype: str  # "fp32" | "bf16" | "fp16"
    qweight: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    awq_qweight: torch.Tensor | None = None
    awq_qzeros: torch.Tensor | None = None
    w13_qweight: torch.Tensor | None = None
    w13_scales: torch.Tensor | None = None
    w13_zeros: torch.Tensor | None = None
    w2_qweight: torch.Tensor | None = None
    w2_scales: torch.Tensor | None = None
    w2_zeros: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    device: str = "cpu"
    scratch: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def torch_dtype(self) -> torch.dtype:
        return ref.DTYPES[self.dtype]

    @property
    def symmetric(self) -> bool:
        if self.suite == MOE:
            return self.w13_zeros is None and self.w2_zeros is None
        return self.zeros is None

    @property
    def num_experts(self) -> int:
        return 0 if self.w13_qweight is None else int(self.w13_qweight.shape[0])

    @property
    def topk(self) -> int:
        return 0 if self.topk_ids is None else int(self.topk_ids.shape[1])


@dataclass(frozen=True)
class Spec:
    """What a case is made of, before any tensor exists."""

    name: str
    suite: str
    K: int
    N: int
    group_size: int
    symmetric: bool
    fmt: str = "gptq"
    act_order: bool = False
    experts: int = 0
    topk: int = 0
    ms: tuple[int, ...] = (1, 8, 33)
    seed: int = 0


DEFAULT_SPECS: tuple[Spec, ...] = (
    Spec("gptq-sym-g128", LINEAR, K=512, N=384, group_size=128, symmetric=True, seed=11),
    Spec("gptq-asym-g32", LINEAR, K=256, N=320, group_size=32, symmetric=False, seed=12),
    Spec(
        "gptq-asym-g64-actorder",
        LINEAR,
        K=384,
        N=256,
        group_size=64,
        symmetric=False,
        act_order=True,
        seed=13,
    ),
    Spec(
        "awq-asym-g128", LINEAR, K=512, N=256, group_size=128, symmetric=False, fmt="awq", seed=14
    ),
    Spec("gptq-sym-g256", LINEAR, K=1024, N=192, group_size=256, symmetric=True, seed=15),
    Spec(
        "moe-sym-g64-e16",
        MOE,
        K=256,
        N=128,
        group_size=64,
        symmetric=True,
        experts=16,
        topk=2,
        ms=(1, 33),
        seed=21,
    ),
    Spec(
        "moe-asym-g32-e16",
        MOE,
        K=256,
        N=96,
        group_size=32,
        symmetric=False,
        experts=16,
        topk=2,
        ms=(33,),
        seed=22,
    ),
)


def default_specs(suites: tuple[str, ...] | list[str] = SUITES) -> list[Spec]:
    return [s for s in DEFAULT_SPECS if s.suite in suites]


# ---------------------------------------------------------------- generation


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest bfloat16 value, kept as float32."""
    return t.to(torch.bfloat16).to(torch.float32)


def _nibbles(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q = torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.int64)
    # every nibble value in the first column and the first row, whatever the seed
    q[:16, 0] = torch.arange(16)
    q[0, :16] = torch.arange(16)
    return q


def _scales(groups: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    g = torch.arange(groups, dtype=torch.float32).view(-1, 1)
    n = torch.arange(cols, dtype=torch.float32).view(1, -1)
    jitter = 0.5 + torch.rand(groups, cols, generator=gen)
    # varies along the group (K) axis and the N axis, never constant
    return bf16_exact(0.004 * (1.0 + 0.5 * g / max(groups, 1)) * (1.0 + n / cols) * jitter)


def _zeros(groups: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    z = torch.randint(0, 16, (groups, cols), generator=gen, dtype=torch.int64)
    z[0, :16] = torch.arange(16)
    return z.to(torch.uint8)


def activations(m: int, k: int, group_size: int, seed: int) -> torch.Tensor:
    """[M, K] float32, bf16-exact, with a non-zero mean in every K group."""
    gen = torch.Generator().manual_seed(seed * 1000 + m)
    groups = (k + group_size - 1) // group_size
    means = 0.5 + torch.rand(groups, generator=gen)  # all positive: no group averages out
    mean_per_k = means.repeat_interleave(group_size)[:k]
    return bf16_exact(torch.randn(m, k, generator=gen) + mean_per_k)


def _routing(
    m: int, experts: int, topk: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(experts, generator=gen)
    ids = torch.empty(m, topk, dtype=torch.int64)
    for row in range(m):
        first = row % experts  # every expert is active once m >= experts
        chosen = [first]
        step = 1 + (row * 7) % (experts - 1)
        while len(chosen) < topk:
            cand = (chosen[-1] + step) % experts
            while cand in chosen:
                cand = (cand + 1) % experts
            chosen.append(cand)
        ids[row] = perm[torch.tensor(chosen)]
    w = 0.2 + torch.rand(m, topk, generator=gen)
    w = bf16_exact(w / w.sum(dim=1, keepdim=True))
    return ids.to(torch.int32), w


@dataclass(frozen=True, eq=False)
class Vector:
    """A case, its activations and the fp64 reference output."""

    case: Int4Case
    x: torch.Tensor  # [M, K] in case.dtype, CPU
    ref: torch.Tensor  # fp64

    @property
    def m(self) -> int:
        return int(self.x.shape[0])

    @property
    def shape(self) -> str:
        return f"M{self.m}xK{self.case.K}xN{self.case.N}"


def dequant_case(case: Int4Case) -> dict[str, torch.Tensor]:
    """fp64 weights of a case, straight from its original format (AWQ from AWQ tensors)."""
    if case.suite == LINEAR:
        if case.fmt == "awq":
            assert case.awq_qweight is not None and case.scales is not None
            return {
                "w": ref.dequant_awq(
                    case.awq_qweight, case.scales, case.awq_qzeros, case.group_size
                )
            }
        assert case.qweight is not None and case.scales is not None
        return {
            "w": ref.dequant_gptq(
                case.qweight, case.scales, case.zeros, case.group_size, case.g_idx
            )
        }
    assert case.w13_qweight is not None and case.w13_scales is not None
    assert case.w2_qweight is not None and case.w2_scales is not None
    def dq(q: torch.Tensor, sc: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return ref.dequant_gptq(q, sc, z, case.group_size)

    w13 = ref.per_expert(dq, case.w13_qweight, case.w13_scales, case.w13_zeros)
    w2 = ref.per_expert(dq, case.w2_qweight, case.w2_scales, case.w2_zeros)
    return {"w13": w13, "w2": w2}


def reference_output(
    case: Int4Case, x: torch.Tensor, weights: dict[str, torch.Tensor]
) -> torch.Tensor:
    if case.suite == LINEAR:
        return ref.gemm(x, weights["w"])
    assert case.topk_ids is not None and case.topk_weights is not None
    return ref.moe(x, weights["w13"], weights["w2"], case.topk_ids, case.topk_weights)


def _linear_master(spec: Spec) -> Int4Case:
    gen = torch.Generator().manual_seed(spec.seed)
    k, n, g = spec.K, spec.N, spec.group_size
    q = _nibbles(k, n, gen)
    scales = _scales(k // g, n, gen)
    zeros = None if spec.symmetric else _zeros(k // g, n, gen)
    g_idx = None
    if spec.act_order:
        perm = torch.randperm(k, generator=gen)
        g_idx = (torch.arange(k) // g)[perm].to(torch.int32)
    if spec.fmt == "awq":
        awq_q = ref.pack_awq(q)
        awq_z = ref.pack_awq(zeros) if zeros is not None else None
        qweight, gz = ref.awq_to_gptq(awq_q, awq_z)
        return Int4Case(
            spec.name,
            LINEAR,
            "awq",
            k,
            n,
            g,
            "fp32",
            qweight=qweight,
            scales=scales,
            zeros=gz,
            awq_qweight=awq_q,
            awq_qzeros=awq_z,
        )
    return Int4Case(
        spec.name,
        LINEAR,
        "gptq",
        k,
        n,
        g,
        "fp32",
        qweight=ref.pack_gptq(q),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
    )


def _moe_master(spec: Spec) -> Int4Case:
    gen = torch.Generator().manual_seed(spec.seed)
    k, n, g, e = spec.K, spec.N, spec.group_size, spec.experts
    w13 = torch.stack([ref.pack_gptq(_nibbles(k, 2 * n, gen)) for _ in range(e)])
    s13 = torch.stack([_scales(k // g, 2 * n, gen) for _ in range(e)])
    w2 = torch.stack([ref.pack_gptq(_nibbles(n, k, gen)) for _ in range(e)])
    # the down projection's output is small; scale it up so both products matter
    s2 = torch.stack([bf16_exact(_scales(n // g, k, gen) * 8) for _ in range(e)])
    z13 = z2 = None
    if not spec.symmetric:
        z13 = torch.stack([_zeros(k // g, 2 * n, gen) for _ in range(e)])
        z2 = torch.stack([_zeros(n // g, k, gen) for _ in range(e)])
    return Int4Case(
        spec.name,
        MOE,
        "gptq",
        k,
        n,
        g,
        "fp32",
        w13_qweight=w13,
        w13_scales=s13,
        w13_zeros=z13,
        w2_qweight=w2,
        w2_scales=s2,
        w2_zeros=z2,
    )


def _cast(case: Int4Case, dtype: str, device: str) -> Int4Case:
    td = ref.DTYPES[dtype]
    changes: dict[str, Any] = {"dtype": dtype, "device": device, "scratch": {}}
    for name in ("scales", "w13_scales", "w2_scales"):
        t = getattr(case, name)
        if t is not None:
            changes[name] = t.to(td)
    return replace(case, **changes)


def master_case(spec: Spec) -> Int4Case:
    """The weights of a spec (fp32 scales, no routing)."""
    return _linear_master(spec) if spec.suite == LINEAR else _moe_master(spec)


def routing_for(spec: Spec, m: int) -> dict[str, Any]:
    """MoE routing of the M-token batch of a spec ({} for a linear spec)."""
    if spec.suite != MOE:
        return {}
    gen = torch.Generator().manual_seed(spec.seed * 7919 + m)
    ids, wts = _routing(m, spec.experts, spec.topk, gen)
    return {"topk_ids": ids, "topk_weights": wts}


def build_vectors(
    specs: list[Spec], dtypes: tuple[str, ...] | list[str], device: str = "cpu"
) -> dict[str, list[Vector]]:
    """Vectors per dtype, in spec order, M ascending. One fp64 reference per (spec, M)."""
    out: dict[str, list[Vector]] = {d: [] for d in dtypes}
    for spec in specs:
        master = master_case(spec)
        weights = dequant_case(master)
        # one case per dtype, shared across M (MoE: the same scratch, routing per M), so
        # adapters can memoise prepared weights once per spec and dtype
        casts = {d: _cast(master, d, device) for d in dtypes}
        for m in spec.ms:
            x32 = activations(m, spec.K, spec.group_size, spec.seed)
            routing = routing_for(spec, m)
            reference = reference_output(replace(master, **routing), x32, weights)
            for dtype in dtypes:
                case = replace(casts[dtype], **routing) if routing else casts[dtype]
                out[dtype].append(Vector(case, x32.to(ref.DTYPES[dtype]), reference))
    return out
