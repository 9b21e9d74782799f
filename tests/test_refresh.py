"""refresh: the series onto real vLLM releases (0.20.0, 0.21.0), a constructed git
upstream that merged our patches (verbatim and with a line changed), conflicts with
--continue / --abort, and the matrix."""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import fixtures
import pytest
from fixtures import VLLM_SDISTS, commit_files, make_upstream_repo

from stackbuild.errors import StackbuildError
from stackbuild.recipe import load_recipe
from stackbuild.refresh import (
    Evidence,
    RefreshVerdict,
    new_recipe_name,
    refresh,
    refresh_abort,
    refresh_continue,
    refresh_matrix,
)

UTILS = "vllm/v1/utils.py"


def udiff(rel: str, old: str, new: str, header: str = "") -> str:
    body = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{rel}", f"b/{rel}"))
    return header + f"diff --git a/{rel} b/{rel}\n" + body


def seed_cache(cache: Path, versions: list[str]) -> None:
    for v in versions:
        d = cache / "sdists" / VLLM_SDISTS[v]
        d.mkdir(parents=True, exist_ok=True)
        link = d / f"vllm-{v}.tar.gz"
        if not link.exists():
            link.symlink_to(fixtures.vllm_sdist(v))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _patch_entries(root: Path, version: str, patches: dict[str, str]) -> str:
    """Write each patch to patches/pkg/VERSION/NAME.patch in the project at `root`; the
    recipe's [[patches]] entries for them, in order."""
    pdir = root / "patches" / "pkg" / version
    pdir.mkdir(parents=True, exist_ok=True)
    body = ""
    for name, text in patches.items():
        (pdir / f"{name}.patch").write_text(text)
        body += f'\n[[patches]]\nfile = "patches/pkg/{version}/{name}.patch"\nsource = "pkg"\nsha256 = "{sha(pdir / f"{name}.patch")}"\n'
    return body


def _series(tree: Path) -> dict[str, str]:
    """Our own small series against 0.19.0, each patch made on top of the previous."""
    cur: dict[str, str] = {}

    def text(rel: str) -> str:
        return cur.get(rel) or (tree / rel).read_text()

    def change(rel: str, old: str, new: str) -> tuple[str, str]:
        before = text(rel)
        assert before.count(old) == 1, (rel, old)
        after = before.replace(old, new)
        cur[rel] = after
        return before, after

    out: dict[str, str] = {}
    hdr = "Description: {}\nOrigin: vendor\nForwarded: no\nLast-Update: 2026-01-01\n\n"
    b, a = change("vllm/logprobs.py", "# TODO(sang): Fix it.\n", "# TODO(sang): Fix it.\n# stackbuild: clean\n")
    out["clean"] = udiff("vllm/logprobs.py", b, a, hdr.format("applies as it is"))
    b, a = change(UTILS, "    def __len__(self):\n        return len(self._x)\n",
                  "    def __len__(self):\n        # stackbuild: offset\n        return len(self._x)\n")
    out["offset"] = udiff(UTILS, b, a, hdr.format("lands a line lower upstream"))
    b, a = change(UTILS, "sentinel_to_proc[coordinator.proc.sentinel] = coordinator.proc\n",
                  "sentinel_to_proc[coordinator.proc.sentinel] = coordinator.proc  # merged\n")
    out["merged"] = udiff(UTILS, b, a, hdr.format("context changed upstream"))
    b, a = change(UTILS, "import multiprocessing\n", "import multiprocessing\nimport threading\n")
    out["upstream"] = udiff(UTILS, b, a, hdr.format("what 0.20.0 did"))
    b, a = change("vllm/lora/layers/gate_linear.py", "    # GateLinearWithLoRA should always be replaced",
                  "    # stackbuild: obsolete\n    # GateLinearWithLoRA should always be replaced")
    out["vanished"] = udiff("vllm/lora/layers/gate_linear.py", b, a, hdr.format("its file is gone upstream"))
    b, a = change(UTILS, "connection.wait(sentinel_to_proc, timeout=5)", "connection.wait(sentinel_to_proc, timeout=10)")
    out["conflict"] = udiff(UTILS, b, a, hdr.format("upstream rewrote this line"))
    return out


