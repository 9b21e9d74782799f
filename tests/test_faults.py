"""Fault injection: a real `stackbuild apply` subprocess killed (as `kill -9` would)
at every step of a rebuild, including between the steps of the swap, and at random
moments. After each kill the workspace path must hold a complete workspace, old or
new, and the next plain apply must succeed and leave no litter."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_workspace import Project, sha256

BIN = Path(sys.executable).parent
STACKBUILD = str(BIN / "stackbuild")

# every fault point of workspace._build/_swap, in the order a rebuild reaches them
POINTS = ("staging-created", "materialised", "patched", "manifest-written", "swap-before",
          "swap-exchanged", "swap-renamed-old", "swap-removing-old")


def _files(n: int, tag: str) -> dict[str, str]:
    return {f"pkg/m{i:03d}.py": f"# {tag} module {i}\n" + "".join(f"x{j} = {j}\n" for j in range(40)) for i in range(n)}


def _patch(rel: str, old: str, new: str) -> str:
    return f"--- a/{rel}\n+++ b/{rel}\n@@ -1 +1 @@\n-{old}\n+{new}\n"


@pytest.fixture
def two_states(tmp_path: Path) -> tuple[Project, dict[str, str], Path]:
    """Recipes `ra` (one patch) and `rb` (two patches) on one local source, to be
    applied alternately into one workdir."""
    proj = Project(tmp_path / "proj")
    tree = proj.add_tree("pkg", _files(300, "upstream"))
    p1 = _patch("pkg/m000.py", "# upstream module 0", "# patched module 0")
    p2 = _patch("pkg/m299.py", "# upstream module 299", "# patched module 299")
    r1, r2 = proj.add_patch("one.patch", p1), proj.add_patch("two.patch", p2)
    e1 = {"file": r1, "source": "pkg", "sha256": sha256(p1)}
    e2 = {"file": r2, "source": "pkg", "sha256": sha256(p2)}
    proj.write_recipe("ra", {"pkg": {"path": str(tree)}}, [e1])
    proj.write_recipe("rb", {"pkg": {"path": str(tree)}}, [e1, e2])
    env = {**os.environ, "STACKBUILD_CACHE": str(tmp_path / "cache"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("STACKBUILD_FAULT_POINT", None)
    return proj, env, tmp_path / "ws" / "w"


def _run(proj: Project, env: dict[str, str], recipe: str, workdir: Path, fault: str | None = None,
         argv: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    e = dict(env)
    if fault:
        e["STACKBUILD_FAULT_POINT"] = fault
    cmd = argv or [STACKBUILD]
    return subprocess.run([*cmd, "apply", recipe, "--workdir", str(workdir)], cwd=proj.root, env=e,
                          capture_output=True, text=True, timeout=120)


def state(workdir: Path) -> tuple[str, dict[str, str], str] | None:
    """(inputs digest, content hash of every file outside .git, HEAD) of a complete,
    clean workspace; None when the path is empty. Fails on anything in between."""
    if not os.path.lexists(workdir):
        return None
    manifest = json.loads((workdir / "manifest.json").read_text())
    files: dict[str, str] = {}
    for dirpath, dirs, names in os.walk(workdir):
        dirs[:] = [d for d in dirs if d != ".git"]
        for n in names:
            p = Path(dirpath) / n
            rel = str(p.relative_to(workdir))
            if rel != "manifest.json":
                files[rel] = sha256(p.read_bytes())
    tree = workdir / "pkg"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True, check=True).stdout.strip()
    assert head == manifest["sources"][0]["head_commit"]
    fsck = subprocess.run(["git", "fsck", "--no-dangling"], cwd=tree, capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr
    status = subprocess.run(["git", "status", "--porcelain"], cwd=tree, capture_output=True, text=True, check=True)
    assert status.stdout == ""
    return manifest["inputs_sha256"], files, head


def litter(workdir: Path) -> list[str]:
    return sorted(p.name for p in workdir.parent.iterdir() if p.name.startswith(f".{workdir.name}.") and not p.name.endswith(".lock"))


def _reference_states(proj: Project, env: dict[str, str], workdir: Path) -> tuple[object, object]:
    assert _run(proj, env, "rb", workdir).returncode == 0
    b = state(workdir)
    r = _run(proj, env, "ra", workdir)
    assert r.returncode == 0, r.stderr
    a = state(workdir)
    assert a != b and a is not None and b is not None
    return a, b


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_each_step_leaves_old_or_new_and_the_next_run_recovers(
        two_states: tuple[Project, dict[str, str], Path], point: str) -> None:
    proj, env, workdir = two_states
    a, b = _reference_states(proj, env, workdir)
    killed = _run(proj, env, "rb", workdir, fault=point)
    assert killed.returncode == 137, killed.stderr
    after = state(workdir)
    assert after in (a, b)
    # the swap is the line: before it the old workspace, from the exchange on the new one
    assert after == (b if POINTS.index(point) >= POINTS.index("swap-exchanged") else a)
    again = _run(proj, env, "rb", workdir)
    assert again.returncode == 0, again.stderr
    assert state(workdir) == b
    assert litter(workdir) == []
    assert "Traceback" not in again.stderr


def test_kill_between_the_renames_of_the_fallback_swap_is_repaired(
        two_states: tuple[Project, dict[str, str], Path]) -> None:
    """Without renameat2 the swap is two renames; a kill between them leaves the path
    empty for a moment, and the next run puts the old workspace back first."""
    proj, env, workdir = two_states
    a, _b = _reference_states(proj, env, workdir)
    no_exchange = [sys.executable, "-c",
                   "import sys; import stackbuild.workspace as w; w._exchange = lambda a, b: False; "
                   "from stackbuild.launch import main; sys.argv = ['stackbuild', *sys.argv[1:]]; sys.exit(main())"]
    killed = _run(proj, env, "rb", workdir, fault="swap-between-renames", argv=no_exchange)
    assert killed.returncode == 137
    assert state(workdir) is None and len(litter(workdir)) == 2  # the old tree and the staged new one
    back = _run(proj, env, "ra", workdir)
    assert back.returncode == 0, back.stderr
    assert "restored" in back.stderr and "unchanged" in back.stdout  # the old workspace, intact
    assert state(workdir) == a and litter(workdir) == []


@pytest.mark.slow
def test_sigkill_at_random_moments_over_repeated_runs(two_states: tuple[Project, dict[str, str], Path]) -> None:
    proj, env, workdir = two_states
    a, b = _reference_states(proj, env, workdir)
    t0 = time.monotonic()
    assert _run(proj, env, "rb", workdir).returncode == 0
    full = time.monotonic() - t0
    rng = random.Random(13)
    seen = {"old": 0, "new": 0}
    for i in range(16):
        target, other = ("rb", a) if i % 2 == 0 else ("ra", b)
        # start from the other state, then kill a rebuild towards `target`
        assert _run(proj, env, "ra" if target == "rb" else "rb", workdir).returncode == 0
        before = state(workdir)
        assert before == other
        e = dict(env)
        proc = subprocess.Popen([STACKBUILD, "apply", target, "--workdir", str(workdir)], cwd=proj.root, env=e,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(0.3, 1.0) * full)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        after = state(workdir)
        assert after in (a, b)
        seen["old" if after == other else "new"] += 1
    r = _run(proj, env, "rb", workdir)
    assert r.returncode == 0 and state(workdir) == b
    assert litter(workdir) == []
    assert seen["old"] + seen["new"] == 16
    print(f"random kills: {seen['old']} left the old workspace, {seen['new']} the new one")


@pytest.mark.network  # the real vLLM sdists (cached once under STACKBUILD_TEST_CACHE)
@pytest.mark.slow
def test_real_vllm_release_killed_around_the_swap(tmp_path: Path) -> None:
    """vLLM 0.19.0 (4,400 files): killed while materialising, at the exchange and while
    the old tree is deleted; then at random moments. Old or new, never in between."""
    import fixtures

    cache = fixtures.seed_cache(tmp_path / "cache", ("0.19.0",))
    sha_19 = fixtures.VLLM_SDISTS["0.19.0"]
    proj = Project(tmp_path / "proj")
    p1 = "diff --git a/NOTES b/NOTES\nnew file mode 100644\n--- /dev/null\n+++ b/NOTES\n@@ -0,0 +1 @@\n+ours\n"
    p2 = "diff --git a/NOTES2 b/NOTES2\nnew file mode 100644\n--- /dev/null\n+++ b/NOTES2\n@@ -0,0 +1 @@\n+more\n"
    e1 = {"file": proj.add_patch("one.patch", p1), "source": "vllm", "sha256": sha256(p1)}
    e2 = {"file": proj.add_patch("two.patch", p2), "source": "vllm", "sha256": sha256(p2)}
    src = {"vllm": {"pypi": "vllm==0.19.0", "sha256": sha_19}}
    proj.write_recipe("ra", src, [e1])
    proj.write_recipe("rb", src, [e1, e2])
    env = {**os.environ, "STACKBUILD_CACHE": str(cache), "STACKBUILD_INDEX_URL": "http://127.0.0.1:9/simple"}
    env.pop("STACKBUILD_FAULT_POINT", None)
    workdir = tmp_path / "ws" / "w"

    def vstate() -> tuple[str, str] | None:
        if not os.path.lexists(workdir):
            return None
        manifest = json.loads((workdir / "manifest.json").read_text())
        tree = workdir / "vllm"
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True, check=True).stdout.strip()
        assert head == manifest["sources"][0]["head_commit"]
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=tree,
                                capture_output=True, text=True, check=True)
        assert status.stdout == ""  # every tracked file is there with its committed content
        return manifest["inputs_sha256"], head

    def run(recipe: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
        e = {**env, **({"STACKBUILD_FAULT_POINT": fault} if fault else {})}
        return subprocess.run([STACKBUILD, "apply", recipe, "--workdir", str(workdir)], cwd=proj.root, env=e,
                              capture_output=True, text=True, timeout=600)

    assert run("rb").returncode == 0
    b = vstate()
    assert run("ra").returncode == 0
    a = vstate()
    for point, expect in (("materialised", a), ("swap-exchanged", b), ("swap-removing-old", b)):
        assert run("ra").returncode == 0 and vstate() == a
        assert run("rb", point).returncode == 137
        assert vstate() == expect
    rng = random.Random(7)
    assert run("ra").returncode == 0
    t0 = time.monotonic()
    assert run("rb").returncode == 0  # a full rebuild, to spread the kills over
    full = time.monotonic() - t0
    for _ in range(4):
        target = "ra" if vstate() == b else "rb"  # always a rebuild
        proc = subprocess.Popen([STACKBUILD, "apply", target, "--workdir", str(workdir)], cwd=proj.root, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(0.4, 1.2) * full)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert vstate() in (a, b)
    assert run("rb").returncode == 0 and vstate() == b
    assert litter(workdir) == []
