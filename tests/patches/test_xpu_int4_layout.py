"""xpu-int4-linear.patch's xpu_int4_layout.py (used by xpu-int4-moe too):
GPTQ/AWQ data round-tripped through the XPU layouts against a plain fp64 GPTQ
dequant written here, bit by bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _load import load_file

pytestmark = pytest.mark.network

LAYOUT = "vllm/model_executor/layers/quantization/utils/xpu_int4_layout.py"


@pytest.fixture(scope="module")
def L(patched_0190: Path):
    return load_file(patched_0190 / LAYOUT, "xpu_int4_layout_under_test")


def gptq_pack(q: torch.Tensor) -> torch.Tensor:
    """[K, N] 0..15 -> GPTQ int32 [K/8, N], written independently of the module."""
    k, n = q.shape
    out = torch.zeros(k // 8, n, dtype=torch.int64)
    for i in range(8):
        out |= q[i::8].to(torch.int64) << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def gptq_dequant(qweight: torch.Tensor, scales, zeros, group_size: int) -> torch.Tensor:
    """Plain fp64 GPTQ dequant: w[k, n] = (nibble(k % 8) of qweight[k // 8, n] - z) * s."""
    k = qweight.shape[0] * 8
    w = torch.empty(k, qweight.shape[1], dtype=torch.float64)
    for kk in range(k):
        q = ((qweight[kk // 8].to(torch.int64) >> (4 * (kk % 8))) & 0xF).double()
        g = kk // group_size
        z = 8.0 if zeros is None else zeros[g].double()
        w[kk] = (q - z) * scales[g].double()
    return w


def random_gptq(k: int, n: int, group_size: int, asym: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen)
    q[:16, 0] = torch.arange(16)  # every nibble value present
    scales = (torch.rand(k // group_size, n, generator=gen) + 0.05).to(torch.float16)
    zeros = (
        torch.randint(0, 16, (k // group_size, n), generator=gen).to(torch.uint8) if asym else None
    )
    return q, gptq_pack(q), scales, zeros


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("asym", [False, True])
def test_linear_round_trip(L, group_size: int, asym: bool) -> None:
    k, n = 256, 96  # K != N
    q, qweight, scales, zeros = random_gptq(k, n, group_size, asym)
    assert set(q.flatten().tolist()) == set(range(16))
    b, b_scale, b_zp = L.gptq_linear_to_xpu(qweight, scales, zeros)
    # what int4_gemm_w4a16 takes: [K/8, N] with strides (1, K/8)
    assert b.shape == (k // 8, n) and b.stride() == (1, k // 8) and b.t().is_contiguous()
    assert b_scale.shape == (k // group_size, n)
    if asym:
        assert b_zp.dtype == torch.int32 and b_zp.shape == (k // group_size, n // 8)
    else:
        assert b_zp.dtype == torch.int8 and b_zp.tolist() == [8]
    got = L.xpu_linear_dequant(b, b_scale, b_zp, group_size)
    want = gptq_dequant(qweight, scales, zeros, group_size)
    assert got.dtype == torch.float64 and got.shape == (k, n)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unpack_pack_rows_and_cols(L) -> None:
    q = torch.randint(0, 16, (2, 64, 40))
    assert torch.equal(L.unpack_int4_rows(L.pack_int4_rows(q)), q.to(torch.uint8))
    for order in (None, L.AWQ_PACK_ORDER):
        assert torch.equal(L.unpack_int4_cols(L.pack_int4_cols(q, order), order), q.to(torch.uint8))
    # nibble i of each int32 is row 8r+i
    assert torch.equal(L.pack_int4_rows(q[0]), gptq_pack(q[0]))


def test_awq_to_gptq_matches_independent_awq_packing(L) -> None:
    k, n, g = 128, 64, 32
    q = torch.randint(0, 16, (k, n))
    z = torch.randint(0, 16, (k // g, n))

    def awq_pack(x: torch.Tensor) -> torch.Tensor:  # AWQ: nibble i holds column 8c+order[i]
        order = (0, 2, 4, 6, 1, 3, 5, 7)
        out = torch.zeros(x.shape[0], x.shape[1] // 8, dtype=torch.int64)
        for i, col in enumerate(order):
            out |= x[:, col::8].to(torch.int64) << (4 * i)
        return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)

    qweight, zeros = L.awq_to_gptq(awq_pack(q), awq_pack(z))
    assert torch.equal(qweight, gptq_pack(q))
    assert torch.equal(zeros, z.to(torch.uint8))


def test_gptq_v1_qzeros_store_z_minus_one(L) -> None:
    z = torch.randint(1, 16, (4, 16))
    stored = L.pack_int4_cols(z - 1)
    assert torch.equal(L.unpack_gptq_qzeros(stored), z.to(torch.uint8))
    assert torch.equal(L.unpack_gptq_qzeros(stored, v1=False), (z - 1).to(torch.uint8))


def test_zero_point_16_refused(L) -> None:
    q, qweight, scales, _ = random_gptq(64, 16, 32, asym=False)
    zeros = torch.full((2, 16), 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="zero point 16"):
        L.gptq_linear_to_xpu(qweight, scales, zeros)


def moe_reference(w_q, scales, group_size):
    return torch.stack(
        [gptq_dequant(w_q[e], scales[e], None, group_size).t() for e in range(w_q.shape[0])]
    )


@pytest.mark.parametrize("group_size", [32, 128])
def test_moe_round_trip(L, group_size: int) -> None:
    e, k, n2 = 3, 256, 160  # w13: K=hidden 256, 2N=160
    qs, packed, scales = [], [], []
    for i in range(e):
        q, qw, s, _ = random_gptq(k, n2, group_size, asym=False, seed=i)
        qs.append(q)
        packed.append(qw)
        scales.append(s)
    w_q, s = torch.stack(packed), torch.stack(scales)
    w, ws, zp = L.gptq_moe_to_xpu(w_q, s)
    assert w.dtype == torch.uint8 and w.shape == (e, n2, k // 2) and w.is_contiguous()
    assert ws.shape == (e, n2, k // group_size) and zp is None
    # low nibble = lower K index
    assert int(w[1, 5, 3]) == int(qs[1][6, 5]) | (int(qs[1][7, 5]) << 4)
    got = L.xpu_moe_dequant(w, ws, None, group_size)
    torch.testing.assert_close(got, moe_reference(w_q, s, group_size), rtol=0, atol=0)


def test_moe_skipped_transpose_is_detected(L) -> None:
    e, k, n2, g = 2, 128, 64, 32
    packed, scales = [], []
    for i in range(e):
        _, qw, s, _ = random_gptq(k, n2, g, asym=False, seed=10 + i)
        packed.append(qw)
        scales.append(s)
    w_q, s = torch.stack(packed), torch.stack(scales)
    want = moe_reference(w_q, s, g)
    # the bug: reinterpret GPTQ's [E, K/8, N2] bytes as [E, N2, K/2] without moving K
    wrong_w = w_q.contiguous().view(torch.uint8).reshape(e, n2, k // 2)
    _, ws, _ = L.gptq_moe_to_xpu(w_q, s)
    wrong = L.xpu_moe_dequant(wrong_w, ws, None, g)
    rel = (wrong - want).norm() / want.norm()
    assert rel > 0.5
    right_w, _, _ = L.gptq_moe_to_xpu(w_q, s)
    assert not torch.equal(right_w, wrong_w)


def test_linear_dequant_matches_torch_cpu_int4_kernel(L) -> None:
    """A real INT4 kernel (torch CPU, zero point 8 convention) agrees with the
    decode of the XPU operands, so the reference decode itself is not wrong."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("torch build without CPU int4 kernels")
    k, n, g = 256, 64, 32
    q, qweight, scales, _ = random_gptq(k, n, g, asym=False, seed=3)
    scales = scales.float()
    b, b_scale, b_zp = L.gptq_linear_to_xpu(qweight, scales)
    w = L.xpu_linear_dequant(b, b_scale, b_zp, g).float()  # [K, N]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        q.t().contiguous().to(torch.int32), 1
    )
    sz = torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()  # [K/G, N, 2]
    x = torch.randn(5, k)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz)
    torch.testing.assert_close(got, x @ w, rtol=1e-4, atol=1e-3)
