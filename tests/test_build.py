"""`stackbuild build`: a real pure-Python build of the patched vLLM 0.19.0 (slow,
network: the sdist comes from the package index once, then from the test cache), the
cache hit that runs no pip, misses on a changed patch or pin, a failing build that
leaves the cache clean; and the fast parts (prerequisites, the log and its tail)."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures import VLLM_SDISTS, vllm_sdist, vllm_tree
from packaging.utils import parse_wheel_filename

from stackbuild.bom import read_bom
from stackbuild.build import BuildError, BuildResult, build, build_env, check_toolchain, run_logged
from stackbuild.buildcache import TMP_PREFIX, builds_dir, logs_dir
from stackbuild.errors import StackbuildError
from stackbuild.recipe import Recipe, load_recipe
from stackbuild.workspace import apply_recipe

VERSION = "0.19.0"
SDIST_SHA = VLLM_SDISTS[VERSION]
MARK = "STACKBUILD_TEST_PATCHED = True"


def _diff(rel: str, old: str, new: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{rel}", f"b/{rel}"))


def _edit_patch(rel: str, old: str, new: str) -> str:
    text = (vllm_tree(VERSION) / rel).read_text()
    assert old in text, (rel, old)
    return _diff(rel, text, text.replace(old, new, 1))


@dataclass
class Proj:
    root: Path
    recipe: Recipe

    @property
    def workdir(self) -> Path:
        return self.root / "work" / self.recipe.name


def make_project(root: Path, patch: str, pins: str = "", name: str = "bt") -> Proj:
    """A project whose recipe `name` patches the real vLLM 0.19.0 sdist with `patch`."""
    (root / "recipes").mkdir(parents=True)
    pdir = root / "patches" / "vllm"
    pdir.mkdir(parents=True)
    (pdir / "tiny.patch").write_text(patch)
    sha = hashlib.sha256(patch.encode()).hexdigest()
    (root / "recipes" / f"{name}.toml").write_text(
        f'platform = "lunar-lake"\n\n[sources.vllm]\npypi = "vllm=={VERSION}"\nsha256 = "{SDIST_SHA}"\n\n'
        f'[[patches]]\nfile = "patches/vllm/tiny.patch"\nsource = "vllm"\nsha256 = "{sha}"\n\n'
        f'[build]\ntarget_device = "empty"\n\n{pins}'
    )
    return Proj(root, load_recipe(root / "recipes" / f"{name}.toml"))


def tiny_patch(value: str = "True") -> str:
    return _edit_patch("vllm/version.py", "\n\ndef _prev_minor_version_was",
                       f"\n\nSTACKBUILD_TEST_PATCHED = {value}\n\n\ndef _prev_minor_version_was")


def key_dirs() -> set[str]:
    return {d.name for d in builds_dir().iterdir() if d.is_dir() and len(d.name) == 64}


@pytest.fixture(scope="session")
def build_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One STACKBUILD_CACHE for the slow tests, pre-seeded with the sdist so nothing
    downloads twice."""
    cache = tmp_path_factory.mktemp("build-cache")
    seeded = cache / "sdists" / SDIST_SHA
    seeded.mkdir(parents=True)
    shutil.copyfile(vllm_sdist(VERSION), seeded / f"vllm-{VERSION}.tar.gz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STACKBUILD_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def first(build_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Proj, BuildResult, list[str]]:
    """The applied workspace and its first (cold) build, shared by the slow tests."""
    proj = make_project(tmp_path_factory.mktemp("proj"), tiny_patch())
    lines: list[str] = []
    result = build(proj.recipe, proj.workdir, progress=lines.append)
    return proj, result, lines


@pytest.mark.slow
@pytest.mark.network
def test_builds_the_patched_wheel_with_the_override_version(first: tuple[Proj, BuildResult, list[str]]) -> None:
    proj, r, lines = first
    assert not r.cache_hit and r.key and r.wheel is not None and r.wheel.is_file()
    assert r.version == f"{VERSION}+bt.{r.key[:8]}"
    assert str(parse_wheel_filename(r.wheel.name)[1]) == r.version
    with zipfile.ZipFile(r.wheel) as zf:
        assert MARK in zf.read("vllm/version.py").decode()
        assert "vllm/model_executor/models/registry.py" in zf.namelist()
    assert r.wheel.parent == builds_dir() / r.key
    assert json.loads(json.dumps(r.to_dict()))["wheels"] == [str(r.wheel)]
    # progress streamed the build, and the full log is on disk
    assert any(line.startswith("pip wheel (vllm):") for line in lines)
    assert r.log_path is not None and "Successfully built vllm" in r.log_path.read_text()
    # artefacts stayed out of the workspace
    tree = proj.workdir / "vllm"
    assert not (tree / "build").exists()
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=tree, capture_output=True, text=True)
    assert status.stdout == ""


