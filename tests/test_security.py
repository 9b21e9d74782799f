"""Hostile input through the real `stackbuild apply` / `stackbuild import` command
lines (issue 12, classes 1 and 6, and the link classes that reach the tree writer).

Each case plants one attack on a small local-source recipe and asserts what the README
promises: exit 2, one line on stderr naming the patch file and the cause, no
traceback, no marker file from a planted hook or fsmonitor, nothing changed outside
the tree (a sibling folder hashed before and after), and the previous workspace left
as it was. Positive controls (a quoted UTF-8 name, a link that stays inside the tree)
show the guards do not refuse what is legitimate.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_workspace import ORIG, Project, sha256

from stackbuild.gitrun import git_argv, git_env, run_git

BIN = Path(sys.executable).parent / "stackbuild"
NEW_FILE = "new file mode 100644\n--- /dev/null\n"


def hook_script(marker: Path) -> str:
    return f"#!/bin/sh\ntouch {marker}\n"


def new_file_patch(header_path: str, body: str, git_name: str | None = None) -> bytes:
    """A git patch creating `header_path` (as written after `+++ `) with `body`."""
    lines = body.splitlines()
    diff = f"diff --git {git_name} {git_name}\n" if git_name else ""
    hunk = "".join(f"+{ln}\n" for ln in lines)
    old = NEW_FILE if git_name else "--- /dev/null\n"
    return (f"Description: hostile\n\n{diff}{old}+++ {header_path}\n"
            f"@@ -0,0 +1,{len(lines)} @@\n{hunk}").encode()


def prepend_patch(path: str, lines: list[str], plain: bool = False) -> bytes:
    """A patch inserting `lines` at the top of an existing file (it matches any file)."""
    hunk = "".join(f"+{ln}\n" for ln in lines)
    head = "" if plain else f"diff --git {path.replace('b/', 'a/', 1)} {path}\n"
    return f"{head}--- {path.replace('b/', 'a/', 1)}\n+++ {path}\n@@ -0,0 +1,{len(lines)} @@\n{hunk}".encode()


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    if not root.exists():
        return "absent"
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        if p.is_symlink():
            h.update(b"L" + os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@dataclass
class World:
    tmp: Path
    proj: Project
    outside: Path  # a sibling folder the attacks aim at
    marker: Path  # created by any planted hook or fsmonitor that runs
    env: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN), *args], cwd=self.proj.root, env=self.env, capture_output=True, text=True,
                              timeout=120)

    def recipe(self, patch: bytes | None = None, links: dict[str, str] | None = None,
               backport: tuple[str, bytes] | None = None, opts: dict[str, object] | None = None) -> Path:
        files = {"pkg/a.py": ORIG, "setup.py": "print('hi')\n"}
        tree = self.proj.add_tree("pkg", files)
        for rel, target in (links or {}).items():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, tree / rel)
        entries: list[dict[str, object]] = []
        if patch is not None:
            rel = self.proj.add_patch("hostile.patch", patch)
            entries.append({"file": rel, "source": "pkg", "sha256": sha256(patch), **(opts or {})})
        if backport is not None:
            # the backported file as the cache keeps it (derived data: untrusted too)
            fake_sha = "ab" * 32
            dest = Path(self.env["STACKBUILD_CACHE"]) / "backports" / fake_sha / backport[0]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(backport[1])
            # with the digest the cache records for it: an attacker who can write the cache can write that too
            index = Path(self.env["STACKBUILD_CACHE"]) / "backports" / fake_sha / ".stackbuild-sha256.json"
            index.write_text(json.dumps({backport[0]: sha256(backport[1])}))
            entries.append({"backport": "vllm==0.20.0", "sha256": fake_sha, "files": [backport[0]], "source": "pkg"})
        return self.proj.write_recipe("r", {"pkg": {"path": str(tree)}}, entries)


@pytest.fixture
def world(tmp_path: Path) -> World:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "existing.py").write_text(ORIG)
    (outside / "target.py").write_text(ORIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "STACKBUILD_"))}
    env["STACKBUILD_CACHE"] = str(tmp_path / "cache")
    return World(tmp_path, Project(tmp_path / "proj"), outside, tmp_path / "MARKER", env)


def assert_refused(w: World, r: subprocess.CompletedProcess[str], cause: str, before: str) -> None:
    """exit 2, one line naming the patch and the cause, no traceback, no marker,
    nothing outside changed, no workspace swapped in."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("stackbuild: error:")]
    assert len(lines) == 1, r.stderr
    assert "hostile" in lines[0] or "backport" in lines[0], lines[0]
    assert cause in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not w.marker.exists()
    assert tree_hash(w.outside) == before
    assert not (w.proj.workdir / "pkg").exists()


