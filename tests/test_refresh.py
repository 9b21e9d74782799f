"""refresh: the series onto real vLLM releases (0.20.0, 0.21.0), a constructed git
upstream that merged our patches (verbatim and with a line changed), conflicts with
--continue / --abort, and the matrix."""

from __future__ import annotations

import difflib
import hashlib
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
    "vanished": (RefreshVerdict.OBSOLETE, Evidence.FILE_GONE),
    "backport-same": (RefreshVerdict.ALREADY_UPSTREAM, Evidence.IDENTICAL_FILES),
    "backport-diff": (RefreshVerdict.OBSOLETE, Evidence.DIFFERENT_FILES),
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
    assert res.state == "done" and res.exit_code == 0
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
    assert '# dropped by stackbuild refresh to vllm==0.20.0' in text and "reverse applies" in text
    assert 'source = "vllm"  # keep me' in text
    new = load_recipe(res.new_recipe)
    assert new.source("vllm").requirement == "vllm==0.20.0"
    assert new.source("vllm").sha256 == VLLM_SDISTS["0.20.0"]
    assert [p.name for p in new.patches] == ["clean", "offset", "merged", "conflict"]
    for p in new.patches:
        assert p.file and p.file.startswith("patches/vllm/0.20.0/")
        assert p.sha256 == sha(project / p.file)
    # and it applies to the new base: the refresh's result is a working series
    from stackbuild.workspace import apply_recipe

    applied = apply_recipe(new, project / "work" / "applied-020")
    assert applied.ok, applied.message
    assert [r.verdict.value for r in applied.patches] == ["applied"] * 4


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
    assert grid["backport-diff"] == {"0.20.0": "obsolete", "0.21.0": "already upstream"}
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
    pdir = root / "patches" / "pkg" / "v1.0"
    pdir.mkdir(parents=True)
    (root / "recipes").mkdir()
    hdr = "Description: {}\nForwarded: yes\nLast-Update: 2026-01-01\n\n"
    patches = {
        "verbatim": udiff("pkg/alpha.py", BASE_FILES["pkg/alpha.py"], alpha2, hdr.format("merged as it is")),
        "reworded": udiff("pkg/beta.py", BASE_FILES["pkg/beta.py"], beta2, hdr.format("merged with a line changed")),
    }
    body = ""
    for name, text in patches.items():
        (pdir / f"{name}.patch").write_text(text)
        body += f'\n[[patches]]\nfile = "patches/pkg/v1.0/{name}.patch"\nsource = "pkg"\nsha256 = "{sha(pdir / f"{name}.patch")}"\n'
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

REAL_EXPECTED = {
    "xpu-unified-memory-free-check": "conflict",
    "hybrid-kv-page-size-lcm": "merged (3-way)",
    "xpu-autoround-gptq-awq": "conflict",
    "xpu-int4-linear": "clean",
    "xpu-int4-moe": "obsolete",  # compressed_tensors_moe.py is gone in 0.20.0
}


@pytest.mark.network
@pytest.mark.slow
def test_real_lunar_lake_series_on_0_20_0_and_0_21_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Path(__file__).resolve().parent.parent
    seed_cache(tmp_path / "cache", ["0.19.0", "0.20.0", "0.21.0"])
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "proj"
    shutil.copytree(repo / "recipes", root / "recipes")
    shutil.copytree(repo / "patches", root / "patches")
    recipe = load_recipe(root / "recipes" / "lunar-lake-moe.toml")
    m = refresh_matrix(recipe, ["0.20.0", "0.21.0"], jobs=2,
                       sha256s={v: VLLM_SDISTS[v] for v in ("0.20.0", "0.21.0")})
    assert m.errors == (None, None)
    grid = m.grid()
    for name, verdict in REAL_EXPECTED.items():
        assert grid[name] == {"0.20.0": verdict, "0.21.0": verdict}, name
    moe = m.results[0].verdict("xpu-int4-moe")  # type: ignore[union-attr]
    assert "compressed_tensors_moe.py" in moe.detail

