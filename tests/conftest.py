from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/fixtures.py is imported as `fixtures` by every test module
sys.path.insert(0, str(Path(__file__).parent))

import fixtures  # noqa: E402


@pytest.fixture(scope="session")
def seeded_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session stackbuild cache pre-seeded with the real vLLM sdists."""
    return fixtures.seed_cache(tmp_path_factory.mktemp("sbcache"))


@pytest.fixture(scope="session")
def b70_gemma4_ws(tmp_path_factory: pytest.TempPathFactory, seeded_cache: Path):  # type: ignore[no-untyped-def]
    """The shipped b70-gemma4 recipe applied with `stackbuild apply` (ApplyResult)."""
    return fixtures.apply_shipped("b70-gemma4", tmp_path_factory.mktemp("ws") / "b70-gemma4", seeded_cache)


@pytest.fixture(scope="session")
def lunar_lake_moe_ws(tmp_path_factory: pytest.TempPathFactory, seeded_cache: Path):  # type: ignore[no-untyped-def]
    """The shipped lunar-lake-moe recipe applied with `stackbuild apply` (ApplyResult)."""
    return fixtures.apply_shipped("lunar-lake-moe", tmp_path_factory.mktemp("ws") / "lunar-lake-moe", seeded_cache)
