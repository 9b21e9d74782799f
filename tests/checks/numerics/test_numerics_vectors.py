"""The vectors hold what exposes layout bugs, and are reproducible."""

from __future__ import annotations

import pytest
import torch

from stackbuild.checks.numerics import reference as ref
from stackbuild.checks.numerics.vectors import (
    DEFAULT_SPECS,
    LINEAR,
    MOE,
    Vector,
    build_vectors,
)


@pytest.fixture(scope="module")
def vectors() -> dict[str, list[Vector]]:
    return build_vectors(list(DEFAULT_SPECS), ("fp32", "bf16"))


def _weights(vec: Vector) -> list[torch.Tensor]:
    c = vec.case
    if c.suite == LINEAR:
        assert c.qweight is not None
        return [ref.unpack_gptq(c.qweight)]
    assert c.w13_qweight is not None and c.w2_qweight is not None
    return [ref.unpack_gptq(w) for w in c.w13_qweight] + [ref.unpack_gptq(w) for w in c.w2_qweight]


def test_every_weight_matrix_holds_all_16_nibbles_and_varies_along_k_and_n(vectors) -> None:
    for vec in vectors["fp32"]:
        for q in _weights(vec):
            assert set(q.unique().tolist()) == set(range(16)), vec.case.name
            assert not torch.equal(q[0], q[1]), "constant along K"
            assert not torch.equal(q[:, 0], q[:, 1]), "constant along N"
        c = vec.case
        scales = c.scales if c.suite == LINEAR else c.w13_scales[0]  # type: ignore[index]
        assert scales is not None
        assert scales.shape[0] > 1 and not torch.equal(scales[0], scales[1]), (
            "scales constant along K"
        )
        assert not torch.equal(scales[:, 0], scales[:, 1]), "scales constant along N"


def test_activations_have_non_zero_means_in_every_group(vectors) -> None:
    for vec in vectors["fp32"]:
        c = vec.case
        g = ref.group_index(c.K, c.group_size, c.g_idx)
        x = vec.x.double()
        for group in g.unique().tolist():
            means = x[:, g == group].mean(dim=1)
            assert bool((means.abs() > 0.1).all()), (c.name, group)
        assert x.abs().sum() > 0


def test_the_suite_covers_the_shapes_and_formats_that_hide_bugs(vectors) -> None:
    cases = [v.case for v in vectors["fp32"]]
    assert all(c.K != c.N for c in cases)
    assert {v.m for v in vectors["fp32"] if v.case.suite == LINEAR} >= {1, 8, 33}
    assert {c.group_size for c in cases} >= {32, 64, 128, 256}
    linear = [c for c in cases if c.suite == LINEAR]
    assert any(c.symmetric for c in linear) and any(not c.symmetric for c in linear)
    assert any(c.g_idx is not None for c in linear)
    assert any(c.fmt == "awq" for c in linear)
    # act-order really permutes: not the contiguous grouping
    ordered = next(c for c in linear if c.g_idx is not None)
    assert not torch.equal(ordered.g_idx.long(), torch.arange(ordered.K) // ordered.group_size)  # type: ignore[union-attr]
    moe = [v for v in vectors["fp32"] if v.case.suite == MOE]
    assert any(v.m == 1 for v in moe)
    assert max(len(v.case.topk_ids.unique()) for v in moe) >= 16  # type: ignore[union-attr]
    assert any(not v.case.symmetric for v in moe)
    for v in moe:
        ids = v.case.topk_ids
        assert ids is not None
        assert all(len(set(row)) == len(row) for row in ids.tolist()), "an expert twice per token"


def test_references_are_non_zero(vectors) -> None:
    for vec in vectors["fp32"]:
        assert float(vec.ref.norm()) > 0


def test_vectors_are_seeded_and_reproducible(vectors) -> None:
    again = build_vectors(list(DEFAULT_SPECS), ("fp32",))["fp32"]
    for a, b in zip(vectors["fp32"], again, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.ref, b.ref)
        if a.case.suite == LINEAR:
            assert torch.equal(a.case.qweight, b.case.qweight)  # type: ignore[arg-type]
        else:
            assert torch.equal(a.case.w13_qweight, b.case.w13_qweight)  # type: ignore[arg-type]
            assert torch.equal(a.case.topk_ids, b.case.topk_ids)  # type: ignore[arg-type]


def test_dtypes_share_values_so_one_reference_serves_all(vectors) -> None:
    for a, b in zip(vectors["fp32"], vectors["bf16"], strict=True):
        assert b.x.dtype == torch.bfloat16 and torch.equal(a.x, b.x.float())
        assert a.ref is b.ref
        if a.case.suite == LINEAR:
            assert torch.equal(a.case.scales, b.case.scales.float())  # type: ignore[union-attr]
