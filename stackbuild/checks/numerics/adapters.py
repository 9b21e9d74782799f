"""Adapters: the kernels under test, each behind one small function.

An adapter is

    fn(case: Int4Case, x: torch.Tensor) -> torch.Tensor

- `case` (vectors.Int4Case, frozen) holds the INT4 weights in GPTQ form on the CPU:
  linear: qweight int32 [K/8, N], scales [K/G, N] in case.dtype, zeros uint8 [K/G, N]
  (effective zero points) or None (symmetric, 8), g_idx int32 [K] or None, group_size, K, N;
  AWQ cases also carry awq_qweight / awq_qzeros. MoE (case.suite == "int4-moe"):
  w13_qweight [E, K/8, 2N], w13_scales, w13_zeros, w2_qweight [E, N/8, K], w2_scales,
  w2_zeros, topk_ids int32 [M, topk], topk_weights float32 [M, topk]; SiLU-and-mul with the
  first N columns of w13 as gate (vLLM's fused_moe convention). case.device is the device
  the run selected; case.scratch may memoise prepared weights between calls.
- `x` is [M, K] in case.dtype on the CPU. Return [M, N] (linear) or [M, K] (MoE), any device,
  any float dtype.
- Raise NotImplementedError("why") for a case the kernel does not support: the row is
  reported as skipped with that reason. Any other exception fails the row.
- Optional attributes on the function: `suites` (default both), `dtypes` (default
  ("fp32", "bf16")).

Users add adapters with `--adapter module:function` (the module must be importable by the
target interpreter). Time per call is measured after a first call, so weight conversion
memoised in case.scratch is not counted.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from . import reference as ref
from .vectors import LINEAR, MOE, SUITES, Int4Case

AdapterFn = Callable[[Int4Case, torch.Tensor], torch.Tensor]

PATCH_LAYOUT_RELPATH = "vllm/vllm/model_executor/layers/quantization/utils/xpu_int4_layout.py"


@dataclass(frozen=True)
class Adapter:
    name: str
    fn: AdapterFn
    suites: tuple[str, ...] = SUITES
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    # why it cannot run here (None: it can); decided before any vector is built
    unavailable: str | None = None


# ---------------------------------------------------------------- torch tinygemm (CPU, CUDA)


def _sorted_by_group(q: torch.Tensor, case: Int4Case) -> torch.Tensor | None:
    """Act-order: the row permutation that makes groups contiguous (None without g_idx)."""
    if case.g_idx is None:
        return None
    g = case.g_idx.to(torch.int64)
    counts = torch.bincount(g, minlength=case.K // case.group_size)
    if not bool((counts == case.group_size).all()):
        raise NotImplementedError("g_idx groups of unequal size cannot be made contiguous")
    return torch.argsort(g, stable=True)


def _tinygemm_linear_operands(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    case: Int4Case,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ -> (q [N, K] int32, qScaleAndZeros [K/G, N, 2], act-order permutation).

    torch's int4 kernels compute (q - 8) * scale + zero, so zero = (8 - z) * scale."""
    q = ref.unpack_gptq(qweight)  # [K, N]
    perm = _sorted_by_group(q, case)
    if perm is not None:
        q = q[perm]
    s = scales.to(torch.float32)
    z = torch.full_like(s, 8.0) if zeros is None else zeros.to(torch.float32)
    sz = torch.stack([s, (8.0 - z) * s], dim=-1).to(case.torch_dtype).contiguous()
    return q.t().contiguous().to(torch.int32), sz, perm


def _cpu_pack(q_nk: torch.Tensor) -> torch.Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(q_nk, 1)


def _cuda_pack(q_nk: torch.Tensor) -> torch.Tensor:
    k = q_nk.shape[1]
    inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
    # the CUDA kernel takes two nibbles per byte, the even K index in the high nibble
    w_uint8 = ((q_nk[:, ::2] << 4) | q_nk[:, 1::2]).to(torch.uint8).cuda()
    return torch._convert_weight_to_int4pack(w_uint8, inner_k_tiles)


