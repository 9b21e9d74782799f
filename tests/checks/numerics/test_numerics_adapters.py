"""Adapters and negative controls over the real vectors, with torch's real CPU int4 kernels."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from numerics_helpers import BROKEN_LAYOUT, real_layout_source, workspace_with

from stackbuild.checks.numerics import reference as ref
from stackbuild.checks.numerics.adapters import (
    Adapter,
    builtin_adapters,
    load_user_adapter,
)
from stackbuild.checks.numerics.controls import CONTROLS, Control
from stackbuild.checks.numerics.suite import FAIL, PASS, SKIP, NumericsRun, run_suite
from stackbuild.checks.numerics.vectors import DEFAULT_SPECS, Vector, build_vectors


def by_name(name: str, device: str = "cpu", workspace: Path | None = None) -> Adapter:
    return next(a for a in builtin_adapters(device, workspace) if a.name == name)


@pytest.fixture(scope="module")
def cpu_run() -> NumericsRun:
    return run_suite([by_name("torch-cpu-int4")], repeats=1)


def test_torch_cpu_int4_passes_every_vector_in_fp32_and_bf16(cpu_run: NumericsRun) -> None:
    rows = cpu_run.rows
    assert {r.dtype for r in rows} == {"fp32", "bf16"}
    assert {r.suite for r in rows} == {"int4-linear", "int4-moe"}
    bad = [(r.subject, r.detail) for r in rows if r.status != PASS]
    assert not bad
    assert len(rows) == 2 * sum(len(s.ms) for s in DEFAULT_SPECS)
    fp32 = [r for r in rows if r.dtype == "fp32"]
    assert max(r.rel for r in fp32 if r.rel is not None) < 1e-5
    assert all(r.ms_per_call is not None and r.ms_per_call > 0 for r in rows)
    assert cpu_run.ok


def test_every_negative_control_is_caught_on_every_vector(cpu_run: NumericsRun) -> None:
    assert {c.control for c in cpu_run.controls} == {c.name for c in CONTROLS}
    for c in cpu_run.controls:
        assert c.status == PASS, c.detail
        assert c.caught == c.vectors > 0
        assert c.min_rel is not None and c.min_rel > 0.1  # far outside every threshold


@pytest.mark.parametrize("control", CONTROLS, ids=lambda c: c.name)
def test_each_control_fails_the_thresholds_directly(control: Control) -> None:
    vecs = build_vectors(
        [s for s in DEFAULT_SPECS if s.name in ("gptq-sym-g128", "moe-sym-g64-e16")], ("bf16",)
    )
    limits = ref.thresholds()
    for vec in vecs["bf16"]:
        m = ref.compare(control.fn(vec.case, vec.x), vec.ref)
        assert ref.verdict(m, "bf16", limits)[0] is False, (control.name, vec.shape, m)


def test_a_control_that_passes_makes_the_check_fail() -> None:
    correct = by_name("torch-cpu-int4").fn
    fake = Control("not-a-bug", correct, "a control equal to the correct kernel")
    specs = [s for s in DEFAULT_SPECS if s.name == "gptq-asym-g32"]
    run = run_suite(
        [by_name("torch-cpu-int4")],
        suites=["int4-linear"],
        specs=specs,
        controls=(*CONTROLS, fake),
        repeats=0,
    )
    row = next(c for c in run.controls if c.control == "not-a-bug")
    assert row.status == FAIL
    assert "harness broken" in row.detail and "a control equal to the correct kernel" in row.detail
    assert all(r.status == PASS for r in run.rows)  # the adapters themselves were fine
    assert run.ok is False
    assert run.to_dict()["ok"] is False


def test_zero_reference_guard_fails_the_row() -> None:
    vec = build_vectors([s for s in DEFAULT_SPECS if s.name == "gptq-sym-g128"], ("fp32",))["fp32"][
        0
    ]
    zero = Vector(vec.case, torch.zeros_like(vec.x), torch.zeros_like(vec.ref))
    from stackbuild.checks.numerics.suite import _evaluate

    status, detail, metrics, _ = _evaluate(by_name("torch-cpu-int4").fn, zero, ref.thresholds(), 0)
    assert status == FAIL and "guard" in detail and metrics is None


def test_unavailable_kernels_are_skipped_with_reasons() -> None:
    adapters = builtin_adapters("cpu", None)
    reasons = {a.name: a.unavailable for a in adapters}
    assert reasons["torch-cpu-int4"] is None
    assert reasons["torch-cuda-int4"] == "device is cpu, not cuda"
    assert reasons["xpu-int4-gemm"] == "device is cpu, not xpu"
    assert reasons["xpu-fused-moe"] == "device is cpu, not xpu"
    assert reasons["patch-layout"] == "no workspace given"
    assert "no CUDA device" in (by_name("torch-cuda-int4", "cuda").unavailable or "")
    assert "no XPU device" in (by_name("xpu-int4-gemm", "xpu").unavailable or "")
    run = run_suite([a for a in adapters if a.unavailable], repeats=0)
    assert {r.status for r in run.rows} == {SKIP}
    assert run.ok  # skipped is not failed; the controls still ran
    assert len(run.controls) == 2 * len(CONTROLS)


def test_patch_layout_missing_from_the_workspace_is_skipped(tmp_path: Path) -> None:
    assert "not found in the workspace" in (
        by_name("patch-layout", workspace=tmp_path).unavailable or ""
    )


def test_patch_layout_adapter_passes_our_real_layout_module(tmp_path: Path) -> None:
    source = real_layout_source()
    if source is None:
        pytest.skip("patches/vllm/0.19.0/xpu-int4-linear.patch is not in this tree")
    ws = workspace_with(tmp_path, source)
    adapter = by_name("patch-layout", workspace=ws)
    assert adapter.unavailable is None
    run = run_suite([adapter], repeats=0)
    assert run.rows and all(r.status == PASS for r in run.rows), [
        (r.subject, r.detail) for r in run.rows if r.status != PASS
    ]
    assert {r.case for r in run.rows} == {s.name for s in DEFAULT_SPECS}  # AWQ, g_idx, MoE too


def test_patch_layout_adapter_fails_act_order_without_the_patch_s_shuffle(tmp_path: Path) -> None:
    """The adapter used to sort act-order rows itself, so it passed a patch that handed
    the checkpoint's g_idx to the kernel. Now act-order goes through the patch's own
    shuffle_act_order_rows; a layout module without it (the pre-fix patch) fails."""
    source = real_layout_source()
    if source is None or "def shuffle_act_order_rows" not in source:
        pytest.skip("the xpu-int4-linear patch with the act-order shuffle is not in this tree")
    ws = workspace_with(tmp_path, source + "\ndel shuffle_act_order_rows\n")
    run = run_suite([by_name("patch-layout", workspace=ws)], repeats=0)
    act_order = [r for r in run.rows if "actorder" in r.case]
    assert act_order and all(r.status == FAIL and "shuffle_act_order_rows" in r.detail for r in act_order)
    assert all(r.status == PASS for r in run.rows if "actorder" not in r.case)


def test_patch_layout_adapter_catches_a_broken_layout_module(tmp_path: Path) -> None:
    ws = workspace_with(tmp_path, BROKEN_LAYOUT)
    run = run_suite([by_name("patch-layout", workspace=ws)], repeats=0)
    status = {(r.case, r.shape): (r.status, r.detail) for r in run.rows}
    assert status[("gptq-sym-g128", "M8xK512xN384")][0] == PASS  # symmetric linear is right
    assert status[("gptq-asym-g32", "M8xK256xN320")][0] == FAIL  # zeros dropped
    assert status[("moe-sym-g64-e16", "M33xK256xN128")][0] == FAIL  # nibbles swapped
    assert status[("awq-asym-g128", "M1xK512xN256")] == (SKIP, "stand-in")
    assert run.ok is False


USER_MODULE = """
import torch
from stackbuild.checks.numerics import reference as ref