# ------------------------------------------------------------------ class 1: a patch reaches git metadata

def _git_meta_cases(marker: Path) -> list[tuple[str, bytes, dict[str, str], str]]:
    hook = hook_script(marker)
    fsmon = ["[core]", f"\tfsmonitor = touch {marker}", f"\thooksPath = {marker.parent}"]
    return [
        ("dot-slash-config", prepend_patch("b/./.git/config", fsmon), {}, "git metadata"),
        ("repair-vendor-config", prepend_patch("b/vendor/.git/config", fsmon, plain=True), {}, "git metadata"),
        ("upper-hooks", new_file_patch("b/.GIT/hooks/post-commit", hook, "a/.GIT/hooks/post-commit"), {}, "git metadata"),
        ("trailing-dot", new_file_patch("b/.git./hooks/post-commit", hook), {}, "git metadata"),
        ("trailing-space", new_file_patch('"b/.git /hooks/post-commit"', hook), {}, "git metadata"),
        ("ntfs-short", new_file_patch("b/git~1/hooks/post-commit", hook), {}, "git metadata"),
        ("ntfs-stream", new_file_patch("b/.git::$INDEX_ALLOCATION/hooks/post-commit", hook), {}, "git metadata"),
        ("hfs-ignorable", new_file_patch("b/.g\u200cit/hooks/post-commit", hook), {}, "git metadata"),
        ("octal-quoted", new_file_patch('"b/\\056git/hooks/post-commit"', hook), {}, "git metadata"),
        ("nested-git", new_file_patch("b/pkg/.git/hooks/post-commit", hook), {}, "git metadata"),
        ("rename-into-git", b"diff --git a/setup.py b/.git/hooks/post-commit\nsimilarity index 100%\n"
                            b"rename from setup.py\nrename to .git/hooks/post-commit\n", {}, "git metadata"),
        ("link-to-git", new_file_patch("b/meta/hooks/post-commit", hook), {"meta": ".git"}, "git metadata"),
        ("copy-into-git", b"diff --git a/setup.py b/x\nsimilarity index 100%\n"
                          b"copy from setup.py\ncopy to .git/hooks/post-commit\n", {}, "git metadata"),
        ("quoted-rename-into-git", b"diff --git a/setup.py b/x\nsimilarity index 100%\n"
                                   b'rename from setup.py\nrename to "\\056git/config"\n', {}, "git metadata"),
        ("delete-git-index", b"diff --git a/.git/index b/.git/index\ndeleted file mode 100644\n--- a/.git/index\n"
                             b"+++ /dev/null\n@@ -1 +0,0 @@\n-x\n", {}, "git metadata"),
        ("strip0-git", new_file_patch(".git/hooks/post-commit", hook), {}, "git metadata"),
    ]


GIT_META_IDS = [c[0] for c in _git_meta_cases(Path("/m"))]


@pytest.mark.parametrize("case", GIT_META_IDS)
def test_patch_into_git_metadata_is_refused(world: World, case: str) -> None:
    name, patch, links, cause = next(c for c in _git_meta_cases(world.marker) if c[0] == case)
    opts = {"strip": 0} if case == "strip0-git" else None
    world.recipe(patch, links, opts=opts)
    before = tree_hash(world.outside)
    r = world.cli("apply", "recipes/r.toml", "--workdir", "work")
    assert_refused(world, r, cause, before)
    assert "malformed" in r.stderr


def test_backport_into_git_metadata_is_refused(world: World) -> None:
    world.recipe(None, backport=(".git/hooks/post-commit", hook_script(world.marker).encode()))
    before = tree_hash(world.outside)
    r = world.cli("apply", "recipes/r.toml", "--workdir", "work")
    assert_refused(world, r, "git metadata", before)


# ------------------------------------------------------------------ writes through links out of the tree

