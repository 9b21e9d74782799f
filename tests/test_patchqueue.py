"""edit/export round trip, import of each form patches travel in, snapshot."""

from __future__ import annotations

import base64
import difflib
import gzip
import hashlib
import subprocess
from pathlib import Path

import git
import pytest
from fixtures import make_upstream_repo

from stackbuild.patchqueue import EDIT_BRANCH, detect_strip, edit, export, import_patch, snapshot
from stackbuild.recipe import load_recipe
from stackbuild.series import parse_patch
from stackbuild.workspace import apply_recipe

ALPHA = "".join(f"def a{i}():\n    return {i}\n\n\n" for i in range(20))
BETA = "".join(f"def b{i}(x):\n    return x + {i}\n\n\n" for i in range(20))


def udiff(rel: str, old: str, new: str, header: str = "") -> str:
    body = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{rel}", f"b/{rel}"))
    return header + f"diff --git a/{rel} b/{rel}\n" + body


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def proj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "upstream"
    monkeypatch.setenv("STACKBUILD_ALLOW_DIRS", str(tmp_path))  # local sources outside the project (upstream, upstream2)
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "alpha.py").write_text(ALPHA)
    (src / "pkg" / "beta.py").write_text(BETA)
    root = tmp_path / "proj"
    pdir = root / "patches" / "pkg" / "local"
    pdir.mkdir(parents=True)
    (root / "recipes").mkdir()
    alpha1 = ALPHA.replace("    return 3\n", "    return 33\n")
    beta1 = BETA.replace("    return x + 5\n", "    return x + 55\n")
    (pdir / "one.patch").write_text(udiff("pkg/alpha.py", ALPHA, alpha1,
                                          "Description: one\nOrigin: vendor\nBug: https://example.com/1\nLast-Update: 2026-01-01\n\n"))
    (pdir / "two.patch").write_text(udiff("pkg/beta.py", BETA, beta1,
                                          "Description: two\n Longer text.\nOrigin: vendor\nLast-Update: 2026-01-01\n\n"))
    (root / "recipes" / "pq.toml").write_text(
        f'# keep this comment\nplatform = "b70"\n\n[sources.pkg]\npath = "{src}"\n\n'
        f'[[patches]]\nfile = "patches/pkg/local/one.patch"\nsource = "pkg"\nsha256 = "{sha(pdir / "one.patch")}"  # pinned\n\n'
        f'[[patches]]\n# the second\nfile = "patches/pkg/local/two.patch"\nsource = "pkg"\nsha256 = "{sha(pdir / "two.patch")}"\n')
    return root


def test_edit_export_round_trip_keeps_headers_and_updates_sha(proj: Path) -> None:
    recipe = load_recipe(proj / "recipes" / "pq.toml")
    res = edit(recipe)
    (tree,) = res.trees
    assert tree.commits == 2 and tree.created and tree.branch == EDIT_BRANCH
    repo = git.Repo(tree.path)
    assert repo.active_branch.name == EDIT_BRANCH
    assert edit(recipe).trees[0].created is False  # a second edit keeps the tree
    # amend the second patch, add a third commit
    f = tree.path / "pkg" / "beta.py"
    f.write_text(f.read_text().replace("    return x + 55\n", "    return x + 56\n"))
    run = lambda *a: subprocess.run(["git", "-c", "user.name=m", "-c", "user.email=m@x", *a], cwd=tree.path, check=True, capture_output=True)  # noqa: E731
    run("commit", "-qa", "--amend", "--no-edit")
    (tree.path / "pkg" / "gamma.py").write_text("G = 1\n")
    run("add", "pkg/gamma.py")
    run("commit", "-qm", "Add gamma\n\nA new module.")
    one_before = (proj / "patches/pkg/local/one.patch").read_bytes()
    out = export(recipe)
    actions = {p.name: p.action for p in out.patches}
    assert actions == {"one": "unchanged", "two": "updated", "add-gamma": "new"}
    assert (proj / "patches/pkg/local/one.patch").read_bytes() == one_before
    two = (proj / "patches/pkg/local/two.patch").read_text()
    assert two.startswith("Description: two\n Longer text.\nOrigin: vendor\nLast-Update: ")
    assert "2026-01-01" not in two and "+    return x + 56" in two and "stackbuild-patch" not in two
    gamma = (proj / "patches/pkg/local/add-gamma.patch").read_text()
    assert gamma.startswith("Description: Add gamma\n A new module.\n") and "new file mode" in gamma
    text = (proj / "recipes" / "pq.toml").read_text()
    assert "# keep this comment" in text and "# the second" in text and '"  # pinned' in text
    new = load_recipe(proj / "recipes" / "pq.toml")
    assert [p.name for p in new.patches] == ["one", "two", "add-gamma"]
    for p in new.patches:
        assert p.sha256 == sha(proj / p.file)  # type: ignore[operator]
    applied = apply_recipe(new, proj / "work" / "check")
    assert applied.ok, applied.message
    assert (proj / "work" / "check" / "pkg" / "pkg" / "gamma.py").read_text() == "G = 1\n"


