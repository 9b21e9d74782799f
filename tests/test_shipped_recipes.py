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
    assert {"b70-gemma4", "lunar-lake-moe", "b70-llm-scaler", "xpu-base", *PORTED} <= set(names)
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


# The recipes for the series carried forward (patches/vllm/0.23.0, patches/vllm/0.33.0).
PORTED = {
    "b70-vllm-0.23.0": "0.23.0",
    "lunar-lake-vllm-0.23.0": "0.23.0",
    "b70-vllm-0.33.0": "0.33.0",
    "lunar-lake-vllm-0.33.0": "0.33.0",
}


@pytest.fixture(scope="module")
def ported_ws(tmp_path_factory: pytest.TempPathFactory, seeded_cache):  # type: ignore[no-untyped-def]
    import fixtures

    fixtures.seed_cache(seeded_cache, ("0.23.0", "0.33.0"))
    return {name: fixtures.apply_shipped(name, tmp_path_factory.mktemp("ws") / name, seeded_cache)
            for name in PORTED}


@pytest.mark.parametrize("name", list(PORTED))
def test_ported_recipe_applies_every_patch_of_its_release(name: str, ported_ws) -> None:  # type: ignore[no-untyped-def]
    result = ported_ws[name]
    assert result.ok, result.message
    verdicts = {p.name: p.verdict for p in result.patches}
    assert verdicts and all(v is PatchVerdict.APPLIED for v in verdicts.values()), verdicts
    # only this release's own patch directory, nothing from the 0.19.0 series
    from fixtures import REPO_ROOT

    shipped = {f"patches/vllm/{PORTED[name]}/{f.name}" for f in (REPO_ROOT / "patches/vllm" / PORTED[name]).glob("*.patch")}
    assert {p.file for p in load_recipe(name).patches} <= shipped
    tree = result.workdir / "vllm"
    assert int(run_git(tree, "rev-list", "--count", f"{BASE_TAG}..HEAD")) == len(result.patches)
    assert run_git(tree, "status", "--porcelain") == ""
    for rel in result.manifest.touched()["vllm"]:
        if rel.endswith(".py"):
            py_compile.compile(str(tree / rel), doraise=True)


@pytest.mark.parametrize("name", list(PORTED))
def test_ported_recipe_pins_what_its_release_asks(name: str, ported_ws) -> None:  # type: ignore[no-untyped-def]
    """torch and vllm-xpu-kernels as the release's own requirements/xpu.txt says."""
    xpu_txt = (ported_ws[name].workdir / "vllm" / "requirements" / "xpu.txt").read_text()
    recipe = load_recipe(name)
    torch_pin, kernels = recipe.pin("torch"), recipe.pin("vllm-xpu-kernels")
    assert torch_pin is not None and kernels is not None
    asked_torch = next(line.split("==")[1].strip() for line in xpu_txt.splitlines() if line.startswith("torch=="))
    assert torch_pin.spec.removeprefix("==").removesuffix("+xpu") == asked_torch
    asked = next(line for line in xpu_txt.splitlines() if line.startswith("vllm_xpu_kernels"))
    if "@" in asked:  # a direct URL (0.23.0)
        assert kernels.url == asked.split("@", 1)[1].strip()
    else:  # a release on the index (0.33.0): the recipe pins that release's wheel
        version = asked.split("==")[1].strip()
        assert kernels.url and f"vllm_xpu_kernels-{version}-" in kernels.url and kernels.sha256
