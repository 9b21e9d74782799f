"""`apply --onto DIR` and `apply-patch FILE --onto DIR` on real git checkouts: the
branch's tree is what `git apply` gives, and a refusal or failure leaves DIR (files,
index, HEAD, branches, worktrees) byte for byte as it was. Plus the local base cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fixtures import vllm_tree
from hypothesis import given, settings
from hypothesis import strategies as st
from test_workspace import Project, sha256, snapshot

from stackbuild.cli import main
from stackbuild.gitrun import GIT_ENV, git_process
from stackbuild.recipe import load_recipe
from stackbuild.workspace import apply_recipe

ENV = {**os.environ, **GIT_ENV}


def git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env={**ENV, **(env or {})}, check=True,
                          capture_output=True, text=True).stdout.strip()


def make_checkout(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "upstream")
    return path


def state(repo: Path) -> tuple[dict[str, str], str, str, str]:
    """Every byte under DIR (.git included), HEAD, every ref, and the worktree list."""
    return (snapshot(repo), git(repo, "rev-parse", "HEAD"), git(repo, "for-each-ref"),
            git(repo, "worktree", "list", "--porcelain"))


def git_apply_tree(repo: Path, patch: Path, strip: int = 1) -> str:
    """The tree `git apply` makes of HEAD and the patch (in a private index: DIR untouched)."""
    env = {"GIT_INDEX_FILE": str(repo.parent / "git-apply-index")}
    git(repo, "read-tree", "HEAD", env=env)
    git(repo, "apply", "--cached", f"-p{strip}", str(patch), env=env)
    return git(repo, "write-tree", env=env)


ORIG = "".join(f"line {i}\n" for i in range(1, 31))


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def diff(repo: Path, files: dict[str, str], out: Path) -> Path:
    """A real `git diff` of `files` against HEAD (the checkout is put back after)."""
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    git(repo, "add", "-A", "-N")
    out.write_text(git(repo, "diff") + "\n")
    git(repo, "reset", "-q", "--hard")
    git(repo, "clean", "-q", "-fd")
    return out


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    return make_checkout(tmp_path / "co", {"pkg/a.py": ORIG, "pkg/b.py": ORIG})


def test_apply_patch_dry_verdict_writes_nothing(checkout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = diff(checkout, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n")}, tmp_path / "p.patch")
    before = state(checkout)
    assert main(["apply-patch", str(p), "--onto", str(checkout), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["patches"][0]["verdict"] == "applied" and out["patches"][0]["files"] == ["pkg/a.py"]
    assert out["patches"][0]["commit"] is None and "nothing written" in out["message"]
    assert state(checkout) == before


def test_apply_patch_commit_equals_git_apply(checkout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = diff(checkout, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n"), "pkg/new.py": "x = 1\n"}, tmp_path / "fix.patch")
    head = git(checkout, "rev-parse", "HEAD")
    assert main(["apply-patch", str(p), "--onto", str(checkout), "--commit"]) == 0
    assert git(checkout, "rev-parse", "stackbuild/fix^{tree}") == git_apply_tree(checkout, p)
    assert git(checkout, "rev-parse", "stackbuild/fix~1") == head
    # the user's branch, index and files are as they were; only the new branch is new
    assert git(checkout, "rev-parse", "HEAD") == head and git(checkout, "status", "--porcelain") == ""
    assert not (checkout / "pkg/new.py").exists()
    # a second --commit to the same branch is refused, and --force moves it
    assert main(["apply-patch", str(p), "--onto", str(checkout), "--commit"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["apply-patch", str(p), "--onto", str(checkout), "--commit", "--force"]) == 0


def test_conflict_leaves_dir_byte_identical(checkout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = diff(checkout, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n"),
                        "pkg/b.py": edit(ORIG, "line 20\n", "line twenty\n")}, tmp_path / "p.patch")
    git(checkout, "commit", "-q", "-am", "x", "--allow-empty")
    (checkout / "pkg/b.py").write_text(edit(ORIG, "line 20\n", "line 20 changed upstream\n"))
    git(checkout, "commit", "-q", "-am", "upstream moved on")
    before = state(checkout)
    assert main(["apply-patch", str(p), "--onto", str(checkout), "--commit", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    (r,) = out["patches"]
    assert r["verdict"] == "conflict" and r["applied"] == ["pkg/a.py"] and any("pkg/b.py" in f for f in r["failures"])
    assert state(checkout) == before


def test_recipe_series_onto_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    files = {"pkg/a.py": ORIG, "pkg/b.py": ORIG}
    co = make_checkout(tmp_path / "co", files)
    p1 = diff(co, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n")}, tmp_path / "1.patch")
    p2 = diff(co, {"pkg/b.py": edit(ORIG, "line 7\n", "line seven\n")}, tmp_path / "2.patch")
    proj = Project(tmp_path / "proj")
    proj.add_tree("pkg", files)
    entries = []
    for name, p in (("first", p1), ("second", p2)):
        rel = proj.add_patch(f"{name}.patch", p.read_bytes())
        entries.append({"file": rel, "source": "pkg", "sha256": sha256(p.read_bytes())})
    recipe = proj.write_recipe("r", {"pkg": {"path": str(proj.root / "upstream/pkg")}}, entries)
    head = git(co, "rev-parse", "HEAD")
    assert main(["apply", str(recipe), "--onto", str(co), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["verdict"] for p in out["patches"]] == ["applied", "applied"]
    # one commit per patch on stackbuild/r, on top of the user's HEAD
    assert git(co, "rev-list", "--reverse", f"{head}..stackbuild/r").split() == [p["commit"] for p in out["patches"]]
    env = {"GIT_INDEX_FILE": str(tmp_path / "idx")}
    git(co, "read-tree", "HEAD", env=env)
    for p in (p1, p2):
        git(co, "apply", "--cached", str(p), env=env)
    assert git(co, "rev-parse", "stackbuild/r^{tree}") == git(co, "write-tree", env=env)
    assert git(co, "rev-parse", "HEAD") == head

    # a series whose second patch conflicts: no branch, DIR as it was
    git(co, "branch", "-D", "stackbuild/r")
    (co / "pkg/b.py").write_text(edit(ORIG, "line 7\n", "line 7 moved\n"))
    git(co, "commit", "-q", "-am", "upstream moved on")
    before = state(co)
    assert main(["apply", str(recipe), "--onto", str(co), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [p["verdict"] for p in out["patches"]] == ["applied", "conflict"] and out["failed"] == "second"
    assert state(co) == before


def test_dirty_checkout_is_refused_naming_the_files(checkout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = diff(checkout, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n")}, tmp_path / "p.patch")
    (checkout / "pkg/b.py").write_text("changed\n")
    (checkout / "stray.txt").write_text("new\n")
    git(checkout, "mv", "pkg/a.py", "pkg/moved.py")
    before = state(checkout)
    assert main(["apply-patch", str(p), "--onto", str(checkout), "--commit"]) == 2
    err = capsys.readouterr().err
    assert "uncommitted changes" in err and "pkg/b.py" in err and "stray.txt" in err and "Traceback" not in err
    listed = err.split("uncommitted changes (", 1)[1].split("); commit", 1)[0]
    assert sorted(listed.split(", ")) == ["pkg/b.py", "pkg/moved.py", "stray.txt"]  # a rename: its new name
    assert state(checkout) == before


def test_not_a_checkout_or_not_its_top_is_refused(checkout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = diff(checkout, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n")}, tmp_path / "p.patch")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["apply-patch", str(p), "--onto", str(plain)]) == 2
    assert "not a git checkout" in capsys.readouterr().err
    assert main(["apply-patch", str(p), "--onto", str(checkout / "pkg")]) == 2
    assert "not the top" in capsys.readouterr().err


@pytest.mark.parametrize("target", [".git/config", "pkg/.GIT/hooks/post-checkout", ".git/hooks/pre-commit"])
def test_hostile_patch_into_git_metadata_is_refused(checkout: Path, tmp_path: Path, target: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "evil.patch"
    p.write_text(f"--- /dev/null\n+++ b/{target}\n@@ -0,0 +1,2 @@\n+[core]\n+\thooksPath = /tmp/evil\n")
    before = state(checkout)
    assert main(["apply-patch", str(p), "--onto", str(checkout), "--commit", "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["patches"][0]["verdict"] == "malformed" and "git metadata" in out["patches"][0]["detail"]
    assert state(checkout) == before


def test_bad_strip_and_missing_patch_are_bad_input(checkout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply-patch", str(tmp_path / "nope.patch"), "--onto", str(checkout)]) == 2
    assert "nope.patch" in capsys.readouterr().err
    p = diff(checkout, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n")}, tmp_path / "p.patch")
    assert main(["apply-patch", str(p), "--onto", str(checkout), "--strip", "-1"]) == 2


def test_missing_file_exits_1(checkout: Path, tmp_path: Path) -> None:
    p = tmp_path / "p.patch"
    p.write_text("--- a/pkg/gone.py\n+++ b/pkg/gone.py\n@@ -1 +1 @@\n-a\n+b\n")
    assert main(["apply-patch", str(p), "--onto", str(checkout)]) == 1


# ------------------------------------------------------------------ the local base cache


def test_clean_checkout_source_is_cached_by_its_tree_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("STACKBUILD_CACHE", str(cache))
    files = {"pkg/a.py": ORIG, "pkg/b.py": ORIG, ".gitignore": "*.so\n"}
    proj = Project(tmp_path / "proj")
    src = make_checkout(proj.root / "upstream/pkg", files)
    (src / "pkg/_C.so").write_text("build output\n")  # ignored: not part of HEAD's tree
    patch = "--- a/pkg/a.py\n+++ b/pkg/a.py\n@@ -1,3 +1,3 @@\n line 1\n-line 2\n+line two\n line 3\n"
    rel = proj.add_patch("p.patch", patch)
    recipe = load_recipe(proj.write_recipe("r", {"pkg": {"path": "upstream/pkg"}},
                                           [{"file": rel, "source": "pkg", "sha256": sha256(patch)}]))
    index_before = (src / ".git/index").read_bytes()
    r = apply_recipe(recipe, proj.workdir)
    assert r.ok and r.manifest is not None
    tree = git(src, "rev-parse", "HEAD^{tree}")
    assert r.manifest.sources[0].sha256 == f"git-tree-{tree}"
    base = cache / "bases" / f"local-git-tree-{tree}.git"
    assert git(base, "rev-parse", "stackbuild^{tree}") == tree
    ws = proj.workdir / "pkg"
    assert git(ws, "rev-parse", "stackbuild/base^{tree}") == tree and not (ws / "pkg/_C.so").exists()
    assert (ws / "pkg/a.py").read_text() == edit(ORIG, "line 2\n", "line two\n")
    # the source checkout was only read
    assert (src / ".git/index").read_bytes() == index_before and git(src, "status", "--porcelain") == ""
    # a second apply uses the cached base: the entry is not rebuilt
    mtime = (base / "objects").stat().st_mtime_ns
    packs = sorted(os.listdir(base / "objects/pack"))
    r2 = apply_recipe(recipe, proj.workdir, force=True)
    assert r2.ok and r2.changed and (base / "objects").stat().st_mtime_ns == mtime
    assert sorted(os.listdir(base / "objects/pack")) == packs
    # the same content in another folder: the same cache entry and the same base commit
    other = proj.root / "elsewhere"
    shutil.copytree(src, other, symlinks=True)
    recipe2 = load_recipe(proj.write_recipe("r2", {"pkg": {"path": str(other)}},
                                            [{"file": rel, "source": "pkg", "sha256": sha256(patch)}]))
    r3 = apply_recipe(recipe2, tmp_path / "ws2")
    assert r3.ok and sorted(os.listdir(cache / "bases")) == [base.name]
    assert git(tmp_path / "ws2/pkg", "rev-parse", "stackbuild/base") == git(ws, "rev-parse", "stackbuild/base")


def test_dirty_checkout_source_is_keyed_by_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    proj = Project(tmp_path / "proj")
    src = make_checkout(proj.root / "upstream/pkg", {"pkg/a.py": ORIG})
    (src / "pkg/a.py").write_text(edit(ORIG, "line 9\n", "line nine (uncommitted)\n"))
    (src / "pkg/extra.py").write_text("x = 1\n")
    patch = "--- a/pkg/a.py\n+++ b/pkg/a.py\n@@ -1,3 +1,3 @@\n line 1\n-line 2\n+line two\n line 3\n"
    rel = proj.add_patch("p.patch", patch)
    recipe = load_recipe(proj.write_recipe("r", {"pkg": {"path": str(src)}},
                                           [{"file": rel, "source": "pkg", "sha256": sha256(patch)}]))
    r = apply_recipe(recipe, proj.workdir)
    assert r.ok and r.manifest is not None and r.manifest.sources[0].sha256.startswith("files-")
    ws = proj.workdir / "pkg"
    # the working files are the base, uncommitted edits and untracked files included
    assert "line nine (uncommitted)" in (ws / "pkg/a.py").read_text() and (ws / "pkg/extra.py").exists()
    assert git(ws, "ls-tree", "-r", "--name-only", "stackbuild/base").split() == ["pkg/a.py", "pkg/extra.py"]
    # changing a file changes the key: a new base, not the stale one
    (src / "pkg/extra.py").write_text("x = 2\n")
    r2 = apply_recipe(recipe, proj.workdir)
    assert r2.changed and (ws / "pkg/extra.py").read_text() == "x = 2\n"


# ------------------------------------------------------------------ real vLLM 0.19.0


@pytest.fixture(scope="module")
def vllm_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    co = tmp_path_factory.mktemp("vllm") / "vllm"
    shutil.copytree(vllm_tree("0.19.0"), co, symlinks=True)
    git(co, "init", "-q", "-b", "main")
    git(co, "add", "-A", "-f")
    git(co, "commit", "-q", "-m", "vllm 0.19.0")
    return co


NETWORK_FIXTURES = frozenset({"vllm_checkout"})


def _tree_hash(repo: Path) -> str:
    h = hashlib.sha256()
    for rel, digest in sorted(snapshot(repo).items()):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


@pytest.mark.network
def test_real_vllm_patch_onto_checkout_equals_git_apply(vllm_checkout: Path, tmp_path: Path) -> None:
    co = vllm_checkout
    reg = (co / "vllm/model_executor/models/registry.py").read_text()
    plat = (co / "vllm/platforms/xpu.py").read_text()
    p = diff(co, {
        "vllm/model_executor/models/registry.py": reg.replace("_TEXT_GENERATION_MODELS = {",
                                                              "# stackbuild test\n_TEXT_GENERATION_MODELS = {", 1),
        "vllm/platforms/xpu.py": plat + "\n# appended by a test\n",
        "vllm/new_module.py": "VALUE = 1\n",
    }, tmp_path / "real.patch")
    head = git(co, "rev-parse", "HEAD")
    assert main(["apply-patch", str(p), "--onto", str(co), "--commit", "--branch", "t/real"]) == 0
    assert git(co, "rev-parse", "t/real^{tree}") == git_apply_tree(co, p)
    assert git(co, "rev-parse", "HEAD") == head
    # a patch that conflicts with the release: DIR byte-identical
    git(co, "branch", "-D", "t/real")
    bad = tmp_path / "bad.patch"
    text = p.read_text()
    assert text.count(" _TEXT_GENERATION_MODELS = {\n") == 1
    bad.write_text(text.replace(" _TEXT_GENERATION_MODELS = {\n", " _TEXT_GENERATION_MODELS = {  # not in 0.19.0\n"))
    refs, before = git(co, "for-each-ref"), _tree_hash(co)  # .git included
    assert main(["apply-patch", str(bad), "--onto", str(co), "--commit"]) == 1
    assert _tree_hash(co) == before and git(co, "rev-parse", "HEAD") == head and git(co, "for-each-ref") == refs
    assert git_process(co, "worktree", "list").stdout.count("\n") == 1


def test_every_kind_of_change_matches_git_apply(tmp_path: Path) -> None:
    """The scratch checkout writes out only what the series reads; deletes, renames,
    mode changes, new files, a file reached through a linked folder and a second patch
    on a file the first changed must still give git apply's tree."""
    co = make_checkout(tmp_path / "co", {"pkg/a.py": ORIG, "pkg/b.py": ORIG, "pkg/c.py": ORIG, "real/d.py": ORIG,
                                         "tool.sh": "echo hi\n", ".gitattributes": "*.py text eol=lf\n"})
    (co / "linked").symlink_to("real")
    git(co, "add", "-A")
    git(co, "commit", "-q", "-m", "link")
    (co / "pkg/a.py").unlink()
    git(co, "mv", "pkg/b.py", "pkg/renamed.py")
    (co / "tool.sh").chmod(0o755)
    (co / "real/d.py").write_text(edit(ORIG, "line 5\n", "line five\n"))
    (co / "pkg/new.py").write_text("NEW = 1\n")
    (co / "pkg/c.py").write_text(edit(ORIG, "line 9\n", "line nine\n"))
    git(co, "add", "-A")
    p1 = tmp_path / "1.patch"
    p1.write_text(git(co, "diff", "--cached", "-M") + "\n")
    git(co, "commit", "-q", "-m", "tmp")
    (co / "pkg/c.py").write_text(edit(edit(ORIG, "line 9\n", "line nine\n"), "line 11\n", "line eleven\n"))
    p2 = tmp_path / "2.patch"
    p2.write_text(git(co, "diff") + "\n")
    git(co, "checkout", "-q", "--", ".")
    git(co, "reset", "-q", "--hard", "HEAD~1")
    # the linked-folder change, as a user's tool would write it (through the link)
    p3 = tmp_path / "3.patch"
    p3.write_text("--- a/linked/d.py\n+++ b/linked/d.py\n@@ -1,3 +1,3 @@\n line 1\n-line 2\n+line two\n line 3\n")

    proj = Project(tmp_path / "proj")
    entries = []
    for name, p in (("one", p1), ("two", p2), ("three", p3)):
        rel = proj.add_patch(f"{name}.patch", p.read_bytes())
        entries.append({"file": rel, "source": "pkg", "sha256": sha256(p.read_bytes())})
    proj.add_tree("pkg", {"x": "x\n"})
    recipe = load_recipe(proj.write_recipe("r", {"pkg": {"path": str(proj.root / "upstream/pkg")}}, entries))
    from stackbuild.onto import apply_onto

    r = apply_onto(recipe, co)
    assert r.ok, r.message
    env = {"GIT_INDEX_FILE": str(tmp_path / "idx")}
    git(co, "read-tree", "HEAD", env=env)
    git(co, "apply", "--cached", str(p1), env=env)
    git(co, "apply", "--cached", str(p2), env=env)
    # git apply refuses paths beyond a symbolic link; the same change on the real path
    p3real = tmp_path / "3real.patch"
    p3real.write_text(p3.read_text().replace("linked/", "real/"))
    git(co, "apply", "--cached", str(p3real), env=env)
    assert git(co, "rev-parse", "stackbuild/r^{tree}") == git(co, "write-tree", env=env)
    assert git(co, "ls-tree", "stackbuild/r", "tool.sh").startswith("100755")


