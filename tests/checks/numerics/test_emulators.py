"""The kernel emulators against the kernel package's own Python helpers and tests' definitions."""

from __future__ import annotations

import importlib.util
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from stackbuild.checks.numerics import emulators as emu

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from test_wheelarch import kernel_wheel  # noqa: E402


def _rand_words(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int64).to(torch.int32)


@pytest.fixture(scope="module")
def quantize_convert(tmp_path_factory: pytest.TempPathFactory) -> types.ModuleType:
    """quantization/_quantize_convert.py of the real 0.1.3.1 wheel, loaded by file path:
    it imports only torch (the package's __init__ would load the native libraries).
    Its GPTQUtils is identical in 0.1.3.1, 0.1.12.1 and 0.1.16.2."""
    wheel = kernel_wheel("0.1.3.1")
    dest = tmp_path_factory.mktemp("qc") / "_quantize_convert.py"
    with zipfile.ZipFile(wheel) as zf:
        dest.write_bytes(zf.read("vllm_xpu_kernels/quantization/_quantize_convert.py"))
    spec = importlib.util.spec_from_file_location("vxk_quantize_convert", dest)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.network
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("asym", [False, True])
def test_int4_gemm_matches_the_kernel_tests_recipe(
    quantize_convert: types.ModuleType, act_order: bool, asym: bool
) -> None:
    """As v0.1.5:tests/test_int4_gemm_onednn.py:45-100: GPTQUtils.shuffle for act-order,
    B passed as weight.t().contiguous().t(), reference from the package's dequantize."""
    gen = torch.Generator().manual_seed(3)
    m, k, n, g = 5, 256, 64, 64
    a = torch.rand(m, k, generator=gen).to(torch.float16)
    weight = _rand_words((k // 8, n), gen)
    scales = (torch.rand(k // g, n, generator=gen) * 0.05).to(torch.float16)
    zeros = _rand_words((k // g, n // 8), gen) if asym else None
    if act_order:
        g_idx = (torch.randperm(k, generator=gen) // g).to(torch.int32)
        shuffled, perm = quantize_convert.GPTQUtils(bits=4, blocksize=g).shuffle(weight, g_idx)
    else:
        g_idx, shuffled, perm = None, weight, None
    ref = a.double() @ quantize_convert.dequantize(weight, scales.double(), zeros, g, g_idx).double()
    zp = zeros if asym else torch.tensor([8], dtype=torch.int8)
    out = emu.int4_gemm_w4a16(a, shuffled.t().contiguous().t(), None, scales, zp, g, perm)
    assert out.dtype == torch.float16
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < 1e-3, rel


def test_int4_gemm_reads_a_row_major_b_as_the_kernel_does() -> None:
    """ldb = B.stride(-1) * 8: a contiguous [K/8, N] (the missing-transpose bug) is wrong."""
    gen = torch.Generator().manual_seed(4)
    k, n, g = 128, 64, 32
    a = torch.randn(3, k, generator=gen).to(torch.bfloat16)
    b = _rand_words((k // 8, n), gen)
    s = torch.rand(k // g, n, generator=gen).to(torch.bfloat16)
    zp = torch.tensor([8], dtype=torch.int8)
    good = emu.int4_gemm_w4a16(a, b.t().contiguous().t(), None, s, zp, g, None)
    bad = emu.int4_gemm_w4a16(a, b.contiguous(), None, s, zp, g, None)
    assert float((good.double() - bad.double()).norm() / good.double().norm()) > 0.5


def test_group_numbers_as_g_idx_are_a_column_gather_not_groups() -> None:
    """The patch's old bug: a checkpoint g_idx (group per row) handed to the kernel gathers
    columns 0..K/G-1 of A, which is garbage, not act-order."""
    gen = torch.Generator().manual_seed(5)
    k, n, g = 128, 32, 32
    a = torch.randn(2, k, generator=gen).to(torch.float16)
    b = _rand_words((k // 8, n), gen).t().contiguous().t()
    s = torch.rand(k // g, n, generator=gen).to(torch.float16)
    zp = torch.tensor([8], dtype=torch.int8)
    g_idx = (torch.randperm(k, generator=gen) // g).to(torch.int32)
    gathered = emu.int4_gemm_w4a16(a, b, None, s, zp, g, g_idx)
    same = emu.int4_gemm_w4a16(a[:, g_idx.long()], b, None, s, zp, g, None)
    assert torch.equal(gathered, same)


def _moe_inputs(gen: torch.Generator, e: int = 3, h: int = 64, inter: int = 32, m: int = 4, topk: int = 2):
    x = (torch.randn(m, h, generator=gen) / 4).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=gen)[:topk] for _ in range(m)])
    w = torch.rand(m, topk, generator=gen)
    return x, ids, w


def _ref_moe(x, ids, w, w13_nk, w2_nk):  # type: ignore[no-untyped-def]
    """v0.1.5:tests/fused_moe/test_fused_moe.py:92-145, in float64: w13 is [E, 2I, H]
    with the gate in the first half, w2 [E, H, I]."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = w2_nk.shape[-1]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g1 = x[t].double() @ w13_nk[e].double().t()
            a = torch.nn.functional.silu(g1[:inter]) * g1[inter:]
            out[t] += float(w[t, j]) * (a @ w2_nk[e].double().t())
    return out


def _dequant_uint4(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """v0.1.5:tests/fused_moe/test_fused_moe.py:36-49: low nibble = even k, (u - 8) * s."""
    nib = torch.stack(((q & 0xF), (q >> 4) & 0xF), -1).reshape(*q.shape[:-1], q.shape[-1] * 2).double()
    gs = nib.shape[-1] // scales.shape[-1]
    return (nib - 8) * scales.double()[..., torch.arange(nib.shape[-1]) // gs]


@pytest.mark.parametrize("api", ["0.1.3", "0.1.5", "0.1.16.2"])
def test_int4_moe_matches_the_kernel_tests_reference(api: str) -> None:
    gen = torch.Generator().manual_seed(6)
    e, h, inter, gs = 3, 64, 32, 32
    x, ids, w = _moe_inputs(gen, e, h, inter)
    w13 = torch.randint(0, 256, (e, 2 * inter, h // 2), generator=gen).to(torch.uint8)
    w2 = torch.randint(0, 256, (e, h, inter // 2), generator=gen).to(torch.uint8)
    s13 = (torch.rand(e, 2 * inter, h // gs, generator=gen) * 0.1).to(torch.bfloat16)
    s2 = (torch.rand(e, h, inter // gs, generator=gen) * 0.1).to(torch.bfloat16)
    ref = _ref_moe(x, ids, w, _dequant_uint4(w13, s13), _dequant_uint4(w2, s2))
    out = torch.empty_like(x)
    p13, p2 = torch.nn.Parameter(w13.clone(), requires_grad=False), torch.nn.Parameter(w2.clone(), requires_grad=False)
    api_names = emu.fused_moe_api(api)
    if api == "0.1.16.2":
        assert "xpu_fused_moe" not in api_names
        with pytest.raises(TypeError):
            api_names["XpuFusedMoe"](p13, s13, None, p2, s2, None, 2, "silu", e, is_int4=True)
        api_names["XpuFusedMoe"](p13, s13, None, p2, s2, None, 2, "silu", e).apply(out, x, w, ids)
    else:
        api_names["xpu_fused_moe"](hidden_states=x, w13=p13, w13_scales=s13, w13_bias=None, w2=p2,
                                   w2_scales=s2, w2_bias=None, topk_weights=w, topk_ids=ids,
                                   n_experts_per_token=2, activation="silu", num_experts=e,
                                   output=out, is_int4=True)
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < 1e-2, rel


def test_bf16_moe_layout_changed_between_0_1_4_and_0_1_5() -> None:
    """0.1.4 transposes vLLM's [E, N, K] itself; 0.1.5 reads [E, K, N] and, for vLLM 0.19.0's
    untransposed weights with N != K, fails the grouped GEMM's shape check."""
    gen = torch.Generator().manual_seed(7)
    e, h, inter = 2, 64, 32
    x, ids, w = _moe_inputs(gen, e, h, inter, topk=1)
    w13 = (torch.randn(e, 2 * inter, h, generator=gen) / 8).to(torch.bfloat16)
    w2 = (torch.randn(e, h, inter, generator=gen) / 8).to(torch.bfloat16)
    ref = _ref_moe(x, ids, w, w13, w2)
    kw = dict(hidden_states=x, w13_scales=None, w13_bias=None, w2_scales=None, w2_bias=None, topk_weights=w,
              topk_ids=ids, n_experts_per_token=1, activation="silu", num_experts=e)
    out = emu.xpu_fused_moe_0_1_3(w13=torch.nn.Parameter(w13.clone(), requires_grad=False),
                                  w2=torch.nn.Parameter(w2.clone(), requires_grad=False), **kw)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-2
    with pytest.raises(RuntimeError, match="must match"):
        emu.xpu_fused_moe_0_1_5(w13=w13.clone(), w2=w2.clone(), **kw)
    out5 = emu.xpu_fused_moe_0_1_5(w13=w13.transpose(1, 2).contiguous(), w2=w2.transpose(1, 2).contiguous(), **kw)
    assert float((out5.double() - ref).norm() / ref.norm()) < 1e-2


def test_fused_moe_api_by_version() -> None:
    assert set(emu.fused_moe_api("0.1.3.1")) == {"xpu_fused_moe"}
    assert set(emu.fused_moe_api("0.1.5")) == {"xpu_fused_moe"}
    assert set(emu.fused_moe_api("0.1.11")) == {"xpu_fused_moe", "XpuFusedMoe"}
    assert set(emu.fused_moe_api("0.1.12.1")) == {"XpuFusedMoe"}


def _wheel_package(version: str, dest: Path) -> types.ModuleType:
    """The wheel's Python files as a package (named per version), with empty _C, _xpu_C and
    _moe_C modules in place of the native libraries (they need libc10_xpu.so): only the
    signatures and the pure-Python helpers are used from it."""
    name = "vxk_" + version.replace(".", "_")
    pkg = dest / name
    pkg.mkdir(parents=True)
    with zipfile.ZipFile(kernel_wheel(version)) as zf:
        for member in zf.namelist():
            if member.startswith("vllm_xpu_kernels/") and member.endswith(".py") and member.count("/") == 1:
                (pkg / member.split("/", 1)[1]).write_bytes(zf.read(member))
    for stub in ("_C.py", "_xpu_C.py", "_moe_C.py"):
        (pkg / stub).write_text("")
    sys.path.insert(0, str(dest))
    try:
        return importlib.import_module(f"{name}.fused_moe_interface")
    finally:
        sys.path.remove(str(dest))


def _params(fn: object) -> list[tuple[str, object]]:
    import inspect

    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]  # type: ignore[arg-type]


@pytest.mark.network
@pytest.mark.parametrize("version", ["0.1.3.1", "0.1.12.1", "0.1.16.2"])
def test_emulator_signatures_and_int4_conversion_match_the_wheel(version: str, tmp_path: Path) -> None:
    fmi = _wheel_package(version, tmp_path)
    api = emu.fused_moe_api(version)
    assert set(api) == {n for n in ("xpu_fused_moe", "XpuFusedMoe") if hasattr(fmi, n)}
    if "xpu_fused_moe" in api:
        assert _params(api["xpu_fused_moe"]) == _params(fmi.xpu_fused_moe)
    if "XpuFusedMoe" in api:
        wheel_init = _params(fmi.XpuFusedMoe.__init__)
        ours = _params(api["XpuFusedMoe"].__init__)
        assert ours[: len(wheel_init)] == wheel_init  # 0.1.12 lacks the 0.1.16 SITU keywords
        assert all(default is None for _, default in ours[len(wheel_init):])
        assert _params(api["XpuFusedMoe"].apply) == _params(fmi.XpuFusedMoe.apply)
    w = torch.randint(0, 256, (64, 48), dtype=torch.int64).to(torch.uint8)
    assert torch.equal(emu._signed_int4(w).view(torch.int8), fmi.implement_zp(w).view(torch.int8))