def test_import_format_patch_series_into_recipe(proj: Path, tmp_path: Path) -> None:
    repo = make_upstream_repo(tmp_path / "r", {"pkg/alpha.py": ALPHA, "pkg/beta.py": BETA})
    for rel, text, msg in (("pkg/alpha.py", ALPHA.replace("return 1\n", "return 11\n"), "Fix a1"),
                           ("pkg/beta.py", BETA.replace("x + 2\n", "x + 22\n"), "Fix b2")):
        (tmp_path / "r" / rel).write_text(text)
        repo.index.add([rel])
        repo.index.commit(msg)
    mbox = tmp_path / "series.mbox"
    mbox.write_text(repo.git.format_patch("--stdout", "HEAD~2"))
    recipe = load_recipe(proj / "recipes" / "pq.toml")
    res = import_patch(mbox, into=recipe, source="pkg", tree=tmp_path / "upstream")
    assert res.form == "mbox series"
    assert [Path(p.file).name for p in res.patches] == ["fix-a1.patch", "fix-b2.patch"]
    assert all(p.verdict == "applied" for p in res.patches)
    text = (proj / res.patches[0].file).read_text()
    assert "Origin: imported from series.mbox" in text and "Author: Upstream <upstream@example.com>" in text
    new = load_recipe(proj / "recipes" / "pq.toml")
    assert [p.name for p in new.patches][-2:] == ["fix-a1", "fix-b2"]
    assert apply_recipe(new, proj / "work" / "imp").ok


def test_import_plain_diff_against_site_packages_detects_strip(proj: Path, tmp_path: Path) -> None:
    sp = "/usr/lib/python3.11/site-packages"
    body = "".join(difflib.unified_diff(ALPHA.splitlines(True), ALPHA.replace("return 7\n", "return 77\n").splitlines(True),
                                        f"{sp}/pkg/alpha.py.orig", f"{sp}/pkg/alpha.py"))
    body = body.replace(f"--- {sp}/pkg/alpha.py.orig", f"--- {sp}/pkg/alpha.py")
    plain = tmp_path / "hotfix.diff"
    plain.write_text(body)
    assert detect_strip([f"{sp}/pkg/alpha.py"]) == 5
    assert detect_strip([f"{sp}/pkg/alpha.py"], lambda p: (tmp_path / "upstream" / p).exists()) == 5
    assert detect_strip(["x/y/pkg/alpha.py"], lambda p: (tmp_path / "upstream" / p).exists()) == 2
    res = import_patch(plain, source="pkg", version="local", dest=tmp_path / "out", tree=tmp_path / "upstream")
    (p,) = res.patches
    assert res.form == "plain diff" and p.strip == 5 and p.verdict == "applied"
    text = (tmp_path / "out" / "hotfix.patch").read_text()
    assert "diff --git a/pkg/alpha.py b/pkg/alpha.py\n--- a/pkg/alpha.py\n+++ b/pkg/alpha.py\n" in text
    assert "site-packages" not in text.split("diff --git")[1]


def test_import_gzip_base64_artifact_and_split_per_file(proj: Path, tmp_path: Path) -> None:
    big = udiff("pkg/alpha.py", ALPHA, ALPHA.replace("return 2\n", "return 22\n")) + udiff(
        "pkg/beta.py", BETA, BETA.replace("x + 3\n", "x + 33\n"))
    art = tmp_path / "downstream.patch.gz.b64"
    art.write_bytes(base64.b64encode(gzip.compress(big.encode())))
    res = import_patch(art, source="pkg", dest=tmp_path / "split", tree=tmp_path / "upstream", split_per_file=True)
    assert res.form.startswith("gzip+base64")
    names = sorted(p.name for p in (tmp_path / "split").iterdir())
    assert names == ["downstream-alpha.patch", "downstream-beta.patch"]
    for n in names:
        parsed = parse_patch((tmp_path / "split" / n).read_text())
        assert len(parsed.files) == 1
        assert "Origin: imported from downstream.patch.gz.b64" in (tmp_path / "split" / n).read_text()
    assert [p.verdict for p in res.patches] == ["applied", "applied"]


def test_snapshot_of_dirty_tree_against_head_and_base(proj: Path) -> None:
    recipe = load_recipe(proj / "recipes" / "pq.toml")
    ws = apply_recipe(recipe)
    tree = ws.workdir / "pkg"
    (tree / "pkg" / "alpha.py").write_text((tree / "pkg" / "alpha.py").read_text().replace("return 9\n", "return 99\n"))
    (tree / "pkg" / "new.py").write_text("N = 1\n")
    index_before = (tree / ".git" / "index").read_bytes()
    head = snapshot(tree, "head", output=proj / "snap.patch")
    assert head.files == ("pkg/alpha.py", "pkg/new.py")
    text = (proj / "snap.patch").read_text()
    assert "+    return 99" in text and "+    return 33" not in text and "Origin: stackbuild snapshot" in text
    base = snapshot(tree, "base")
    assert "+    return 33" in base.text and "+    return x + 55" in base.text and "+    return 99" in base.text
    assert (tree / ".git" / "index").read_bytes() == index_before
    (tree / "pkg" / "alpha.py").write_text((tree / "pkg" / "alpha.py").read_text().replace("return 99\n", "return 9\n"))
    (tree / "pkg" / "new.py").unlink()
    assert snapshot(tree, "head").files == ()


