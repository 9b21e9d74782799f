from __future__ import annotations

import stat
from pathlib import Path

import pytest

from stackbuild.cache import atomic_file, atomic_write_text, cache_dir


def test_cache_dir_honours_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("old\n")
    recipe.chmod(0o664)
    atomic_write_text(recipe, "new\n")
    assert recipe.read_text() == "new\n"
    assert stat.S_IMODE(recipe.stat().st_mode) == 0o664
    fresh = tmp_path / "fresh.txt"
    atomic_write_text(fresh, "x")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's 0600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "lock.txt"
    dest.write_text("previous\n")
    with pytest.raises(RuntimeError), atomic_file(dest) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert dest.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock.txt"]
