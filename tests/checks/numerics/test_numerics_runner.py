"""run_numerics(ctx): the worker as a real subprocess of a real interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from numerics_helpers import real_layout_source, workspace_with

from stackbuild.checks import CheckContext, CheckStatus
from stackbuild.checks.numerics import run_numerics
from stackbuild.checks.numerics.runner import results_from_output, worker_args
from stackbuild.errors import RecipeError, StackbuildError
from stackbuild.recipe import load_recipe


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("lunar-lake-moe")


def ctx_for(recipe, workspace: Path, **options) -> CheckContext:
    return CheckContext(recipe=recipe, workspace=workspace, options=options)


def test_end_to_end_in_a_subprocess(
    recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = real_layout_source()
    ws = workspace_with(tmp_path / "ws", source) if source else tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    # a user adapter in the working directory: the runner puts it on the worker's path
    (tmp_path / "numerics_runner_user.py").write_text(
        textwrap.dedent("""
        from stackbuild.checks.numerics import reference as ref

        def fp64(case, x):
            if case.suite != "int4-linear":
                raise NotImplementedError("linear only")
            w = ref.dequant_gptq(case.qweight, case.scales, case.zeros, case.group_size, case.g_idx)
            return ref.gemm(x, w)
    """)
    )
    monkeypatch.chdir(tmp_path)
    results = run_numerics(
        ctx_for(recipe, ws, device="cpu", adapters=["numerics_runner_user:fp64"])
    )

    assert all(r.check == "numerics" for r in results)
    failed = [(r.subject, r.detail) for r in results if r.status is CheckStatus.FAIL]
    assert not failed
    subjects = {r.subject for r in results}
    assert "torch-cuda-int4/int4-linear" in subjects
    assert (
        "control:fp4-e2m1/int4-linear" in subjects and "control:zero-point-0/int4-moe" in subjects
    )
    cpu = [r for r in results if r.subject.startswith("torch-cpu-int4/")]
    assert cpu and all(r.status is CheckStatus.PASS for r in cpu)
    assert "torch-cpu-int4/int4-moe/moe-sym-g64-e16:M33xK256xN128:bf16" in subjects
    sample = cpu[0]
    assert "ms/call on cpu" in sample.detail and sample.data["device"] == "cpu"
    assert {"max_abs", "rel", "corr", "ms_per_call"} <= set(sample.data)
    user = [r for r in results if r.subject.startswith("numerics_runner_user:fp64/")]
    assert {r.status for r in user if "/int4-linear/" in r.subject} == {CheckStatus.PASS}
    assert {r.status_text for r in user if "/int4-moe/" in r.subject} == {"skipped: linear only"}
    skipped = {r.subject: r.status_text for r in results if r.status is CheckStatus.SKIP}
    assert skipped["xpu-int4-gemm/int4-linear"] == "skipped: device is cpu, not xpu"
    if source:
        layout = [r for r in results if r.subject.startswith("patch-layout/")]
        assert layout and {r.status for r in layout} == {CheckStatus.PASS}


def test_recipe_suites_and_thresholds_reach_the_worker(recipe, tmp_path: Path) -> None:
    r = replace(
        recipe,
        checks=replace(recipe.checks, numerics=("int4-moe",), thresholds=(("bf16.rel", 2e-2),)),
    )
    args = worker_args(ctx_for(r, tmp_path, thresholds={"fp32.rel": 1e-3}))
    assert args["suites"] == ["int4-moe"]
    assert args["thresholds"] == {"bf16.rel": 2e-2, "fp32.rel": 1e-3}
    assert args["device"] == "auto" and args["workspace"] == str(tmp_path)
    # with no suites in the recipe: both
    none = replace(recipe, checks=replace(recipe.checks, numerics=()))
    assert worker_args(ctx_for(none, tmp_path))["suites"] == ["int4-linear", "int4-moe"]


def test_bad_recipe_and_options_are_user_errors(recipe, tmp_path: Path) -> None:
    bad = replace(recipe, checks=replace(recipe.checks, thresholds=(("bf16.abs", 1.0),)))
    with pytest.raises(RecipeError) as e:
        worker_args(ctx_for(bad, tmp_path))
    assert e.value.key == "checks.thresholds" and "bf16.abs" in str(e.value)
    bad = replace(recipe, checks=replace(recipe.checks, numerics=("int8-linear",)))
    with pytest.raises(RecipeError, match="int8-linear"):
        worker_args(ctx_for(bad, tmp_path))
    with pytest.raises(StackbuildError, match="tpu"):
        worker_args(ctx_for(recipe, tmp_path, device="tpu"))
    with pytest.raises(StackbuildError, match="module:function"):
        worker_args(ctx_for(recipe, tmp_path, adapters=["nocolon"]))
    with pytest.raises(StackbuildError, match="no_such_python"):
        run_numerics(
            CheckContext(recipe=recipe, workspace=tmp_path, python=tmp_path / "no_such_python")
        )


def test_an_unimportable_user_adapter_is_a_user_error(recipe, tmp_path: Path) -> None:
    with pytest.raises(StackbuildError, match="cannot import numerics_nowhere"):
        run_numerics(
            ctx_for(
                recipe,
                tmp_path,
                device="cpu",
                suites=["int4-linear"],
                builtin=[],
                adapters=["numerics_nowhere:fn"],
            )
        )


def test_a_python_without_torch_fails_naming_torch(recipe, tmp_path: Path) -> None:
    # the real interpreter, with torch made unimportable by a sitecustomize on its path
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    python = tmp_path / "python-without-torch"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{shim}:$PYTHONPATH" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    results = run_numerics(CheckContext(recipe=recipe, workspace=tmp_path, python=python))
    assert len(results) == 1
    assert results[0].status is CheckStatus.FAIL
    assert "lacks the package 'torch'" in results[0].detail


def test_a_bare_venv_fails_naming_the_first_missing_package(recipe, tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True
    )
    results = run_numerics(
        CheckContext(recipe=recipe, workspace=tmp_path, python=tmp_path / "venv/bin/python")
    )
    assert len(results) == 1 and results[0].status is CheckStatus.FAIL
    # stackbuild's own import chain needs packaging before the worker reaches torch
    assert "lacks the package" in results[0].detail
    assert results[0].data["missing"] in ("packaging", "torch")


def test_output_without_a_result_is_a_failure() -> None:
    [r] = results_from_output("some noise\n", "Traceback ...\nSegmentation fault\n", -11)
    assert r.status is CheckStatus.FAIL and "exited -11" in r.detail and "Segmentation" in r.detail
