"""Faults users meet (issue 13): a damaged cache, a damaged workspace, local edits, a
full disk, a read-only cache, a workdir on another filesystem, a bad STACKBUILD_CACHE,
Ctrl-C. Each is one clear error (exit 2, 130 for Ctrl-C) or recovers by itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_workspace import ORIG, Project, edit, git_diff, sha256, snapshot

from stackbuild import workspace
from stackbuild.cli import main
from stackbuild.recipe import load_recipe

BIN = Path(sys.executable).parent
STACKBUILD = str(BIN / "stackbuild")


@pytest.fixture
def proj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    p = Project(tmp_path / "proj")
    files = {"pkg/a.py": ORIG}
    patch = git_diff(files, {"pkg/a.py": edit(ORIG, "line 5\n", "line five\n")}, tmp_path / "g", "Spell out five")
    tree = p.add_tree("pkg", files)
    rel = p.add_patch("five.patch", patch)
    p.write_recipe("r", {"pkg": {"path": str(tree)}}, [{"file": rel, "source": "pkg", "sha256": sha256(patch)}])
    monkeypatch.chdir(p.root)
    return p


def _one_clean_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err and "Broken pipe" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("stackbuild: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], err


# ------------------------------------------------------------------ damaged workspaces, local edits


def test_stray_byte_in_manifest_is_rebuilt_by_plain_apply(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply", "r"]) == 0
    m = proj.root / "work/r/manifest.json"
    m.write_bytes(m.read_bytes()[:40] + b"\xff" + m.read_bytes()[40:])
    capsys.readouterr()
    assert main(["apply", "r"]) == 0
    err = capsys.readouterr().err
    assert "damaged" in err and "manifest" in err
    assert "line five" in (proj.root / "work/r/pkg/pkg/a.py").read_text()
    assert main(["apply", "r"]) == 0 and "unchanged" in capsys.readouterr().out


@pytest.mark.parametrize("garbage", [b"garbage\n", b"", b"ref: refs/heads/nowhere\n", b"\x00\xff"])
def test_garbage_head_gets_advice_that_works_and_force_rebuilds(proj: Project, capsys: pytest.CaptureFixture[str],
                                                                 garbage: bytes) -> None:
    assert main(["apply", "r"]) == 0
    (proj.root / "work/r/pkg/.git/HEAD").write_bytes(garbage)
    capsys.readouterr()
    rc = main(["apply", "r"])
    err = capsys.readouterr().err
    assert rc == 2
    _one_clean_line(err, "apply --force r")
    assert main(["apply", "--force", "r"]) == 0
    assert main(["apply", "r"]) == 0 and "unchanged" in capsys.readouterr().out


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_what_stackbuild_did_not_make_is_never_replaced(proj: Project, tmp_path: Path, force: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "my-folder"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "todo.txt").write_text("keep me\n")
    afile = tmp_path / "afile"
    afile.write_text("keep me too\n")
    for target in (mine, afile):
        assert main(["apply", "r", "--workdir", str(target), *force]) == 2
        _one_clean_line(capsys.readouterr().err, "not a stackbuild workspace", str(target))
    assert (mine / "notes" / "todo.txt").read_text() == "keep me\n" and afile.read_text() == "keep me too\n"


def test_force_rebuilds_a_workspace_without_its_manifest(proj: Project) -> None:
    assert main(["apply", "r"]) == 0
    (proj.root / "work/r/manifest.json").unlink()
    (proj.root / "work/r/pkg/.git/HEAD").write_text("junk\n")
    assert main(["apply", "r"]) == 2  # git cannot say whether there are local edits
    assert main(["apply", "--force", "r"]) == 0
    assert (proj.root / "work/r/manifest.json").is_file()


def test_local_edits_are_refused_then_kept_with_the_advised_snapshot(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply", "r"]) == 0
    tree = proj.root / "work/r/pkg"
    (tree / "pkg/a.py").write_text((tree / "pkg/a.py").read_text().replace("line 9\n", "line nine\n"))
    (tree / "pkg/untracked.py").write_text("mine = 1\n")
    # a changed input makes apply want to rebuild
    recipe = proj.root / "recipes/r.toml"
    recipe.write_text(recipe.read_text() + '\n[environment.vars]\nX = "1"\n')
    before = snapshot(tree)
    capsys.readouterr()
    assert main(["apply", "r"]) == 2
    err = capsys.readouterr().err
    _one_clean_line(err, "pkg/a.py", "pkg/untracked.py", "stackbuild snapshot")
    assert snapshot(tree) == before  # nothing lost
    # the advice, as printed, works: snapshot into the recipe, then apply --force
    assert main(["snapshot", str(tree), "--into", "r"]) == 0
    assert main(["apply", "--force", "r"]) == 0
    assert "line nine" in (tree / "pkg/a.py").read_text()
    assert (tree / "pkg/untracked.py").read_text() == "mine = 1\n"


# ------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_while_the_old_tree_is_deleted_says_the_new_one_is_in(
        proj: Project, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["apply", "r"]) == 0
    discard = workspace._discard

    def interrupted(old: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(workspace, "_discard", interrupted)
    capsys.readouterr()
    assert main(["apply", "--force", "r"]) == 130
    err = capsys.readouterr().err
    assert "swapped in" in err and "no workspace was replaced" not in err
    assert (proj.root / "work/r/manifest.json").is_file()
    monkeypatch.setattr(workspace, "_discard", discard)
    assert main(["apply", "r"]) == 0  # and the next run clears what was left
    assert [p.name for p in (proj.root / "work").iterdir() if p.name.startswith(".r.")] == [".r.lock"]


def test_ctrl_c_before_the_swap_says_nothing_was_replaced(
        proj: Project, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["apply", "r"]) == 0
    before = snapshot(proj.root / "work/r")

    def interrupted(staging: Path, workdir: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(workspace, "_swap", interrupted)
    capsys.readouterr()
    assert main(["apply", "--force", "r"]) == 130
    assert "no workspace was replaced" in capsys.readouterr().err
    assert snapshot(proj.root / "work/r") == before


def test_ctrl_c_during_start_up_is_130_without_a_traceback(tmp_path: Path) -> None:
    """A KeyboardInterrupt raised while the CLI's imports load (as a Ctrl-C there is)."""
    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name == 'typer':\n"
            "        raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "from stackbuild.launch import main\n"
            "sys.exit(main())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 130
    assert "Traceback" not in r.stderr and "interrupted" in r.stderr