@pytest.mark.slow
@pytest.mark.network
def test_bill_of_materials_says_what_went_in(first: tuple[Proj, BuildResult, list[str]]) -> None:
    proj, r, _ = first
    assert r.bom_path is not None and r.wheel is not None
    bom = json.loads(r.bom_path.read_text())
    assert bom["cache_key"] == r.key
    assert bom["recipe"] == {"name": "bt", "sha256": proj.recipe.sha256, "path": str(proj.recipe.path),
                             "platform": "lunar-lake"}
    assert bom["sources"][0]["sha256"] == SDIST_SHA
    (patch,) = bom["patches"]
    assert patch["verdict"] == "applied"
    assert patch["sha256"] == hashlib.sha256((proj.root / "patches/vllm/tiny.patch").read_bytes()).hexdigest()
    (art,) = bom["artifacts"]
    assert art["filename"] == r.wheel.name
    assert art["sha256"] == hashlib.sha256(r.wheel.read_bytes()).hexdigest()
    assert bom["build"]["env"]["VLLM_TARGET_DEVICE"] == "empty"
    assert bom["build"]["env"]["VLLM_VERSION_OVERRIDE"] == r.version
    assert bom["toolchain"]["packages"]["torch"].startswith("2.13.0")
    assert bom["toolchain"]["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert bom["host"]["cpu_count"] == os.cpu_count()
    assert bom["lockfile"] is None
    shown = read_bom(proj.recipe)
    assert shown.key == r.key
    text = "\n".join(t.render() for t in shown.tables())
    assert "tiny" in text and r.wheel.name in text


@pytest.mark.slow
@pytest.mark.network
def test_second_build_is_a_cache_hit_without_pip(first: tuple[Proj, BuildResult, list[str]]) -> None:
    proj, r, _ = first
    logs_before = sorted(logs_dir().iterdir())
    again = build(proj.recipe, proj.workdir)
    assert again.cache_hit
    assert again.wheels == r.wheels and again.key == r.key
    assert again.log_path is None
    assert sorted(logs_dir().iterdir()) == logs_before  # no build ran, so no new log


@pytest.mark.slow
@pytest.mark.network
def test_a_changed_patch_misses(first: tuple[Proj, BuildResult, list[str]], tmp_path: Path) -> None:
    _, r, _ = first
    other = make_project(tmp_path / "p", tiny_patch("'changed'"))
    assert apply_recipe(other.recipe, other.workdir).ok
    plan = build(other.recipe, other.workdir, dry_run=True)
    assert plan.key and plan.key != r.key
    assert not plan.cache_hit
    assert set(plan.miss_reasons) == {"patches", "trees"}


@pytest.mark.slow
@pytest.mark.network
def test_a_changed_pin_misses(first: tuple[Proj, BuildResult, list[str]], tmp_path: Path) -> None:
    _, r, _ = first
    other = make_project(tmp_path / "p", tiny_patch(), pins='[pins]\ntransformers = "==5.5.0"\n')
    assert apply_recipe(other.recipe, other.workdir).ok
    plan = build(other.recipe, other.workdir, dry_run=True)
    assert plan.key and plan.key != r.key
    assert not plan.cache_hit
    assert plan.miss_reasons == ("pins",)

@pytest.mark.slow
@pytest.mark.network
def test_dry_run_on_an_unchanged_workspace_predicts_the_hit(first: tuple[Proj, BuildResult, list[str]]) -> None:
    proj, r, _ = first
    plan = build(proj.recipe, proj.workdir, dry_run=True)
    assert plan.cache_hit and plan.key == r.key and plan.version == r.version and not plan.wheels


@pytest.mark.slow
@pytest.mark.network
def test_a_failing_build_leaves_the_cache_clean(first: tuple[Proj, BuildResult, list[str]], tmp_path: Path) -> None:
    before = key_dirs()
    broken = make_project(tmp_path / "p", _edit_patch("setup.py", "import ctypes\n", "import ctypes\ndef broken(:\n"))
    with pytest.raises(BuildError) as exc:
        build(broken.recipe, broken.workdir)
    msg = str(exc.value)
    assert "SyntaxError" in msg
    log = Path(msg.rsplit("full log: ", 1)[1].strip())
    assert log.is_file() and log.parent == logs_dir()
    assert key_dirs() == before
    assert not [d for d in builds_dir().iterdir() if d.name.startswith(TMP_PREFIX)]


@pytest.mark.slow
@pytest.mark.network
def test_rebuilding_the_same_inputs_gives_the_same_wheel_bytes(first: tuple[Proj, BuildResult, list[str]]) -> None:
    """Runs after the other slow tests: it drops the first build's entry and builds
    again in the build copy the earlier builds left dirty."""
    proj, r, _ = first
    assert r.wheel is not None and r.entry is not None
    before = hashlib.sha256(r.wheel.read_bytes()).hexdigest()
    shutil.rmtree(r.entry)
    again = build(proj.recipe, proj.workdir)
    assert not again.cache_hit and again.key == r.key and again.wheels == r.wheels
    assert hashlib.sha256(again.wheels[0].read_bytes()).hexdigest() == before


# ------------------------------------------------------------------ fast


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("STACKBUILD_CACHE", str(d))
    return d


def _recipe(tmp_path: Path, build_table: str) -> Recipe:
    (tmp_path / "recipes").mkdir(exist_ok=True)
    path = tmp_path / "recipes" / "x.toml"
    path.write_text(
        f'platform = "b70"\n[sources.vllm]\npypi = "vllm==0.19.0"\nsha256 = "{SDIST_SHA}"\n\n[build]\n{build_table}\n'
    )
    return load_recipe(path)


@pytest.mark.skipif(shutil.which("icpx") is not None, reason="this machine has the oneAPI compiler")
def test_xpu_target_without_oneapi_fails_up_front_naming_what_is_missing(tmp_path: Path, cache: Path) -> None:
    recipe = _recipe(tmp_path, 'target_device = "xpu"')
    with pytest.raises(BuildError) as exc:
        build(recipe, tmp_path / "work")
    msg = str(exc.value)
    assert "icpx is not on PATH" in msg
    assert "torch with XPU support" in msg
    assert "--target-device empty" in msg
    assert not (tmp_path / "work").exists()  # nothing was fetched or applied


def test_kernels_from_source_without_their_source_is_a_recipe_error(tmp_path: Path, cache: Path) -> None:
    recipe = _recipe(tmp_path, 'target_device = "xpu"\nkernels_from_source = true')
    with pytest.raises(BuildError) as exc:
        build(recipe, tmp_path / "work")
    assert exc.value.key == "build.kernels_from_source"


def test_kernels_are_ignored_for_a_pure_python_build(tmp_path: Path, cache: Path) -> None:
    recipe = _recipe(tmp_path, 'kernels_from_source = true')
    r = build(recipe, tmp_path / "work", target_device="empty", dry_run=True)
    assert any("kernels_from_source is ignored" in n for n in r.notes)
    assert check_toolchain("empty", False) == ()


def test_dry_run_without_a_workspace_plans_an_apply_and_touches_nothing(tmp_path: Path, cache: Path) -> None:
    recipe = _recipe(tmp_path, "")
    r = build(recipe, tmp_path / "work", target_device="empty", jobs=3, dry_run=True)
    assert r.dry_run and r.key is None and not r.wheels
    assert any("apply the recipe" in s for s in r.plan)
    assert r.jobs.jobs == 3 and not r.jobs.capped
    assert not (tmp_path / "work").exists()
    assert not (cache / "builds").exists() or not key_dirs()
    json.dumps(r.to_dict())
    text = "\n".join(t.render() for t in r.tables())
    assert "apply the recipe" in text and "jobs" in text


def test_unknown_target_device_is_refused(tmp_path: Path, cache: Path) -> None:
    recipe = _recipe(tmp_path, "")
    with pytest.raises(StackbuildError, match="unknown target device 'cuda'"):
        build(recipe, tmp_path / "work", target_device="cuda")


def test_inherited_vllm_variables_are_dropped_from_the_build_env() -> None:
    env, ours = build_env("empty", "0.19.0+x.1", 2, {"FOO": "1"},
                          base={"PATH": "/bin", "VLLM_USE_PRECOMPILED": "1", "MAX_JOBS": "64",
                                "SETUPTOOLS_SCM_PRETEND_VERSION": "9"})
    assert "VLLM_USE_PRECOMPILED" not in env and "SETUPTOOLS_SCM_PRETEND_VERSION" not in env
    assert env["MAX_JOBS"] == "2" and env["PATH"] == "/bin" and env["FOO"] == "1"
    assert ours["VLLM_VERSION_OVERRIDE"] == "0.19.0+x.1" and ours["VLLM_TARGET_DEVICE"] == "empty"


def test_run_logged_streams_throttled_progress_and_writes_the_whole_log(tmp_path: Path) -> None:
    seen: list[str] = []
    log = tmp_path / "b.log"
    code = "import time\nfor i in range(300):\n    print('line', i, flush=True)\n    time.sleep(0.005)\n"
    run_logged([sys.executable, "-c", code], tmp_path, dict(os.environ), log, seen.append, "step")
    text = log.read_text()
    assert "line 0\n" in text and "line 299\n" in text
    streamed = [s for s in seen if "lines" in s and not s.startswith("step: done")]
    assert 1 <= len(streamed) < 30  # throttled, not one call per line
    assert seen[-1].startswith("step: done") and "300 lines" in seen[-1]


def test_a_failing_step_raises_with_the_log_tail_and_path(tmp_path: Path) -> None:
    log = tmp_path / "b.log"
    code = "import sys\nfor i in range(100):\n    print('noise', i)\nprint('the real cause')\nsys.exit(3)\n"
    with pytest.raises(BuildError) as exc:
        run_logged([sys.executable, "-c", code], tmp_path, dict(os.environ), log, lambda _m: None, "step")
    msg = str(exc.value)
    assert "exit status 3" in msg and "the real cause" in msg and f"full log: {log}" in msg
    assert "noise 99" in msg and "noise 10\n" not in msg  # only the tail


def test_bom_of_a_recipe_never_built_says_so(cache: Path) -> None:
    with pytest.raises(StackbuildError, match="no build recorded for recipe 'nope'"):
        read_bom("nope")



def test_the_build_copy_is_exactly_head_and_the_workspace_is_never_touched(tmp_path: Path, cache: Path) -> None:
    from fixtures import commit_files, make_upstream_repo

    from stackbuild.build import build_tree_dir, sync_build_tree

    ws = tmp_path / "work" / "r" / "vllm"
    repo = make_upstream_repo(ws, {"setup.py": "print('v1')\n", "pkg/a.py": "A = 1\n", "gone.py": "x\n", ".gitignore": "build/\n"})
    (ws / "untracked-in-workspace.txt").write_text("mine\n")
    dest = build_tree_dir(ws)
    assert cache in dest.parents
    sync_build_tree(ws, dest)
    assert (dest / "pkg/a.py").read_text() == "A = 1\n" and not (dest / "untracked-in-workspace.txt").exists()
    # what a build leaves behind
    (dest / "build" / "lib").mkdir(parents=True)
    (dest / "build" / "lib" / "a.py").write_text("built\n")
    (dest / "pkg" / "a.py").write_text("A = 'rewritten by the build'\n")
    (dest / "pkg" / "_version.py").write_text("v = '9'\n")
    # and the next workspace state
    repo.index.remove(["gone.py"], working_tree=True)
    head = commit_files(repo, {"setup.py": "print('v2')\n"}, "patch")
    index_before = (ws / ".git" / "index").read_bytes()
    assert sync_build_tree(ws, dest) == head
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == [".gitignore", "pkg/a.py", "setup.py"]
    assert (dest / "pkg/a.py").read_text() == "A = 1\n" and (dest / "setup.py").read_text() == "print('v2')\n"
    # the workspace: its index, its files and its untracked file as they were
    assert (ws / "untracked-in-workspace.txt").exists() and not (ws / "build").exists()
    assert (ws / ".git" / "index").read_bytes() == index_before
    st = subprocess.run(["git", "status", "--porcelain"], cwd=ws, capture_output=True, text=True).stdout
    assert st == "?? untracked-in-workspace.txt\n"