def _git(tree: Path, *a: str) -> None:
    subprocess.run(["git", "-c", "user.name=m", "-c", "user.email=m@x", *a], cwd=tree, check=True, capture_output=True)


def test_export_updates_every_recipe_that_shares_the_patch(proj: Path) -> None:
    pq = (proj / "recipes" / "pq.toml").read_text()
    # a second recipe naming the same patch file, with its own comments
    (proj / "recipes" / "pq2.toml").write_text(pq.replace("# keep this comment", "# the other recipe"))
    recipe = load_recipe(proj / "recipes" / "pq.toml")
    tree = edit(recipe).trees[0].path
    f = tree / "pkg" / "alpha.py"
    f.write_text(f.read_text().replace("    return 33\n", "    return 34\n"))
    _git(tree, "commit", "-qa", "--fixup=HEAD~1")
    _git(tree, "-c", "sequence.editor=true", "rebase", "-q", "-i", "--autosquash", "stackbuild/base")
    out = export(recipe)
    one = next(p for p in out.patches if p.name == "one")
    assert one.action == "updated" and "also updated in pq2.toml" in one.detail
    new_sha = sha(proj / "patches/pkg/local/one.patch")
    for name in ("pq", "pq2"):
        r = load_recipe(proj / "recipes" / f"{name}.toml")
        assert next(p for p in r.patches if p.name == "one").sha256 == new_sha, name
        assert apply_recipe(r, proj / "work" / f"check-{name}").ok
    assert "# the other recipe" in (proj / "recipes" / "pq2.toml").read_text()


def test_export_refuses_during_a_refresh_or_an_unfinished_cherry_pick(proj: Path, tmp_path: Path) -> None:
    from stackbuild.errors import StackbuildError
    from stackbuild.refresh import refresh, refresh_abort

    recipe = load_recipe(proj / "recipes" / "pq.toml")
    tree = edit(recipe).trees[0].path
    # a refresh of the same recipe onto another local tree stops at a conflict
    other = tmp_path / "upstream2"
    (other / "pkg").mkdir(parents=True)
    (other / "pkg" / "alpha.py").write_text(ALPHA.replace("    return 3\n", "    return 300\n"))
    (other / "pkg" / "beta.py").write_text(BETA)
    res = refresh(recipe, f"pkg={other}")
    assert res.state == "conflict" and res.verdict("one").verdict.value == "conflict"
    before = (proj / "recipes" / "pq.toml").read_text()
    with pytest.raises(StackbuildError, match="stopped at a conflict in one.*before exporting"):
        export(recipe)
    refresh_abort(recipe)
    # a cherry-pick in progress in the edit tree
    _git(tree, "checkout", "-q", "-b", "side", "stackbuild/base")
    (tree / "pkg" / "alpha.py").write_text(ALPHA.replace("    return 3\n", "    return 3000\n"))
    _git(tree, "commit", "-qam", "side")
    _git(tree, "checkout", "-q", EDIT_BRANCH)
    assert subprocess.run(["git", "cherry-pick", "side"], cwd=tree, capture_output=True).returncode != 0
    with pytest.raises(StackbuildError, match="middle of a cherry-pick"):
        export(recipe)
    assert (proj / "recipes" / "pq.toml").read_text() == before


def test_rehash_rewrites_sha_lines_in_place(proj: Path) -> None:
    from stackbuild.errors import PatchError
    from stackbuild.patchqueue import rehash

    path = proj / "recipes" / "pq.toml"
    before = path.read_text()
    p = proj / "patches/pkg/local/two.patch"
    p.write_text(p.read_text().replace("Description: two", "Description: two, reworded"))
    res = rehash([str(path)])
    assert [(e.file, e.action) for e in res.entries] == [("patches/pkg/local/one.patch", "unchanged"),
                                                         ("patches/pkg/local/two.patch", "updated")]
    after = path.read_text()
    # only the one sha256 line changed; comments and the trailing "# pinned" stay
    changed = [(a, b) for a, b in zip(before.split("\n"), after.split("\n"), strict=True) if a != b]
    assert len(changed) == 1 and changed[0][1] == f'sha256 = "{sha(p)}"'
    assert apply_recipe(load_recipe(path), proj / "work" / "rehashed").ok
    (proj / "patches/pkg/local/one.patch").unlink()
    with pytest.raises(PatchError, match="one.patch, which does not exist"):
        rehash([str(path)])
    assert path.read_text() == after
