"""The verify orchestrator: one report from all checks, skips never counted as passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import vllm_backport as vb

from stackbuild import verify
from stackbuild.checks import CheckStatus
from stackbuild.errors import StackbuildError

NETWORK_FIXTURES = frozenset({"workspace"})  # built from the real vLLM 0.19.0 release


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("verify-report")
    vb.backport_tree(ws)
    return ws


def test_report_of_the_unpatched_backport(workspace: Path) -> None:
    ctx = vb.context(workspace, [vb.BACKPORT],
                     registry=("Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration"))
    report = verify.run_verify(ctx, ["compile", "registry", "imports", "registry-dynamic"])
    rows = [(r.check, r.subject, r.status) for r in report.results]
    assert rows == [
        ("compile", vb.BACKPORT, CheckStatus.PASS),
        ("compile", "files read by the checks", CheckStatus.PASS),  # registry.py, the modules imported, ...
        ("registry", "Gemma4ForConditionalGeneration", CheckStatus.PASS),
        ("registry", "Gemma4UnifiedForConditionalGeneration", CheckStatus.FAIL),
        ("imports", vb.BACKPORT, CheckStatus.FAIL),
        ("registry-dynamic", "", CheckStatus.SKIP),
    ]
    assert report.summary == "3 passed, 2 failed, 1 skipped"
    assert report.exit_code == 1
    [table] = report.tables()
    assert table.columns == ("check", "subject", "status", "detail")
    assert table.rows[-1][2] == "skipped: needs the target interpreter (--python PATH)"
    assert table.summary == report.summary
    d = report.to_dict()
    assert d["summary"] == {"passed": 3, "failed": 2, "skipped": 1} and d["exit_code"] == 1
    assert [c for c, _ in report.timings] == ["compile", "registry", "imports", "registry-dynamic"]


def test_skips_alone_exit_zero_but_are_not_passes(workspace: Path) -> None:
    report = verify.run_verify(vb.context(workspace, []), ["registry", "registry-dynamic"])
    assert report.passed == 0 and report.skipped == 2 and report.exit_code == 0
    assert report.summary == "0 passed, 0 failed, 2 skipped"


def test_unknown_check_is_bad_input(workspace: Path) -> None:
    with pytest.raises(StackbuildError) as e:
        verify.run_verify(vb.context(workspace, []), ["compile", "nonsense"])
    assert e.value.key == "--only" and "nonsense" in e.value.render()


def test_a_missing_check_module_costs_only_that_check(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(verify.CHECKS, "ghost", "stackbuild.checks.ghost_does_not_exist:run")
    report = verify.run_verify(vb.context(workspace, [vb.BACKPORT]), ["compile", "ghost"])
    assert [(r.check, r.status) for r in report.results] == [
        ("compile", CheckStatus.PASS), ("compile", CheckStatus.PASS), ("ghost", CheckStatus.SKIP)]
    assert "stackbuild.checks.ghost_does_not_exist is not installed" in report.results[-1].detail


def test_a_check_raising_a_user_error_is_a_fail_and_the_rest_run(workspace: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    from stackbuild.recipe import Checks, Pin
    ctx = vb.context(workspace, [vb.BACKPORT], model_types=("gemma4",))
    recipe = ctx.recipe.__class__(**{**ctx.recipe.__dict__, "pins": (Pin("transformers", "==5.10.2", index="http://127.0.0.1:9/simple"),),
                                     "checks": Checks(model_types=("gemma4",))})
    ctx = ctx.__class__(recipe=recipe, workspace=workspace, touched=ctx.touched)
    report = verify.run_verify(ctx, ["transformers", "compile"])
    assert [(r.check, r.status) for r in report.results] == [
        ("compile", CheckStatus.PASS), ("compile", CheckStatus.PASS), ("transformers", CheckStatus.FAIL)]
    assert "http://127.0.0.1:9/simple" in report.results[-1].detail


def test_every_registered_check_names_an_importable_function() -> None:
    # the modules other helpers write may not exist yet; those that do must expose the function
    for name in verify.CHECKS:
        try:
            fn = verify.resolve_check(name)
        except ModuleNotFoundError:
            continue
        assert callable(fn), name
    for name in verify.STATIC_CHECKS:
        assert callable(verify.resolve_check(name))
