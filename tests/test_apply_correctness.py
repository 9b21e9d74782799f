"""Apply correctness on real third-party patch forms (issue 16 items 1-4, issue 13
item 10): site-packages diffs patch the existing file, conflicts name every failing
hunk and the files that applied, hints for fuzz and whitespace, conflict exit 1,
CRLF patches for CRLF files, and a parser linear in blank lines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_series import apply_text, diff_u
from test_workspace import ORIG, Project, edit, git_diff, sha256

from stackbuild.gitrun import git_env
from stackbuild.recipe import load_recipe
from stackbuild.series import PatchVerdict, parse_patch
from stackbuild.workspace import apply_recipe

BIN = Path(sys.executable).parent / "stackbuild"


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------ item 1: which file a plain diff changes

def test_two_names_patch_the_existing_file_never_a_new_one(tmp_path: Path) -> None:
    """`diff -u` between a checkout and an installed copy: the `---` name exists, the
    `+++` name does not; the change goes to the existing file and nothing is created."""
    d = diff_u(tmp_path, "src/pkg/a.py", ORIG, "venv/lib/python3.12/site-packages/pkg/a.py", edit(ORIG, "line 4\n", "line four\n"))
    o = apply_text({"pkg/a.py": ORIG}, d, strip=1)
    assert o.verdict is PatchVerdict.APPLIED
    assert o.new_contents == {"pkg/a.py": edit(ORIG, "line 4\n", "line four\n")}
    assert "patched pkg/a.py (the '---' name" in o.detail


def test_the_plus_name_is_chosen_when_only_it_exists_and_said(tmp_path: Path) -> None:
    d = diff_u(tmp_path, "pkg/a.py.orig", ORIG, "pkg/a.py", edit(ORIG, "line 4\n", "line four\n"))
    o = apply_text({"pkg/a.py": ORIG}, d, strip=0)
    assert o.new_contents == {"pkg/a.py": edit(ORIG, "line 4\n", "line four\n")}
    assert "the '+++' name" in o.detail


def test_two_names_neither_in_the_tree_is_missing_not_created(tmp_path: Path) -> None:
    d = diff_u(tmp_path, "x/old.py", ORIG, "y/new.py", edit(ORIG, "line 4\n", "line four\n"))
    o = apply_text({"pkg/a.py": ORIG}, d, strip=0)
    assert o.verdict is PatchVerdict.MISSING_FILE and o.new_contents == {}


def _git(cwd: Path, *args: str, stdin: str | None = None) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, env=git_env(), capture_output=True, text=True, input=stdin)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.network
@pytest.mark.slow
def test_site_packages_diff_on_real_vllm_equals_git_apply_at_every_strip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real `diff -u` between a vLLM checkout and a pip-installed copy of it, as
    `/home/u/src/vllm/vllm/...` vs `/home/u/venv/lib64/python3.12/site-packages/vllm/...`,
    applied at strip 1, 4 and 5: the whole resulting tree (its git tree id) equals
    what `git apply` gives with the right -p, and no file appears under lib64/."""
    import fixtures

    pristine = fixtures.vllm_tree("0.19.0")
    monkeypatch.setenv("STACKBUILD_ALLOW_DIRS", str(pristine))  # a local source outside the project
    rels = ["vllm/envs.py", "vllm/config/cache.py"]
    home = tmp_path / "home/u"
    diffs = []
    for rel in rels:
        src = home / "src/vllm" / rel
        site = home / "venv/lib64/python3.12/site-packages" / rel
        for p in (src, site):
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pristine / rel, p)
        text = site.read_text()
        lines = text.splitlines(keepends=True)
        lines[10] = lines[10].rstrip("\n") + "  # patched in site-packages\n"
        lines.insert(len(lines) // 2, "# inserted mid-file\n")
        site.write_text("".join(lines))
        r = subprocess.run(["diff", "-u", str(src), str(site)], capture_output=True, text=True)
        assert r.returncode == 1
        diffs.append(r.stdout.replace(str(tmp_path), ""))
    patch = "".join(diffs)
    assert "--- /home/u/src/vllm/vllm/envs.py" in patch
    assert "+++ /home/u/venv/lib64/python3.12/site-packages/vllm/envs.py" in patch

    # the reference: git apply with the strip that makes git's chosen (+++) name right
    ref = tmp_path / "ref"
    shutil.copytree(pristine, ref, symlinks=True)
    _git(ref, "init", "-q")
    _git(ref, "add", "-A", "-f")
    _git(ref, "commit", "-q", "-m", "base")
    base_tree = _git(ref, "rev-parse", "HEAD^{tree}")
    _git(ref, "apply", "-p7", "--whitespace=nowarn", "-", stdin=patch)
    _git(ref, "add", "-A", "-f")
    want = _git(ref, "write-tree")
    assert want != base_tree

    proj = Project(tmp_path / "proj")
    rel = proj.add_patch("site.patch", patch)
    for strip in (1, 4, 5):
        path = proj.write_recipe(f"s{strip}", {"vllm": {"path": str(pristine)}},
                                 [{"file": rel, "source": "vllm", "sha256": sha256(patch), "strip": strip}])
        r = apply_recipe(load_recipe(path), tmp_path / f"work{strip}")
        assert r.ok, r.message
        (p,) = r.patches
        tree = tmp_path / f"work{strip}" / "vllm"
        assert not (tree / "lib64").exists() and not (tree / "python3.12").exists()
        assert _git(tree, "rev-parse", f"{p.commit}^{{tree}}") == want, strip
        assert p.verdict is PatchVerdict.APPLIED, p.detail
        assert "the '---' name" in p.detail


# ------------------------------------------------------------------ item 2: every failing hunk, and what applied

def test_conflict_lists_every_failing_hunk_and_the_files_that_applied(tmp_path: Path) -> None:
    files = {"a.py": ORIG, "b.py": ORIG, "c.py": ORIG}
    after = {
        "a.py": edit(edit(ORIG, "line 2\n", "line two\n"), "line 18\n", "line eighteen\n"),
        "b.py": edit(ORIG, "line 10\n", "line ten\n"),
        "c.py": edit(edit(ORIG, "line 3\n", "line three\n"), "line 17\n", "line seventeen\n"),
    }
    patch = git_diff(files, after, tmp_path / "g")
    tree = {"a.py": edit(edit(ORIG, "line 2\n", "line 2 upstream\n"), "line 18\n", "line 18 upstream\n"),
            "b.py": ORIG,
            "c.py": edit(ORIG, "line 17\n", "line 17 upstream\n")}
    o = apply_text(tree, patch)
    assert o.verdict is PatchVerdict.CONFLICT
    assert [f.split(" (")[0] for f in o.failures] == ["a.py: hunk 1", "a.py: hunk 2", "c.py: hunk 2"]
    assert o.applied == ("b.py",)
    assert "a.py: hunks 1 (@@" in o.detail and "c.py: hunk 2 (@@" in o.detail
    assert "applied cleanly: b.py" in o.detail


def test_conflict_json_lists_all_failures_and_exit_is_1(tmp_path: Path) -> None:
    proj = Project(tmp_path / "proj")
    files = {"a.py": ORIG, "b.py": ORIG}
    patch = git_diff(files, {"a.py": edit(ORIG, "line 2\n", "line two\n"), "b.py": edit(ORIG, "line 9\n", "line nine\n")},
                     tmp_path / "g")
    tree = proj.add_tree("pkg", {"a.py": edit(ORIG, "line 2\n", "line 2 upstream\n"), "b.py": ORIG})
    rel = proj.add_patch("p.patch", patch)
    proj.write_recipe("r", {"pkg": {"path": str(tree)}}, [{"file": rel, "source": "pkg", "sha256": sha256(patch)}])
    r = subprocess.run([str(BIN), "apply", "recipes/r.toml", "--workdir", "work", "--json"], cwd=proj.root,
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    d = json.loads(r.stdout)
    (p,) = d["patches"]
    assert p["verdict"] == "conflict"
    assert [f.split(" (")[0] for f in p["failures"]] == ["a.py: hunk 1"]
    assert p["applied"] == ["b.py"]


# ------------------------------------------------------------------ item 3: hints

def test_conflict_that_fuzz_would_apply_says_so(tmp_path: Path) -> None:
    changed = edit(ORIG, "line 10\n", "line ten\n")
    patch = git_diff({"a.py": ORIG}, {"a.py": changed}, tmp_path / "g")
    drifted = edit(ORIG, "line 7\n", "line 7 # reworded upstream\n")
    o = apply_text({"a.py": drifted}, patch)
    assert o.verdict is PatchVerdict.CONFLICT
    assert "applies with fuzz 1 (allow with `fuzz = 1`)" in o.detail
    drifted2 = edit(drifted, "line 8\n", "line 8 # reworded\n")
    o2 = apply_text({"a.py": drifted2}, patch)
    assert "applies with fuzz 2 (allow with `fuzz = 2`)" in o2.detail
    o3 = apply_text({"a.py": edit(ORIG, "line 10\n", "line X\n")}, patch)
    assert "fuzz" not in o3.detail  # the changed line itself differs: no hint


def test_whitespace_and_line_ending_only_differences_are_named(tmp_path: Path) -> None:
    patch = git_diff({"a.py": ORIG}, {"a.py": edit(ORIG, "line 10\n", "line ten\n")}, tmp_path / "g")
    o = apply_text({"a.py": edit(ORIG, "line 9\n", "line  9   \n")}, patch)
    assert o.verdict is PatchVerdict.CONFLICT and "a.py: only whitespace differs" in o.detail
    o2 = apply_text({"a.py": ORIG.replace("\n", "\r\n")}, patch)
    assert o2.verdict is PatchVerdict.CONFLICT
    assert "a.py: only line endings differ (the file has CRLF, the patch LF)" in o2.detail


# ------------------------------------------------------------------ issue 13 item 10: CRLF, and linear parsing

def test_crlf_patch_for_a_crlf_file_applies_and_keeps_crlf(tmp_path: Path) -> None:
    crlf = ORIG.replace("\n", "\r\n")
    new = edit(ORIG, "line 10\n", "line ten\n").replace("\n", "\r\n")
    repo = tmp_path / "g"
    repo.mkdir()
    (repo / "a.txt").write_bytes(crlf.encode())
    (repo / "b.txt").write_bytes(new.encode())
    r = subprocess.run(["diff", "-u", "a.txt", "b.txt"], cwd=repo, capture_output=True)
    real = r.stdout  # diff's own lines in LF, the file's lines in CRLF: applies as it is
    o0 = apply_text({"a.txt": crlf}, real, strip=0)
    assert o0.verdict is PatchVerdict.APPLIED and o0.new_contents == {"a.txt": new}
    # the same patch saved with CRLF on every line (a Windows editor, a mail client)
    data = real.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert all(ln.endswith(b"\r") for ln in data.split(b"\n")[:-1])
    o = apply_text({"a.txt": crlf}, data, strip=0)
    assert o.verdict is PatchVerdict.APPLIED, o.detail
    assert o.new_contents == {"a.txt": new}
    # the same patch still applies to the LF file (CRLF added by a mailer)
    o2 = apply_text({"a.txt": ORIG}, data, strip=0)
    assert o2.new_contents == {"a.txt": edit(ORIG, "line 10\n", "line ten\n")}


def test_crlf_patch_through_apply_keeps_crlf_bytes(tmp_path: Path) -> None:
    proj = Project(tmp_path / "proj")
    crlf = ORIG.replace("\n", "\r\n")
    new = edit(ORIG, "line 10\n", "line ten\n").replace("\n", "\r\n")
    patch = ("--- a/pkg/a.txt\n+++ b/pkg/a.txt\n@@ -9,3 +9,3 @@\n line 9\n-line 10\n+line ten\n line 11\n").replace("\n", "\r\n")
    tree = proj.add_tree("pkg", {"pkg/a.txt": crlf.encode()})
    rel = proj.add_patch("crlf.patch", patch.encode())
    r = proj.apply(load_recipe(proj.write_recipe("r", {"pkg": {"path": str(tree)}},
                                                 [{"file": rel, "source": "pkg", "sha256": sha256(patch)}])))
    assert r.ok, r.message
    assert (proj.workdir / "pkg/pkg/a.txt").read_bytes() == new.encode()


def test_long_blank_line_run_after_the_counted_lines_parses() -> None:
    """A hunk followed by a long run of blank lines and then more hunk lines (the
    form that made parsing quadratic: 40 KB took 77 s; the speed target is in
    benchmarks/bench_parse.py): the blank lines are context, the hunk goes on."""
    text = "--- a/f.py\n+++ b/f.py\n@@ -1,2 +1,3 @@\n a\n" + "\n" * 40_000 + "+new\n"
    (fp,) = parse_patch(text).files
    (h,) = fp.hunks
    assert h.lines[-1] == "+new" and len(h.lines) == 40_002
    assert h.old_len == 40_001 and h.new_len == 40_002


@pytest.mark.parametrize("with_tree, strip", [(True, 5), (False, 5), (True, None)])
def test_import_of_a_site_packages_diff_names_the_existing_file(tmp_path: Path, with_tree: bool, strip: int | None) -> None:
    """`stackbuild import` of a checkout-vs-site-packages diff writes a patch with one
    name per file, the tree's; git apply takes it and changes that file."""
    from stackbuild.patchqueue import import_patch

    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg/a.py").write_text(ORIG)
    home = tmp_path / "home/u"
    src, site = home / "src/pkg/pkg/a.py", home / "venv/lib64/python3.12/site-packages/pkg/a.py"
    for p, text in ((src, ORIG), (site, edit(ORIG, "line 4\n", "line four\n"))):
        p.parent.mkdir(parents=True)
        p.write_text(text)
    diff = subprocess.run(["diff", "-u", str(src), str(site)], capture_output=True, text=True).stdout
    raw = tmp_path / "site.diff"
    raw.write_text(diff.replace(str(tmp_path), ""))
    res = import_patch(raw, None, source="pkg", dest=tmp_path / "out", tree=tree if with_tree else None, strip=strip)
    (imp,) = res.patches
    assert imp.files == ("pkg/a.py",)
    body = (tmp_path / "out" / "site.patch").read_text()
    assert "diff --git a/pkg/a.py b/pkg/a.py" in body and "site-packages" not in body.split("diff --git", 1)[1]
    _git(tree, "init", "-q")
    _git(tree, "apply", str(tmp_path / "out" / "site.patch"))
    assert (tree / "pkg/a.py").read_text() == edit(ORIG, "line 4\n", "line four\n")


def test_git_copy_creates_the_copy_and_keeps_the_original(tmp_path: Path) -> None:
    """`copy from`/`copy to` (git diff -C -C): the two names differ on purpose; the new
    file is the patched copy and the original stays, as git apply does."""
    repo = tmp_path / "r"
    repo.mkdir()
    (repo / "a.py").write_text(ORIG)
    _git(repo, "init", "-q")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-q", "-m", "base")
    (repo / "b.py").write_text(edit(ORIG, "line 4\n", "line four\n"))
    _git(repo, "add", "b.py")
    patch = _git(repo, "diff", "--cached", "-C", "-C", "HEAD") + "\n"
    assert "copy from a.py" in patch and "copy to b.py" in patch
    o = apply_text({"a.py": ORIG}, patch)
    assert o.verdict is PatchVerdict.APPLIED, o.detail
    assert o.new_contents == {"b.py": edit(ORIG, "line 4\n", "line four\n")}
    o2 = apply_text({"a.py": ORIG, "b.py": "other\n"}, patch)
    assert o2.verdict is PatchVerdict.CONFLICT and "b.py: is the target of a copy but already exists" in o2.detail


# ------------------------------------------------------------------ property: the same result as git apply

_REAL = (Path(__file__).resolve().parent.parent / "stackbuild" / "series.py").read_text()


def _edit_lines(lines: list[str], edits: list[tuple[int, int, str]]) -> list[str]:
    out = list(lines)
    for pos, op, text in sorted(edits, reverse=True):
        pos = pos % (len(out) + 1)
        if op == 0 and pos < len(out):
            out[pos] = text
        elif op == 1:
            out.insert(pos, text)
        elif pos < len(out):
            del out[pos]
    return out


_edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 2), st.sampled_from(["", "x = 1", "    pass", ")", "# edited"])),
                  min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=_edits, drift=_edits, start=st.integers(0, 700))
