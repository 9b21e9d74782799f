"""CPU emulators of the vllm-xpu-kernels entry points our vLLM 0.19.0 series calls.

Each emulator takes the kernel's exact arguments (names, order, defaults), reads them
the way the kernel reads its memory, computes in float64 and returns (or writes) the
kernel's dtype. They exist so that the `layers` suite can run the PATCHED vLLM code
on a CPU: the throw-away `vllm_xpu_kernels` package made by kernelpkg.py forwards to
them. Sources of truth are cited per function as `tag:file:line` of
github.com/vllm-project/vllm-xpu-kernels (read with `git show`), and for 0.1.3.1,
0.1.12.1 and 0.1.16.2 also the wheels on the package index (their Python files match
the tags' for what is cited here).

Version map of the fused MoE Python API (checked tag by tag):

    0.1.3, 0.1.4      xpu_fused_moe(..., ep_size=1, output, is_fp8, is_int4, is_mxfp4);
                      transposes non-4-bit weights itself ([E,N,K] -> [E,K,N])
    0.1.5 .. 0.1.7    xpu_fused_moe(..., ep_size=1, expert_map, output, is_fp8,
                      is_int4, is_mxfp4); non-4-bit weights must come as [E,K,N]
    0.1.8 .. 0.1.10   the same function, plus class XpuFusedMoe(..., is_int4=...)
    0.1.11            the function, plus XpuFusedMoe without is_* flags (weight dtype decides)
    >= 0.1.12         XpuFusedMoe only (0.1.16 adds activation_situ_* keywords)
"""

from __future__ import annotations

from typing import Any

import torch

F64 = torch.float64

# A negative control of the layers suite plants one kernel bug class here (None: faithful).
#   "fp4-decode"         INT4 nibbles decoded as FP4 E2M1 (the seeds' 0.1.4 bug class)
#   "skipped-transpose"  the weight buffer read without the K<->N transpose
#   "zp-0"               zero point 0 instead of the given one (linear) / of 8 (MoE)
PLANT: str | None = None

# -- int4_gemm_w4a16 ---------------------------------------------------------------


