"""Patches in the forms they come in, and a verdict for each way applying can go.

Patches are made by real tools here (git format-patch, diff -u); the few written by
hand are the hand-damaged forms the parser must repair or refuse."""

from __future__ import annotations

import base64
import gzip
import os
import subprocess
from pathlib import Path

import git
import pytest
from fixtures import commit_files, make_upstream_repo
from test_workspace import ORIG, Project, edit, git_diff, log_messages, sha256, snapshot

from stackbuild.recipe import load_recipe
from stackbuild.series import (
    MalformedPatch,
    PatchVerdict,
    apply_parsed,
    decode_patch_bytes,
    parse_patch,
    split_mbox,
)


def apply_text(files: dict[str, str], patch: str | bytes, strip: int = 1, fuzz: int = 0, name: str = "p.patch"):  # type: ignore[no-untyped-def]
    data = patch.encode() if isinstance(patch, str) else patch
    text, notes = decode_patch_bytes(data, name)
    parsed = parse_patch(text, strip, notes)
    return apply_parsed(parsed, files.get, fuzz)


def diff_u(tmp: Path, old_name: str, old: str, new_name: str, new: str, cwd: Path | None = None) -> str:
    """Real `diff -u OLD NEW` output (no git headers)."""
    cwd = cwd or tmp
    for name, text in ((old_name, old), (new_name, new)):
        p = cwd / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    r = subprocess.run(["diff", "-u", old_name, new_name], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    return r.stdout


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def proj(tmp_path: Path) -> Project:
    return Project(tmp_path / "proj")


CHANGED = edit(ORIG, "line 10\n", "line ten\n")


# ------------------------------------------------------------------ messy forms that are accepted


def test_crlf_patch_applies(tmp_path: Path, proj: Project) -> None:
    patch = git_diff({"a.py": ORIG}, {"a.py": CHANGED}, tmp_path / "g")
    crlf = patch.replace("\n", "\r\n").encode()
    assert b"\r\n" in crlf
    r = proj.apply(proj.simple({"a.py": ORIG}, [("crlf", crlf)]))
    assert r.patches[0].verdict is PatchVerdict.APPLIED
    assert "CRLF" in r.patches[0].detail
    # the tree keeps LF line endings: the CR belonged to the transport, not the file
    assert (proj.workdir / "pkg/a.py").read_bytes() == CHANGED.encode()


def test_miscounted_hunk_header_is_recounted(tmp_path: Path, proj: Project) -> None:
    patch = git_diff({"a.py": ORIG}, {"a.py": CHANGED}, tmp_path / "g")
    header = "@@ -7,7 +7,7 @@"
    assert header in patch
    # someone added a line to the hunk by hand and did not update the header
    edited = patch.replace(header, header).replace("+line ten\n", "+line ten\n+line ten and a half\n")
    r = proj.apply(proj.simple({"a.py": ORIG}, [("hand-edited", edited)]))
    (p,) = r.patches
    assert p.verdict is PatchVerdict.APPLIED
    assert "header said -7 +7, recounted -7 +8" in p.detail
    assert (proj.workdir / "pkg/a.py").read_text() == edit(CHANGED, "line ten\n", "line ten\nline ten and a half\n")


def test_overcounted_hunk_header_in_a_format_patch_mail(tmp_path: Path) -> None:
    patch = git_diff({"a.py": ORIG}, {"a.py": CHANGED}, tmp_path / "g")
    assert patch.rstrip().endswith(git.Git().version().split()[-1]) or "\n-- \n" in patch
    # a line taken out of the hunk by hand; the header still counts it, and the mail's
    # signature separator "-- " follows the hunk
    edited = patch.replace(" line 13\n", "")
    o = apply_text({"a.py": ORIG}, edited)
    assert o.verdict is PatchVerdict.APPLIED
    assert "recounted -6 +6" in o.detail
    assert o.new_contents == {"a.py": CHANGED}


def test_blank_context_line_eaten_by_an_editor(tmp_path: Path) -> None:
    orig = "def f():\n    a = 1\n\n    b = 2\n    return a + b\n"
    new = orig.replace("    b = 2\n", "    b = 3\n")
    patch = git_diff({"f.py": orig}, {"f.py": new}, tmp_path / "g")
    assert "\n \n" in patch
    o = apply_text({"f.py": orig}, patch.replace("\n \n", "\n\n"))
    assert o.verdict is PatchVerdict.APPLIED
    assert o.new_contents == {"f.py": new}


def test_blank_context_line_and_undercounted_header_never_apply_half_a_hunk(tmp_path: Path) -> None:
    orig = "a\nb\n\nc\nd\n"
    new = "a\nB\n\nc\nD\n"
    patch = git_diff({"f": orig}, {"f": new}, tmp_path / "g")
    hunk = patch[patch.index("@@ -1,5 +1,5 @@"):]
    # the header counts only the lines above the blank one
    damaged = patch.replace(hunk, hunk.replace("@@ -1,5 +1,5 @@", "@@ -1,2 +1,2 @@").replace("\n \n", "\n\n", 1))
    o = apply_text({"f": orig}, damaged)
    # the whole change, said as repaired; never "applied" with D left out
    assert o.verdict is PatchVerdict.APPLIED
    assert o.new_contents == {"f": new}
    assert "recounted -5 +5" in o.detail


@pytest.mark.parametrize("strip", [0, 1])
def test_plain_diff_u_of_a_and_b_dirs(tmp_path: Path, proj: Project, strip: int) -> None:
    # `diff -u a/x b/x` names the files a/x and b/x: strip 1 is the usual form, and
    # with strip 0 the extra leading "a/" is dropped because pkg/x.py exists
    patch = diff_u(tmp_path, "a/pkg/x.py", ORIG, "b/pkg/x.py", CHANGED)
    assert patch.startswith("--- a/pkg/x.py\t") and "diff --git" not in patch
    r = proj.apply(proj.simple({"pkg/x.py": ORIG}, [("plain", patch, {"strip": strip})]))
    assert r.patches[0].verdict is PatchVerdict.APPLIED, r.patches[0].detail
    assert (proj.workdir / "pkg/pkg/x.py").read_text() == CHANGED
    assert r.patches[0].files == ("pkg/x.py",)


def test_plain_diff_u_of_a_backup_copy(tmp_path: Path, proj: Project) -> None:
    # the other common way: `cp x.py x.py.orig; edit x.py; diff -u x.py.orig x.py`
    patch = diff_u(tmp_path, "pkg/x.py.orig", ORIG, "pkg/x.py", CHANGED)
    assert patch.startswith("--- pkg/x.py.orig\t")
    r = proj.apply(proj.simple({"pkg/x.py": ORIG}, [("backup", patch, {"strip": 0})]))
    assert r.patches[0].verdict is PatchVerdict.APPLIED, r.patches[0].detail
    assert (proj.workdir / "pkg/pkg/x.py").read_text() == CHANGED
    assert not (proj.workdir / "pkg/pkg/x.py.orig").exists()


def test_diff_made_against_site_packages_absolute(tmp_path: Path, proj: Project) -> None:
    site = "/usr/lib/python3.11/site-packages/vllm/x.py"
    patch = f"--- {site}\n+++ {site}\n" + git_diff({"x": ORIG}, {"x": CHANGED}, tmp_path / "g").split("+++ b/x\n", 1)[1]
    r = proj.apply(proj.simple({"vllm/x.py": ORIG}, [("site", patch)]))
    (p,) = r.patches
    assert p.verdict is PatchVerdict.APPLIED, p.detail
    assert "dropped 4 extra leading path component(s) -> vllm/x.py" in p.detail
    assert (proj.workdir / "pkg/vllm/x.py").read_text() == CHANGED
    assert snapshot(proj.workdir / "pkg").keys() >= {"vllm/x.py"}
    assert not (proj.workdir / "pkg/usr").exists()


def test_diff_made_in_a_venv_with_diff_u(tmp_path: Path, proj: Project) -> None:
    rel = "venv/lib/python3.11/site-packages/vllm/model_executor/x.py"
    patch = diff_u(tmp_path, rel + ".orig", ORIG, rel, CHANGED)
    r = proj.apply(proj.simple({"vllm/model_executor/x.py": ORIG}, [("venv", patch, {"strip": 0})]))
    (p,) = r.patches
    assert p.verdict is PatchVerdict.APPLIED, p.detail
    assert (proj.workdir / "pkg/vllm/model_executor/x.py").read_text() == CHANGED


def test_git_format_patch_series_one_commit_per_part(tmp_path: Path, proj: Project) -> None:
    files = {"vllm/a.py": ORIG, "vllm/b.py": ORIG}
    up = make_upstream_repo(tmp_path / "up", files)
    commit_files(up, {"vllm/a.py": edit(ORIG, "line 2\n", "line two\n")}, "First: spell out two")
    commit_files(up, {"vllm/b.py": edit(ORIG, "line 5\n", "line five\n")}, "Second: spell out five")
    commit_files(up, {"vllm/a.py": edit(edit(ORIG, "line 2\n", "line two\n"), "line 19\n", "line nineteen\n"),
                      "vllm/new.py": "print('new')\n"}, "Third: nineteen and a new file")
    mbox = str(up.git.format_patch("--stdout", "v1.0..HEAD")) + "\n"
    assert len(split_mbox(mbox)) == 3
    r = proj.apply(proj.simple(files, [("series", mbox)]))
    (p,) = r.patches
    assert p.verdict is PatchVerdict.APPLIED, p.detail
    assert "3 commits" in p.detail
    assert set(p.files) == {"vllm/a.py", "vllm/b.py", "vllm/new.py"}
    tree = proj.workdir / "pkg"
    assert log_messages(tree)[1:] == ["First: spell out two", "Second: spell out five", "Third: nineteen and a new file"]
    for rel in ("vllm/a.py", "vllm/b.py", "vllm/new.py"):
        assert (tree / rel).read_bytes() == (tmp_path / "up" / rel).read_bytes()
    assert git.Repo(tree).head.commit.hexsha == p.commit


def test_gzip_base64_artifact(tmp_path: Path, proj: Project) -> None:
    patch = git_diff({"a.py": ORIG}, {"a.py": CHANGED}, tmp_path / "g")
    artifact = base64.encodebytes(gzip.compress(patch.encode()))
    r = proj.apply(proj.simple({"a.py": ORIG}, [("artifact", artifact)]))
    (p,) = r.patches
    assert p.verdict is PatchVerdict.APPLIED, p.detail
    assert "base64-decoded" in p.detail and "gunzipped" in p.detail
    assert p.sha256 == sha256(artifact)  # the artifact as pinned, not the decoded text
    assert (proj.workdir / "pkg/a.py").read_text() == CHANGED


def test_plain_gzip_patch(tmp_path: Path) -> None:
    patch = git_diff({"a.py": ORIG}, {"a.py": CHANGED}, tmp_path / "g")
    o = apply_text({"a.py": ORIG}, gzip.compress(patch.encode()), name="p.patch.gz")
    assert o.verdict is PatchVerdict.APPLIED and o.new_contents == {"a.py": CHANGED}


def test_dep3_header_gives_the_description(tmp_path: Path, proj: Project) -> None:
    body = git_diff({"a.py": ORIG}, {"a.py": CHANGED}, tmp_path / "g").split("\ndiff --git", 1)[1]
    patch = (
        "Description: Spell out ten so the XPU path sees it\n"
        " A longer explanation that continues\n"
        " over two lines.\n"
        "Origin: vendor, https://github.com/intel/llm-scaler\n"
        "Forwarded: not-needed\n"
        "Last-Update: 2026-11-01\n"
        "---\n"
        "diff --git" + body
    )
    text, _ = decode_patch_bytes(patch.encode())
    parsed = parse_patch(text)
    assert parsed.description == "Spell out ten so the XPU path sees it"
    assert parsed.header["Origin"] == "vendor, https://github.com/intel/llm-scaler"
    assert parsed.header["Forwarded"] == "not-needed"
    r = proj.apply(proj.simple({"a.py": ORIG}, [("dep3", patch)]))
    assert r.ok
    assert log_messages(proj.workdir / "pkg")[1] == "Spell out ten so the XPU path sees it"


# ------------------------------------------------------------------ verdicts


def test_already_applied_when_applied_twice(tmp_path: Path, proj: Project) -> None:
    patch = git_diff({"a.py": ORIG}, {"a.py": CHANGED}, tmp_path / "g")
    r = proj.apply(proj.simple({"a.py": ORIG}, [("once", patch), ("twice", patch)]))
    assert [p.verdict for p in r.patches] == [PatchVerdict.APPLIED, PatchVerdict.ALREADY_APPLIED]
    assert r.ok
    assert "reverse applies" in r.patches[1].detail
    assert r.patches[1].commit is None
    assert len(log_messages(proj.workdir / "pkg")) == 2  # base + one commit; the skip adds none
    m = r.manifest
    assert m is not None and m.patches[1].verdict == "already applied"


def test_already_applied_upstream(tmp_path: Path) -> None:
    patch = git_diff({"a.py": ORIG}, {"a.py": CHANGED}, tmp_path / "g")
    o = apply_text({"a.py": CHANGED}, patch)
    assert o.verdict is PatchVerdict.ALREADY_APPLIED
    assert o.new_contents == {}


def test_conflict_names_file_and_hunk(tmp_path: Path) -> None:
    new = edit(edit(ORIG, "line 2\n", "line two\n"), "line 18\n", "line eighteen\n")
    patch = git_diff({"pkg/a.py": ORIG}, {"pkg/a.py": new}, tmp_path / "g")
    assert patch.count("\n@@ ") == 2
    tree = {"pkg/a.py": edit(ORIG, "line 17\n", "line 17 changed upstream\n")}
    o = apply_text(tree, patch)
    assert o.verdict is PatchVerdict.CONFLICT
    assert o.detail.startswith("pkg/a.py: hunk 2 (@@ -15,6 +15,6 @@")
    assert o.new_contents == {}


def test_offset_when_lines_were_inserted_above(tmp_path: Path) -> None:
    patch = git_diff({"a.py": ORIG}, {"a.py": CHANGED}, tmp_path / "g")
    moved = "# header\n# added upstream\n# later\n" + ORIG
    o = apply_text({"a.py": moved}, patch)
    assert o.verdict is PatchVerdict.APPLIED_OFFSET
    assert o.new_contents == {"a.py": "# header\n# added upstream\n# later\n" + CHANGED}


def test_fuzz_refused_by_default_allowed_with_fuzz_1(tmp_path: Path, proj: Project) -> None:
    patch = git_diff({"a.py": ORIG}, {"a.py": CHANGED}, tmp_path / "g")
    drifted = edit(ORIG, "line 7\n", "line 7 # reworded upstream\n")  # the hunk's first context line
    tree = proj.add_tree("pkg", {"a.py": drifted})
    refused = proj.add_patch("refused.patch", patch)
    allowed = proj.add_patch("allowed.patch", patch)
    r1 = proj.apply(load_recipe(proj.write_recipe("nofuzz", {"pkg": {"path": str(tree)}},
                                                  [{"file": refused, "source": "pkg", "sha256": sha256(patch)}])))
    assert r1.patches[0].verdict is PatchVerdict.CONFLICT
    assert not r1.ok and not proj.workdir.exists()

    r2 = proj.apply(load_recipe(proj.write_recipe("fuzz", {"pkg": {"path": str(tree)}},
                                                  [{"file": allowed, "source": "pkg", "sha256": sha256(patch), "fuzz": 1}])))
    (p,) = r2.patches
    assert p.verdict is PatchVerdict.APPLIED_FUZZ and "fuzz 1" in p.detail
    assert (proj.workdir / "pkg/a.py").read_text() == edit(drifted, "line 10\n", "line ten\n")


def test_fuzz_never_turns_a_missing_change_into_applied(tmp_path: Path) -> None:
    # fuzz drops context, never removed lines: a hunk whose '-' line is gone conflicts
    patch = git_diff({"a.py": ORIG}, {"a.py": CHANGED}, tmp_path / "g")
    o = apply_text({"a.py": edit(ORIG, "line 10\n", "line X\n")}, patch, fuzz=3)
    assert o.verdict is PatchVerdict.CONFLICT


def test_missing_file(tmp_path: Path) -> None:
    patch = git_diff({"pkg/a.py": ORIG}, {"pkg/a.py": CHANGED}, tmp_path / "g")
    o = apply_text({"pkg/b.py": ORIG}, patch)
    assert o.verdict is PatchVerdict.MISSING_FILE
    assert "pkg/a.py" in o.detail


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"this is not a patch\njust words\n", "no file changes found"),
        (b"", "no file changes found"),
        (b"--- a/x\n+++ b/x\n@@ -1,x +1 @@\n-a\n+b\n", "bad hunk header"),
        (b"--- a/x\n+++ b/x\n@@ -1 +1 @@\n", "empty"),
        (base64.encodebytes(b"\x1f\x8b\x08\x00 not really gzip"), "gzip data is corrupt"),
    ],
)
def test_malformed_text(data: bytes, why: str) -> None:
    with pytest.raises(MalformedPatch, match=why):
        apply_text({"x": "a\n"}, data)