def test_property_same_result_as_git_apply(tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[int, int, str]],
                                           drift: list[tuple[int, int, str]], start: int) -> None:
    """Random edits of a real file (a 200-line window of stackbuild/series.py: blank
    lines, repeated lines), made into a patch by git, applied to the file after random
    upstream drift: whenever git apply applies it cleanly, stackbuild gives the same
    file (a tie between two equally near places goes to the later one, as in git)."""
    base = _REAL.splitlines(keepends=True)[start : start + 200]
    mine = _edit_lines(base, [(p % 200, op, t + "\n") for p, op, t in edits])
    if mine == base:
        return
    tmp = tmp_path_factory.mktemp("prop")
    repo = tmp / "r"
    repo.mkdir()
    (repo / "f.py").write_text("".join(base))
    _git(repo, "init", "-q")
    _git(repo, "add", "f.py")
    _git(repo, "commit", "-q", "-m", "base")
    (repo / "f.py").write_text("".join(mine))
    patch = subprocess.run(["git", "diff"], cwd=repo, env=git_env(), capture_output=True, text=True, check=True).stdout
    upstream = "".join(_edit_lines(base, [(p % 200, op, t + "  # upstream\n") for p, op, t in drift]))
    target = tmp / "t"
    target.mkdir()
    (target / "f.py").write_text(upstream)
    g = subprocess.run(["git", "apply", "-"], cwd=target, input=patch, capture_output=True, text=True, env=git_env())
    o = apply_text({"f.py": upstream}, patch)
    ours_applied = o.verdict in (PatchVerdict.APPLIED, PatchVerdict.APPLIED_OFFSET)
    if g.returncode == 0:
        assert ours_applied, o.detail
        assert o.new_contents["f.py"] == (target / "f.py").read_text()
    # the other way round is allowed: git anchors a hunk at line 1, or one without
    # trailing context, to the file's start or end; stackbuild (like GNU patch) lets
    # it apply at an offset, and says so


