"""All static checks pass on 0.19.0 with the real Gemma 4 patches and the backport."""

from __future__ import annotations

from pathlib import Path

import pytest
import vllm_backport as vb

from stackbuild import verify
from stackbuild.checks import CheckStatus

ARCHS = ("Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration")
pytestmark = pytest.mark.network  # every test here runs on the real 0.19.0 release


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    ws = tmp_path_factory.mktemp("verify-applied")
    out = vb.applied_tree(ws)
    if out is None:
        pytest.skip(f"the Gemma 4 patch series is not complete in {vb.PATCH_DIR}")
    return ws, out[1]


def test_series_touches_the_expected_files(applied: tuple[Path, list[str]]) -> None:
    _, touched = applied
    assert {vb.BACKPORT, "vllm/model_executor/models/gemma4_mm.py",
            "vllm/model_executor/models/registry.py"} <= set(touched)


def test_all_static_checks_pass_on_the_applied_tree(applied: tuple[Path, list[str]]) -> None:
    ws, touched = applied
    ctx = vb.context(ws, touched, registry=ARCHS)
    report = verify.run_verify(ctx, ["compile", "registry", "imports"])
    failed = [(r.check, r.subject, r.detail) for r in report.results if r.status is not CheckStatus.PASS]
    assert failed == []
    assert report.exit_code == 0
    reg = {r.subject: r for r in report.results if r.check == "registry"}
    assert reg["Gemma4UnifiedForConditionalGeneration"].data["defined_in"] == "vllm.model_executor.models.gemma4_unified"
    imp = {r.subject: r for r in report.results if r.check == "imports"}
    assert imp[vb.BACKPORT].data["imports"] >= 20 and imp[vb.BACKPORT].data["unresolved"] == []


def test_with_transformers_5_10_2_the_recipe_checks_pass(applied: tuple[Path, list[str]], seeded_cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from test_api_closure import seed_kernel_wheel

    monkeypatch.setenv("STACKBUILD_CACHE", str(seeded_cache))
    seed_kernel_wheel(seeded_cache, "0.1.3.1")
    ws, touched = applied
    # 0.1.3.1: the kernel release on the index whose API vLLM 0.19.0's own imports need
    ctx = vb.context(ws, touched, registry=ARCHS, model_types=("gemma4", "gemma4_unified"), transformers="==5.10.2",
                     kernels="==0.1.3.1")
    report = verify.run_verify(ctx, list(verify.STATIC_CHECKS))
    assert report.failed == 0 and report.skipped == 0, report.tables()[0].render()
    api = {r.subject for r in report.results if r.check == "api"}
    assert {"vllm/_xpu_ops.py", "vllm/model_executor/layers/fused_moe/xpu_fused_moe.py"} <= api


def test_dropping_the_helper_patch_fails_the_import_closure(tmp_path: Path) -> None:
    # the series without gemma4-unified-prereqs.patch: the backport's helpers are missing
    tree = vb.backport_tree(tmp_path)
    patches = vb.series_patches(("gemma4-mm-embedder-prenorm.patch", "gemma4-unified-register.patch"))
    if len(patches) != 2:
        pytest.skip("patch series incomplete")
    touched = [vb.BACKPORT, *vb.apply_series(tree, patches)]
    report = verify.run_verify(vb.context(tmp_path, touched, registry=ARCHS), ["registry", "imports"])
    fails = [r for r in report.results if r.status is CheckStatus.FAIL]
    assert [(r.check, r.subject) for r in fails] == [("imports", vb.BACKPORT)]
    assert "_get_max_soft_tokens" in fails[0].detail
