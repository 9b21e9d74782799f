"""The fp64 reference against independent naive loops on tiny shapes, and the metrics."""

from __future__ import annotations

import math

import pytest
import torch

from stackbuild.checks.numerics import reference as ref


def _u32(v: int) -> int:
    return v & 0xFFFFFFFF


def naive_gptq(qweight, scales, zeros, group_size, g_idx=None) -> list[list[float]]:
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    out = []
    for kk in range(k):
        row = []
        for nn in range(n):
            word = _u32(int(qweight[kk // 8, nn]))
            q = (word >> (4 * (kk % 8))) & 0xF
            g = int(g_idx[kk]) if g_idx is not None else kk // group_size
            z = 8 if zeros is None else int(zeros[g, nn])
            row.append((q - z) * float(scales[g, nn]))
        out.append(row)
    return out


def naive_awq(qweight, scales, qzeros, group_size) -> list[list[float]]:
    order = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column 8j + order[i]
    k, n = qweight.shape[0], qweight.shape[1] * 8

    def nib(word: int, col: int) -> int:
        return (_u32(word) >> (4 * order.index(col % 8))) & 0xF

    return [
        [
            (nib(int(qweight[kk, nn // 8]), nn) - nib(int(qzeros[kk // group_size, nn // 8]), nn))
            * float(scales[kk // group_size, nn])
            for nn in range(n)
        ]
        for kk in range(k)
    ]


def close(got: torch.Tensor, expected: list[list[float]]) -> bool:
    return torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def tiny(k: int = 16, n: int = 8, groups: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=gen, dtype=torch.int64)
    scales = torch.rand(groups, n, generator=gen) + 0.1
    zeros = torch.randint(0, 16, (groups, n), generator=gen).to(torch.uint8)
    return qweight.to(torch.int32), scales, zeros


@pytest.mark.parametrize("asym", [False, True])
def test_gptq_dequant_matches_naive_loop(asym: bool) -> None:
    qweight, scales, zeros = tiny()
    z = zeros if asym else None
    got = ref.dequant_gptq(qweight, scales, z, group_size=8)
    assert close(got, naive_gptq(qweight, scales, z, 8))


def test_gptq_dequant_with_g_idx_uses_the_given_group_per_row() -> None:
    qweight, scales, zeros = tiny()
    g_idx = torch.tensor([1, 0] * 8, dtype=torch.int32)
    got = ref.dequant_gptq(qweight, scales, zeros, 8, g_idx)
    assert close(got, naive_gptq(qweight, scales, zeros, 8, g_idx))
    # and it differs from the contiguous grouping: g_idx is not ignored
    assert not torch.equal(got, ref.dequant_gptq(qweight, scales, zeros, 8))


def test_awq_dequant_matches_naive_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    qweight = torch.randint(-(2**31), 2**31 - 1, (16, 2), generator=gen).to(torch.int32)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (2, 2), generator=gen).to(torch.int32)
    scales = torch.rand(2, 16, generator=gen) + 0.1
    got = ref.dequant_awq(qweight, scales, qzeros, 8)
    assert close(got, naive_awq(qweight, scales, qzeros, 8))


def test_pack_unpack_round_trips_and_awq_to_gptq_keeps_the_weights() -> None:
    q = torch.randint(0, 16, (32, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(ref.unpack_gptq(ref.pack_gptq(q)), q)
    assert torch.equal(ref.unpack_awq(ref.pack_awq(q)), q)
    z = torch.randint(0, 16, (2, 24), generator=torch.Generator().manual_seed(2))
    gq, gz = ref.awq_to_gptq(ref.pack_awq(q), ref.pack_awq(z))
    s = torch.rand(2, 24) + 0.1
    assert torch.equal(
        ref.dequant_gptq(gq, s, gz, 16), ref.dequant_awq(ref.pack_awq(q), s, ref.pack_awq(z), 16)
    )


def test_moe_matches_a_naive_token_loop() -> None:
    gen = torch.Generator().manual_seed(5)
    e, k, n, m = 4, 6, 3, 5
    w13 = torch.randn(e, k, 2 * n, generator=gen, dtype=torch.float64)
    w2 = torch.randn(e, n, k, generator=gen, dtype=torch.float64)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    ids = torch.tensor([[0, 3], [1, 2], [3, 0], [2, 2 - 1], [0, 1]], dtype=torch.int32)
    wts = torch.rand(m, 2, generator=gen)
    got = ref.moe(x, w13, w2, ids, wts)
    for t in range(m):
        acc = [0.0] * k
        for j in range(2):
            ex = int(ids[t, j])
            h = [
                sum(float(x[t, kk]) * float(w13[ex, kk, c]) for kk in range(k))
                for c in range(2 * n)
            ]
            act = [h[c] / (1 + math.exp(-h[c])) * h[n + c] for c in range(n)]  # gate first
            for kk in range(k):
                acc[kk] += float(wts[t, j]) * sum(act[c] * float(w2[ex, c, kk]) for c in range(n))
        assert got[t].tolist() == pytest.approx(acc, rel=1e-9, abs=1e-12)


def test_compare_figures() -> None:
    r = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    m = ref.compare(r + torch.tensor([[0.0, 0.0], [0.0, 0.5]]), r)
    assert m.max_abs == pytest.approx(0.5)
    assert m.rel == pytest.approx(0.5 / math.sqrt(30))
    assert m.corr < 1.0
    assert ref.compare(r.float(), r).rel == 0.0


def test_zero_reference_is_refused() -> None:
    with pytest.raises(ref.ZeroReferenceError):
        ref.compare(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        ref.compare(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.float64))


def test_nan_output_fails_every_dtype() -> None:
    r = torch.ones(4, dtype=torch.float64)
    m = ref.compare(torch.tensor([1.0, float("nan"), 1.0, 1.0]), r)
    limits = ref.thresholds()
    for dtype in ("fp32", "bf16", "fp16"):
        assert ref.verdict(m, dtype, limits)[0] is False


def test_thresholds_defaults_overrides_and_unknown_keys() -> None:
    limits = ref.thresholds()
    assert limits["fp32.rel"] == 1e-4 and limits["bf16.rel"] == 1e-2
    assert limits["bf16.corr"] == 0.999 and limits["fp16.corr"] == 0.999
    m = ref.Metrics(max_abs=0.1, rel=1.5e-2, corr=0.9995)
    assert ref.verdict(m, "bf16", limits) == (False, "rel err 0.015 >= 0.01")
    assert ref.verdict(m, "bf16", ref.thresholds({"bf16.rel": 2e-2}))[0] is True
    assert (
        ref.verdict(m, "bf16", ref.thresholds({"bf16.rel": 2e-2, "bf16.corr": 0.9999}))[0] is False
    )
    with pytest.raises(KeyError, match="bf32.rel"):
        ref.thresholds({"bf32.rel": 1.0})
    with pytest.raises(KeyError, match="fp32.abs"):
        ref.thresholds({"fp32.abs": 1.0})