def test_garbage_patch_in_a_recipe_is_malformed(proj: Project) -> None:
    r = proj.apply(proj.simple({"a.py": ORIG}, [("garbage", b"\x00\x01\x02 not a patch at all \xff\n")]))
    (p,) = r.patches
    assert p.verdict is PatchVerdict.MALFORMED
    assert "no file changes found" in p.detail
    assert not r.ok and not proj.workdir.exists()


def test_binary_patch_is_malformed(tmp_path: Path, proj: Project) -> None:
    g = tmp_path / "g"
    repo = make_upstream_repo(g, {"a.py": ORIG}, tag=None)
    (g / "blob.bin").write_bytes(bytes(range(256)))
    repo.index.add(["blob.bin"])
    repo.index.commit("add a binary")
    binary = str(repo.git.format_patch("--stdout", "--binary", "HEAD~1")) + "\n"
    assert "GIT binary patch" in binary
    r = proj.apply(proj.simple({"a.py": ORIG}, [("binary", binary)]))
    (p,) = r.patches
    assert p.verdict is PatchVerdict.MALFORMED and "binary" in p.detail
    plain = str(repo.git.diff("HEAD~1"))
    assert "Binary files" in plain
    with pytest.raises(MalformedPatch, match="binary"):
        apply_text({"a.py": ORIG}, plain)