def _tinygemm(device: str) -> AdapterFn:
    pack = _cpu_pack if device == "cpu" else _cuda_pack
    mm = torch._weight_int4pack_mm_for_cpu if device == "cpu" else torch._weight_int4pack_mm

    def prepared(
        case: Int4Case,
        key: str,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
    ) -> tuple[Any, Any, Any]:
        full = f"tinygemm-{device}-{key}"
        if full not in case.scratch:
            q_nk, sz, perm = _tinygemm_linear_operands(qweight, scales, zeros, case)
            case.scratch[full] = (pack(q_nk), sz.to(device), perm)
        return case.scratch[full]

    def linear(
        case: Int4Case,
        x: torch.Tensor,
        key: str,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
    ) -> torch.Tensor:
        packed, sz, perm = prepared(case, key, qweight, scales, zeros)
        if perm is not None:
            x = x[:, perm.to(x.device)]
        return mm(x.to(device).contiguous(), packed, case.group_size, sz)

    def fn(case: Int4Case, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        if case.suite == LINEAR:
            assert case.qweight is not None and case.scales is not None
            return linear(case, x, "w", case.qweight, case.scales, case.zeros)
        assert case.w13_qweight is not None and case.w13_scales is not None
        assert case.w2_qweight is not None and case.w2_scales is not None
        assert case.topk_ids is not None and case.topk_weights is not None
        ids = case.topk_ids.to(torch.int64)
        wts = case.topk_weights
        out = torch.zeros(x.shape[0], case.K, dtype=torch.float32, device=device)
        n = case.N
        for e in torch.unique(ids).tolist():
            rows, slots = (ids == e).nonzero(as_tuple=True)
            z13 = None if case.w13_zeros is None else case.w13_zeros[e]
            z2 = None if case.w2_zeros is None else case.w2_zeros[e]
            h = linear(
                case, x[rows.to(device)], f"w13.{e}", case.w13_qweight[e], case.w13_scales[e], z13
            )
            act = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
            y = linear(case, act, f"w2.{e}", case.w2_qweight[e], case.w2_scales[e], z2)
            out.index_add_(0, rows.to(device), y.float() * wts[rows, slots].to(device).unsqueeze(1))
        return out.to(case.torch_dtype)

    return fn


# ---------------------------------------------------------------- vllm-xpu-kernels


def _xpu_reason(device: str) -> str | None:
    if device != "xpu":
        return f"device is {device}, not xpu"
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        return "no XPU device (torch.xpu is not available)"
    try:
        importlib.import_module("vllm_xpu_kernels._xpu_C")
    except Exception as exc:  # an import of native code fails in many ways
        return f"vllm_xpu_kernels not importable: {type(exc).__name__}: {exc}"
    return None


def kernels_version() -> str | None:
    try:
        return importlib.metadata.version("vllm-xpu-kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


def _xpu_int4_gemm(layout: ModuleType | None) -> AdapterFn:
    """torch.ops._xpu_C.int4_gemm_w4a16(A, B, bias, B_scale, B_zp, group_size, g_idx).

    Layout: with our patch's layout module (a workspace given) its gptq_linear_to_xpu is
    used, so the check covers what the patched vLLM feeds the kernel. Without it, the
    layout of vLLM 0.23's INCXPULinearMethod: B = GPTQ qweight [K/8, N] with strides
    (1, K/8), scales [K/G, N], zero point int8 tensor([8]); that path is symmetric only."""

    def fn(case: Int4Case, x: torch.Tensor) -> torch.Tensor:
        if case.suite != LINEAR:
            raise NotImplementedError("linear kernel")
        if case.dtype == "fp32":
            raise NotImplementedError("int4_gemm_w4a16 takes bf16/fp16 activations")
        qweight, zeros = case.qweight, case.zeros
        assert qweight is not None and case.scales is not None
        if "xpu-gemm" not in case.scratch:
            g_idx = None
            if case.g_idx is not None:
                if layout is None:
                    raise NotImplementedError("act-order needs the patch layout module (give the workspace)")
                qweight, perm = _patch_act_order(layout, qweight, case)
                g_idx = perm.to("xpu")
            if layout is not None:
                b, b_scale, b_zp = layout.gptq_linear_to_xpu(qweight, case.scales, zeros)
                b, b_scale = b.to("xpu"), b_scale.to("xpu")
                b_zp = b_zp.to("xpu") if b_zp is not None else None
            else:
                if zeros is not None:
                    raise NotImplementedError(
                        "asymmetric zero points need the patch layout module (give the workspace)"
                    )
                b = qweight.to("xpu").t().contiguous().t()
                b_scale = case.scales.to("xpu")
                b_zp = torch.tensor([8], dtype=torch.int8, device="xpu")
            case.scratch["xpu-gemm"] = (b, b_scale, b_zp, g_idx)
        b, b_scale, b_zp, g_idx = case.scratch["xpu-gemm"]
        out = torch.ops._xpu_C.int4_gemm_w4a16(
            x.to("xpu").contiguous(), b, None, b_scale, b_zp, case.group_size, g_idx
        )
        return out

    return fn


def _xpu_fused_moe(layout: ModuleType | None) -> AdapterFn:
    """vllm_xpu_kernels' fused MoE, INT4. 0.1.3 - 0.1.11 expose
    `fused_moe_interface.xpu_fused_moe(..., is_int4=True)`; >= 0.1.11 `XpuFusedMoe(...).apply(...)`
    (see emulators.py for the version map).
    Weights [E, 2N, K/2] uint8 (low nibble = lower K), scales [E, 2N, K/G]; the int4 path
    assumes zero point 8 (symmetric only)."""

    def convert(w_q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layout is not None:
            w, s, _ = layout.gptq_moe_to_xpu(w_q, scales, None)
            return w.contiguous(), s.contiguous()
        # vLLM 0.23 _process_weights_xpu: transpose K<->N, then the int32 words as bytes
        return (
            w_q.transpose(1, 2).contiguous().view(torch.uint8),
            scales.transpose(1, 2).contiguous(),
        )

    def fn(case: Int4Case, x: torch.Tensor) -> torch.Tensor:
        if case.suite != MOE:
            raise NotImplementedError("MoE kernel")
        if case.dtype == "fp32":
            raise NotImplementedError("xpu fused MoE takes bf16/fp16 activations")
        if not case.symmetric:
            raise NotImplementedError("the int4 fused MoE supports zero point 8 only")
        from vllm_xpu_kernels import fused_moe_interface as fmi

        assert case.w13_qweight is not None and case.w13_scales is not None
        assert case.w2_qweight is not None and case.w2_scales is not None
        assert case.topk_ids is not None and case.topk_weights is not None
        if "xpu-moe" not in case.scratch:
            w13, s13 = convert(case.w13_qweight, case.w13_scales)
            w2, s2 = convert(case.w2_qweight, case.w2_scales)
            case.scratch["xpu-moe"] = (w13.to("xpu"), s13.to("xpu"), w2.to("xpu"), s2.to("xpu"))
        w13, s13, w2, s2 = case.scratch["xpu-moe"]
        hidden = x.to("xpu").contiguous()
        out = torch.empty_like(hidden)
        common: dict[str, Any] = {
            "w13": w13,
            "w13_scales": s13,
            "w13_bias": None,
            "w2": w2,
            "w2_scales": s2,
            "w2_bias": None,
            "n_experts_per_token": case.topk,
            "activation": "silu",
            "num_experts": case.num_experts,
        }
        call: dict[str, Any] = {
            "output": out,
            "hidden_states": hidden,
            "topk_weights": case.topk_weights.to("xpu"),
            "topk_ids": case.topk_ids.to("xpu"),
        }
        # each API called with its own signature, no keyword filtering (filtering hid a
        # TypeError the patched vLLM would hit): 0.1.3-0.1.11 the function with is_int4;
        # >= 0.1.11 the class, which takes no is_int4 (uint8 weights mean INT4)
        if hasattr(fmi, "xpu_fused_moe"):
            result = fmi.xpu_fused_moe(**common, **call, is_int4=True)
            return out if result is None else result
        if hasattr(fmi, "XpuFusedMoe"):
            fmi.XpuFusedMoe(**common).apply(**call)
            return out
        raise NotImplementedError(
            f"vllm_xpu_kernels {kernels_version()}: neither xpu_fused_moe nor XpuFusedMoe"
        )

    return fn


def _patch_act_order(layout: ModuleType, qweight: torch.Tensor, case: Int4Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Act-order through the patch's own shuffle_act_order_rows -> (shuffled qweight, the
    permutation the kernel gets as g_idx). A layout module without it leaves act-order
    weights unshuffled: RuntimeError, so the row fails rather than passes by our sorting."""
    shuffle = getattr(layout, "shuffle_act_order_rows", None)
    if shuffle is None:
        raise RuntimeError(
            "the patch's xpu_int4_layout has no shuffle_act_order_rows: act-order weights "
            "reach int4_gemm_w4a16 unshuffled (its g_idx must be a column permutation)"
        )
    assert case.g_idx is not None
    q, perm = shuffle(qweight, case.g_idx, case.group_size)
    return q, perm


# ---------------------------------------------------------------- our patch's layout module


def load_patch_layout(workspace: str | Path) -> ModuleType:
    """Load xpu_int4_layout.py from an applied workspace by file path (it imports nothing
    from vllm). FileNotFoundError when the workspace does not hold it."""
    path = Path(workspace) / PATCH_LAYOUT_RELPATH
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the workspace")
    spec = importlib.util.spec_from_file_location("stackbuild_patch_xpu_int4_layout", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _patch_layout(layout: ModuleType) -> AdapterFn:
    """Converts with the patch's functions, dequantises with its own xpu_*_dequant, and
    multiplies in fp64: a wrong layout shows as a wrong product, on any device."""

    def fn(case: Int4Case, x: torch.Tensor) -> torch.Tensor:
        if case.suite == LINEAR:
            assert case.qweight is not None and case.scales is not None
            qweight, zeros = case.qweight, case.zeros
            if case.fmt == "awq":
                qweight, zeros = layout.awq_to_gptq(case.awq_qweight, case.awq_qzeros)
            if case.g_idx is not None:
                # act-order: the patch's shuffle; the kernel applies g_idx to x's columns
                qweight, perm = _patch_act_order(layout, qweight, case)
                x = x.index_select(-1, perm.to(torch.int64))
            b, b_scale, b_zp = layout.gptq_linear_to_xpu(qweight, case.scales, zeros)
            w = layout.xpu_linear_dequant(b, b_scale, b_zp, case.group_size)
            if tuple(w.shape) != (case.K, case.N):
                raise ValueError(
                    f"xpu_linear_dequant returned {tuple(w.shape)}, "
                    f"expected [K={case.K}, N={case.N}]"
                )
            return ref.gemm(x, w)
        assert case.topk_ids is not None and case.topk_weights is not None
        w13, s13, z13 = layout.gptq_moe_to_xpu(case.w13_qweight, case.w13_scales, case.w13_zeros)
        w2, s2, z2 = layout.gptq_moe_to_xpu(case.w2_qweight, case.w2_scales, case.w2_zeros)
        d13 = layout.xpu_moe_dequant(w13, s13, z13, case.group_size)  # [E, 2N, K]
        d2 = layout.xpu_moe_dequant(w2, s2, z2, case.group_size)  # [E, K, N]
        return ref.moe(x, d13.transpose(1, 2), d2.transpose(1, 2), case.topk_ids, case.topk_weights)

    return fn


# ---------------------------------------------------------------- registry


BUILTIN = ("torch-cpu-int4", "torch-cuda-int4", "xpu-int4-gemm", "xpu-fused-moe", "patch-layout")


def builtin_adapters(device: str, workspace: str | Path | None = None) -> list[Adapter]:
    """Every built-in adapter, those that cannot run on `device` marked with the reason."""
    layout: ModuleType | None = None
    layout_reason: str | None = None
    if workspace is None:
        layout_reason = "no workspace given"
    else:
        try:
            layout = load_patch_layout(workspace)
        except FileNotFoundError as exc:
            layout_reason = str(exc)
    cuda_reason = None
    if device != "cuda":
        cuda_reason = f"device is {device}, not cuda"
    elif not torch.cuda.is_available():
        cuda_reason = "no CUDA device (torch.cuda is not available)"
    xpu_reason = _xpu_reason(device)
    adapters = [
        Adapter("torch-cpu-int4", _tinygemm("cpu"), SUITES, ("fp32", "bf16")),
        Adapter(
            "torch-cuda-int4",
            _tinygemm("cuda") if cuda_reason is None else _never,
            SUITES,
            ("bf16",),
            cuda_reason,
        ),
        Adapter("xpu-int4-gemm", _xpu_int4_gemm(layout), (LINEAR,), ("bf16", "fp16"), xpu_reason),
        Adapter("xpu-fused-moe", _xpu_fused_moe(layout), (MOE,), ("bf16", "fp16"), xpu_reason),
        Adapter(
            "patch-layout",
            _patch_layout(layout) if layout is not None else _never,
            SUITES,
            ("fp32",),
            layout_reason,
        ),
    ]
    return adapters


def _never(case: Int4Case, x: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("adapter unavailable")


def load_user_adapter(spec: str) -> Adapter:
    """`module:function` (function may be dotted) -> Adapter. ValueError on a bad spec."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"adapter {spec!r}: expected module:function")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"adapter {spec!r}: cannot import {module_name}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"adapter {spec!r}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"adapter {spec!r}: {attr} is not callable")
    suites = tuple(getattr(obj, "suites", SUITES))
    dtypes = tuple(getattr(obj, "dtypes", ("fp32", "bf16")))
    for d in dtypes:
        if d not in ref.DTYPES:
            raise ValueError(f"adapter {spec!r}: unknown dtype {d!r} in its dtypes")
    return Adapter(spec, obj, suites, dtypes)
