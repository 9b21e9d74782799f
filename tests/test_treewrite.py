"""The tree door (stackbuild.treewrite): git's path rule, links resolved inside the
tree, parents never created through a link. Unit cases, then a property test over
random paths built from `.`, `..`, `.git` spellings, links in and out of the tree,
control characters and git quoting."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stackbuild.series import MalformedPatch, parse_patch, quote_git_path, unquote_git_path
from stackbuild.treewrite import Tree, TreeWriteError, UnsafePath, is_git_component, verify_path


@pytest.mark.parametrize("name", [".git", ".GIT", ".Git", ".git.", ".git ", ".git. .", "git~1", "GIT~1",
                                  ".git::$INDEX_ALLOCATION", ".g\u200cit", "\ufeff.git"])
def test_git_spellings_are_git(name: str) -> None:
    assert is_git_component(name)
    with pytest.raises(UnsafePath, match="git metadata"):
        verify_path(f"pkg/{name}/config")


@pytest.mark.parametrize("name", [".gitignore", ".github", ".gitattributes", "git", "x.git", ".git2"])
def test_ordinary_names_are_not_git(name: str) -> None:
    assert not is_git_component(name)
    verify_path(f"pkg/{name}")


@pytest.mark.parametrize("path, cause", [
    ("", "empty"), ("/etc/x", "absolute"), ("a/../b", "'..'"), ("./a", "'.'"), ("a//b", "empty component"),
    ("a\0b", "control"), ("a\nb", "control"), ("a\x7fb", "control"), ("a\\b", "backslash"),
])
def test_verify_path_refuses(path: str, cause: str) -> None:
    with pytest.raises(UnsafePath, match=cause):
        verify_path(path)


def _world(root: Path) -> tuple[Path, Path]:
    tree, outside = root / "tree", root / "outside"
    (tree / ".git/hooks").mkdir(parents=True)
    (tree / ".git/config").write_text("[core]\n")
    (tree / "sub").mkdir()
    (tree / "sub/f.py").write_text("x\n")
    outside.mkdir()
    (outside / "f.py").write_text("outside\n")
    os.symlink("sub", tree / "in_link")
    os.symlink("../outside", tree / "out_link")
    os.symlink(str(outside), tree / "abs_link")
    os.symlink(".git", tree / "git_link")
    os.symlink("../outside/f.py", tree / "file_link")
    os.symlink("loop", tree / "loop")
    os.symlink("sub/../..", tree / "up_link")
    return tree, outside


def _hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p).encode() + b"\0")
        st_ = p.lstat()
        h.update(str(stat.S_IFMT(st_.st_mode) | stat.S_IMODE(st_.st_mode)).encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_write_creates_parents_and_replaces_hard_links(tmp_path: Path) -> None:
    tree, outside = _world(tmp_path)
    door = Tree(tree)
    assert door.write("a/b/c.py", b"new\n", 0o755) == "a/b/c.py"
    assert (tree / "a/b/c.py").read_bytes() == b"new\n"
    assert stat.S_IMODE((tree / "a/b/c.py").stat().st_mode) == 0o755
    os.link(outside / "f.py", tree / "hard.py")  # a hard link to a file outside
    door.write("hard.py", b"changed\n")
    assert (outside / "f.py").read_text() == "outside\n"
    assert (tree / "hard.py").read_text() == "changed\n"


def test_links_inside_are_followed_and_outside_refused(tmp_path: Path) -> None:
    tree, outside = _world(tmp_path)
    door = Tree(tree)
    assert door.write("in_link/new.py", b"1\n") == "sub/new.py"
    assert (tree / "sub/new.py").read_bytes() == b"1\n"
    before = _hash(outside)
    for rel in ("out_link/x.py", "abs_link/f.py", "up_link/outside/x.py", "file_link"):
        with pytest.raises(UnsafePath):
            door.write(rel, b"evil\n")
        with pytest.raises(UnsafePath):
            door.read(rel)
    with pytest.raises(UnsafePath, match="git metadata"):
        door.write("git_link/hooks/post-commit", b"#!/bin/sh\n")
    assert _hash(outside) == before
    assert not (tree / ".git/hooks/post-commit").exists()


def test_final_link_is_not_written_through_and_delete_removes_the_link_only(tmp_path: Path) -> None:
    tree, outside = _world(tmp_path)
    os.symlink("sub/f.py", tree / "alias.py")
    door = Tree(tree)
    with pytest.raises(UnsafePath, match="symbolic link"):
        door.write("alias.py", b"x\n")
    door.delete("file_link")
    assert not os.path.lexists(tree / "file_link") and (outside / "f.py").exists()


def test_delete_removes_emptied_folders(tmp_path: Path) -> None:
    tree, _ = _world(tmp_path)
    door = Tree(tree)
    door.write("d1/d2/x.py", b"x")
    door.delete("d1/d2/x.py")
    assert not (tree / "d1").exists()


def test_a_file_where_a_folder_is_needed_is_a_clear_error(tmp_path: Path) -> None:
    tree, _ = _world(tmp_path)
    with pytest.raises(TreeWriteError, match="is a file, not a folder"):
        Tree(tree).write("sub/f.py/inner.py", b"x")


def test_a_link_swapped_in_after_the_check_is_not_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race: the folder is real when resolved, a link when opened. O_NOFOLLOW on
    every step refuses it."""
    tree, outside = _world(tmp_path)
    (tree / "race").mkdir()
    door = Tree(tree)
    real = door._real_parent

    def swap(rel: str) -> list[str]:
        comps = real(rel)
        shutil.rmtree(tree / "race")
        os.symlink(str(outside), tree / "race")
        return comps

    monkeypatch.setattr(door, "_real_parent", swap)
    with pytest.raises(UnsafePath, match="symbolic link"):
        door.write("race/evil.py", b"x")
    assert not (outside / "evil.py").exists()


