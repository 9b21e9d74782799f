"""Real vLLM trees for the verify checks: pristine 0.19.0 with 0.23.0's
gemma4_unified.py copied in (the backport without its helper patch), and, where the
patch series exists, the same tree with the series applied by `git apply`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import fixtures

from stackbuild.checks import CheckContext
from stackbuild.platforms import PLATFORMS
from stackbuild.recipe import Checks, Pin, Recipe

REPO = Path(__file__).resolve().parents[2]
PATCH_DIR = REPO / "patches" / "vllm" / "0.19.0"
BACKPORT = "vllm/model_executor/models/gemma4_unified.py"
# the Gemma 4 part of recipes/b70-gemma4.toml's series: patches before the backport, then after
BEFORE_BACKPORT = ("gemma4-unified-prereqs.patch", "gemma4-mm-embedder-prenorm.patch")
AFTER_BACKPORT = ("gemma4-unified-register.patch",)


def backport_tree(dest: Path) -> Path:
    """0.19.0 + gemma4_unified.py from 0.23.0, nothing else: a tree under `dest`."""
    tree = dest / "vllm"
    shutil.copytree(fixtures.vllm_tree("0.19.0"), tree, symlinks=True)
    shutil.copy2(fixtures.vllm_tree("0.23.0") / BACKPORT, tree / BACKPORT)
    return tree


def series_patches(names: tuple[str, ...]) -> list[Path]:
    return [PATCH_DIR / name for name in names if (PATCH_DIR / name).is_file()]


def applied_tree(dest: Path) -> tuple[Path, list[str]] | None:
    """0.19.0 with the Gemma 4 series applied around the backport, as `stackbuild apply`
    would; (tree, touched files), or None while a patch of the series is missing."""
    before, after = series_patches(BEFORE_BACKPORT), series_patches(AFTER_BACKPORT)
    if len(before) + len(after) != len(BEFORE_BACKPORT) + len(AFTER_BACKPORT):
        return None
    tree = dest / "vllm"
    shutil.copytree(fixtures.vllm_tree("0.19.0"), tree, symlinks=True)
    touched = apply_series(tree, before)
    shutil.copy2(fixtures.vllm_tree("0.23.0") / BACKPORT, tree / BACKPORT)
    touched.append(BACKPORT)
    touched += apply_series(tree, after)
    return tree, list(dict.fromkeys(touched))


def apply_series(tree: Path, patches: list[Path]) -> list[str]:
    """`git apply` each patch (the tree need not be a git repository); the files they touch."""
    touched: list[str] = []
    for patch in patches:
        subprocess.run(["git", "apply", "--whitespace=nowarn", str(patch)], cwd=tree, check=True,
                       capture_output=True, text=True)
        out = subprocess.run(["git", "apply", "--numstat", str(patch)], cwd=tree, check=True,
                             capture_output=True, text=True).stdout
        touched += [line.split("\t", 2)[2] for line in out.splitlines() if line.strip()]
    return touched


def recipe(registry: tuple[str, ...] = (), model_types: tuple[str, ...] = (),
           transformers: str | None = None, kernels: str | None = None) -> Recipe:
    pins = (Pin("transformers", transformers),) if transformers else ()
    pins += (Pin("vllm-xpu-kernels", kernels),) if kernels else ()
    return Recipe(name="test-gemma4", path=REPO / "recipes" / "test-gemma4.toml", platform=PLATFORMS["b70"],
                  pins=pins, checks=Checks(registry=registry, model_types=model_types))


def context(workspace: Path, touched: list[str], python: Path | None = None, **recipe_kw: object) -> CheckContext:
    return CheckContext(recipe=recipe(**recipe_kw), workspace=workspace,  # type: ignore[arg-type]
                        touched={"vllm": tuple(touched)}, python=python)