def _link_cases(outside: Path) -> list[tuple[str, bytes, dict[str, str], str]]:
    return [
        ("new-file-through-dir-link", new_file_patch("b/out/evil.py", "x = 1\n"), {"out": str(outside)}, "outside the tree"),
        ("edit-through-dir-link", prepend_patch("b/out/existing.py", ["x = 1"]), {"out": str(outside)}, "outside the tree"),
        ("edit-file-link", prepend_patch("b/pkg/link.py", ["x = 1"]), {"pkg/link.py": str(outside / "target.py")},
         "outside the tree"),
        ("relative-link-chain", new_file_patch("b/l2/evil.py", "x = 1\n"),
         {"l1": "pkg/..", "l2": "l1/../../../outside"}, "outside the tree"),
        ("dotdot", new_file_patch("b/../outside/evil.py", "x = 1\n"), {}, "'..'"),
        ("absolute-p0", new_file_patch(str(outside / "evil.py"), "x = 1\n"), {}, "absolute"),
    ]


LINK_IDS = [c[0] for c in _link_cases(Path("/o"))]


@pytest.mark.parametrize("case", LINK_IDS)
def test_patch_through_a_link_out_of_the_tree_is_refused(world: World, case: str) -> None:
    name, patch, links, cause = next(c for c in _link_cases(world.outside) if c[0] == case)
    world.recipe(patch, links, opts={"strip": 0} if case == "absolute-p0" else None)
    before = tree_hash(world.outside)
    r = world.cli("apply", "recipes/r.toml", "--workdir", "work")
    assert_refused(world, r, cause, before)
    assert not (world.outside / "evil.py").exists()


def test_backport_through_a_link_out_of_the_tree_is_refused(world: World) -> None:
    world.recipe(None, {"out": str(world.outside)}, backport=("out/evil.py", b"x = 1\n"))
    before = tree_hash(world.outside)
    r = world.cli("apply", "recipes/r.toml", "--workdir", "work")
    assert_refused(world, r, "outside the tree", before)
    assert not (world.outside / "evil.py").exists()


def test_link_inside_the_tree_is_followed_and_committed(world: World) -> None:
    """Positive control: a folder link that stays inside the tree is written through,
    to the real file, and committed under its real name."""
    world.recipe(new_file_patch("b/alias/new.py", "x = 1\n"), {"alias": "pkg"})
    r = world.cli("apply", "recipes/r.toml", "--workdir", "work")
    assert r.returncode == 0, r.stderr
    tree = world.proj.workdir / "pkg"
    assert (tree / "pkg/new.py").read_text() == "x = 1\n"
    assert run_git(tree, "ls-files", "pkg/new.py") == "pkg/new.py"


# ------------------------------------------------------------------ class 6: names git quotes

def test_quoted_name_with_a_newline_is_malformed(world: World) -> None:
    world.recipe(new_file_patch('"b/evil\\nname.py"', "x = 1\n", '"a/evil\\nname.py"'))
    before = tree_hash(world.outside)
    r = world.cli("apply", "recipes/r.toml", "--workdir", "work")
    assert_refused(world, r, "control character", before)
    assert "malformed" in r.stderr


def test_octal_control_character_is_malformed(world: World) -> None:
    world.recipe(new_file_patch('"b/evil\\001.py"', "x = 1\n"))
    before = tree_hash(world.outside)
    r = world.cli("apply", "recipes/r.toml", "--workdir", "work")
    assert_refused(world, r, "control character", before)


def test_nul_in_a_path_is_malformed_not_a_crash(world: World) -> None:
    world.recipe(new_file_patch("b/evil\0.py", "x = 1\n"))
    before = tree_hash(world.outside)
    r = world.cli("apply", "recipes/r.toml", "--workdir", "work")
    assert_refused(world, r, "control character", before)


def test_quoted_utf8_name_is_unquoted_by_gits_rules(world: World) -> None:
    """Positive control: `"b/caf\\303\\251.py"` is café.py, as git writes and reads it."""
    world.recipe(new_file_patch('"b/pkg/caf\\303\\251 \\"q\\".py"', "x = 1\n", '"a/pkg/caf\\303\\251 \\"q\\".py"'))
    r = world.cli("apply", "recipes/r.toml", "--workdir", "work")
    assert r.returncode == 0, r.stderr
    tree = world.proj.workdir / "pkg"
    assert (tree / 'pkg/café "q".py').read_text() == "x = 1\n"
    assert not list(tree.glob('*"*'))  # no file under the literal quoted name