# ------------------------------------------------------------------ the cache directory


@pytest.mark.parametrize("kind", ["file", "under-a-file", "empty"])
def test_bad_stackbuild_cache_is_exit_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    value = {"file": str(f), "under-a-file": str(f / "cache"), "empty": ""}[kind]
    monkeypatch.setenv("STACKBUILD_CACHE", value)
    assert main(["cache", "ls"]) == 2
    _one_clean_line(capsys.readouterr().err, "STACKBUILD_CACHE")


def test_crash_log_falls_back_to_the_temp_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from stackbuild import buildcache

    f = tmp_path / "afile"
    f.write_text("x")
    monkeypatch.setenv("STACKBUILD_CACHE", str(f / "cache"))  # the cache cannot exist
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def bug() -> None:
        raise RuntimeError("a planted bug")

    monkeypatch.setattr(buildcache, "cache_ls", bug)
    assert main(["cache", "ls"]) == 3
    err = capsys.readouterr().err
    assert err.count("Traceback") == 0 and "a planted bug" in err
    logs = list(tmp_path.glob("stackbuild-crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in err and "RuntimeError: a planted bug" in logs[0].read_text()


# ------------------------------------------------------------------ mount namespaces: full disk, read-only, another filesystem


def _unshare_ok() -> str | None:
    if not shutil.which("unshare") or not shutil.which("mount"):
        return "unshare/mount not installed"
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot make a mount namespace here: {r.stderr.strip()}"


needs_mounts = pytest.mark.skipif(_unshare_ok() is not None, reason=str(_unshare_ok()))


def _in_ns(setup: str, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`stackbuild ARGS` in a private mount namespace after the shell `setup` (mounts)."""
    cmd = setup + " && exec " + " ".join(f"'{a}'" for a in [STACKBUILD, *args])
    return subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@needs_mounts
def test_full_disk_under_the_workspace_is_one_no_space_error(tmp_path: Path) -> None:
    proj = Project(tmp_path / "proj")
    big = {f"pkg/blob{i}.bin": os.urandom(1 << 20) for i in range(6)}
    tree = proj.add_tree("pkg", {**big, "pkg/a.py": ORIG})
    patch = git_diff({"pkg/a.py": ORIG}, {"pkg/a.py": edit(ORIG, "line 5\n", "line five\n")}, tmp_path / "g", "five")
    rel = proj.add_patch("five.patch", patch)
    proj.write_recipe("r", {"pkg": {"path": str(tree)}}, [{"file": rel, "source": "pkg", "sha256": sha256(patch)}])
    work = tmp_path / "small"
    work.mkdir()
    env = {**os.environ, "STACKBUILD_CACHE": str(tmp_path / "cache")}
    r = _in_ns(f"mount -t tmpfs -o size=4m tmpfs {work}", ["apply", "r", "--workdir", str(work / "w")], proj.root, env)
    assert r.returncode == 2, r.stderr
    _one_clean_line(r.stderr, "no space left on device")
    assert len(r.stderr.splitlines()) < 10


@needs_mounts
def test_read_only_cache_without_the_entry_is_one_clear_error(proj: Project, tmp_path: Path) -> None:
    cache = tmp_path / "rocache"
    cache.mkdir()
    env = {**os.environ, "STACKBUILD_CACHE": str(cache)}
    r = _in_ns(f"mount --bind {cache} {cache} && mount -o remount,ro,bind {cache}", ["cache", "gc", "--max-age", "0"],
               proj.root, env)
    assert r.returncode == 2, r.stderr
    _one_clean_line(r.stderr, "read-only", str(cache))


@pytest.mark.network  # the real vLLM sdists (cached once under STACKBUILD_TEST_CACHE)
@needs_mounts
@pytest.mark.slow
def test_real_release_cache_damage_read_only_cache_and_another_filesystem(tmp_path: Path) -> None:
    """vLLM 0.19.0 with a backport from 0.23.0: a damaged base repo and a damaged cached
    backport file are rebuilt from the verified sdists; workspaces share no inode with
    the cache; a read-only cache that holds the entries still applies; a workdir on
    another filesystem (tmpfs) works; a full cache filesystem is one error."""
    import fixtures

    cache = fixtures.seed_cache(tmp_path / "cache", ("0.19.0", "0.23.0"))
    env = {**os.environ, "STACKBUILD_CACHE": str(cache), "STACKBUILD_INDEX_URL": "http://127.0.0.1:9/simple"}
    sha_19, sha_23 = fixtures.VLLM_SDISTS["0.19.0"], fixtures.VLLM_SDISTS["0.23.0"]
    proj = Project(tmp_path / "proj")
    backport = "vllm/model_executor/models/gemma4_unified.py"
    proj.write_recipe("rel", {"vllm": {"pypi": "vllm==0.19.0", "sha256": sha_19}},
                      [{"backport": "vllm==0.23.0", "sha256": sha_23, "files": [backport], "source": "vllm"}])
    genuine = (fixtures.vllm_tree("0.23.0") / backport).read_bytes()

    def apply(workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([STACKBUILD, "apply", "rel", "--workdir", str(workdir), *extra], cwd=proj.root, env=env,
                              capture_output=True, text=True, timeout=600)

    r = apply(tmp_path / "ws1")
    assert r.returncode == 0, r.stderr
    base = cache / "bases" / f"{sha_19}.git"
    # no inode shared between a workspace and the cache
    cache_inodes = {p.stat().st_ino for p in cache.rglob("*") if p.is_file()}
    ws_inodes = {p.stat().st_ino for p in (tmp_path / "ws1").rglob("*") if p.is_file()}
    assert not cache_inodes & ws_inodes

    # damage: the base's pack index gone, a cached backport file truncated; and what a
    # run killed while importing the release leaves
    stale = cache / "bases" / f".import-{sha_19}-k1lled00"
    (stale / "objects").mkdir(parents=True)
    for idx in base.rglob("*.idx"):
        idx.unlink()
    cached = cache / "backports" / sha_23 / backport
    cached.write_bytes(cached.read_bytes()[:100])
    r = apply(tmp_path / "ws2")
    assert r.returncode == 0, r.stderr
    assert "damaged" in r.stderr and "does not match its digest" in r.stderr
    assert (tmp_path / "ws2/vllm" / backport).read_bytes() == genuine
    assert cached.read_bytes() == genuine
    assert not stale.exists()
    from stackbuild.manifest import read_manifest

    m1, m2 = read_manifest(tmp_path / "ws1"), read_manifest(tmp_path / "ws2")
    assert m1 is not None and m2 is not None and m1.patches[0].sha256 == m2.patches[0].sha256
    assert m1.sources[0].head_commit == m2.sources[0].head_commit

    # a read-only cache holding everything; a workdir on another filesystem (tmpfs)
    other = tmp_path / "other"
    other.mkdir()
    setup = (f"mount --bind {cache} {cache} && mount -o remount,ro,bind {cache} && "
             f"mount -t tmpfs -o size=400m tmpfs {other}")
    r = _in_ns(setup, ["apply", "rel", "--workdir", str(other / "w")], proj.root, env)
    assert r.returncode == 0, r.stderr

    # a full workdir filesystem while cloning: one line, and the cache is not blamed
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    r = _in_ns(f"mount -t tmpfs -o size=12m tmpfs {tiny}", ["apply", "rel", "--workdir", str(tiny / "w")], proj.root, env)
    assert r.returncode == 2, r.stderr
    _one_clean_line(r.stderr, "no space left on device")
    assert "damaged" not in r.stderr and len(r.stderr.splitlines()) < 10, r.stderr

    # a full cache filesystem while importing a release: one line, not a broken pipe
    small = tmp_path / "smallcache"
    small.mkdir()
    env_small = {**env, "STACKBUILD_CACHE": str(small)}
    sdist = cache / "sdists" / sha_19
    setup = (f"mount -t tmpfs -o size=40m tmpfs {small} && mkdir -p {small}/sdists && "
             f"cp -r {sdist} {small}/sdists/")
    r = _in_ns(setup, ["apply", "rel", "--workdir", str(tmp_path / "ws3")], proj.root, env_small)
    assert r.returncode == 2, r.stderr
    _one_clean_line(r.stderr, "no space left on device")
    assert len(r.stderr.splitlines()) < 10, r.stderr


def test_recipe_paths_are_rechecked_when_applied(proj: Project, tmp_path: Path) -> None:
    """A patch file swapped for a link to outside the project after loading is refused
    at apply, naming the key, without the outside file's hash."""
    recipe = load_recipe(proj.root / "recipes/r.toml")
    outside = tmp_path / "secret.patch"
    outside.write_text("secret\n")
    pf = proj.root / "patches/five.patch"
    pf.unlink()
    pf.symlink_to(outside)
    from stackbuild.errors import StackbuildError

    with pytest.raises(StackbuildError) as ei:
        workspace.apply_recipe(recipe)
    assert ei.value.key == "patches[0].file" and sha256("secret\n") not in ei.value.render()


def test_bytecode_written_by_importing_the_tree_is_not_a_local_edit(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply", "r"]) == 0
    cache = proj.root / "work/r/pkg/pkg/__pycache__"  # what importing pkg.a leaves (verify imports the tree)
    cache.mkdir()
    (cache / "a.cpython-311.pyc").write_bytes(b"\xa7\r\r\n" + bytes(12))
    (proj.root / "work/r/pkg/pkg/b.pyc").write_bytes(b"\xa7\r\r\n")
    recipe = proj.root / "recipes/r.toml"
    recipe.write_text(recipe.read_text() + '\n[environment.vars]\nX = "1"\n')
    assert main(["apply", "r"]) == 0


# ------------------------------------------------------------------ refresh arguments


def test_refresh_to_a_missing_release_names_the_index_and_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "index"
    (index / "vllm").mkdir(parents=True)
    (index / "vllm" / "index.json").write_text(
        '{"files": [{"filename": "vllm-0.19.0.tar.gz", "url": "vllm-0.19.0.tar.gz", "hashes": {"sha256": "' + "a" * 64 + '"}}]}')
    monkeypatch.setenv("STACKBUILD_INDEX_URL", index.as_uri())
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    proj = Project(tmp_path / "proj")
    path = proj.write_recipe("r", {"vllm": {"pypi": "vllm==0.19.0", "sha256": "a" * 64}})
    monkeypatch.chdir(proj.root)
    assert main(["refresh", "r", "--to", "vllm==0.0.999"]) == 2
    err = capsys.readouterr().err
    _one_clean_line(err, str(path), index.as_uri(), "vllm==0.0.999")


@pytest.mark.parametrize(("arg", "want"), [
    ("vllm==0.20.0,vllm==0.21.0", ["vllm==0.20.0", "vllm==0.21.0"]),
    ("vllm==0.20.0,0.21.0", ["vllm==0.20.0", "vllm==0.21.0"]),
    ("0.20.0, 0.21.0", ["0.20.0", "0.21.0"]),
    ("vllm==0.20.0", ["vllm==0.20.0"]),
    ("scaler@v1.2,scaler@0123abc", ["scaler@v1.2", "scaler@0123abc"]),
])
def test_matrix_forms_accepted(arg: str, want: list[str]) -> None:
    from stackbuild.cli import _matrix_versions

    assert _matrix_versions(arg) == want


@pytest.mark.parametrize("arg", ["vllm==0.20.0,,0.21.0", "vllm===0.20.0", "vllm==vllm==0.2", "vllm==", "x y==1", "latest", ""])
def test_matrix_bad_forms_are_exit_2_listing_the_accepted_forms(proj: Project, arg: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["refresh", "r", "--matrix", arg]) == 2
    _one_clean_line(capsys.readouterr().err, "--matrix", "accepted")


def test_commits_made_in_the_workspace_are_not_dropped(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply", "r"]) == 0
    tree = proj.root / "work/r/pkg"
    (tree / "pkg/a.py").write_text("committed by hand\n")
    subprocess.run(["git", "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qam", "mine"], cwd=tree, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
    capsys.readouterr()
    assert main(["apply", "r"]) == 2
    _one_clean_line(capsys.readouterr().err, "1 commit(s) made since apply", "format-patch")
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip() == head
    assert main(["apply", "--force", "r"]) == 0
    assert "line five" in (tree / "pkg/a.py").read_text()


def test_renamed_file_is_named_once(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply", "r"]) == 0
    tree = proj.root / "work/r/pkg"
    subprocess.run(["git", "mv", "pkg/a.py", "pkg/renamed.py"], cwd=tree, check=True)
    capsys.readouterr()
    recipe = proj.root / "recipes/r.toml"
    recipe.write_text(recipe.read_text() + '\n[environment.vars]\nX = "1"\n')
    assert main(["apply", "r"]) == 2
    err = capsys.readouterr().err
    assert "(pkg: pkg/renamed.py)" in err  # the old path of the rename is not a file of its own


# ------------------------------------------------------------------ a damaged cache (a tiny release on a local index: fast)


def _tiny_sdist(tmp_path: Path, index: Path, version: str) -> str:
    import tarfile

    src = tmp_path / f"tiny-{version}"
    (src / "tiny").mkdir(parents=True)
    for i in range(150):  # over git's unpack limit (100): the base is a pack, as a real release's is
        (src / "tiny" / f"m{i}.py").write_text(f"# module {i} of {version}\n" + "".join(f"v{j} = {j * i}\n" for j in range(50)))
    (index / "tiny").mkdir(parents=True, exist_ok=True)
    sdist = index / "tiny" / f"tiny-{version}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(src, arcname=f"tiny-{version}")
    return sha256(sdist.read_bytes())


def _tiny_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Project, Path]:
    """Source releases tiny==1.0 and tiny==2.0 (sdists on a file:// index), and a recipe
    `t` patching 1.0 and backporting tiny/m1.py from 2.0."""
    index = tmp_path / "index"
    shas = {v: _tiny_sdist(tmp_path, index, v) for v in ("1.0", "2.0")}
    files = [{"filename": f"tiny-{v}.tar.gz", "url": f"tiny-{v}.tar.gz", "hashes": {"sha256": sha}} for v, sha in shas.items()]
    (index / "tiny" / "index.json").write_text(json.dumps({"files": files}))
    monkeypatch.setenv("STACKBUILD_INDEX_URL", index.as_uri())
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    proj = Project(tmp_path / "proj")
    patch = "--- a/tiny/m0.py\n+++ b/tiny/m0.py\n@@ -1 +1 @@\n-# module 0 of 1.0\n+# module zero\n"
    rel = proj.add_patch("zero.patch", patch)
    proj.write_recipe("t", {"tiny": {"pypi": "tiny==1.0", "sha256": shas["1.0"]}},
                      [{"file": rel, "source": "tiny", "sha256": sha256(patch)},
                       {"backport": "tiny==2.0", "sha256": shas["2.0"], "files": ["tiny/m1.py"], "source": "tiny"}])
    return proj, tmp_path / "cache" / "bases" / f"{shas['1.0']}.git"


@pytest.mark.parametrize("how", ["truncated", "edited", "deleted", "index-garbage", "index-deleted", "replaced-by-link"])
def test_damaged_backport_cache_is_read_again_from_the_verified_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     how: str) -> None:
    proj, _base = _tiny_release(tmp_path, monkeypatch)
    recipe = load_recipe(proj.root / "recipes/t.toml")
    first = workspace.apply_recipe(recipe, tmp_path / "ws1")
    assert first.ok and first.manifest is not None
    genuine = (tmp_path / "ws1/tiny/tiny/m1.py").read_bytes()
    assert b"of 2.0" in genuine
    root = next((tmp_path / "cache" / "backports").iterdir())
    cached, index = root / "tiny" / "m1.py", root / workspace.BACKPORT_INDEX
    if how == "truncated":
        cached.write_bytes(genuine[:20])
    elif how == "edited":
        cached.write_bytes(genuine.replace(b"v1 = 1", b"v1 = 9"))
    elif how == "deleted":
        cached.unlink()
    elif how == "index-garbage":
        cached.write_bytes(b"evil = 1\n")
        index.write_text("[not json")
    elif how == "index-deleted":
        cached.write_bytes(b"evil = 1\n")
        index.unlink()
    elif how == "replaced-by-link":
        other = tmp_path / "other.py"
        other.write_bytes(b"evil = 1\n")
        cached.unlink()
        cached.symlink_to(other)
    second = workspace.apply_recipe(recipe, tmp_path / "ws2")
    assert second.ok and second.manifest is not None
    assert (tmp_path / "ws2/tiny/tiny/m1.py").read_bytes() == genuine
    assert second.manifest.patches[1].sha256 == first.manifest.patches[1].sha256
    assert cached.read_bytes() == genuine and not cached.is_symlink()


def _damage_pack(base: Path, how: str) -> None:
    packs = sorted((base / "objects" / "pack").glob("*.pack"))
    assert packs
    if how == "idx-missing":
        for p in (base / "objects" / "pack").glob("*.idx"):
            p.unlink()
    elif how == "pack-missing":
        for p in packs:
            p.unlink()
    elif how == "pack-bitflip":
        data = bytearray(packs[0].read_bytes())
        data[len(data) // 2] ^= 0xFF
        packs[0].chmod(0o644)
        packs[0].write_bytes(bytes(data))
    elif how == "pack-truncated":
        packs[0].chmod(0o644)
        packs[0].write_bytes(packs[0].read_bytes()[: packs[0].stat().st_size // 3])
    elif how == "objects-gone":
        shutil.rmtree(base / "objects")
        (base / "objects").mkdir()
    elif how == "ref-garbage":
        (base / "refs" / "heads" / "stackbuild").write_text("0" * 40 + "\n")


@pytest.mark.parametrize("how", ["idx-missing", "pack-missing", "pack-bitflip", "pack-truncated", "objects-gone", "ref-garbage"])
def test_damaged_base_repo_is_rebuilt_from_the_verified_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             how: str) -> None:
    proj, base = _tiny_release(tmp_path, monkeypatch)
    recipe = load_recipe(proj.root / "recipes/t.toml")
    first = workspace.apply_recipe(recipe, tmp_path / "ws1")
    assert first.ok and base.is_dir()
    expected = snapshot(tmp_path / "ws1" / "tiny")
    _damage_pack(base, how)
    said: list[str] = []
    second = workspace.apply_recipe(recipe, tmp_path / "ws2", progress=said.append)
    assert second.ok
    assert any("damaged" in m for m in said), said
    got = snapshot(tmp_path / "ws2" / "tiny")
    same = {k: v for k, v in got.items() if not k.startswith(".git/")}
    assert same == {k: v for k, v in expected.items() if not k.startswith(".git/")}
    assert second.manifest is not None and first.manifest is not None
    assert second.manifest.sources[0].head_commit == first.manifest.sources[0].head_commit
    fsck = subprocess.run(["git", "fsck", "--no-dangling"], cwd=tmp_path / "ws2" / "tiny", capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr
    # and a workspace made before the damage never shared its objects with the cache
    assert subprocess.run(["git", "fsck"], cwd=tmp_path / "ws1" / "tiny", capture_output=True).returncode == 0


def test_workspace_shares_no_inode_with_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proj, base = _tiny_release(tmp_path, monkeypatch)
    assert workspace.apply_recipe(load_recipe(proj.root / "recipes/t.toml"), tmp_path / "ws").ok
    cache_inodes = {(p.stat().st_dev, p.stat().st_ino) for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    ws_inodes = {(p.stat().st_dev, p.stat().st_ino) for p in (tmp_path / "ws").rglob("*") if p.is_file()}
    assert cache_inodes and not cache_inodes & ws_inodes


@needs_mounts
def test_tiny_release_with_a_read_only_cache_and_a_workdir_on_another_filesystem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proj, _base = _tiny_release(tmp_path, monkeypatch)
    assert workspace.apply_recipe(load_recipe(proj.root / "recipes/t.toml"), tmp_path / "ws1").ok  # fills the cache
    cache, other = tmp_path / "cache", tmp_path / "other"
    other.mkdir()
    setup = (f"mount --bind {cache} {cache} && mount -o remount,ro,bind {cache} && "
             f"mount -t tmpfs -o size=50m tmpfs {other}")
    env = dict(os.environ)
    script = (f"{setup} && {STACKBUILD} apply t --workdir {other / 'w'} && echo APPLIED && "
              f"test \"$(stat -c %d {other / 'w'})\" != \"$(stat -c %d {cache})\" && echo OTHER-FS && "
              f"! touch {cache}/x && echo CACHE-READ-ONLY")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=proj.root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split()[-3:] == ["APPLIED", "OTHER-FS", "CACHE-READ-ONLY"], r.stdout + r.stderr
    assert "stackbuild: error" not in r.stderr and "Traceback" not in r.stderr
    # an empty read-only cache: one clear error
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _in_ns(f"mount --bind {empty} {empty} && mount -o remount,ro,bind {empty}",
               ["apply", "t", "--workdir", str(tmp_path / "ws3")], proj.root, {**env, "STACKBUILD_CACHE": str(empty)})
    assert r.returncode == 2, r.stderr
    _one_clean_line(r.stderr, "read-only file system", "STACKBUILD_CACHE")


def test_ctrl_c_at_the_exchange_itself_is_reported_truly(proj: Project, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGINT arriving while the exchange runs: it is held until the swap is
    recorded, so the message matches what is on disk."""
    import signal

    assert main(["apply", "r"]) == 0
    exchange = workspace._exchange

    def sigint_then_exchange(a: Path, b: Path) -> bool:
        os.kill(os.getpid(), signal.SIGINT)
        return exchange(a, b)

    monkeypatch.setattr(workspace, "_exchange", sigint_then_exchange)
    capsys.readouterr()
    assert main(["apply", "--force", "r"]) == 130
    err = capsys.readouterr().err
    assert "swapped in" in err, err
    assert (proj.root / "work/r/manifest.json").is_file()
    monkeypatch.setattr(workspace, "_exchange", exchange)
    assert main(["apply", "r"]) == 0
    assert [p.name for p in (proj.root / "work").iterdir() if p.name.startswith(".r.")] == [".r.lock"]