BACKPORT_SAME = "vllm/tool_parsers/hy_v3_tool_parser.py"  # new in 0.20.0, identical in 0.21.0
BACKPORT_DIFF = "vllm/v1/attention/ops/triton_turboquant_decode.py"  # new in 0.20.0, changed in 0.21.0


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("refresh-project")
    cache = root / "cache"
    seed_cache(cache, ["0.19.0", "0.20.0", "0.21.0"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STACKBUILD_CACHE", str(cache))
        pdir = root / "patches" / "vllm" / "0.19.0"
        pdir.mkdir(parents=True)
        (root / "recipes").mkdir()
        entries = []
        series = _series(fixtures.vllm_tree("0.19.0"))
        order = ["clean", "offset", "merged", "upstream", "vanished", "backport-same", "backport-diff", "conflict"]
        for name in order:
            if name.startswith("backport"):
                f = BACKPORT_SAME if name == "backport-same" else BACKPORT_DIFF
                entries.append(f'# a backport\n[[patches]]\nname = "{name}"\nbackport = "vllm==0.21.0"\n'
                               f'sha256 = "{VLLM_SDISTS["0.21.0"]}"\nfiles = ["{f}"]\nsource = "vllm"\n')
                continue
            p = pdir / f"{name}.patch"
            p.write_text(series[name])
            entries.append(f'[[patches]]\nfile = "patches/vllm/0.19.0/{name}.patch"\nsource = "vllm"  # keep me\n'
                           f'sha256 = "{sha(p)}"\n')
        (root / "recipes" / "xpu-test.toml").write_text(
            '# a test recipe\nname = "xpu-test"\nplatform = "lunar-lake"\n\n[sources.vllm]\n'
            f'pypi = "vllm==0.19.0"\nsha256 = "{VLLM_SDISTS["0.19.0"]}"\n\n' + "\n".join(entries))
        yield root


@pytest.fixture(scope="session")
def at_020(project: Path):  # type: ignore[no-untyped-def]
    recipe = load_recipe(project / "recipes" / "xpu-test.toml")
    return refresh(recipe, "vllm==0.20.0", VLLM_SDISTS["0.20.0"])


@pytest.fixture(scope="session")
def at_021(project: Path):  # type: ignore[no-untyped-def]
    recipe = load_recipe(project / "recipes" / "xpu-test.toml")
    return refresh(recipe, "vllm==0.21.0", VLLM_SDISTS["0.21.0"], workdir=project / "work" / "r021")


def _verdicts(result) -> dict[str, tuple[RefreshVerdict, Evidence | None]]:  # type: ignore[no-untyped-def]
    return {p.name: (p.verdict, p.evidence) for p in result.patches}


EXPECTED_020 = {
    "clean": (RefreshVerdict.CLEAN, None),
    "offset": (RefreshVerdict.OFFSET, None),
    "merged": (RefreshVerdict.MERGED, None),
    "upstream": (RefreshVerdict.ALREADY_UPSTREAM, Evidence.REVERSE_APPLIES),
    # GateLinearWithLoRA is gone from 0.20.0 and nothing holds its code
    "vanished": (RefreshVerdict.OBSOLETE, Evidence.FILE_GONE),
    "backport-same": (RefreshVerdict.ALREADY_UPSTREAM, Evidence.IDENTICAL_FILES),
    # 0.20.0 ships an older version of the 0.21.0 file: the backport still replaces it
    "backport-diff": (RefreshVerdict.CLEAN, None),
    "conflict": (RefreshVerdict.CONFLICT, None),
}


@pytest.mark.network
@pytest.mark.slow
def test_refresh_onto_0_20_0_gives_each_verdict(at_020) -> None:  # type: ignore[no-untyped-def]
    assert _verdicts(at_020) == EXPECTED_020
    assert at_020.state == "conflict" and at_020.exit_code == 1
    tree = at_020.worktree
    text = (tree / UTILS).read_text()
    assert "<<<<<<< " in text and "timeout=10" in text  # left as an in-progress cherry-pick
    assert (tree / ".git" / "CHERRY_PICK_HEAD").exists()
    # nothing written outside the refresh worktree yet
    assert not (tree.parents[2] / "patches" / "vllm" / "0.20.0").exists()
    assert at_020.to_dict()["patches"][3]["evidence"] == "reverse applies"
    assert "vanished" in at_020.tables()[0].render()


@pytest.mark.network
@pytest.mark.slow
def test_continue_refuses_markers_then_writes_patches_and_recipe(project: Path, at_020) -> None:  # type: ignore[no-untyped-def]
    recipe = load_recipe(project / "recipes" / "xpu-test.toml")
    with pytest.raises(StackbuildError, match="conflict markers"):
        refresh_continue(recipe)
    path = at_020.worktree / UTILS
    lines = path.read_text().split("\n")
    out, skip = [], False
    for ln in lines:  # keep upstream's side, with our longer timeout
        if ln.startswith("<<<<<<< "):
            skip = False
            continue
        if ln.startswith("======="):
            skip = True
            continue
        if ln.startswith(">>>>>>> "):
            skip = False
            continue
        if not skip:
            out.append(ln.replace("connection.wait(sentinel_to_proc)", "connection.wait(sentinel_to_proc, timeout=10)"))
    path.write_text("\n".join(out))
    res = refresh_continue(recipe)
    assert res.state == "done" and res.exit_code == 1  # "vanished" waits for a person
    v = _verdicts(res)
    assert v["conflict"][0] is RefreshVerdict.RESOLVED
    new_dir = project / "patches" / "vllm" / "0.20.0"
    assert sorted(p.name for p in new_dir.iterdir()) == ["clean.patch", "conflict.patch", "merged.patch", "offset.patch"]
    # clean: carried byte for byte; offset: regenerated with the header kept and Last-Update bumped
    assert (new_dir / "clean.patch").read_bytes() == (project / "patches/vllm/0.19.0/clean.patch").read_bytes()
    off = (new_dir / "offset.patch").read_text()
    assert off.startswith("Description: lands a line lower upstream\nOrigin: vendor\n")
    assert "Last-Update: 2026-01-01" not in off and "Last-Update: " in off
    assert "stackbuild-patch" not in off and "# stackbuild: offset" in off
    assert "timeout=10" in (new_dir / "conflict.patch").read_text()
    # the new recipe loads, pins 0.20.0, drops the upstream/obsolete entries with a reason
    assert res.new_recipe == project / "recipes" / "xpu-test-0.20.0.toml"
    text = res.new_recipe.read_text()
    assert '# stackbuild refresh to vllm==0.20.0' in text and "already upstream (reverse applies)" in text
    assert 'source = "vllm"  # keep me' in text
    assert "obsolete (file gone upstream):" in text and 'file = "patches/vllm/0.19.0/vanished.patch"' in text
    new = load_recipe(res.new_recipe)
    assert new.source("vllm").requirement == "vllm==0.20.0"
    assert new.source("vllm").sha256 == VLLM_SDISTS["0.20.0"]
    assert [p.name for p in new.patches] == ["clean", "offset", "merged", "vanished", "backport-diff", "conflict"]
    for p in new.patches:
        if p.file and p.name != "vanished":
            assert p.file.startswith("patches/vllm/0.20.0/")
            assert p.sha256 == sha(project / p.file)
    # the undecided patch is marked: apply refuses the series instead of building without it
    from stackbuild.workspace import apply_recipe

    applied = apply_recipe(new, project / "work" / "applied-020")
    assert not applied.ok and applied.failed is not None and applied.failed.name == "vanished"
    assert applied.exit_code == 1 and applied.failed.detail.startswith("marked by refresh: obsolete: ")
    assert {r.verdict.value for r in applied.patches} == {"not attempted"}


@pytest.mark.network
@pytest.mark.slow
def test_refresh_onto_0_21_0_then_abort_restores(project: Path, at_021) -> None:  # type: ignore[no-untyped-def]
    expected = dict(EXPECTED_020)
    expected["backport-diff"] = (RefreshVerdict.ALREADY_UPSTREAM, Evidence.IDENTICAL_FILES)
    assert _verdicts(at_021) == expected
    recipe = load_recipe(project / "recipes" / "xpu-test.toml")
    before = sorted(str(p.relative_to(project)) for p in (project / "patches").rglob("*")) + sorted(
        p.name for p in (project / "recipes").iterdir())
    with pytest.raises(StackbuildError, match="--continue or drop it with --abort"):
        refresh(recipe, "vllm==0.21.0", VLLM_SDISTS["0.21.0"], workdir=project / "work" / "r021")
    res = refresh_abort(recipe, workdir=project / "work" / "r021")
    assert res.state == "aborted"
    assert not (project / "work" / "r021").exists()
    after = sorted(str(p.relative_to(project)) for p in (project / "patches").rglob("*")) + sorted(
        p.name for p in (project / "recipes").iterdir())
    assert before == after
    with pytest.raises(StackbuildError, match="no refresh in progress"):
        refresh_abort(recipe, workdir=project / "work" / "r021")


@pytest.mark.network
@pytest.mark.slow
def test_matrix_grid_over_two_releases(project: Path) -> None:
    recipe = load_recipe(project / "recipes" / "xpu-test.toml")
    m = refresh_matrix(recipe, ["0.20.0", "0.21.0"], jobs=2,
                       sha256s={"0.20.0": VLLM_SDISTS["0.20.0"], "0.21.0": VLLM_SDISTS["0.21.0"]})
    assert m.errors == (None, None)
    grid = m.grid()
    assert grid["conflict"] == {"0.20.0": "conflict", "0.21.0": "conflict"}
    assert grid["backport-diff"] == {"0.20.0": "clean", "0.21.0": "already upstream"}
    assert grid["offset"] == {"0.20.0": "offset", "0.21.0": "offset"}
    assert m.exit_code == 1
    assert not (project / "patches" / "vllm" / "0.21.0").exists()  # the matrix writes nothing


def test_new_recipe_name() -> None:
    assert new_recipe_name("lunar-lake-moe", "0.19.0", "0.20.0") == "lunar-lake-moe-0.20.0"
    assert new_recipe_name("vllm-0.19.0-lnl", "0.19.0", "0.20.0") == "vllm-0.20.0-lnl"


# ------------------------------------------------------------------ a constructed git upstream

BASE_FILES = {
    "pkg/__init__.py": "",
    "pkg/alpha.py": "".join(f"def a{i}():\n    return {i}\n\n\n" for i in range(30)),
    "pkg/beta.py": "".join(f"def b{i}(x):\n    y = x + {i}\n    return y\n\n\n" for i in range(30)),
}


def _mod(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1
    return text.replace(old, new)


def test_git_upstream_that_merged_our_patches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    up = make_upstream_repo(tmp_path / "upstream", BASE_FILES, tag="v1.0")
    alpha2 = _mod(BASE_FILES["pkg/alpha.py"], "def a5():\n    return 5\n", "def a5():\n    # verbatim\n    return 55\n")
    beta2 = _mod(BASE_FILES["pkg/beta.py"], "def b7(x):\n    y = x + 7\n    return y\n",
                 "def b7(x):\n    if x is None:\n        raise ValueError('x is None')\n    y = x + 7\n    return y * 2\n")
    beta_up = beta2.replace("raise ValueError('x is None')", "raise TypeError('x must not be None')")
    root = tmp_path / "proj"
    (root / "recipes").mkdir(parents=True)
    hdr = "Description: {}\nForwarded: yes\nLast-Update: 2026-01-01\n\n"
    patches = {
        "verbatim": udiff("pkg/alpha.py", BASE_FILES["pkg/alpha.py"], alpha2, hdr.format("merged as it is")),
        "reworded": udiff("pkg/beta.py", BASE_FILES["pkg/beta.py"], beta2, hdr.format("merged with a line changed")),
    }
    body = _patch_entries(root, "v1.0", patches)
    (root / "recipes" / "gitrec.toml").write_text(
        f'platform = "b70"\n\n[sources.pkg]\ngit = "{up.working_tree_dir}"\ntag = "v1.0"\n' + body)
    # upstream merges the first verbatim, the second with one added line changed, and moves on
    commit_files(up, {"pkg/alpha.py": alpha2}, "take the vendor fix")
    commit_files(up, {"pkg/beta.py": beta_up}, "None check, reworded")
    commit_files(up, {"pkg/gamma.py": "G = 1\n"}, "unrelated")
    up.create_tag("v2.0")
    recipe = load_recipe(root / "recipes" / "gitrec.toml")
    res = refresh(recipe, "pkg@v2.0")
    v = _verdicts(res)
    assert v == {
        "verbatim": (RefreshVerdict.ALREADY_UPSTREAM, Evidence.PATCH_ID),
        "reworded": (RefreshVerdict.ALREADY_UPSTREAM, Evidence.LINES_PRESENT),
    }
    assert "upstream differs in" in res.verdict("reworded").detail
    assert "TypeError" not in res.verdict("reworded").detail and "ValueError" in res.verdict("reworded").detail
    new = load_recipe(res.new_recipe)  # type: ignore[arg-type]
    assert new.source("pkg").tag == "v2.0" and new.patches == ()


# ------------------------------------------------------------------ the real series (patches/vllm/0.19.0)

def _real_matrix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe_name: str, versions: list[str]):  # type: ignore[no-untyped-def]
    """`refresh --matrix` of a shipped 0.19.0 recipe (a copy of the project's recipes and
    patches) onto real releases, from sdists seeded into a private cache."""
    repo = Path(__file__).resolve().parent.parent
    seed_cache(tmp_path / "cache", ["0.19.0", *versions])
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "proj"
    shutil.copytree(repo / "recipes", root / "recipes")
    shutil.copytree(repo / "patches", root / "patches")
    recipe = load_recipe(root / "recipes" / f"{recipe_name}.toml")
    return refresh_matrix(recipe, versions, jobs=2, sha256s={v: VLLM_SDISTS[v] for v in versions})


REAL_EXPECTED = {
    # 0.20.0 made the UMA free-memory branch a platform hook (is_integrated_gpu)
    "xpu-unified-memory-free-check": "needs porting",
    "hybrid-kv-page-size-lcm": "merged (3-way)",
    # upstream added its own XPU path for INC/AutoRound (INCXPULinearMethod) in 0.20.0
    "xpu-autoround-gptq-awq": "needs porting",
    "xpu-int4-linear": "clean",
    "xpu-int4-moe": "needs porting",  # compressed_tensors_moe.py was split into a package in 0.20.0
}


@pytest.mark.network
@pytest.mark.slow
def test_real_lunar_lake_series_on_0_20_0_and_0_21_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _real_matrix(tmp_path, monkeypatch, "lunar-lake-moe", ["0.20.0", "0.21.0"])
    assert m.errors == (None, None)
    grid = m.grid()
    for name, verdict in REAL_EXPECTED.items():
        assert grid[name] == {"0.20.0": verdict, "0.21.0": verdict}, name
    umem = m.results[0].verdict("xpu-unified-memory-free-check")  # type: ignore[union-attr]
    assert "`if current_platform.is_integrated_gpu(device.index):` at vllm/utils/mem_utils.py:109" in umem.detail
    moe = m.results[0].verdict("xpu-int4-moe")  # type: ignore[union-attr]
    assert "compressed_tensors_moe.py is gone; its code moved to vllm/model_executor/layers/quantization/" \
        "compressed_tensors/compressed_tensors_moe/compressed_tensors_moe_wna16_marlin.py (similarity" in moe.detail



# ------------------------------------------------------------------ constructed upstreams, one per verdict class


def _funcs(prefix: str, n: int, body: str) -> str:
    return "".join(f"def {prefix}{i}(x):\n    {body.format(i=i)}\n\n\n" for i in range(n))


OPS = "def fused_add(x, y):\n    total = x + y\n    return total\n\n\n" + "".join(
    f"def op_{i}(value):\n    result = value * {i} + {i * 3}\n    return result\n\n\n" for i in range(20))
GAMMA = _funcs("g", 12, "return x - {i}")
BETA = _funcs("b", 12, "return x * {i}")
LEGACY = "def old_path_handler(request):\n    handled = request.strip()\n    return handled\n"
GONE = "def gone_helper(value):\n    doubled = value * 2\n    return doubled\n"
V1 = {"pkg/__init__.py": "", "pkg/alpha.py": BASE_FILES["pkg/alpha.py"], "pkg/ops.py": OPS, "pkg/gamma.py": GAMMA,
      "pkg/beta.py": BETA, "pkg/legacy.py": LEGACY, "pkg/gone.py": GONE}

CLAMP = "def clamp_value(x, low, high):\n    return max(low, min(x, high))\n\n\n"
CLAMP_UP = ('def clamp_value(x, low, high):\n    """Keep x within [low, high]."""\n    # upstream\'s own words\n'
            "    return max(low,\n               min(x, high))\n\n\n")
PACK = "XPU_INT4_GROUP_SIZE = 128\n\n\ndef xpu_int4_gemm_pack(weights):\n    return [w & 0xF for w in weights][:XPU_INT4_GROUP_SIZE]\n\n\n"
UP_INT4 = ("XPU_INT4_GROUP_SIZE = 64\n\n\ndef xpu_int4_gemm_pack(weights, group=XPU_INT4_GROUP_SIZE):\n"
           "    packed = []\n    for w in weights:\n        packed.append(w % 16)\n    return packed[:group]\n")


def _constructed_patches() -> dict[str, str]:
    hdr = "Description: {}\nForwarded: no\nLast-Update: 2026-01-01\n\n"
    ops2 = _mod(OPS, "    total = x + y\n", "    total = x + y + 0  # the vendor fix\n")
    gamma2 = _mod(GAMMA, "def g4(x):\n    return x - 4\n", CLAMP + "def g4(x):\n    return clamp_value(x, 0, 4)\n")
    beta2 = _mod(BETA, "def b8(x):\n", PACK + "def b8(x):\n")
    legacy2 = _mod(LEGACY, "request.strip()", "request.strip().lower()")
    alpha2 = _mod(BASE_FILES["pkg/alpha.py"], "    return 5\n", "    return 555\n")
    gone2 = _mod(GONE, "value * 2", "value * 3")
    return {
        "moved": udiff("pkg/ops.py", OPS, ops2, hdr.format("fix in a file upstream moves")),
        "reformatted": udiff("pkg/gamma.py", GAMMA, gamma2, hdr.format("upstream took it with other comments")),
        "elsewhere": udiff("pkg/beta.py", BETA, beta2, hdr.format("upstream implements it in another file")),
        "deleted": udiff("pkg/legacy.py", LEGACY, legacy2, hdr.format("a change to code upstream deleted")),
        "partial": udiff("pkg/alpha.py", BASE_FILES["pkg/alpha.py"], alpha2)
        + udiff("pkg/gone.py", GONE, gone2, hdr.format("two files, one gone upstream")).split("\n\n", 1)[1],
    }


def _v2(up) -> None:  # type: ignore[no-untyped-def]
    root = Path(up.working_tree_dir)
    moved = _mod(OPS, "def op_3(value):\n    result = value * 3 + 9\n", "def op_3(value):\n    result = value * 3 + 10\n")
    (root / "pkg" / "kernels").mkdir()
    up.index.move(["pkg/ops.py", "pkg/kernels/fused_ops.py"])
    up.index.remove(["pkg/legacy.py", "pkg/gone.py"], working_tree=True)
    gamma_up = _mod(GAMMA, "def g4(x):\n    return x - 4\n", CLAMP_UP + "def g4(x):\n    return clamp_value( x, 0, 4 )  # same call\n")
    beta_up = _mod(BETA, "def b7(x):\n    return x * 7\n\n\ndef b8(x):\n    return x * 8\n",
                   "def b7(x):\n    return x * 70\n\n\n# b8 takes a scale now\ndef b8(x, scale=1):\n    return x * 80 * scale\n")
    commit_files(up, {"pkg/kernels/fused_ops.py": moved, "pkg/kernels/__init__.py": "", "pkg/gamma.py": gamma_up,
                      "pkg/beta.py": beta_up, "pkg/xpu/__init__.py": "", "pkg/xpu/int4.py": UP_INT4,
                      "pkg/other/ops.py": "def unrelated_thing():\n    return 'nothing in common here'\n"}, "v2 changes")
    up.create_tag("v2.0")


def test_constructed_upstream_gives_each_verdict_and_keeps_every_undecided_patch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stackbuild.workspace import apply_recipe

    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    up = make_upstream_repo(tmp_path / "upstream", V1, tag="v1.0")
    root = tmp_path / "proj"
    (root / "recipes").mkdir(parents=True)
    body = _patch_entries(root, "v1.0", _constructed_patches())
    (root / "recipes" / "con.toml").write_text(f'platform = "b70"\n\n[sources.pkg]\ngit = "{up.working_tree_dir}"\ntag = "v1.0"\n' + body)
    _v2(up)
    recipe = load_recipe(root / "recipes" / "con.toml")
    res = refresh(recipe, "pkg@v2.0")
    assert _verdicts(res) == {
        "moved": (RefreshVerdict.NEEDS_PORTING, Evidence.FILE_MOVED),
        "reformatted": (RefreshVerdict.ALREADY_UPSTREAM, Evidence.NORMALISED),
        "elsewhere": (RefreshVerdict.POSSIBLY_UPSTREAM, Evidence.NAMES_FOUND),
        "deleted": (RefreshVerdict.OBSOLETE, Evidence.FILE_GONE),
        "partial": (RefreshVerdict.CONFLICT, Evidence.FILE_GONE),
    }
    moved = res.verdict("moved")
    # ranked by content, not by file name: the same-named pkg/other/ops.py is not the answer
    assert "moved to pkg/kernels/fused_ops.py (similarity 0.9" in moved.detail
    assert moved.hints[0].startswith("pkg/ops.py -> pkg/kernels/fused_ops.py")
    assert all("pkg/other/ops.py" not in h for h in moved.hints)
    assert "possibly upstream in pkg/xpu/int4.py:1 (check)" in res.verdict("elsewhere").detail
    assert "nothing replaced it" in res.verdict("deleted").detail
    partial = res.verdict("partial")
    assert "pkg/gone.py is gone" in partial.detail and "the rest applied (pkg/alpha.py" in partial.detail
    assert "return 555" in (res.worktree / "pkg" / "alpha.py").read_text()  # the rest is carried in the worktree
    # exit 1, and the new recipe keeps every undecided patch, marked, naming the old file
    assert res.state == "done" and res.exit_code == 1
    text = res.new_recipe.read_text()  # type: ignore[union-attr]
    for name in ("moved", "elsewhere", "deleted", "partial"):
        assert f'\nfile = "patches/pkg/v1.0/{name}.patch"' in text
    assert text.count("refuses the whole series while it has `refresh_verdict`") == 4
    assert '# file = "patches/pkg/v1.0/reformatted.patch"' in text
    new = load_recipe(res.new_recipe)  # type: ignore[arg-type]
    assert [p.name for p in new.patches] == ["moved", "elsewhere", "deleted", "partial"]
    assert [(p.refresh_verdict or "").split(":")[0] for p in new.patches] == [
        "needs porting", "possibly upstream", "obsolete", "conflict"]
    assert not apply_recipe(new, tmp_path / "applied").ok  # never builds silently without them


def test_comment_only_patch_is_not_proven_upstream_by_normalising(tmp_path: Path) -> None:
    """A change of comments alone is equal before and after normalising: that proves
    nothing, so it is not "already upstream"."""
    from stackbuild.refresh.verdict import normalised_upstream
    from stackbuild.series import parse_patch

    post = _mod(GAMMA, "def g4(x):\n", "def g4(x):  # a comment\n")
    fp = parse_patch(udiff("pkg/gamma.py", GAMMA, post)).files[0]
    assert normalised_upstream(GAMMA, post, GAMMA, fp, lambda _q: ()) is None
    real = _mod(GAMMA, "    return x - 4\n", "    return x - 44\n")
    fp = parse_patch(udiff("pkg/gamma.py", GAMMA, real)).files[0]
    assert normalised_upstream(GAMMA, real, GAMMA, fp, lambda _q: ()) == (False, [])
    reformatted = _mod(GAMMA, "    return x - 4\n", '    """doc"""\n    return (x -\n            44)  # same\n')
    assert normalised_upstream(GAMMA, real, reformatted, fp, lambda _q: ()) == (True, [])


def test_continue_commits_only_tracked_changes_and_the_patch_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Untracked build products in the refresh worktree (__pycache__, build/) never go
    into the regenerated patch; the verdict says what was left out."""
    from stackbuild.series import parse_patch
    from stackbuild.workspace import apply_recipe

    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    up = make_upstream_repo(tmp_path / "upstream", {"pkg/__init__.py": "", "pkg/beta.py": BETA}, tag="v1.0")
    root = tmp_path / "proj"
    pdir = root / "patches" / "pkg" / "v1.0"
    pdir.mkdir(parents=True)
    (root / "recipes").mkdir()
    ours = _mod(BETA, "    return x * 5\n", "    return x * 50\n") + "\n\ndef helper(x):\n    return x\n"
    patch = udiff("pkg/beta.py", BETA, ours, "Description: fifty\nLast-Update: 2026-01-01\n\n")
    patch += udiff("pkg/new_mod.py", "", "N = 1\n").split("\n", 1)[1].replace(
        "--- a/pkg/new_mod.py", "new file mode 100644\n--- /dev/null")
    (pdir / "fifty.patch").write_text(patch)
    (root / "recipes" / "cont.toml").write_text(
        f'platform = "b70"\n\n[sources.pkg]\ngit = "{up.working_tree_dir}"\ntag = "v1.0"\n\n[[patches]]\n'
        f'file = "patches/pkg/v1.0/fifty.patch"\nsource = "pkg"\nsha256 = "{sha(pdir / "fifty.patch")}"\n')
    commit_files(up, {"pkg/beta.py": _mod(BETA, "    return x * 5\n", "    return x * 5 + 1\n")}, "upstream")
    up.create_tag("v2.0")
    recipe = load_recipe(root / "recipes" / "cont.toml")
    res = refresh(recipe, "pkg@v2.0")
    assert res.state == "conflict"
    tree = res.worktree
    beta = tree / "pkg" / "beta.py"
    text = beta.read_text()
    start, end = text.index("<<<<<<< "), text.index(">>>>>>> ")
    beta.write_text(text[:start] + "    return x * 50 + 1\n" + text[text.index("\n", end) + 1:])
    (tree / "pkg" / "__pycache__").mkdir()
    (tree / "pkg" / "__pycache__" / "beta.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00junk")
    (tree / "build" / "lib").mkdir(parents=True)
    (tree / "build" / "lib" / "beta.py").write_text("stale = True\n")
    done = refresh_continue(recipe)
    assert done.state == "done" and done.exit_code == 0
    v = done.verdict("fifty")
    assert v.verdict is RefreshVerdict.RESOLVED
    assert "left out (untracked, not files of the patch): build/lib/beta.py, pkg/__pycache__/beta.cpython-311.pyc" in v.detail
    new_patch = (root / v.file).read_text()  # type: ignore[operator]
    assert sorted(fp.path for fp in parse_patch(new_patch).files) == ["pkg/beta.py", "pkg/new_mod.py"]
    assert "__pycache__" not in new_patch and "build/lib" not in new_patch
    applied = apply_recipe(load_recipe(done.new_recipe), tmp_path / "applied")  # type: ignore[arg-type]
    assert applied.ok, applied.message


def _p0(rel: str, old: str, new: str) -> str:
    """A `diff -u` made inside the tree (no a/ b/ prefixes): applied with strip = 0."""
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), rel, rel))


@pytest.mark.parametrize("form", ["path", "git-ref"])
def test_local_source_refreshes_onto_another_tree_or_a_git_ref(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    """A -p0 patch on a local source: carried with hunks moved, it is regenerated with
    a/ b/ paths, and the new recipe says strip = 1 so that it applies."""
    from stackbuild.workspace import apply_recipe

    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    old_tree = tmp_path / "v1"
    # the local checkouts (the old one, and the new tree --to names) are outside the project
    monkeypatch.setenv("STACKBUILD_ALLOW_DIRS", os.pathsep.join([str(old_tree), str(tmp_path / "v2")]))
    up = make_upstream_repo(old_tree, {"pkg/beta.py": BETA}, tag=None)
    root = tmp_path / "proj"
    pdir = root / "patches" / "pkg" / "v1"
    pdir.mkdir(parents=True)
    (root / "recipes").mkdir()
    (pdir / "p0.patch").write_text(_p0("pkg/beta.py", BETA, _mod(BETA, "    return x * 5\n", "    return x * 55\n")))
    (root / "recipes" / "loc.toml").write_text(
        f'platform = "b70"\n\n[sources.pkg]\npath = "{old_tree}"  # my checkout\n\n[[patches]]\n'
        f'file = "patches/pkg/v1/p0.patch"\nsource = "pkg"\nstrip = 0\nsha256 = "{sha(pdir / "p0.patch")}"\n')
    recipe = load_recipe(root / "recipes" / "loc.toml")
    shifted = "# a new header line\n# and another\n" + BETA
    if form == "path":
        new_tree = tmp_path / "v2"
        (new_tree / "pkg").mkdir(parents=True)
        (new_tree / "pkg" / "beta.py").write_text(shifted)
        to = f"pkg={new_tree}"
    else:
        commit_files(up, {"pkg/beta.py": shifted}, "v2")
        up.create_tag("v2")
        up.git.checkout("HEAD~1")  # the checkout itself stays where it was: the ref is read from git
        to = "pkg@v2"
    assert (old_tree / "pkg" / "beta.py").read_text() == BETA
    res = refresh(recipe, to)
    assert _verdicts(res) == {"p0": (RefreshVerdict.OFFSET, None)}
    assert res.exit_code == 0
    new = load_recipe(res.new_recipe)  # type: ignore[arg-type]
    (entry,) = new.patches
    assert entry.strip == 1 and entry.file == "patches/pkg/v2/p0.patch"
    text = res.new_recipe.read_text()  # type: ignore[union-attr]
    if form == "path":
        assert new.source("pkg").path == str(new_tree)
        assert f'path = "{new_tree}"  # my checkout' in text  # replaced in place, comment kept
    else:
        assert new.source("pkg").commit == up.commit("v2").hexsha and new.source("pkg").url == str(old_tree)
        assert "the local checkout at pkg@v2, pinned by commit" in text
    applied = apply_recipe(new, tmp_path / "applied")
    assert applied.ok, applied.message
    assert "    return x * 55\n" in (tmp_path / "applied" / "pkg" / "pkg" / "beta.py").read_text()


def test_normalised_statements_of_a_function_upstream_rewrote_around() -> None:
    """Upstream took the change inside a function it also changed elsewhere, binding a
    name where the patch discards the value: the changed statements are compared."""
    from stackbuild.refresh.verdict import normalised_upstream
    from stackbuild.series import parse_patch

    pre = ("def call(kw):\n    SUPPORTED = (1, 2)\n    val = kw.get('n')\n    if val is None:\n"
           "        val = kw.get('inner', {}).get('n')\n    return val in SUPPORTED\n")
    post = "def call(kw):\n    val, _ = _get_n(kw)\n    return val in SUPPORTED\n"
    fp = parse_patch(udiff("m.py", pre, post)).files[0]
    new = ("def call(kw):\n    # upstream's own comment\n    val, top_level = _get_n(kw)\n    log(top_level)\n"
           "    return val in SUPPORTED\n")
    res = normalised_upstream(pre, post, new, fp, lambda _q: ())
    assert res is not None and res[0] is True and "the statements it changes in call are upstream" in res[1][0]
    # upstream still has a statement the patch removes: not proven
    kept = new.replace("    log(top_level)\n", "    val = kw.get('n')\n")
    assert normalised_upstream(pre, post, kept, fp, lambda _q: ()) == (False, [])


def test_similar_code_upstream_added_is_named_but_edits_of_old_statements_are_not() -> None:
    from stackbuild.refresh.verdict import similar_upstream_code
    from stackbuild.series import parse_patch

    old = ("def measure(self, device):\n    self.free, self.total = mem_get_info(device)\n"
           "    FACTORS = {'A', 'B'}\n    return self.total - self.free\n")
    ours = old.replace("    return", "    if on_igpu():\n        self.free = min(psutil.virtual_memory().available, self.total)\n"
                       "    return").replace("{'A', 'B'}", "{'A', 'B', 'OURS'}")
    theirs = old.replace("    return", "    if is_integrated_gpu(device):\n        self.free = psutil.virtual_memory().available\n"
                         "    return").replace("{'A', 'B'}", "{'A', 'B', 'THEIRS'}")
    fp = parse_patch(udiff("m.py", old, ours)).files[0]
    found = similar_upstream_code("m.py", old, ours, old, theirs, fp)
    assert found is not None and found.function == "measure" and found.line == 5
    assert "self.free = psutil.virtual_memory().available" in found.describe()
    # both sides only added an item to the same set: no code of upstream's own
    only_set = theirs.replace("    if is_integrated_gpu(device):\n        self.free = psutil.virtual_memory().available\n", "")
    assert similar_upstream_code("m.py", old, ours, old, only_set, fp) is None


@pytest.mark.network
@pytest.mark.slow
def test_real_b70_gemma4_series_on_0_21_0_and_0_23_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Already upstream in substance (upstream's comments and docstrings differ, and it
    changed the functions around ours), and possibly upstream where 0.23.0 has XPU INT4
    linear of its own."""
    m = _real_matrix(tmp_path, monkeypatch, "b70-gemma4", ["0.21.0", "0.23.0"])
    assert m.errors == (None, None)
    grid = m.grid()
    assert grid["gemma4-unified-prereqs"] == {"0.21.0": "already upstream", "0.23.0": "already upstream"}
    assert grid["gemma4-mm-embedder-prenorm"] == {"0.21.0": "already upstream", "0.23.0": "already upstream"}
    assert grid["gemma4-unified-backport"] == {"0.21.0": "clean", "0.23.0": "already upstream"}
    assert grid["gemma4-unified-register"]["0.23.0"] == "already upstream"
    # 0.23.0 has XPU INT4 linear of its own in the kernel class the patch changes, but still
    # passes act-order g_idx unshuffled: the patch's fix must be ported onto upstream's code
    assert grid["xpu-int4-linear"] == {"0.21.0": "clean", "0.23.0": "needs porting"}
    r21, r23 = m.results
    assert r21 is not None and r23 is not None
    assert r21.verdict("gemma4-unified-prereqs").evidence is Evidence.NORMALISED
    assert "vllm/model_executor/kernels/linear/mixed_precision/xpu.py:" in r23.verdict("xpu-int4-linear").detail
    assert "XPUwNa16LinearKernel.process_weights_after_loading" in r23.verdict("xpu-int4-linear").detail
    assert m.exit_code == 1


def test_normalised_finds_a_function_upstream_moved_to_another_file() -> None:
    from stackbuild.refresh.verdict import function_index, normalised_upstream
    from stackbuild.series import parse_patch

    post = _mod(GAMMA, "def g4(x):\n", CLAMP + "def g4(x):\n")
    fp = parse_patch(udiff("pkg/gamma.py", GAMMA, post)).files[0]
    util = "import math\n\n\n" + CLAMP_UP

    def elsewhere(q: str):  # type: ignore[no-untyped-def]
        norm = function_index(util).get(q)
        return [("pkg/util.py", norm)] if norm else []

    assert normalised_upstream(GAMMA, post, GAMMA, fp, elsewhere) == (True, ["clamp_value is in pkg/util.py"])
    other = util.replace("min(x, high)", "min(x, high + 1)")
    assert normalised_upstream(GAMMA, post, GAMMA, fp, lambda q: [("pkg/util.py", function_index(other)[q])]) == (False, [])


def test_branch_added_to_an_if_whose_condition_upstream_generalised() -> None:
    from stackbuild.refresh.verdict import similar_upstream_code
    from stackbuild.series import parse_patch

    old = ("def measure(self, device):\n    self.free = mem_get_info(device)\n    if is_cuda() and cap(device) in UMA:\n"
           "        self.free = psutil.virtual_memory().available\n    return self.free\n")
    ours = old.replace("    return", "    elif is_xpu() and UNIFIED:\n        self.free = min(available(), self.total)\n    return")
    theirs = old.replace("if is_cuda() and cap(device) in UMA:", "if platform.is_integrated_gpu(device):")
    fp = parse_patch(udiff("m.py", old, ours)).files[0]
    found = similar_upstream_code("m.py", old, ours, old, theirs, fp)
    assert found is not None and found.condition and found.line == 3
    assert "`if platform.is_integrated_gpu(device):` at m.py:3 in measure" in found.describe()
    assert similar_upstream_code("m.py", old, ours, old, old, fp) is None  # upstream unchanged: nothing to port onto


# ------------------------------------------------------------------ upstream did it elsewhere, or moved the function

ORACLE = ("class Backend:\n    CPU = 'cpu'\n    XPU = 'xpu'\n\n\n"
          "def convert(backend, w13, w2):\n    if backend == Backend.CPU:\n        w13 = w13 + 0\n"
          "    return w13, w2\n")
METHOD = ("from pkg.oracle import Backend\n\n\nclass Method:\n    def __init__(self, backend):\n"
          "        self.backend = backend\n\n    def process(self, layer):\n        self.ready = True\n")
METHOD_UP = ("from pkg.oracle import Backend\n\n\nclass Method:\n    def __init__(self, backend):\n"
             "        self.backend = backend\n\n    def process(self, layer):\n        self.ready = True\n"
             "        if self.backend == Backend.XPU:\n            layer.w13.data = layer.w13.transpose(-1, -2).contiguous()\n"
             "            layer.w2.data = layer.w2.transpose(-1, -2).contiguous()\n")
UNIFY = "def unify(pages):\n    biggest = max(pages)\n    if any(biggest % p for p in pages):\n        raise ValueError(pages)\n    return biggest\n"
UTILS_V1 = "def helper(x):\n    return x\n\n\n" + UNIFY
PLANNING_UP = ("def plan(pages):\n    return unify(pages)\n\n\n"
               "def unify(pages):\n    biggest = max(pages)\n    return [biggest for _ in pages]\n")


def _elsewhere_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_does_it: bool,  # type: ignore[no-untyped-def]
                       extra: dict[str, str] | None = None):
    """Two patches on a v1.0 git upstream: `unify` changes unify(); `layout` adds an
    XPU transpose to convert(). v2.0 rewrites convert() (the patch conflicts) and moves
    unify() to pkg/planning.py; with `upstream_does_it`, v2.0's Method.process does
    the transpose itself, under other variable names."""
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    up = make_upstream_repo(tmp_path / "upstream", {"pkg/__init__.py": "", "pkg/oracle.py": ORACLE,
                                                    "pkg/method.py": METHOD, "pkg/utils.py": UTILS_V1}, tag="v1.0")
    root = tmp_path / "proj"
    (root / "recipes").mkdir(parents=True)
    layout = _mod(ORACLE, "    return w13, w2\n", "    elif backend == Backend.XPU:\n"
                  "        w13 = w13.transpose(-1, -2).contiguous()\n        w2 = w2.transpose(-1, -2).contiguous()\n"
                  "    return w13, w2\n")
    patches = {"unify": udiff("pkg/utils.py", UTILS_V1, _mod(UTILS_V1, "        raise ValueError(pages)\n",
                                                               "        return biggest * 2\n"), "Description: pad\n\n"),
               "layout": udiff("pkg/oracle.py", ORACLE, layout, "Description: kernels read [E, K, N]\n\n")}
    body = _patch_entries(root, "v1.0", patches)
    (root / "recipes" / "el.toml").write_text(f'platform = "b70"\n\n[sources.pkg]\ngit = "{up.working_tree_dir}"\ntag = "v1.0"\n' + body)
    oracle_up = _mod(ORACLE, "    if backend == Backend.CPU:\n        w13 = w13 + 0\n    return w13, w2\n",
                     "    if backend in (Backend.CPU,):\n        w13 = w13 * 1\n    return w13, w2\n")
    files = {"pkg/oracle.py": oracle_up, "pkg/utils.py": "def helper(x):\n    return x\n",
             "pkg/planning.py": PLANNING_UP}
    if upstream_does_it:
        files["pkg/method.py"] = METHOD_UP
    commit_files(up, {**files, **(extra or {})}, "v2")
    up.create_tag("v2.0")
    return load_recipe(root / "recipes" / "el.toml")


def test_upstream_code_elsewhere_that_does_what_the_patch_adds_is_possibly_upstream(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = refresh(_elsewhere_project(tmp_path, monkeypatch, upstream_does_it=True), "pkg@v2.0")
    assert _verdicts(res)["layout"] == (RefreshVerdict.POSSIBLY_UPSTREAM, Evidence.SAME_BEHAVIOUR)
    detail = res.verdict("layout").detail
    assert "possibly upstream in pkg/method.py:8 (check): Method.process" in detail
    assert "`transpose(-1, -2)`" in detail and "`Backend.XPU`" in detail
    assert res.exit_code == 1  # evidence for a person, never a pass


def test_without_upstream_code_that_does_it_the_same_patch_is_a_conflict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The negative control of the test above: the same conflict, no such code upstream."""
    res = refresh(_elsewhere_project(tmp_path, monkeypatch, upstream_does_it=False), "pkg@v2.0")
    assert _verdicts(res)["layout"][0] is RefreshVerdict.CONFLICT


def test_a_function_upstream_moved_to_another_file_needs_porting_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = refresh(_elsewhere_project(tmp_path, monkeypatch, upstream_does_it=False), "pkg@v2.0")
    assert _verdicts(res)["unify"] == (RefreshVerdict.NEEDS_PORTING, Evidence.FUNCTION_MOVED)
    assert "unify moved from pkg/utils.py to pkg/planning.py:5: port the patch there" in res.verdict("unify").detail


def test_behaviour_features_ignore_the_names_a_change_gives_its_variables() -> None:
    from stackbuild.refresh.verdict import behaviour_features

    ours = ast.parse("w13_weight = layer.w13_weight.data.transpose(-1, -2).contiguous()")
    theirs = ast.parse("w13.data = w13.transpose(-1, -2).contiguous()")
    assert behaviour_features(ours) == behaviour_features(theirs) == {
        "call transpose", "call transpose(-1, -2)", "call contiguous"}
    assert "member Backend.XPU" in behaviour_features(ast.parse("x = b == Backend.XPU"))
    assert "keyword is_int4=" in behaviour_features(ast.parse("f(w13=a, is_int4=True)"))


def test_a_new_upstream_function_counts_only_with_a_feature_the_old_release_had_nowhere() -> None:
    """Code upstream moved unchanged into a new file (the same kernel call, new path) is
    not the patch's change; the call with the patch's new flag is."""
    from stackbuild.refresh.verdict import same_behaviour_upstream

    kernel = frozenset(f"keyword {k}=" for k in ("w13", "w2", "w13_scales", "w2_scales", "topk_ids", "hidden_states"))
    wanted = kernel | {"keyword is_int4=", "call pack_rows", "call our_helper"}
    novel = frozenset({"keyword is_int4=", "call our_helper"})
    moved = [("pkg/experts.py", "Experts.apply", 10, True, kernel)]
    assert same_behaviour_upstream(wanted, novel, moved) is None
    int4 = [("pkg/experts.py", "Experts.apply", 10, True, kernel | {"keyword is_int4="})]
    got = same_behaviour_upstream(wanted, novel, int4)
    assert got is not None and got.path == "pkg/experts.py" and got.found[0] == "keyword is_int4="
    # a changed (not new) function counts what is new to it, novel or not
    changed = [("pkg/experts.py", "Experts.apply", 10, False, kernel)]
    assert same_behaviour_upstream(wanted, novel, changed) is not None
    # bare call names alone are not evidence
    calls = [("pkg/x.py", "f", 1, False, frozenset({"call pack_rows", "call our_helper"}))]
    assert same_behaviour_upstream(frozenset({"call pack_rows", "call our_helper"}), novel, calls) is None


def test_names_hint_prefers_the_patched_file_on_a_tie() -> None:
    from stackbuild.refresh.verdict import possibly_upstream

    hits = {"_get_max_soft_tokens": [("m/importer.py", 48), ("m/gemma4_mm.py", 129)]}
    assert possibly_upstream(["_get_max_soft_tokens"], hits).path == "m/importer.py"  # type: ignore[union-attr]
    got = possibly_upstream(["_get_max_soft_tokens"], hits, frozenset({"m/gemma4_mm.py"}))
    assert got is not None and (got.path, got.line) == ("m/gemma4_mm.py", 129)


@pytest.mark.network
@pytest.mark.slow
def test_real_lunar_lake_series_on_0_23_0_and_0_33_0_sees_upstream_equivalents(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the releases really contain (read in their sources; patches/vllm/0.19.0/SERIES.md):
    the MoE weight transpose for vllm-xpu-kernels >= 0.1.5 is upstream since 0.20.0 in
    UnquantizedFusedMoEMethod; XPU INT4 MoE is upstream in 0.23.0 (XPUExperts, is_int4);
    0.33.0 moved unify_kv_cache_spec_page_size to kv_cache_planning.py; and nothing
    upstream does the unified-memory check (no false 'possibly upstream')."""
    m = _real_matrix(tmp_path, monkeypatch, "lunar-lake-moe", ["0.23.0", "0.33.0"])
    assert m.errors == (None, None)
    grid = m.grid()
    assert grid["xpu-moe-kernel-layout"] == {"0.23.0": "possibly upstream", "0.33.0": "possibly upstream"}
    assert grid["xpu-int4-moe"]["0.23.0"] == "possibly upstream"
    assert grid["hybrid-kv-page-size-lcm"] == {"0.23.0": "merged (3-way)", "0.33.0": "needs porting"}
    assert grid["xpu-unified-memory-free-check"] == {"0.23.0": "needs porting", "0.33.0": "needs porting"}
    r23, r33 = m.results
    assert r23 is not None and r33 is not None
    layout = r23.verdict("xpu-moe-kernel-layout")
    assert layout.evidence is Evidence.SAME_BEHAVIOUR
    assert "vllm/model_executor/layers/fused_moe/unquantized_fused_moe_method.py:" in layout.detail
    assert "possibly upstream in vllm/model_executor/layers/fused_moe/experts/xpu_moe.py:" in r23.verdict("xpu-int4-moe").detail
    assert "`is_int4=`" in r23.verdict("xpu-int4-moe").detail
    assert "moved from vllm/v1/core/kv_cache_utils.py to vllm/v1/core/kv_cache_planning.py:" in \
        r33.verdict("hybrid-kv-page-size-lcm").detail


# ------------------------------------------------------------------ the mark apply refuses


@pytest.mark.network
@pytest.mark.slow
def test_marked_entry_is_refused_even_where_its_file_applies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """refresh 0.19.0 -> 0.20.0 keeps the obsolete "vanished" entry marked with
    `refresh_verdict`. apply, apply --onto and build refuse the new recipe (exit 1, one
    message naming the recipe, the patch and the verdict, nothing done), also once the
    entry names a port that applies to 0.20.0 (rehash keeps the mark); without the mark
    the series applies, the port included."""
    from stackbuild.cli import main
    from stackbuild.patchqueue import rehash
    from stackbuild.workspace import apply_recipe

    cache = tmp_path / "cache"
    seed_cache(cache, ["0.19.0", "0.20.0"])
    monkeypatch.setenv("STACKBUILD_CACHE", str(cache))
    root = tmp_path / "proj"
    pdir = root / "patches" / "vllm" / "0.19.0"
    pdir.mkdir(parents=True)
    (root / "recipes").mkdir()
    series = _series(fixtures.vllm_tree("0.19.0"))
    entries = []
    for name in ("clean", "vanished"):
        (pdir / f"{name}.patch").write_text(series[name])
        entries.append(f'[[patches]]\nfile = "patches/vllm/0.19.0/{name}.patch"\nsource = "vllm"\n'
                       f'sha256 = "{sha(pdir / f"{name}.patch")}"\n')
    (root / "recipes" / "mk.toml").write_text(
        f'name = "mk"\nplatform = "lunar-lake"\n\n[sources.vllm]\npypi = "vllm==0.19.0"\nsha256 = "{VLLM_SDISTS["0.19.0"]}"\n\n'
        + "\n".join(entries))
    res = refresh(load_recipe(root / "recipes" / "mk.toml"), "vllm==0.20.0", VLLM_SDISTS["0.20.0"])
    assert res.state == "done" and res.exit_code == 1
    assert _verdicts(res) == {"clean": (RefreshVerdict.CLEAN, None),
                              "vanished": (RefreshVerdict.OBSOLETE, Evidence.FILE_GONE)}
    new_path = root / "recipes" / "mk-0.20.0.toml"
    assert res.new_recipe == new_path
    marked = load_recipe(new_path).patches[1]
    assert marked.name == "vanished" and marked.file == "patches/vllm/0.19.0/vanished.patch"
    assert marked.refresh_verdict is not None and marked.refresh_verdict.startswith("obsolete: ")
    assert "vllm/lora/layers/gate_linear.py is gone" in marked.refresh_verdict
    assert load_recipe(new_path).patches[0].refresh_verdict is None  # carried: not marked

    # a person ports it (a change 0.20.0 takes) but leaves the mark: still refused
    utils = (fixtures.vllm_tree("0.20.0") / UTILS).read_text()
    port = root / "patches" / "vllm" / "0.20.0" / "vanished.patch"
    port.write_text(udiff(UTILS, utils, utils.replace("import multiprocessing\n", "import multiprocessing  # ported\n", 1),
                          "Description: the port\n\n"))
    new_path.write_text(new_path.read_text().replace('"patches/vllm/0.19.0/vanished.patch"',
                                                     '"patches/vllm/0.20.0/vanished.patch"'))
    assert rehash([str(new_path)]).entries[1].action == "updated"
    text = new_path.read_text()
    assert text.count("refresh_verdict = ") == 1  # rehash kept the mark
    assert load_recipe(new_path).patches[1].refresh_verdict == marked.refresh_verdict

    monkeypatch.chdir(root)
    capsys.readouterr()
    for argv in (["apply", "mk-0.20.0"], ["apply", "mk-0.20.0", "--onto", str(tmp_path / "checkout")],
                 ["build", "mk-0.20.0", "--target-device", "empty"]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert str(new_path) in err and "vanished (patches/vllm/0.20.0/vanished.patch): obsolete: " in err, err
        assert "nothing was applied" in err and "delete its `refresh_verdict` line" in err, err
        assert "Traceback" not in err
    assert not (root / "work" / "mk-0.20.0").exists()  # refused before anything was fetched or written
    assert main(["apply", "mk-0.20.0", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["failed"] == "vanished"
    assert [p["verdict"] for p in out["patches"]] == ["not attempted", "not attempted"]

    # the person decides: the mark goes, and the series applies, the port included
    new_path.write_text("\n".join(ln for ln in text.split("\n") if not ln.startswith("refresh_verdict = ")))
    applied = apply_recipe(load_recipe(new_path))
    assert applied.ok, applied.message
    assert [p.verdict.value for p in applied.patches] == ["applied", "applied"]
    assert "import multiprocessing  # ported\n" in (root / "work" / "mk-0.20.0" / "vllm" / UTILS).read_text()
    # one importer: the refresh's new base is the cached base apply cloned
    from stackbuild.gitrun import run_git

    base = run_git(cache / "bases" / f"{VLLM_SDISTS['0.20.0']}.git", "rev-parse", "stackbuild")
    assert run_git(res.worktree, "rev-parse", "stackbuild/base") == base
    assert run_git(root / "work" / "mk-0.20.0" / "vllm", "rev-parse", "stackbuild/base") == base


def test_export_keeps_the_mark_and_apply_still_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`export` rewrites a marked entry's patch file and sha256 and keeps its
    `refresh_verdict`; apply goes on refusing until a person deletes it."""
    import subprocess

    from stackbuild.patchqueue import edit, export
    from stackbuild.workspace import apply_recipe

    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "proj"
    (root / "tree" / "pkg").mkdir(parents=True)
    (root / "tree" / "pkg" / "beta.py").write_text(BETA)
    (root / "patches").mkdir()
    (root / "recipes").mkdir()
    p = root / "patches" / "p.patch"
    p.write_text(udiff("pkg/beta.py", BETA, _mod(BETA, "    return x * 5\n", "    return x * 55\n"), "Description: p\n\n"))
    recipe_path = root / "recipes" / "ex.toml"
    recipe_path.write_text(f'platform = "b70"\n\n[sources.pkg]\npath = "tree"\n\n[[patches]]\nfile = "patches/p.patch"\n'
                           f'source = "pkg"\nsha256 = "{sha(p)}"\n')
    tree = edit(load_recipe(recipe_path)).trees[0].path
    f = tree / "pkg" / "beta.py"
    f.write_text(f.read_text().replace("    return x * 55\n", "    return x * 56\n"))
    subprocess.run(["git", "-c", "user.name=m", "-c", "user.email=m@x", "commit", "-qa", "--amend", "--no-edit"],
                   cwd=tree, check=True, capture_output=True)
    recipe_path.write_text(recipe_path.read_text() + 'refresh_verdict = "needs porting: moved to pkg/gamma.py"\n')
    out = export(load_recipe(recipe_path))
    assert [x.action for x in out.patches] == ["updated"]
    new = load_recipe(recipe_path)
    assert new.patches[0].sha256 == sha(p) and "x * 56" in p.read_text()
    assert new.patches[0].refresh_verdict == "needs porting: moved to pkg/gamma.py"
    refused = apply_recipe(new, tmp_path / "w")
    assert not refused.ok and refused.exit_code == 1 and "p (patches/p.patch): needs porting" in refused.message
    recipe_path.write_text(recipe_path.read_text().replace('refresh_verdict = "needs porting: moved to pkg/gamma.py"\n', ""))
    assert apply_recipe(load_recipe(recipe_path), tmp_path / "w").ok


# ------------------------------------------------------------------ the cached base, the matrix's processes


def test_matrix_matches_refresh_in_one_process_or_two_and_reuses_the_cached_base(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local source refreshed onto another tree: the new base is the cache's base
    repository of that tree (the commit apply would clone), and a matrix over it, in
    this process or in two, gives the same verdicts as the refresh, without importing
    the tree again."""
    from stackbuild import localbase
    from stackbuild.gitrun import run_git
    from stackbuild.refresh import matrix_jobs

    cache = tmp_path / "cache"
    monkeypatch.setenv("STACKBUILD_CACHE", str(cache))
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    monkeypatch.setenv("STACKBUILD_ALLOW_DIRS", os.pathsep.join([str(v1), str(v2)]))
    make_upstream_repo(v1, V1, tag=None)
    _v2(make_upstream_repo(v2, V1))
    root = tmp_path / "proj"
    (root / "recipes").mkdir(parents=True)
    body = _patch_entries(root, "v1", _constructed_patches())
    (root / "recipes" / "loc.toml").write_text(f'platform = "b70"\n\n[sources.pkg]\npath = "{v1}"\n' + body)
    recipe = load_recipe(root / "recipes" / "loc.toml")
    one = refresh(recipe, f"pkg={v2}")
    base = localbase.base_repo(localbase.identify(v2))
    assert run_git(one.worktree, "rev-parse", "stackbuild/base") == run_git(base, "rev-parse", "stackbuild")
    imported = base.stat().st_ino

    def cells(r) -> list[tuple[str, str, str | None, str]]:  # type: ignore[no-untyped-def]
        return [(p.name, p.verdict.value, p.evidence.value if p.evidence else None, p.detail) for p in r.patches]

    assert dict((c[0], c[1]) for c in cells(one)) == {
        "moved": "needs porting", "reformatted": "already upstream", "elsewhere": "possibly upstream",
        "deleted": "obsolete", "partial": "conflict"}
    for jobs in (1, 2):
        m = refresh_matrix(recipe, [f"pkg={v2}", f"pkg={v1}"], jobs=jobs)
        assert m.errors == (None, None)
        assert cells(m.results[0]) == cells(one), jobs
        assert {p.verdict for p in m.results[1].patches} == {RefreshVerdict.CLEAN}  # its own base
    assert base.stat().st_ino == imported  # fetched from, never imported again
    # a damaged cached base is imported again, and the refresh goes on
    for pack in (base / "objects" / "pack").glob("*.pack"):
        pack.chmod(0o644)
        pack.write_bytes(pack.read_bytes()[:100])
    said: list[str] = []
    again = refresh(recipe, f"pkg={v2}", progress=said.append, workdir=tmp_path / "again")
    assert cells(again) == cells(one)
    assert base.stat().st_ino != imported and any("is damaged" in x for x in said), said
    assert matrix_jobs(None, 1) == 1 and matrix_jobs(3, 2) == 2 and matrix_jobs(1, 4) == 1
    assert matrix_jobs(None, 64) == min(64, len(os.sched_getaffinity(0)))


DEEP = "def deep(a):\n    return " + " + ".join(["a.transpose(-1, -2)"] * 1500) + "\n"  # parses; ast.dump overflows
DEEPER = "def deeper(a):\n    return " + " + ".join(["a"] * 6000) + "\n"  # the parser itself overflows


def test_release_files_nested_too_deeply_are_unparsable_not_a_crash() -> None:
    """A release's Python file is input: one nested past the interpreter's recursion
    limit counts as unparsable in every evidence function."""
    from stackbuild.refresh import verdict as V
    from stackbuild.series import parse_patch

    for text in (DEEP, DEEPER):
        fp = parse_patch(udiff("m.py", text, text.replace("(a)", "(a, b)"))).files[0]
        assert V.function_index(text) == {}
        assert V.normalised_upstream(text, text, text, fp, lambda _q: iter(())) is None
        assert V.similar_upstream_code("m.py", text, text, text, text, fp) is None
        assert V.changed_functions(text, text, fp) == []
        assert V.added_behaviour(text, text, fp) == frozenset()
    assert V.function_behaviours(DEEPER, None) == [] and V.def_line(DEEPER, "deeper") == 0
    # what needs no recursion still works on the file that parses
    assert V.def_line(DEEP, "deep") == 1
    assert "call transpose(-1, -2)" in V.function_behaviours(DEEP, None)[0][3]


def test_refresh_with_a_release_file_nested_too_deeply_gives_verdicts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The behaviour search reads every changed file that names the patch's words: a
    hostile one (an expression of 1,500 transposes, and one of 6,000 terms) leaves the
    verdicts as they are, no internal error."""
    res = refresh(_elsewhere_project(tmp_path, monkeypatch, upstream_does_it=True,
                                     extra={"pkg/deep.py": DEEP.replace("return", "# Backend.XPU\n    return"),
                                            "pkg/deeper.py": DEEPER.replace("return", "# Backend.XPU transpose\n    return")}),
                  "pkg@v2.0")
    assert _verdicts(res)["layout"] == (RefreshVerdict.POSSIBLY_UPSTREAM, Evidence.SAME_BEHAVIOUR)
    assert _verdicts(res)["unify"] == (RefreshVerdict.NEEDS_PORTING, Evidence.FUNCTION_MOVED)