def good(case, x):
    w = ref.dequant_gptq(case.qweight, case.scales, case.zeros, case.group_size, case.g_idx)
    return (x.double() @ w).to(x.dtype)
good.suites = ("int4-linear",)
good.dtypes = ("bf16",)

def transposed(case, x):
    q = ref.unpack_gptq(case.qweight)
    w = ref.dequant_q(q.reshape(case.N, case.K).t(), case.scales, case.zeros, case.group_size)
    return (x.double() @ w).to(x.dtype)
transposed.suites = ("int4-linear",)

def unsupported(case, x):
    raise NotImplementedError("no such kernel here")

def crashes(case, x):
    raise RuntimeError("device lost")

not_callable = 3
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "numerics_user_adapters.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "numerics_user_adapters"


def test_user_adapter_module_function(user_module: str) -> None:
    specs = [s for s in DEFAULT_SPECS if s.name in ("gptq-asym-g64-actorder", "awq-asym-g128")]
    good = load_user_adapter(f"{user_module}:good")
    assert good.suites == ("int4-linear",) and good.dtypes == ("bf16",)
    run = run_suite(
        [
            good,
            load_user_adapter(f"{user_module}:transposed"),
            load_user_adapter(f"{user_module}:unsupported"),
            load_user_adapter(f"{user_module}:crashes"),
        ],
        suites=["int4-linear"],
        specs=specs,
        repeats=0,
    )
    by = {}
    for r in run.rows:
        by.setdefault(r.adapter.split(":")[1], set()).add(
            (r.status, r.detail if r.status != PASS else "")
        )
    assert by["good"] == {(PASS, "")}
    assert {s for s, _ in by["transposed"]} == {FAIL}
    assert by["unsupported"] == {(SKIP, "no such kernel here")}
    assert by["crashes"] == {(FAIL, "RuntimeError: device lost")}


@pytest.mark.parametrize(
    "spec,message",
    [
        ("no_colon", "expected module:function"),
        ("numerics_no_such_module:fn", "cannot import"),
        ("numerics_user_adapters:missing", "has no missing"),
        ("numerics_user_adapters:not_callable", "not callable"),
    ],
)
def test_bad_user_adapter_specs(user_module: str, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_user_adapter(spec)


def test_thresholds_override_changes_the_verdict() -> None:
    specs = [s for s in DEFAULT_SPECS if s.name == "gptq-asym-g32"]
    strict = run_suite(
        [by_name("torch-cpu-int4")],
        suites=["int4-linear"],
        specs=specs,
        limits=ref.thresholds({"bf16.rel": 1e-6}),
        repeats=0,
    )
    assert {r.status for r in strict.rows if r.dtype == "bf16"} == {FAIL}
    assert {r.status for r in strict.rows if r.dtype == "fp32"} == {PASS}


def test_case_dtype_cast_keeps_weights_and_scratch_separate() -> None:
    vecs = build_vectors([s for s in DEFAULT_SPECS if s.name == "gptq-sym-g128"], ("fp32", "bf16"))
    a, b = vecs["fp32"][0].case, vecs["bf16"][0].case
    assert a.scratch is not b.scratch and a.qweight is b.qweight
    assert replace(a, dtype="bf16").torch_dtype == torch.bfloat16