# ------------------------------------------------------------------ paths that escape the tree


ESCAPES = [
    "--- a/../../etc/passwd\n+++ b/../../etc/passwd\n@@ -1 +1 @@\n-root\n+owned\n",
    "--- /dev/null\n+++ b/../outside/new.txt\n@@ -0,0 +1 @@\n+owned\n",
    "diff --git a/x b/x\nrename from x\nrename to ../../escaped\n",
]


@pytest.mark.parametrize("patch", ESCAPES)
def test_dotdot_paths_are_malformed(patch: str) -> None:
    with pytest.raises(MalformedPatch, match="escapes the tree"):
        apply_text({"x": "root\n"}, patch)


def test_absolute_path_without_strip_is_malformed() -> None:
    with pytest.raises(MalformedPatch, match="absolute"):
        apply_text({}, "--- /etc/passwd\n+++ /etc/passwd\n@@ -1 +1 @@\n-root\n+owned\n", strip=0)


def test_path_into_git_metadata_is_malformed() -> None:
    with pytest.raises(MalformedPatch, match="git metadata"):
        apply_text({}, "--- /dev/null\n+++ b/.git/hooks/post-commit\n@@ -0,0 +1 @@\n+evil\n")


def test_hostile_paths_in_a_recipe_write_nothing_outside(tmp_path: Path, proj: Project) -> None:
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "passwd").write_text("root\n")
    before = snapshot(victim)
    depth = len((proj.workdir / "pkg").resolve().relative_to(tmp_path.resolve()).parts)
    up = "../" * depth
    patches: list[tuple[str, bytes | str]] = [
        ("dotdot", f"--- a/{up}outside/passwd\n+++ b/{up}outside/passwd\n@@ -1 +1 @@\n-root\n+owned\n"),
        ("absolute", f"--- {victim}/passwd\n+++ {victim}/passwd\n@@ -1 +1 @@\n-root\n+owned\n"),
        ("create", f"--- /dev/null\n+++ b/{up}outside/new\n@@ -0,0 +1 @@\n+owned\n"),
    ]
    for name, data in patches:
        p = Project(tmp_path / f"proj-{name}")
        r = p.apply(p.simple({"a.py": ORIG}, [(name, data, {"strip": 0 if name == "absolute" else 1})]))
        assert not r.ok
        assert r.patches[0].verdict in (PatchVerdict.MALFORMED, PatchVerdict.MISSING_FILE), (name, r.patches[0])
    assert snapshot(victim) == before