def _nibbles_along_last(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> int64 [..., 8C]: nibble i (bits 4i..4i+3) of word c is element 8c+i
    (oneDNN u4 memory: element 2t is the low nibble of byte t; bytes little-endian)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    return ((w.unsqueeze(-1) >> shifts) & 0xF).reshape(*words.shape[:-1], words.shape[-1] * 8)


def int4_gemm_w4a16(
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor | None,
    B_scale: torch.Tensor,
    B_zp: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None,
) -> torch.Tensor:
    """torch.ops._xpu_C.int4_gemm_w4a16, vllm-xpu-kernels 0.1.3 .. 0.1.16 (stable schema).

    Schema: v0.1.5:csrc/xpu/torch_bindings.cpp:22-25
      ``int4_gemm_w4a16(Tensor A, Tensor B, Tensor? bias, Tensor B_scale, Tensor B_zp,
      int group_size, Tensor? g_idx) -> Tensor``.
    Semantics: v0.1.5:csrc/xpu/onednn/onednn_matmul.cpp:96-112 and
    v0.1.5:csrc/xpu/onednn/int4_gemm_w4a16.h:14-140:
      * ``g_idx`` given: ``A = A.index_select(-1, g_idx)`` (onednn_matmul.cpp:106), then a
        plain grouped GEMM with contiguous groups ``k // group_size``. So g_idx must be a
        permutation of 0..K-1 and B pre-shuffled (the kernel test does it with
        GPTQUtils.shuffle: v0.1.5:tests/test_int4_gemm_onednn.py:68-71).
      * B: logical [K/8, N] int32; oneDNN reads it with ``ldb = B.stride(-1) * 8``
        (int4_gemm_w4a16.h:57): element (k, n) is nibble k % 8 of the word at
        ``n * B.stride(-1) + k // 8``. Only strides (1, K/8) (a contiguous [N, K/8]
        transposed) give the intended weight; the emulator reads memory the same way.
      * B_scale [K/G, N]: w scale of (k, n) is ``B_scale[k // G, n]`` (mask 0b11, groups {G, 1}).
      * B_zp: 1-D (symmetric) -> one zero point for all (the tests pass int8 [8]);
        2-D int32 [K/G, N/8] -> u4 [K/G, N] packed along N, nibble i of word j is column 8j+i
        (int4_gemm_w4a16.h:128-139), effective zero points (GPTQ v1 ``qzeros + 0x11111111``,
        v0.1.5:vllm_xpu_kernels/quantization/_quantize_convert.py:216-220).
      * w = (q - zp) * scale; out = A @ w (+ bias), in A's dtype (fp16 or bf16 only).
    """
    if A.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"Unsupported data type for int4-f16/bf16 matmul: {A.dtype}")
    if A.dim() not in (2, 3):
        raise RuntimeError(f"Unsupported input dimension for int4-f16/bf16 matmul: {A.dim()}")
    if B.dtype != torch.int32 or B.dim() != 2:
        raise RuntimeError(f"B must be int32 [K/8, N], got {B.dtype} {tuple(B.shape)}")
    if g_idx is not None:
        A = A.index_select(-1, g_idx)
    k = A.shape[-1]
    n = B.shape[-1]
    words = B.as_strided((n, k // 8), (B.stride(-1), 1))  # what oneDNN reads, ldb = stride*8
    q = _nibbles_along_last(words).t().to(F64)  # [K, N]
    if PLANT == "skipped-transpose":
        q = _nibbles_along_last(B.contiguous().view(-1).reshape(n, k // 8)).reshape(k, n).to(F64)
    if PLANT == "fp4-decode":
        q = torch.tensor(E2M1, dtype=F64)[q.to(torch.int64)] + 8
    gs = k if group_size in (-1, 0) else group_size
    groups = torch.arange(k) // gs
    scale = B_scale.to(F64)
    if scale.shape != (k // gs, n):
        raise RuntimeError(f"B_scale must be [K/G, N] = [{k // gs}, {n}], got {tuple(scale.shape)}")
    if B_zp.dim() == 1:
        zp: torch.Tensor = B_zp.to(F64).reshape(1, 1)[:, :1].expand(k, n)
    else:
        if B_zp.shape != (k // gs, n // 8):
            raise RuntimeError(f"B_zp must be [K/G, N/8] = [{k // gs}, {n // 8}], got {tuple(B_zp.shape)}")
        zp = _nibbles_along_last(B_zp.contiguous()).to(F64)[groups]
    if PLANT == "zp-0":
        zp = torch.zeros_like(zp)
    w = (q - zp) * scale[groups]
    out = A.to(F64) @ w
    if bias is not None and bias.numel():
        out = out + bias.to(F64)
    return out.to(A.dtype)


# -- static_scaled_fp8_quant --------------------------------------------------------

STATIC_SCALED_FP8_QUANT_SCHEMA = (
    "static_scaled_fp8_quant(Tensor! result, Tensor input, Tensor scale, "
    "(int, int)? group_shape=None) -> ()"
)


def static_scaled_fp8_quant(
    result: torch.Tensor, input: torch.Tensor, scale: torch.Tensor, group_shape: Any = None
) -> None:
    """torch.ops._C.static_scaled_fp8_quant, vllm-xpu-kernels 0.1.5.

    Schema: v0.1.5:csrc/torch_bindings.cpp:65-68. Semantics: v0.1.5:csrc/quantization/
    fp8/fp8_quant.cpp:357-400: per-tensor when scale has one element (only this case is
    emulated): result = fp8(clamp(input / scale, -max, max)), written in place."""
    if scale.numel() != 1:
        raise NotImplementedError("emulator: only per-tensor static_scaled_fp8_quant is emulated")
    fmax = float(torch.finfo(result.dtype).max)
    q = (input.to(F64) / float(scale.reshape(-1)[0])).clamp(-fmax, fmax)
    result.copy_(q.to(result.dtype))


# -- fused MoE -----------------------------------------------------------------------

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _signed_int4(w: torch.Tensor) -> torch.Tensor:
    """What the kernel package does to uint4 weights before the grouped GEMM (its
    ``implement_zp``, v0.1.5:vllm_xpu_kernels/fused_moe_interface.py:80-108): each nibble
    u becomes the 4-bit two's complement of u - 8 (the kernel has zero point 8, fixed)."""
    lo = (w.to(torch.int16) & 0xF) - 8
    hi = ((w.to(torch.int16) >> 4) & 0xF) - 8
    return (((hi & 0xF) << 4) | (lo & 0xF)).to(torch.uint8)


def _decode_4bit(w: torch.Tensor, scales: torch.Tensor, mxfp4: bool, dtype: torch.dtype) -> torch.Tensor:
    """[E, N, K/2] bytes -> float64 [E, N, K]; byte j holds k = 2j (low nibble) and 2j+1
    (high nibble) (v0.1.5:tests/fused_moe/test_fused_moe.py:36-49). INT4 (is_B_int4: the
    scale element type is the activation dtype) reads signed nibbles (after _signed_int4);
    MXFP4 (uint8 = E8M0 scales, grouped_gemm_xe2.hpp:89-92) reads E2M1 codes and 2^(s-127)."""
    b = w.view(torch.uint8).to(torch.int64)
    nib = torch.stack((b & 0xF, (b >> 4) & 0xF), dim=-1).reshape(*w.shape[:-1], w.shape[-1] * 2)
    k = nib.shape[-1]
    if mxfp4:
        vals = torch.tensor(E2M1, dtype=F64)[nib]
        s = torch.pow(2.0, scales.to(torch.int64).to(F64) - 127)
    else:
        if PLANT == "fp4-decode":
            vals = torch.tensor(E2M1, dtype=F64)[nib]
        elif PLANT == "zp-0":
            vals = (nib ^ 8).to(F64)  # the unsigned nibble, zero point 0
        else:
            vals = torch.where(nib >= 8, nib - 16, nib).to(F64)
        if scales.dtype != dtype:
            # the kernel reinterprets the scale buffer as the activation dtype
            s = scales.contiguous().view(-1).view(torch.uint8).view(dtype)[: scales.numel()]
            s = s.reshape(scales.shape).to(F64)
        else:
            s = scales.to(F64)
    group_num = s.shape[-1]
    if k % group_num:
        raise RuntimeError("ptr_scales.size(2) of int4 must be divisible by K")
    gs = k // group_num
    if gs not in (32, 64, 128, 256):
        raise RuntimeError("group_size must be 32, 64, 128 or 256")
    return vals * s[..., torch.arange(k) // gs]


def _act_and_mul(x: torch.Tensor, activation: Any) -> torch.Tensor:
    """silu_and_mul / gelu_and_mul: first half is the gate (v0.1.5:fused_moe_interface.py:253-260)."""
    act = getattr(activation, "value", activation)
    d = x.shape[-1] // 2
    gate, up = x[..., :d], x[..., d:]
    if act == "silu":
        return torch.nn.functional.silu(gate) * up
    if act == "gelu":
        return torch.nn.functional.gelu(gate) * up
    raise NotImplementedError(f"emulator: activation {act!r} is not emulated")


def _grouped_gemm(a: torch.Tensor, b_kn: torch.Tensor, bias: torch.Tensor | None, k: int, n: int) -> torch.Tensor:
    """cutlass_grouped_gemm_interface shape checks (v0.1.5:csrc/xpu/grouped_gemm/xe_2/
    grouped_gemm_xe2_interface.hpp:182-220) and the product for one expert."""
    if a.shape[-1] != k or b_kn.shape[0] != k:
        raise RuntimeError("ptr_A.size(1) must match ptr_B.size(1)")
    if b_kn.shape[1] != n:
        raise RuntimeError("ptr_B.size(2) must match ptr_D.size(1)")
    out = a @ b_kn
    return out if bias is None else out + bias.to(F64)


def _weights_kn(w: torch.Tensor, scales: torch.Tensor | None, four_bit: bool, mxfp4: bool, fp8: bool,
                dtype: torch.dtype) -> torch.Tensor:
    """Per-expert float64 B as [E, K, N] the way the kernel reads it."""
    if four_bit:
        assert scales is not None
        dec = _decode_4bit(w, scales, mxfp4, dtype)  # [E, N, K]
        if PLANT == "skipped-transpose":
            return dec.reshape(dec.shape[0], dec.shape[2], dec.shape[1])
        return dec.transpose(1, 2)  # [E, N, K] -> [E, K, N]
    wf = w.to(F64)
    if fp8:
        if scales is None:
            raise RuntimeError("fp8 MoE needs per-expert scales")
        wf = wf * scales.to(F64).reshape(-1, 1, 1)
    return wf  # non-4-bit: the buffer is read as [E, K, N]


def _moe(
    hidden_states: torch.Tensor,
    w13_kn: torch.Tensor,
    w13_bias: torch.Tensor | None,
    w2_kn: torch.Tensor,
    w2_bias: torch.Tensor | None,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: Any,
    num_experts: int,
    ep_rank: int,
    ep_size: int,
    inter_size: int,
) -> torch.Tensor:
    """remap_hidden_states -> gemm1 -> act -> gemm2 -> moe_gather (v0.1.5:
    fused_moe_interface.py:181-286): each token's top-k experts, weighted by topk_weights;
    experts outside this rank's slice contribute nothing."""
    x = hidden_states.to(F64)
    h = x.shape[-1]
    out = torch.zeros_like(x)
    first = ep_rank * num_experts
    ids = topk_ids.to(torch.int64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) - first
            if not 0 <= e < num_experts:
                continue
            g1 = _grouped_gemm(x[t : t + 1], w13_kn[e], None if w13_bias is None else w13_bias[e], h, 2 * inter_size)
            a = _act_and_mul(g1, activation)
            g2 = _grouped_gemm(a, w2_kn[e], None if w2_bias is None else w2_bias[e], inter_size, h)
            out[t] += float(topk_weights[t, j]) * g2[0]
    return out


def _check_moe_common(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, output: torch.Tensor | None) -> None:
    if output is not None and output.shape != hidden_states.shape:
        raise AssertionError("output shape must be the same as hidden_states shape")
    if not (w13.is_contiguous() and w2.is_contiguous()):
        raise AssertionError("w13 and w2 must be contiguous")


def _fused_moe_function(
    *, transpose_non_4bit: bool, hidden_states: torch.Tensor, w13: torch.Tensor, w13_scales: Any,
    w13_bias: Any, w2: torch.Tensor, w2_scales: Any, w2_bias: Any, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, n_experts_per_token: int, activation: Any, num_experts: int,
    ep_rank: int, ep_size: int, output: torch.Tensor | None, is_fp8: bool, is_int4: bool,
    is_mxfp4: bool,
) -> torch.Tensor:
    _check_moe_common(hidden_states, w13, w2, output)
    four_bit = is_int4 or is_mxfp4
    if not four_bit and transpose_non_4bit:
        # 0.1.3/0.1.4: the kernel package transposes [E, N, K] itself, once, in place
        inter_size = w13.shape[-2] // 2
        if not hasattr(w13, "xpu_fused_moe"):
            w13.data = w13.transpose(-1, -2).contiguous()
            w2.data = w2.transpose(-1, -2).contiguous()
            w13.xpu_fused_moe = True  # type: ignore[attr-defined]
            w13.inter_size = inter_size  # type: ignore[attr-defined]
        else:
            inter_size = w13.inter_size  # type: ignore[attr-defined]
    else:
        inter_size = w13.shape[-1] // 2 if not four_bit else w13.shape[-2] // 2
    if is_int4 and not hasattr(w13, "xpu_fused_moe"):
        w13.data = _signed_int4(w13.data)
        w2.data = _signed_int4(w2.data)
        w13.xpu_fused_moe = True  # type: ignore[attr-defined]
    dtype = hidden_states.dtype
    w13_kn = _weights_kn(w13, w13_scales, four_bit, is_mxfp4, is_fp8, dtype)
    w2_kn = _weights_kn(w2, w2_scales, four_bit, is_mxfp4, is_fp8, dtype)
    res = _moe(hidden_states, w13_kn, w13_bias, w2_kn, w2_bias, topk_weights, topk_ids, activation,
               num_experts, ep_rank, ep_size, inter_size)
    if output is None:
        output = torch.empty_like(hidden_states)
    output.copy_(res.to(output.dtype))
    return output


def xpu_fused_moe_0_1_3(hidden_states, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
                        topk_weights, topk_ids, n_experts_per_token, activation, num_experts,
                        ep_rank=0, ep_size=1, output=None, is_fp8=False, is_int4=False,
                        is_mxfp4=False):
    """``fused_moe_interface.xpu_fused_moe``, vllm-xpu-kernels 0.1.3 and 0.1.4.

    Signature: v0.1.4:vllm_xpu_kernels/fused_moe_interface.py:111-128 (also the 0.1.3.1
    wheel). Non-4-bit weights come in vLLM's [E, N, K] and the package transposes them in
    place once (v0.1.4:fused_moe_interface.py:160-170, attribute ``xpu_fused_moe``). 4-bit
    weights: uint8 [E, N, K/2], scales [E, N, K/G] (docstring lines 130-151)."""
    return _fused_moe_function(
        transpose_non_4bit=True, hidden_states=hidden_states, w13=w13, w13_scales=w13_scales,
        w13_bias=w13_bias, w2=w2, w2_scales=w2_scales, w2_bias=w2_bias, topk_weights=topk_weights,
        topk_ids=topk_ids, n_experts_per_token=n_experts_per_token, activation=activation,
        num_experts=num_experts, ep_rank=ep_rank, ep_size=ep_size, output=output, is_fp8=is_fp8,
        is_int4=is_int4, is_mxfp4=is_mxfp4)


def xpu_fused_moe_0_1_5(hidden_states, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
                        topk_weights, topk_ids, n_experts_per_token, activation, num_experts,
                        ep_rank=0, ep_size=1, expert_map=None, output=None, is_fp8=False,
                        is_int4=False, is_mxfp4=False):
    """``fused_moe_interface.xpu_fused_moe``, vllm-xpu-kernels 0.1.5 .. 0.1.11.

    Signature: v0.1.5:vllm_xpu_kernels/fused_moe_interface.py:111-129 (adds expert_map).
    0.1.5 stopped transposing non-4-bit weights (git diff v0.1.4 v0.1.5, lines 154-167):
    they must come as [E, K, N] ("4bits support [E, N, K], other types [E, K, N]",
    line 158-159); the grouped GEMM checks ``ptr_B.size(1) == K``
    (grouped_gemm_xe2_interface.hpp:214-215), so [E, N, K] with N != K raises and a
    square one is silently read transposed."""
    if expert_map is not None:
        raise NotImplementedError("emulator: expert_map is not emulated")
    return _fused_moe_function(
        transpose_non_4bit=False, hidden_states=hidden_states, w13=w13, w13_scales=w13_scales,
        w13_bias=w13_bias, w2=w2, w2_scales=w2_scales, w2_bias=w2_bias, topk_weights=topk_weights,
        topk_ids=topk_ids, n_experts_per_token=n_experts_per_token, activation=activation,
        num_experts=num_experts, ep_rank=ep_rank, ep_size=ep_size, output=output, is_fp8=is_fp8,
        is_int4=is_int4, is_mxfp4=is_mxfp4)


class XpuFusedMoe:
    """``fused_moe_interface.XpuFusedMoe``, vllm-xpu-kernels >= 0.1.11 (0.1.12.1, 0.1.16.2 wheels).

    __init__: v0.1.12:vllm_xpu_kernels/fused_moe_interface.py:156-265 (0.1.16.2 wheel:
    fused_moe_interface.py:186-203 adds activation_situ_beta/_linear_beta). No is_* flags:
    the weight dtype decides (``_get_weights_dtype``, v0.1.12:fused_moe_interface.py:46-60):
    uint8 -> INT4 (converted to signed int8 nibbles in place), float4_e2m1fn_x2 -> MXFP4,
    float8 -> FP8. Layouts as in 0.1.5: 4-bit [E, N, K/2], other types [E, K, N].
    apply(output, hidden_states, topk_weights, topk_ids, expert_map=None, a1q_scale=None):
    lines 267-283."""

    def __init__(self, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
                 n_experts_per_token, activation, num_experts, ep_rank=0, ep_size=1,
                 expert_map=None, gemm1_clamp_limit=None, activation_situ_beta=None,
                 activation_situ_linear_beta=None):
        assert w13.is_contiguous() and w2.is_contiguous()
        is_fp8 = w13.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        is_int4 = w13.dtype == torch.uint8
        is_mxfp4 = w13.dtype == getattr(torch, "float4_e2m1fn_x2", None)
        if is_fp8 and w13_scales is not None and (w13_scales.dtype == torch.uint8 or w13_scales.dim() == 3):
            raise NotImplementedError("emulator: MXFP8 / block FP8 are not emulated")
        if gemm1_clamp_limit is not None or activation_situ_beta is not None or expert_map is not None:
            raise NotImplementedError("emulator: clamp, SITU and expert_map are not emulated")
        four_bit = is_int4 or is_mxfp4
        self.inter_size = w13.shape[-2] // 2 if four_bit else w13.shape[-1] // 2
        if is_int4 and not hasattr(w13, "xpu_fused_moe"):
            w13.data = _signed_int4(w13.data).view(torch.int8)
            w2.data = _signed_int4(w2.data).view(torch.int8)
            w13.xpu_fused_moe = True
        self.w13, self.w2 = w13, w2
        self.w13_scales, self.w2_scales = w13_scales, w2_scales
        self.w13_bias, self.w2_bias = w13_bias, w2_bias
        self.n_experts_per_token = n_experts_per_token
        self.activation = activation
        _act_and_mul(torch.zeros(1, 2, dtype=F64), activation)  # unsupported activation: raise now
        self.num_experts, self.ep_rank, self.ep_size = num_experts, ep_rank, ep_size
        self.flags = (is_fp8, four_bit, is_mxfp4)

    def apply(self, output, hidden_states, topk_weights, topk_ids, expert_map=None, a1q_scale=None):
        if expert_map is not None or a1q_scale is not None:
            raise NotImplementedError("emulator: expert_map / a1q_scale are not emulated")
        is_fp8, four_bit, is_mxfp4 = self.flags
        dtype = hidden_states.dtype
        w13_kn = _weights_kn(self.w13, self.w13_scales, four_bit, is_mxfp4, is_fp8, dtype)
        w2_kn = _weights_kn(self.w2, self.w2_scales, four_bit, is_mxfp4, is_fp8, dtype)
        res = _moe(hidden_states, w13_kn, self.w13_bias, w2_kn, self.w2_bias, topk_weights, topk_ids,
                   self.activation, self.num_experts, self.ep_rank, self.ep_size, self.inter_size)
        output.copy_(res.to(output.dtype))


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("+")[0].split(".") if p.isdigit())


def fused_moe_api(version: str) -> dict[str, Any]:
    """The fused_moe_interface names a kernel version exports (module docstring's map)."""
    v = version_tuple(version)[:3]
    names: dict[str, Any] = {}
    if v < (0, 1, 5):
        names["xpu_fused_moe"] = xpu_fused_moe_0_1_3
    elif v < (0, 1, 12):
        names["xpu_fused_moe"] = xpu_fused_moe_0_1_5
    if v >= (0, 1, 11):
        names["XpuFusedMoe"] = XpuFusedMoe
    elif v >= (0, 1, 8):
        names["XpuFusedMoe"] = None  # exists there with is_* flags; not emulated
    return {k: f for k, f in names.items() if f is not None}