def test_equally_near_places_go_to_the_later_one_as_in_git(tmp_path: Path) -> None:
    """The hunk's place moved; its context is found 2 lines before and 2 lines after
    where the header says. git apply and GNU patch both take the later place."""
    patch = "--- a/f.txt\n+++ b/f.txt\n@@ -5,3 +5,3 @@\n k\n-m\n+M\n k\n"
    upstream = "".join(f"{x}\n" for x in ["0", "1", "k", "m", "k", "5", "k", "m", "k", "9"])
    (tmp_path / "f.txt").write_text(upstream)
    g = subprocess.run(["git", "apply", "-"], cwd=tmp_path, input=patch, capture_output=True, text=True, env=git_env())
    assert g.returncode == 0, g.stderr
    o = apply_text({"f.txt": upstream}, patch)
    assert o.verdict is PatchVerdict.APPLIED_OFFSET
    assert o.new_contents["f.txt"] == (tmp_path / "f.txt").read_text()
    assert o.new_contents["f.txt"].split("\n")[7] == "M"


def test_a_folder_needed_where_an_earlier_patch_made_a_file_is_one_clear_line(tmp_path: Path) -> None:
    proj = Project(tmp_path / "proj")
    tree = proj.add_tree("pkg", {"pkg/a.py": ORIG})
    first = "--- /dev/null\n+++ b/pkg/x\n@@ -0,0 +1 @@\n+file\n"
    second = "--- /dev/null\n+++ b/pkg/x/y.py\n@@ -0,0 +1 @@\n+inner\n"
    entries = [{"file": proj.add_patch(f"{n}.patch", t), "source": "pkg", "sha256": sha256(t)}
               for n, t in (("first", first), ("second", second))]
    proj.write_recipe("r", {"pkg": {"path": str(tree)}}, entries)
    r = subprocess.run([str(BIN), "apply", "recipes/r.toml", "--workdir", "work"], cwd=proj.root,
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    (err,) = [ln for ln in r.stderr.splitlines() if ln.startswith("stackbuild: error:")]
    assert "second (patches/second.patch): conflict" in err and "pkg/x is a file, not a folder" in err