def test_symlink_in_the_tree_pointing_outside_is_malformed(tmp_path: Path, proj: Project) -> None:
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "config.py").write_text(ORIG)
    before = snapshot(victim)
    tree = proj.add_tree("pkg", {"a.py": ORIG})
    os.symlink(victim, tree / "linked")
    modify = git_diff({"linked/config.py": ORIG}, {"linked/config.py": CHANGED}, tmp_path / "g1")
    create = "--- /dev/null\n+++ b/linked/planted.py\n@@ -0,0 +1 @@\n+owned\n"

    for name, data in (("modify", modify), ("create", create)):
        rel = proj.add_patch(f"{name}.patch", data)
        r = proj.apply(load_recipe(proj.write_recipe(name, {"pkg": {"path": str(tree)}},
                                                     [{"file": rel, "source": "pkg", "sha256": sha256(data)}])))
        (p,) = r.patches
        assert p.verdict is PatchVerdict.MALFORMED, (name, p)
        assert "outside the tree" in p.detail
    assert snapshot(victim) == before
    assert not (victim / "planted.py").exists()


# ------------------------------------------------------------------ file-level changes


def test_new_and_deleted_files(tmp_path: Path, proj: Project) -> None:
    g = tmp_path / "g"
    repo = make_upstream_repo(g, {"keep.py": ORIG, "gone.py": "bye\n"}, tag=None)
    (g / "gone.py").unlink()
    (g / "sub").mkdir()
    (g / "sub/new.py").write_text("hello\n")
    (g / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (g / "run.sh").chmod(0o755)
    repo.git.add("-A")
    repo.index.commit("add and remove")
    patch = str(repo.git.format_patch("--stdout", "HEAD~1")) + "\n"
    assert "deleted file mode" in patch and "new file mode 100755" in patch
    r = proj.apply(proj.simple({"keep.py": ORIG, "gone.py": "bye\n"}, [("files", patch)]))
    (p,) = r.patches
    assert p.verdict is PatchVerdict.APPLIED, p.detail
    tree = proj.workdir / "pkg"
    assert not (tree / "gone.py").exists()
    assert (tree / "sub/new.py").read_text() == "hello\n"
    assert os.access(tree / "run.sh", os.X_OK)
    repo2 = git.Repo(tree)
    assert not repo2.is_dirty(untracked_files=True)
    names = {d.b_path or d.a_path for d in repo2.head.commit.diff("HEAD~1")}
    assert names == {"gone.py", "sub/new.py", "run.sh"}
    # and again: the reverse applies, so the whole patch is already applied
    o = apply_text({"keep.py": ORIG, "sub/new.py": "hello\n", "run.sh": "#!/bin/sh\necho hi\n"}, patch)
    assert o.verdict is PatchVerdict.ALREADY_APPLIED


def test_new_file_that_already_exists_differently_is_a_conflict() -> None:
    o = apply_text({"n.py": "other\n"}, "--- /dev/null\n+++ b/n.py\n@@ -0,0 +1 @@\n+new\n")
    assert o.verdict is PatchVerdict.CONFLICT and "n.py" in o.detail


def test_no_newline_at_end_of_file(tmp_path: Path) -> None:
    old = "a\nb\nc"  # no newline at the end
    # change the last line, keep it without a newline
    p1 = git_diff({"f": old}, {"f": "a\nb\nC"}, tmp_path / "g1")
    assert p1.count("\\ No newline at end of file") == 2
    o = apply_text({"f": old}, p1)
    assert o.verdict is PatchVerdict.APPLIED and o.new_contents == {"f": "a\nb\nC"}
    # add the missing newline
    p2 = git_diff({"f": old}, {"f": "a\nb\nc\n"}, tmp_path / "g2")
    o = apply_text({"f": old}, p2)
    assert o.new_contents == {"f": "a\nb\nc\n"}
    # take it away
    p3 = git_diff({"f": "a\nb\nc\n"}, {"f": old}, tmp_path / "g3")
    o = apply_text({"f": "a\nb\nc\n"}, p3)
    assert o.new_contents == {"f": old}
    # a change in the middle leaves a missing final newline alone
    p4 = git_diff({"f": old}, {"f": "a\nB\nc"}, tmp_path / "g4")
    o = apply_text({"f": old}, p4)
    assert o.new_contents == {"f": "a\nB\nc"}
    # and already applied is recognised without the newline too
    assert apply_text({"f": "a\nb\nC"}, p1).verdict is PatchVerdict.ALREADY_APPLIED


def test_multi_hunk_multi_file_patch(tmp_path: Path) -> None:
    before = {"a.py": ORIG, "b.py": ORIG}
    after = {"a.py": edit(edit(ORIG, "line 1\n", "line one\n"), "line 20\n", "line twenty\n"),
             "b.py": edit(ORIG, "line 11\n", "line 11\nline 11.5\n")}
    patch = git_diff(before, after, tmp_path / "g")
    o = apply_text(before, patch)
    assert o.verdict is PatchVerdict.APPLIED
    assert o.new_contents == after
    assert o.files == ("a.py", "b.py")


def test_binary_file_in_a_plain_recursive_diff_is_malformed(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for side, text, blob in (("a", "x\ny\n", b"\x00\x01"), ("b", "x\nY\n", b"\x00\x02")):
        (tmp_path / side / "t.txt").write_text(text)
        (tmp_path / side / "img.bin").write_bytes(blob)
    out = subprocess.run(["diff", "-ruN", "a", "b"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert "Binary files a/img.bin and b/img.bin differ" in out
    # applying only the text part would drop the binary change and call it applied
    with pytest.raises(MalformedPatch, match="binary"):
        apply_text({"t.txt": "x\ny\n", "img.bin": "\x00\x01"}, out)


def test_patch_of_a_file_with_crlf_endings(tmp_path: Path, proj: Project) -> None:
    # vLLM 0.19.0 ships files with CRLF endings (examples/online_serving/
    # data_parallel_pause_resume.py); git's patch for one has CR on its content lines only
    dos = "".join(f"line {i}\r\n" for i in range(1, 11))
    g = tmp_path / "g"
    repo = git.Repo.init(g)
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "Dev")
        cw.set_value("user", "email", "dev@example.com")
        cw.set_value("core", "autocrlf", "false")
    (g / "dos.py").write_bytes(dos.encode())
    repo.index.add(["dos.py"])
    repo.index.commit("base")
    (g / "dos.py").write_bytes(dos.replace("line 5\r\n", "line five\r\n").encode())
    repo.index.add(["dos.py"])
    repo.index.commit("Spell out five")
    patch = repo.git.format_patch("--stdout", "HEAD~1", strip_newline_in_stdout=False).encode()
    assert b"-line 5\r\n+line five\r\n" in patch and b"Subject: [PATCH] Spell out five\n" in patch
    r = proj.apply(proj.simple({"dos.py": dos.encode()}, [("dos", patch)]))
    (p,) = r.patches
    assert p.verdict is PatchVerdict.APPLIED, p.detail
    assert "CRLF" not in p.detail
    assert (proj.workdir / "pkg/dos.py").read_bytes() == dos.replace("line 5\r\n", "line five\r\n").encode()
