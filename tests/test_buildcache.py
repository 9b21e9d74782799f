"""The build cache's parts that need no build: the key (it changes with every input
that decides the output, and only with those), the version it puts in the wheel, the
job count capped by memory, and `cache ls` / `cache gc` over real entry folders."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

from stackbuild.bom import meminfo, read_bom
from stackbuild.build import GIB, BuildError, key_inputs, local_label, make_version, plan_jobs
from stackbuild.buildcache import (
    BOM_NAME,
    TMP_PREFIX,
    USED_MARKER,
    builds_dir,
    cache_gc,
    cache_ls,
    commit_entry,
    compute_key,
    diff_inputs,
    lookup,
    new_staging,
    record_last,
)
from stackbuild.errors import StackbuildError
from stackbuild.manifest import Manifest, PatchRecord, SourceRecord

SHA_A = "a" * 64
SHA_B = "b" * 64


def manifest(patches: list[tuple[str, str]], source_sha: str = SHA_A, commit: str | None = None) -> Manifest:
    return Manifest(
        recipe="r", recipe_sha256="0" * 64, inputs_sha256="1" * 64, platform="b70",
        sources=(SourceRecord("vllm", "pypi", "vllm==0.19.0", source_sha, commit, "vllm", "c" * 40, "d" * 40),),
        patches=tuple(PatchRecord(n, "file", "vllm", s, "applied", "", ("x.py",), "e" * 40) for n, s in patches),
        created="2026-11-01T00:00:00+00:00", stackbuild_version="0.1.0",
    )


def inputs(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        recipe_name="b70-gemma4",
        manifest=manifest([("p1", SHA_A), ("p2", SHA_B)]),
        trees={"vllm": "f" * 40},
        pins=[{"name": "transformers", "spec": "==5.5.0"}],
        target="xpu",
        kernels=False,
        build_env={"VLLM_TARGET_DEVICE": "xpu", "SOURCE_DATE_EPOCH": "315532800"},
        python={"version": "3.11.7", "implementation": "CPython", "executable": "/usr/bin/python3"},
        packages={"torch": "2.13.0", "setuptools": "80.9.0", "setuptools-scm": "8.1.0", "pip": "24.0"},
        native={"icpx": "Intel(R) oneAPI DPC++/C++ Compiler 2025.2.0"},
        stackbuild_version="0.1.0",
    )
    args.update(over)
    return key_inputs(**args)


def test_the_key_is_deterministic_and_ignores_dict_order() -> None:
    a = inputs()
    b = json.loads(json.dumps(a))
    b = dict(reversed(list(b.items())))
    assert compute_key(a) == compute_key(b)
    assert len(compute_key(a)) == 64


def test_the_key_changes_with_each_input_that_decides_the_output() -> None:
    base = inputs()
    variants = {
        "recipe name (it is in the version)": inputs(recipe_name="lunar-lake-moe"),
        "source sha256": inputs(manifest=manifest([("p1", SHA_A), ("p2", SHA_B)], source_sha=SHA_B)),
        "source commit": inputs(manifest=manifest([("p1", SHA_A), ("p2", SHA_B)], commit="9" * 40)),
        "a patch's content": inputs(manifest=manifest([("p1", SHA_A), ("p2", "c" * 64)])),
        "patch order": inputs(manifest=manifest([("p2", SHA_B), ("p1", SHA_A)])),
        "one patch fewer": inputs(manifest=manifest([("p1", SHA_A)])),
        "tree": inputs(trees={"vllm": "0" * 40}),
        "a pin": inputs(pins=[{"name": "transformers", "spec": "==5.10.1"}]),
        "a new pin": inputs(pins=[{"name": "transformers", "spec": "==5.5.0"}, {"name": "numpy", "spec": "<2"}]),
        "target device": inputs(target="empty"),
        "kernels from source": inputs(kernels=True),
        "build env": inputs(build_env={"VLLM_TARGET_DEVICE": "xpu", "SOURCE_DATE_EPOCH": "315532800", "X": "1"}),
        "python version": inputs(python={"version": "3.12.1", "implementation": "CPython"}),
        "torch version": inputs(packages={**inputs()["packages"], "torch": "2.10.0+xpu"}),
        "setuptools version": inputs(packages={**inputs()["packages"], "setuptools": "77.0.3"}),
        "compiler": inputs(native={"icpx": "Intel(R) oneAPI DPC++/C++ Compiler 2025.3.0"}),
        "stackbuild version": inputs(stackbuild_version="0.2.0"),
    }
    keys = {name: compute_key(v) for name, v in variants.items()}
    for name, key in keys.items():
        assert key != compute_key(base), f"the key ignores the {name}"
    assert len(set(keys.values())) == len(keys)


def test_the_key_ignores_what_does_not_change_the_wheel() -> None:
    # where the interpreter lives and the patch verdict's wording are not inputs
    moved = inputs(python={"version": "3.11.7", "implementation": "CPython", "executable": "/opt/py/bin/python"})
    assert compute_key(moved) == compute_key(inputs())


def test_diff_inputs_names_what_changed() -> None:
    assert diff_inputs(inputs(), inputs(target="empty")) == ("target_device",)
    assert diff_inputs(inputs(), inputs()) == ()


def test_version_is_upstream_plus_recipe_plus_short_key() -> None:
    key = "1a2b3c4d" + "0" * 56
    assert make_version("0.19.0", "b70-gemma4", key) == "0.19.0+b70.gemma4.1a2b3c4d"
    assert local_label("Lunar_Lake MoE!") == "lunar.lake.moe"
    # an all-digit short hash with a leading zero is written as pip normalises it
    v = make_version("0.19.0", "x", "01234567" + "0" * 56)
    assert v == str(Version(v)) == "0.19.0+x.1234567"
    # an upstream local part is replaced, not stacked
    assert make_version("0.19.0+cpu", "x", key) == "0.19.0+x.1a2b3c4d"
    with pytest.raises(BuildError):
        make_version("not a version", "x", key)


def test_jobs_are_capped_by_available_memory() -> None:
    p = plan_jobs(None, 16, 23 * GIB, 4 * GIB)
    assert p.jobs == 5 and p.capped and p.requested == 16
    assert "capped from 16" in p.reason and "4 GiB per compile job" in p.reason


def test_jobs_from_the_command_line_win_over_the_recipe() -> None:
    p = plan_jobs(2, 16, 64 * GIB, 4 * GIB)
    assert p.jobs == 2 and not p.capped and p.source == "--jobs"
    assert plan_jobs(40, 4, 64 * GIB, 4 * GIB).jobs == 16


def test_jobs_never_drop_below_one_and_pure_python_builds_are_not_capped() -> None:
    assert plan_jobs(8, None, GIB // 2, 4 * GIB).jobs == 1
    p = plan_jobs(None, 16, GIB, None)
    assert p.jobs == 16 and not p.capped and "nothing is compiled" in p.reason
    assert plan_jobs(None, None, None, 4 * GIB, cpu_count=3).jobs == 3
    with pytest.raises(BuildError):
        plan_jobs(0, 4, GIB, 4 * GIB)


def test_meminfo_reads_bytes() -> None:
    m = meminfo()
    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo")
    assert m["MemTotal"] > m["MemAvailable"] > 0
    assert m["MemTotal"] > 256 * 1024 * 1024  # bytes, not kB


# ------------------------------------------------------------------ entries on disk


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("STACKBUILD_CACHE", str(d))
    return d


def put_entry(key: str, recipe: str, size: int, age_days: float = 0.0) -> Path:
    import hashlib

    staging = new_staging(key)
    data = os.urandom(size)
    name = f"vllm-0.19.0+{recipe}.{key[:8]}-py3-none-any.whl"
    (staging / name).write_bytes(data)
    bom = {"recipe": {"name": recipe, "sha256": SHA_A, "platform": "b70"}, "cache_key": key,
           "artifacts": [{"role": "vllm", "filename": name, "sha256": hashlib.sha256(data).hexdigest(), "size": size}],
           "key_inputs": {}, "patches": [], "sources": []}
    (staging / BOM_NAME).write_text(json.dumps(bom))
    path = commit_entry(staging, key)
    t = time.time() - age_days * 86400
    os.utime(path / BOM_NAME, (t, t))
    return path


def test_ls_lists_entries_most_recently_used_first(cache: Path) -> None:
    put_entry("1" * 64, "old", 1000, age_days=10)
    put_entry("2" * 64, "new", 2000, age_days=1)
    (builds_dir() / f"{TMP_PREFIX}half-written").mkdir()  # an interrupted build: not an entry
    listing = cache_ls()
    assert [e.recipe for e in listing.entries] == ["new", "old"]
    assert listing.total_bytes > 3000
    d = listing.to_dict()
    assert d["entries"][0]["key"] == "2" * 64 and d["entries"][1]["age_s"] > 9 * 86400
    table = listing.tables()[0].render()
    assert "new" in table and "10d" in table


def test_gc_by_age_removes_entries_unused_for_longer(cache: Path) -> None:
    old = put_entry("1" * 64, "old", 1000, age_days=10)
    used = put_entry("3" * 64, "used", 1000, age_days=10)
    assert lookup("3" * 64) is not None  # a hit counts as use
    new = put_entry("2" * 64, "new", 1000, age_days=1)
    r = cache_gc(max_age_days=7)
    assert [e.recipe for e in r.removed] == ["old"]
    assert not old.exists() and new.exists() and used.exists()
    assert (used / USED_MARKER).exists()
    assert "unused for more than 7 day(s)" in r.reasons[0]


def test_gc_by_size_removes_least_recently_used_first(cache: Path) -> None:
    put_entry("1" * 64, "a", 400_000, age_days=3)
    put_entry("2" * 64, "b", 400_000, age_days=2)
    put_entry("3" * 64, "c", 400_000, age_days=1)
    r = cache_gc(max_size_mb=0.9)
    assert [e.recipe for e in r.removed] == ["a"]
    assert [e.recipe for e in r.kept] == ["c", "b"]
    assert r.freed_bytes >= 400_000
    assert cache_gc(max_size_mb=0).kept == ()


def test_gc_removes_stale_staging_folders_and_refuses_negative_limits(cache: Path) -> None:
    stale = builds_dir() / f"{TMP_PREFIX}stale"
    stale.mkdir()
    t = time.time() - 3 * 86400
    os.utime(stale, (t, t))
    fresh = builds_dir() / f"{TMP_PREFIX}running"
    fresh.mkdir()
    r = cache_gc()
    assert r.leftovers_removed == 1 and not stale.exists() and fresh.exists()
    # build copies of workspaces go by age of last use, with their index
    trees = cache / "buildtrees"
    for name, age in (("old-vllm-1", 30), ("new-vllm-2", 0)):
        (trees / name).mkdir(parents=True)
        (trees / f"{name}.index").write_bytes(b"DIRC")
        t = time.time() - age * 86400
        os.utime(trees / f"{name}.index", (t, t))
    cache_gc(max_age_days=7)
    assert sorted(p.name for p in trees.iterdir() if not p.name.endswith(".lock")) == ["new-vllm-2", "new-vllm-2.index"]
    with pytest.raises(StackbuildError):
        cache_gc(max_age_days=-1)


def test_a_damaged_entry_is_a_miss_and_is_removed(cache: Path) -> None:
    path = put_entry("4" * 64, "r", 1000)
    assert lookup("4" * 64) is not None
    wheel = next(path.glob("*.whl"))
    wheel.write_bytes(b"tampered")
    assert lookup("4" * 64) is None
    assert not path.exists()


def test_an_entry_without_its_bom_is_not_an_entry(cache: Path) -> None:
    path = put_entry("5" * 64, "r", 1000)
    (path / BOM_NAME).unlink()
    assert lookup("5" * 64) is None
    assert cache_ls().entries == ()


def test_bom_reads_the_recipes_last_build_or_a_key_prefix(cache: Path) -> None:
    put_entry("6" * 64, "r", 1000)
    put_entry("7" * 64, "r", 1000)
    record_last("r", "6" * 64)
    assert read_bom("r").key == "6" * 64
    assert read_bom("r", key="7777").key == "7" * 64
    import shutil

    shutil.rmtree(builds_dir() / ("6" * 64))
    with pytest.raises(StackbuildError, match="no longer in the cache"):
        read_bom("r")


def test_results_serialise_to_json(cache: Path) -> None:
    put_entry("8" * 64, "r", 10, age_days=30)
    json.dumps(cache_ls().to_dict())
    json.dumps(cache_gc(max_age_days=1).to_dict())
    assert copy.deepcopy(cache_ls().to_dict())["entries"] == []
