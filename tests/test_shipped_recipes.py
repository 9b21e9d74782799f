"""The shipped recipes, applied for real to the vLLM 0.19.0 source release (issue 3's
"done when": every patch applied, every touched file compiles)."""

from __future__ import annotations

import py_compile

import pytest

from stackbuild.recipe import list_recipe_names, load_recipe
from stackbuild.series import PatchVerdict
from stackbuild.workspace import BASE_TAG, run_git

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_every_shipped_recipe_loads() -> None:
    names = list_recipe_names()
    assert {"b70-gemma4", "lunar-lake-moe", "b70-llm-scaler", "xpu-base"} <= set(names)
    for name in names:
        r = load_recipe(name)
        for p in r.patches:
            assert p.description, f"{name}: {p.name} has no description"


@pytest.mark.parametrize("fixture", ["b70_gemma4_ws", "lunar_lake_moe_ws"])
def test_shipped_recipe_applies_every_patch(fixture: str, request: pytest.FixtureRequest) -> None:
    result = request.getfixturevalue(fixture)
    assert result.ok, result.message
    verdicts = {p.name: p.verdict for p in result.patches}
    assert verdicts and all(v is PatchVerdict.APPLIED for v in verdicts.values()), verdicts
    tree = result.workdir / "vllm"
    # one commit per patch on top of the tagged pristine base
    count = int(run_git(tree, "rev-list", "--count", f"{BASE_TAG}..HEAD"))
    assert count == len(result.patches)
    assert run_git(tree, "status", "--porcelain") == ""


@pytest.mark.parametrize("fixture", ["b70_gemma4_ws", "lunar_lake_moe_ws"])
def test_every_touched_file_compiles(fixture: str, request: pytest.FixtureRequest) -> None:
    result = request.getfixturevalue(fixture)
    touched = result.manifest.touched()["vllm"]
    py = [f for f in touched if f.endswith(".py")]
    assert len(py) >= 3
    for rel in py:
        py_compile.compile(str(result.workdir / "vllm" / rel), doraise=True)


def test_b70_gemma4_takes_the_backport_from_0_23_0(b70_gemma4_ws) -> None:  # type: ignore[no-untyped-def]
    tree = b70_gemma4_ws.workdir / "vllm"
    unified = tree / "vllm/model_executor/models/gemma4_unified.py"
    assert "class Gemma4UnifiedForConditionalGeneration" in unified.read_text()
    # the file came from the release at apply time, not from this repository
    assert run_git(tree, "log", "--format=%s", "-1", "--", "vllm/model_executor/models/gemma4_unified.py")


def test_reapply_unchanged_is_a_no_op(b70_gemma4_ws, seeded_cache) -> None:  # type: ignore[no-untyped-def]
    import fixtures

    again = fixtures.apply_shipped("b70-gemma4", b70_gemma4_ws.workdir, seeded_cache)
    assert again.ok and not again.changed
    assert "unchanged" in again.message
