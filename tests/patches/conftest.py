"""Fixtures for tests/patches: the real vLLM 0.19.0 release with our series applied."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import fixtures
import pytest

PATCH_DIR = Path(__file__).resolve().parents[2] / "patches" / "vllm" / "0.19.0"

# series order (the order the recipes list them in)
SERIES = (
    "gemma4-unified-prereqs.patch",
    "gemma4-mm-embedder-prenorm.patch",
    "gemma4-unified-register.patch",
    "gemma4-bidirectional-vision.patch",
    "gemma4-unified-audio.patch",
    "xpu-unified-memory-free-check.patch",
    "hybrid-kv-page-size-lcm.patch",
    "xpu-autoround-gptq-awq.patch",
    "xpu-int4-linear.patch",
    "xpu-int4-moe.patch",
    "xpu-moe-kernel-layout.patch",
)


def apply_series(tree: Path, patches: tuple[str, ...] = SERIES) -> None:
    for name in patches:
        subprocess.run(
            ["git", "apply", "-p1", "--whitespace=nowarn", str(PATCH_DIR / name)],
            cwd=tree,
            check=True,
            capture_output=True,
            text=True,
        )


@pytest.fixture(scope="session")
def pristine_0190() -> Path:
    return fixtures.vllm_tree("0.19.0")


@pytest.fixture(scope="session")
def patched_0190(tmp_path_factory: pytest.TempPathFactory, pristine_0190: Path) -> Path:
    """A copy of the pristine 0.19.0 tree with the whole series applied."""
    tree = tmp_path_factory.mktemp("vllm-0.19.0-patched") / "vllm-0.19.0"
    shutil.copytree(pristine_0190, tree)
    apply_series(tree)
    return tree
