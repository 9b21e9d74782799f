"""b70-llm-scaler through the mirror map: GitHub is unreachable here, so a local
stand-in for https://github.com/intel/llm-scaler serves the real URL, and its
headerless multi-file git diff is applied to the real vLLM 0.21.0 release."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import fixtures
import pytest

from stackbuild.recipe import load_recipe
from stackbuild.series import PatchVerdict
from stackbuild.workspace import apply_recipe

pytestmark = [pytest.mark.network, pytest.mark.slow]

REAL_COMMIT = "b18beee317d7211ea0a8b2f814594ccf74d458e6"


def _diff_in(scratch: Path) -> str:
    """A headerless git diff (like llm-scaler's) over two files of vLLM 0.21.0."""
    subprocess.run(["git", "init", "-q"], cwd=scratch, check=True)
    subprocess.run(["git", "add", "-A"], cwd=scratch, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "b"], cwd=scratch, check=True)
    xpu = scratch / "vllm/platforms/xpu.py"
    xpu.write_text(xpu.read_text() + "\n\n# multi-arc: stand-in change\nMULTI_ARC = True\n")
    new = scratch / "vllm/platforms/multi_arc.py"
    new.write_text('"""stand-in for llm-scaler multi-arc support"""\nENABLED = True\n')
    subprocess.run(["git", "add", "-A"], cwd=scratch, check=True)
    diff = subprocess.run(["git", "diff", "--cached"], cwd=scratch, check=True, capture_output=True, text=True).stdout
    assert diff.startswith("diff --git")  # no header at all, as upstream's
    return diff


def test_llm_scaler_recipe_through_the_mirror_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = fixtures.seed_cache(tmp_path / "cache", ("0.21.0", "0.23.0"))
    monkeypatch.setenv("STACKBUILD_CACHE", str(cache))
    # the stand-in upstream, served for the real URL
    upstream = tmp_path / "mirrors" / "intel" / "llm-scaler"
    repo = fixtures.make_upstream_repo(upstream, {"README.md": "stand-in\n"}, tag=None)
    tree = fixtures.vllm_tree("0.21.0")
    patch_text = _multi_arc_from(tree, tmp_path)
    commit = fixtures.commit_files(repo, {"vllm/patches/vllm_for_multi_arc.patch": patch_text}, "multi-arc patch")
    monkeypatch.setenv("STACKBUILD_GIT_MIRRORS", f"https://github.com/={tmp_path / 'mirrors'}/")
    # the shipped recipe, pinned to the stand-in's commit instead of the real one
    root = tmp_path / "proj"
    (root / "recipes").mkdir(parents=True)
    (root / "patches").symlink_to(fixtures.REPO_ROOT / "patches")
    for name in ("xpu-base", "b70-llm-scaler"):
        text = (fixtures.REPO_ROOT / "recipes" / f"{name}.toml").read_text()
        assert name != "b70-llm-scaler" or REAL_COMMIT in text
        (root / "recipes" / f"{name}.toml").write_text(text.replace(REAL_COMMIT, commit))
    recipe = load_recipe(root / "recipes" / "b70-llm-scaler.toml")
    assert recipe.source("llm-scaler").url == "https://github.com/intel/llm-scaler"
    result = apply_recipe(recipe, root / "work")
    assert result.ok, result.message
    verdicts = {p.name: p.verdict for p in result.patches}
    assert verdicts == {"llm-scaler-multi-arc": PatchVerdict.APPLIED, "gemma4-unified-backport": PatchVerdict.APPLIED}
    ws = root / "work" / "vllm"
    assert "MULTI_ARC = True" in (ws / "vllm/platforms/xpu.py").read_text()
    assert (ws / "vllm/model_executor/models/gemma4_unified.py").exists()
    src = result.manifest.source("llm-scaler")
    assert src.commit == commit and src.tree is None  # a patch holder, not materialised


def _multi_arc_from(tree: Path, tmp: Path) -> str:
    work = tmp / "diffwork"
    (work / "t").mkdir(parents=True)
    return _multi_arc_patch_in(tree, work / "t")


def _multi_arc_patch_in(tree: Path, out: Path) -> str:
    scratch = out / "scratch"
    shutil.copytree(tree / "vllm" / "platforms", scratch / "vllm" / "platforms")
    return _diff_in(scratch)