def test_patch_through_a_link_out_of_the_checkout_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    co = make_checkout(tmp_path / "co", {"a.py": ORIG})
    (co / "out").symlink_to(outside)
    git(co, "add", "-A")
    git(co, "commit", "-q", "-m", "a link out")
    p = tmp_path / "evil.patch"
    p.write_text("--- /dev/null\n+++ b/out/evil.py\n@@ -0,0 +1 @@\n+import os\n")
    before = state(co)
    assert main(["apply-patch", str(p), "--onto", str(co), "--commit", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["patches"][0]["verdict"] == "malformed"
    assert state(co) == before and list(outside.iterdir()) == []


def test_recipe_with_several_patched_sources_needs_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    co = make_checkout(tmp_path / "co", {"pkg/a.py": ORIG})
    pa = diff(co, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n")}, tmp_path / "a.patch")
    proj = Project(tmp_path / "proj")
    proj.add_tree("one", {"pkg/a.py": ORIG})
    proj.add_tree("two", {"x.txt": "x\n"})
    px = "--- a/x.txt\n+++ b/x.txt\n@@ -1 +1 @@\n-x\n+y\n"
    recipe = proj.write_recipe("r", {"one": {"path": "upstream/one"}, "two": {"path": "upstream/two"}}, [
        {"file": proj.add_patch("a.patch", pa.read_bytes()), "source": "one", "sha256": sha256(pa.read_bytes())},
        {"file": proj.add_patch("x.patch", px), "source": "two", "sha256": sha256(px)},
    ])
    assert main(["apply", str(recipe), "--onto", str(co)]) == 2
    assert "--source" in capsys.readouterr().err
    assert main(["apply", str(recipe), "--onto", str(co), "--source", "nope"]) == 2
    assert main(["apply", str(recipe), "--onto", str(co), "--workdir", str(tmp_path / "w"), "--source", "one"]) == 2
    assert main(["apply", str(recipe), "--onto", str(co), "--source", "one", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in out["patches"]] == ["a"]  # only the patches of that source
    assert git(co, "show", "stackbuild/r:pkg/a.py") == edit(ORIG, "line 3\n", "line three\n").rstrip("\n")


@pytest.mark.parametrize("path", ["pkg", "pkg/a.py/inner.py"])
def test_file_folder_clashes_are_conflicts_as_in_a_full_checkout(checkout: Path, tmp_path: Path, path: str,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the files the patch reads are written out, yet a new file where HEAD has a
    folder (or below a file of HEAD) meets that folder (or file), as it would in a full
    checkout and in a workspace."""
    p = tmp_path / "clash.patch"
    p.write_text(f"--- /dev/null\n+++ b/{path}\n@@ -0,0 +1 @@\n+x = 1\n")
    before = state(checkout)
    assert main(["apply-patch", str(p), "--onto", str(checkout), "--commit", "--json"]) == 1
    r = json.loads(capsys.readouterr().out)["patches"][0]
    assert r["verdict"] == "conflict" and ("folder" in r["detail"]), r
    assert state(checkout) == before
    # the same patch in a workspace of the same files says the same
    proj = Project(tmp_path / "proj")
    recipe = proj.simple({"pkg/a.py": ORIG, "pkg/b.py": ORIG}, [("clash", p.read_text())])
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    w = apply_recipe(recipe, tmp_path / "ws")
    assert w.patches[0].verdict.value == "conflict" and w.patches[0].detail == r["detail"]


# ------------------------------------------------------------------ what the faster path must keep (issue 16 item 5)


def test_force_refuses_a_branch_checked_out_in_another_worktree(checkout: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--force moves a branch with update-ref, which (unlike the fetch it replaced) would
    move a branch under any checkout: one checked out in a linked worktree is refused."""
    p = diff(checkout, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n")}, tmp_path / "p.patch")
    git(checkout, "worktree", "add", "-q", "-b", "stackbuild/p", str(tmp_path / "wt"))
    before = state(checkout)
    assert main(["apply-patch", str(p), "--onto", str(checkout), "--commit", "--force"]) == 2
    err = capsys.readouterr().err
    assert "checked out in" in err and str(tmp_path / "wt") in err
    assert state(checkout) == before


def test_force_moves_the_branch_and_dir_stays_sound(checkout: Path, tmp_path: Path) -> None:
    """The new objects arrive as a pack and the branch by compare-and-swap: after a
    --force over an existing branch, DIR passes a full fsck and holds git apply's tree."""
    p = diff(checkout, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n"), "pkg/new.py": "x = 1\n"}, tmp_path / "p.patch")
    git(checkout, "branch", "stackbuild/p")
    head = git(checkout, "rev-parse", "HEAD")
    assert main(["apply-patch", str(p), "--onto", str(checkout), "--commit", "--force"]) == 0
    assert git(checkout, "rev-parse", "stackbuild/p~1") == head
    assert git(checkout, "rev-parse", "stackbuild/p^{tree}") == git_apply_tree(checkout, p)
    subprocess.run(["git", "fsck", "--full", "--strict", "--no-dangling"], cwd=checkout, env=ENV, check=True,
                   capture_output=True)
    assert git(checkout, "status", "--porcelain") == "" and git(checkout, "rev-parse", "HEAD") == head


def test_already_applied_patch_commits_a_branch_at_head(checkout: Path, tmp_path: Path) -> None:
    p = diff(checkout, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n")}, tmp_path / "p.patch")
    (checkout / "pkg/a.py").write_text(edit(ORIG, "line 3\n", "line three\n"))
    git(checkout, "commit", "-q", "-am", "upstream took it")
    assert main(["apply-patch", str(p), "--onto", str(checkout), "--commit"]) == 0
    assert git(checkout, "rev-parse", "stackbuild/p") == git(checkout, "rev-parse", "HEAD")


def test_dir_config_filters_do_not_run_and_dir_git_is_not_written(checkout: Path, tmp_path: Path) -> None:
    """The scratch repository has its own config: a filter driver in DIR's .git/config
    (git-lfs writes under .git/lfs when it cleans) runs only where the user's own git
    would run it, in DIR (git status cleans files to compare them), never in the scratch
    checkout, and DIR is byte for byte as it was."""
    (checkout / ".gitattributes").write_text("*.py filter=mark\n")
    git(checkout, "add", ".gitattributes")
    git(checkout, "commit", "-q", "-m", "attributes")
    log = tmp_path / "filter-log"
    git(checkout, "config", "filter.mark.smudge", f'echo "smudge $PWD" >> {log}; cat')
    git(checkout, "config", "filter.mark.clean", f'echo "clean $PWD" >> {log}; cat')
    p = diff(checkout, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n")}, tmp_path / "p.patch")
    log.unlink(missing_ok=True)
    assert main(["apply-patch", str(p), "--onto", str(checkout), "--commit"]) == 0
    ran = set(log.read_text().splitlines()) if log.exists() else set()
    assert ran <= {f"clean {checkout}"}, ran
    assert git(checkout, "rev-parse", "stackbuild/p^{tree}") == git_apply_tree(checkout, p)
    git(checkout, "branch", "-D", "stackbuild/p")
    before = state(checkout)
    assert main(["apply-patch", str(p), "--onto", str(checkout)]) == 0
    assert state(checkout) == before
    assert set(log.read_text().splitlines()) <= {f"clean {checkout}"}


@pytest.mark.parametrize("name", ["stackbuild/x y", "a..b", "-x", "x.lock", "a//b", ".x", "x/", "x.", "@", "a@{b",
                                  "HEAD", "a~1", "ok/ä"])
def test_branch_names_git_refuses_are_refused(checkout: Path, tmp_path: Path, name: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    p = diff(checkout, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n")}, tmp_path / "p.patch")
    ok = subprocess.run(["git", "check-ref-format", "--branch", name], env=ENV, capture_output=True).returncode == 0
    before = state(checkout)
    rc = main(["apply-patch", str(p), "--onto", str(checkout), "--commit", "--branch", name])
    if ok:
        assert rc == 0 and git(checkout, "rev-parse", f"refs/heads/{name}^{{tree}}") == git_apply_tree(checkout, p)
    else:
        assert rc == 2 and "not a valid branch name" in capsys.readouterr().err
        assert state(checkout) == before


_NAME_CHARS = "abAZ09_-./@{}~^:?*[\\ ä\t"


@settings(max_examples=400, deadline=None, database=None)
@given(st.text(alphabet=_NAME_CHARS, min_size=1, max_size=12) | st.sampled_from(
    ["stackbuild/r", "a.b/c-d_e", "x.lock/y", "a/.b", "a/b.", "-a", "a..b", "HEAD", "a/HEAD", "_x", "9"]))
def test_branch_names_judged_without_git_are_ones_git_accepts(name: str) -> None:
    """The fast branch-name check may send a valid name to git, never pass an invalid one."""
    from stackbuild.onto import _plain_branch

    if _plain_branch(name):
        r = subprocess.run(["git", "check-ref-format", "--branch", name], env=ENV, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip() == name, name


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(st.text(alphabet="ab# \t\r\v", max_size=6), max_size=8).map("\n".join))
def test_commit_message_cleaned_as_git_stripspace(message: str) -> None:
    """Commits are made with commit-tree, which keeps the message as given: it is first
    cleaned as `git commit -m` cleans it (`git stripspace`), so commit ids stay those
    `git commit` made."""
    from stackbuild.sparsetree import stripspace

    want = subprocess.run(["git", "stripspace"], input=message.encode(), env=ENV, capture_output=True, check=True).stdout
    assert stripspace(message).encode() == want


@pytest.mark.parametrize("kind", ["colon:in path", "linked worktree", "sha256"])
def test_checkouts_of_every_shape_get_git_applys_tree(tmp_path: Path, kind: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The scratch repository reads DIR's objects through GIT_ALTERNATE_OBJECT_DIRECTORIES
    (a colon-separated list: a path with a colon is quoted), finds them in the common
    object store of a linked worktree, and uses DIR's object format."""
    files = {"pkg/a.py": ORIG}
    if kind == "sha256":
        co = tmp_path / "co"
        co.mkdir()
        git(co, "init", "-q", "-b", "main", "--object-format=sha256")
        (co / "pkg").mkdir()
        (co / "pkg/a.py").write_text(ORIG)
        git(co, "add", "-A")
        git(co, "commit", "-q", "-m", "upstream")
    else:
        co = make_checkout(tmp_path / ("co:lon" if kind.startswith("colon") else "main"), files)
    if kind == "linked worktree":
        git(co, "worktree", "add", "-q", "-b", "side", str(tmp_path / "side"))
        co = tmp_path / "side"
    p = diff(co, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n")}, tmp_path / "p.patch")
    head = git(co, "rev-parse", "HEAD")
    assert main(["apply-patch", str(p), "--onto", str(co), "--commit"]) == 0, capsys.readouterr().err
    assert git(co, "rev-parse", "stackbuild/p~1") == head
    assert git(co, "rev-parse", "stackbuild/p^{tree}") == git_apply_tree(co, p)
    subprocess.run(["git", "fsck", "--full", "--no-dangling"], cwd=co, env=ENV, check=True, capture_output=True)


def test_local_identity_of_a_subfolder_a_submodule_and_a_folder_not_in_head(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """One rev-parse reads the top folder, the folder's place and HEAD's tree there; the
    submodule listing is skipped only for a tree id already in the cache (which a tree
    with a submodule never is)."""
    from stackbuild import localbase

    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    co = make_checkout(tmp_path / "co", {"pkg/a.py": ORIG, "top.txt": "x\n"})
    sub = localbase.identify(co / "pkg")
    assert sub.key == f"git-tree-{git(co, 'rev-parse', 'HEAD:pkg')}" and sub.repo == co
    top = localbase.identify(co)
    assert top.key == f"git-tree-{git(co, 'rev-parse', 'HEAD^{tree}')}"
    localbase.base_repo(top)  # now cached: identify skips the listing, with the same answer
    assert localbase.identify(co) == top
    (co / "new").mkdir()
    assert localbase.identify(co / "new").why_files == "the folder is not in the checkout's HEAD"
    (co / "new").rmdir()
    git(co, "update-index", "--add", "--cacheinfo", f"160000,{git(co, 'rev-parse', 'HEAD')},lib")
    git(co, "commit", "-q", "-m", "a submodule")
    (co / "lib").mkdir()
    withsub = localbase.identify(co)
    assert withsub.key.startswith("files-") and withsub.why_files == "the checkout has submodules"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert localbase.identify(plain).why_files == "not a git checkout"