# ------------------------------------------------------------------ property

COMPONENTS = [".", "..", ".git", ".GIT", ".Git.", ".git ", "git~1", ".g\u200cit", "hooks", "config", "sub", "new",
              "x.py", 'q"q', "in_link", "out_link", "abs_link", "git_link", "file_link", "loop", "up_link",
              "", "a\0b", "a\nb", "a\\b", "café"]

paths = st.builds(
    lambda parts, absolute: ("/" if absolute else "") + "/".join(parts),
    st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=6),
    st.booleans(),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=paths, op=st.sampled_from(["write", "delete", "chmod", "read"]), via_patch=st.booleans())
def test_property_never_outside_never_git(path: str, op: str, via_patch: bool) -> None:
    """Whatever the path (and whether it arrives raw or git-quoted in a patch), the
    door either refuses it with TreeWriteError or changes a real file inside the
    tree that is not git metadata; nothing outside and nothing under .git changes."""
    with tempfile.TemporaryDirectory() as td:
        tree, outside = _world(Path(td))
        before_out, before_git = _hash(outside), _hash(tree / ".git")
        rel: str | None = path
        if via_patch:
            text = f"--- /dev/null\n+++ {quote_git_path('b/' + path)}\n@@ -0,0 +1 @@\n+x\n"
            assert unquote_git_path(quote_git_path(path))[0] == path
            try:
                rel = parse_patch(text).files[0].new_path
            except MalformedPatch:
                rel = None
        if rel is not None:
            door = Tree(tree)
            try:
                if op == "write":
                    real = door.write(rel, b"payload\n")
                elif op == "delete":
                    real = door.delete(rel)
                elif op == "chmod":
                    door.chmod(rel, 0o755)
                    real = door.real_path(rel)
                else:
                    door.read(rel)
                    real = None
            except TreeWriteError:
                real = None
            if real is not None:
                verify_path(real)  # the real location is a plain path, not git metadata
                assert os.path.realpath(tree / real).startswith(str(tree.resolve()) + os.sep)
        assert _hash(outside) == before_out
        assert _hash(tree / ".git") == before_git


def test_os_errors_are_one_clear_error(tmp_path: Path) -> None:
    tree, _ = _world(tmp_path)
    with pytest.raises(TreeWriteError, match="name too long"):
        Tree(tree).write("x" * 300 + ".py", b"x")


def test_permission_denied_is_one_clear_error(tmp_path: Path) -> None:
    tree, _ = _world(tmp_path)
    (tree / "ro").mkdir()
    (tree / "ro").chmod(0o555)
    try:
        if os.access(tree / "ro", os.W_OK):
            pytest.skip("running as a user that ignores permissions (root)")
        with pytest.raises(TreeWriteError, match="ermission denied"):
            Tree(tree).write("ro/x.py", b"x")
    finally:
        (tree / "ro").chmod(0o755)
