"""Git sources: real upstream repositories made with gitpython, served under their
real URLs (https://github.com/intel/llm-scaler) through the mirror map."""

from __future__ import annotations

import shutil
from pathlib import Path

import git
import pytest
from fixtures import commit_files, make_upstream_repo
from test_workspace import ORIG, Project, edit, git_diff, sha256

from stackbuild.errors import PatchError, SourceError
from stackbuild.recipe import Source, SourceKind, load_recipe
from stackbuild.series import PatchVerdict
from stackbuild.sources.git import apply_mirrors, export_tree, fetch_git, mirror_map, read_file_at
from stackbuild.workspace import apply_recipe

URL = "https://github.com/intel/llm-scaler"


@pytest.fixture
def github(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local stand-in for github.com, wired in through STACKBUILD_GIT_MIRRORS."""
    root = tmp_path / "github"
    root.mkdir()
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("STACKBUILD_MIRRORS_FILE", str(tmp_path / "no-mirrors.toml"))
    monkeypatch.setenv("STACKBUILD_GIT_MIRRORS", f"https://github.com/={root}/")
    return root


@pytest.fixture
def upstream(github: Path) -> git.Repo:
    return make_upstream_repo(github / "intel" / "llm-scaler", {"README.md": "llm-scaler\n", "vllm/patches/fix.patch": "x\n"})


def src(**kw: object) -> Source:
    return Source("llm-scaler", SourceKind.GIT, url=URL, **kw)  # type: ignore[arg-type]


def test_pin_by_tag(upstream: git.Repo, tmp_path: Path) -> None:
    tagged = upstream.tags["v1.0"].commit.hexsha
    commit_files(upstream, {"README.md": "newer\n"}, "after the tag")
    co = fetch_git(src(tag="v1.0"))
    assert co.commit == tagged
    assert co.url == str(upstream.working_tree_dir)
    assert co.repo.is_relative_to(tmp_path / "cache" / "git")
    assert git.Repo(co.repo).bare
    assert read_file_at(co, "README.md") == b"llm-scaler\n"


def test_pin_by_full_commit(upstream: git.Repo) -> None:
    second = commit_files(upstream, {"README.md": "second\n"}, "second")
    commit_files(upstream, {"README.md": "third\n"}, "third")
    co = fetch_git(src(commit=second))
    assert co.commit == second
    assert read_file_at(co, "README.md") == b"second\n"


def test_cached_mirror_serves_without_the_upstream(upstream: git.Repo, github: Path) -> None:
    first = fetch_git(src(tag="v1.0"))
    shutil.rmtree(github / "intel")
    again = fetch_git(src(tag="v1.0"))
    assert again == first


def test_new_commit_after_a_cached_fetch_is_fetched(upstream: git.Repo) -> None:
    fetch_git(src(tag="v1.0"))
    newer = commit_files(upstream, {"README.md": "newer\n"}, "newer")
    assert fetch_git(src(commit=newer)).commit == newer


def test_moved_tag_against_pinned_commit_is_detected(upstream: git.Repo) -> None:
    pinned = upstream.tags["v1.0"].commit.hexsha
    other = commit_files(upstream, {"README.md": "retagged\n"}, "the release was redone")
    upstream.create_tag("v1.0", ref=other, force=True)
    with pytest.raises(SourceError) as ei:
        fetch_git(src(tag="v1.0", commit=pinned))
    e = ei.value
    assert "the tag moved" in e.message
    assert other[:12] in e.message and pinned[:12] in e.message
    assert e.file == URL


def test_unknown_commit(upstream: git.Repo) -> None:
    ghost = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(SourceError) as ei:
        fetch_git(src(commit=ghost))
    assert ghost in ei.value.message and "not found" in ei.value.message
    assert ei.value.file == URL


def test_unknown_tag(upstream: git.Repo) -> None:
    with pytest.raises(SourceError, match="'v9.9' not found"):
        fetch_git(src(tag="v9.9"))


def test_unreachable_upstream_names_the_url(github: Path) -> None:
    with pytest.raises(SourceError) as ei:
        fetch_git(src(tag="v1.0"))  # no repository under the mirror
    assert "git fetch from" in ei.value.message and str(github) in ei.value.message
    assert ei.value.file == URL
    assert "\n" not in str(ei.value)


def test_floating_branch_follows_upstream(upstream: git.Repo) -> None:
    first = fetch_git(src(branch="main", float=True)).commit
    assert first == upstream.head.commit.hexsha
    newer = commit_files(upstream, {"README.md": "moved on\n"}, "moved on")
    assert fetch_git(src(branch="main", float=True)).commit == newer


def test_export_tree_writes_the_pinned_files_only(upstream: git.Repo, tmp_path: Path) -> None:
    co = fetch_git(src(tag="v1.0"))
    commit_files(upstream, {"later.txt": "later\n"}, "later")
    export_tree(co, tmp_path / "out")
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["README.md", "vllm/patches/fix.patch"]


def test_read_file_at_missing_path(upstream: git.Repo) -> None:
    co = fetch_git(src(tag="v1.0"))
    with pytest.raises(SourceError, match="nope.patch not found at commit"):
        read_file_at(co, "nope.patch")


# ------------------------------------------------------------------ the mirror map


def test_mirror_map_longest_prefix_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STACKBUILD_MIRRORS_FILE", str(tmp_path / "none.toml"))
    monkeypatch.setenv("STACKBUILD_GIT_MIRRORS", "https://github.com/=/srv/gh/;\nhttps://github.com/intel/=/srv/intel/")
    assert apply_mirrors(URL) == "/srv/intel/llm-scaler"
    assert apply_mirrors("https://github.com/vllm-project/vllm") == "/srv/gh/vllm-project/vllm"
    assert apply_mirrors("https://gitlab.com/x/y") == "https://gitlab.com/x/y"


def test_mirror_map_from_file_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "mirrors.toml"
    f.write_text('[mirrors]\n"https://github.com/" = "/srv/gh/"\n"https://gitlab.com/" = "/srv/gl/"\n')
    monkeypatch.setenv("STACKBUILD_MIRRORS_FILE", str(f))
    monkeypatch.setenv("STACKBUILD_GIT_MIRRORS", "https://github.com/=/srv/env/")
    m = mirror_map()
    assert m == {"https://github.com/": "/srv/env/", "https://gitlab.com/": "/srv/gl/"}  # the env var wins


def test_bad_mirror_map_entries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STACKBUILD_MIRRORS_FILE", str(tmp_path / "none.toml"))
    monkeypatch.setenv("STACKBUILD_GIT_MIRRORS", "https://github.com/")
    with pytest.raises(SourceError) as ei:
        mirror_map()
    assert ei.value.key == "STACKBUILD_GIT_MIRRORS"
    f = tmp_path / "bad.toml"
    f.write_text("[mirrors\n")
    monkeypatch.setenv("STACKBUILD_MIRRORS_FILE", str(f))
    monkeypatch.delenv("STACKBUILD_GIT_MIRRORS")
    with pytest.raises(SourceError) as ei:
        mirror_map()
    assert ei.value.file == str(f)


# ------------------------------------------------------------------ recipes with git sources


def test_from_source_patch_applies_to_a_local_source(upstream: git.Repo, github: Path, tmp_path: Path) -> None:
    files = {"vllm/worker.py": ORIG}
    patch = git_diff(files, {"vllm/worker.py": edit(ORIG, "line 4\n", "line four\n")}, tmp_path / "g", "XPU: spell out four")
    pinned = commit_files(upstream, {"vllm/patches/0001-four.patch": patch}, "add the patch")
    # later upstream work on the patch must not leak into a pinned recipe
    commit_files(upstream, {"vllm/patches/0001-four.patch": "garbage\n"}, "break it")
    proj = Project(tmp_path / "proj")
    tree = proj.add_tree("vllm", files)
    entry = {"from": "llm-scaler", "path": "vllm/patches/0001-four.patch", "source": "vllm", "sha256": sha256(patch)}
    path = proj.write_recipe(
        "scaler",
        {"vllm": {"path": str(tree)}, "llm-scaler": {"git": URL, "commit": pinned}},
        [entry],
    )
    r = apply_recipe(load_recipe(path), proj.workdir)
    (p,) = r.patches
    assert (p.name, p.kind, p.verdict) == ("0001-four", "from-source", PatchVerdict.APPLIED)
    assert (proj.workdir / "vllm/vllm/worker.py").read_text() == edit(ORIG, "line 4\n", "line four\n")
    assert not (proj.workdir / "llm-scaler").exists()  # a patch holder is not materialised
    assert r.manifest is not None
    holder = r.manifest.source("llm-scaler")
    assert holder is not None and holder.commit == pinned and holder.ref == f"{URL}@{pinned}"
    assert r.manifest.patches[0].sha256 == sha256(patch)


def test_from_source_patch_with_wrong_sha256(upstream: git.Repo, tmp_path: Path) -> None:
    proj = Project(tmp_path / "proj")
    tree = proj.add_tree("vllm", {"a.txt": "a\n"})
    path = proj.write_recipe(
        "scaler",
        {"vllm": {"path": str(tree)}, "llm-scaler": {"git": URL, "tag": "v1.0"}},
        [{"from": "llm-scaler", "path": "vllm/patches/fix.patch", "source": "vllm", "sha256": "5" * 64}],
    )
    with pytest.raises(PatchError) as ei:
        apply_recipe(load_recipe(path), proj.workdir)
    e = ei.value
    assert e.file == str(path) and e.key == "patches[0].sha256"
    assert "llm-scaler:vllm/patches/fix.patch" in e.message


def test_from_source_path_escaping_the_source(upstream: git.Repo, tmp_path: Path) -> None:
    proj = Project(tmp_path / "proj")
    tree = proj.add_tree("vllm", {"a.txt": "a\n"})
    path = proj.write_recipe(
        "scaler",
        {"vllm": {"path": str(tree)}, "llm-scaler": {"git": URL, "tag": "v1.0"}},
        [{"from": "llm-scaler", "path": "../../etc/passwd", "source": "vllm", "sha256": "5" * 64}],
    )
    with pytest.raises(PatchError) as ei:
        apply_recipe(load_recipe(path), proj.workdir)
    assert ei.value.key == "patches[0].path" and "escapes" in ei.value.message


def test_git_source_as_the_patched_tree(upstream: git.Repo, tmp_path: Path) -> None:
    patch = "--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-llm-scaler\n+llm-scaler for b70\n"
    proj = Project(tmp_path / "proj")
    rel = proj.add_patch("readme.patch", patch)
    path = proj.write_recipe("scaler", {"llm-scaler": {"git": URL, "tag": "v1.0"}},
                             [{"file": rel, "source": "llm-scaler", "sha256": sha256(patch)}])
    r = apply_recipe(load_recipe(path), proj.workdir)
    assert r.ok
    tree = proj.workdir / "llm-scaler"
    assert (tree / "README.md").read_text() == "llm-scaler for b70\n"
    ws = git.Repo(tree)
    assert ws.tags["stackbuild/base"].commit.message.startswith(f"base: {URL} @ v1.0")
    # the workspace is its own repository, not a clone of the upstream's history
    assert len(list(ws.iter_commits("HEAD"))) == 2