@pytest.mark.parametrize("path", ["b/evil\0.py", "b/.git/hooks/post-commit", '"b/evil\\nname.py"', "b/x/../../y.py"])
def test_import_refuses_to_write_a_hostile_patch(world: World, path: str) -> None:
    world.recipe(None)
    src = world.tmp / "in.patch"
    src.write_bytes(new_file_patch(path, "x = 1\n"))
    r = world.cli("import", str(src), "--into", "recipes/r.toml", "--source", "pkg", "--strip", "1")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and str(src) in r.stderr
    assert list((world.proj.root / "patches").rglob("*.patch")) == []
    assert "[[patches]]" not in (world.proj.root / "recipes/r.toml").read_text()


# ------------------------------------------------------------------ git runs untouchable by the tree

def _plant(tree: Path, marker: Path) -> None:
    hook = tree / ".git/hooks/post-commit"
    hook.write_text(hook_script(marker))
    hook.chmod(0o755)
    fsmon = tree.parent / "fsmon.sh"
    fsmon.write_text(hook_script(marker))
    fsmon.chmod(0o755)
    with open(tree / ".git/config", "a") as f:
        f.write(f"[core]\n\tfsmonitor = {fsmon}\n")


def test_planted_hooks_and_fsmonitor_never_run(world: World) -> None:
    """A workspace whose .git already holds a hook and an fsmonitor (planted by an
    older stackbuild, or by hand): re-apply (git status) and apply --force (new
    commits) run neither. The negative control shows the plant is live for plain git."""
    patch = prepend_patch("b/pkg/a.py", ["# first"])
    world.recipe(patch)
    assert world.cli("apply", "recipes/r.toml", "--workdir", "work").returncode == 0
    tree = world.proj.workdir / "pkg"
    _plant(tree, world.marker)
    r = world.cli("apply", "recipes/r.toml", "--workdir", "work")  # the idempotence check runs git status
    assert r.returncode == 0, r.stderr
    assert not world.marker.exists()
    subprocess.run(git_argv("commit", "-q", "--allow-empty", "-m", "x"), cwd=tree, env=git_env(), check=True)
    assert not world.marker.exists()
    # negative control: plain git in the same tree runs the plant
    plain = {**git_env(), "GIT_CONFIG_GLOBAL": "/dev/null"}
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "y"], cwd=tree, env=plain, check=True)
    assert world.marker.exists()


def test_inherited_git_variables_do_not_reach_git(world: World, tmp_path: Path) -> None:
    world.recipe(prepend_patch("b/pkg/a.py", ["# first"]))
    env = {**world.env, "GIT_DIR": str(tmp_path / "elsewhere"), "GIT_CONFIG_COUNT": "1",
           "GIT_CONFIG_KEY_0": "core.hooksPath", "GIT_CONFIG_VALUE_0": str(tmp_path)}
    (tmp_path / "post-commit").write_text(hook_script(world.marker))
    (tmp_path / "post-commit").chmod(0o755)
    r = subprocess.run([str(BIN), "apply", "recipes/r.toml", "--workdir", "work"], cwd=world.proj.root, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not world.marker.exists()
    assert not (tmp_path / "elsewhere").exists()


def test_read_blobs_reads_many_files_through_one_git_and_says_what_is_missing(tmp_path: Path) -> None:
    """The batch reader refresh uses: bytes exactly as committed (binary and text, one
    with a line that looks like cat-file's own header), None for a missing path or a
    tree, and no newline smuggled into the request."""
    from stackbuild.gitrun import read_blobs, run_git

    repo = tmp_path / "r"
    (repo / "d").mkdir(parents=True)
    files = {"a.py": b"x = 1\n", "d/bin.dat": bytes(range(256)) * 3, "d/tricky.txt": b"0" * 40 + b" blob 5\nhello"}
    for rel, data in files.items():
        (repo / rel).write_bytes(data)
    run_git(repo, "init", "-q")
    run_git(repo, "add", "-A")
    run_git(repo, "commit", "-q", "-m", "c")
    got = read_blobs(repo, ["HEAD:a.py", "HEAD:d", "HEAD:nope.py", "HEAD:d/bin.dat", "HEAD:d/tricky.txt"])
    assert got == {"HEAD:a.py": files["a.py"], "HEAD:d": None, "HEAD:nope.py": None,
                   "HEAD:d/bin.dat": files["d/bin.dat"], "HEAD:d/tricky.txt": files["d/tricky.txt"]}
    with pytest.raises(ValueError):
        read_blobs(repo, ["HEAD:a.py\nHEAD:d/bin.dat"])
