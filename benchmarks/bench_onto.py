"""Onto benchmark (issue 16 item 5): one patch onto a vLLM 0.19.0 tree the user already
has, with stackbuild and with raw git in the same run.

The tree is a clean git checkout of the real 0.19.0 release (4,438 files). Measured,
best of 5 each, every one a real command line (process start included):
- raw: `git apply PATCH && git add -A && git commit` in the checkout (reset after);
- cached local source: `stackbuild apply RECIPE --force` of a recipe whose `kind local`
  source is that checkout, after a first apply filled the base cache (printed too);
- onto: `stackbuild apply RECIPE --onto CHECKOUT --branch ...` (one commit on a new
  branch; the checkout itself untouched);
- apply-patch: `stackbuild apply-patch PATCH --onto CHECKOUT` (the dry verdict).
Target: cached local source and onto within 3x raw. Exit 1 when a target is missed.

Then where the time goes, for each stackbuild row: the interpreter (`python -c pass`),
importing the CLI (typer included) and the command's modules (best of 15 each), and one
in-process run of the same command with every git process timed (fastest of 3): git's
share per subcommand, and what is left (our Python work).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fixtures import vllm_tree  # noqa: E402

from stackbuild.gitrun import GIT_ENV  # noqa: E402

TARGET = 3.0
RUNS = 5
STACKBUILD = [sys.executable, "-m", "stackbuild.cli"] if not (Path(sys.executable).parent / "stackbuild").exists() \
    else [str(Path(sys.executable).parent / "stackbuild")]


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, env={**os.environ, **GIT_ENV, **(env or {})}, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


# one in-process run of the CLI with every git process timed (argv[1:] is the command)
_TIMED_RUN = """
import json, subprocess, sys, time
import stackbuild.cli, stackbuild.onto, stackbuild.workspace
from stackbuild.gitrun import git_argv
skip = len(git_argv())
calls = []
real = subprocess.run
def timed(argv, *a, **k):
    t = time.perf_counter()
    try:
        return real(argv, *a, **k)
    finally:
        if argv and argv[0] == "git":
            calls.append((next((x for x in argv[skip:] if not x.startswith("-")), "?"), time.perf_counter() - t))
subprocess.run = timed
t0 = time.perf_counter()
rc = stackbuild.cli.main(sys.argv[1:])
print(json.dumps({"rc": rc, "run": time.perf_counter() - t0, "git": calls}), file=sys.stderr)
"""


def best(fn, runs: int = RUNS) -> float:  # type: ignore[no-untyped-def]
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-onto-"))
    try:
        co = work / "vllm"
        shutil.copytree(vllm_tree("0.19.0"), co, symlinks=True)
        sh(["git", "init", "-q", "-b", "main"], co)
        sh(["git", "add", "-A", "-f"], co)
        sh(["git", "commit", "-q", "-m", "vllm 0.19.0"], co)
        reg = co / "vllm/model_executor/models/registry.py"
        text = reg.read_text()
        reg.write_text(text.replace("_TEXT_GENERATION_MODELS = {", "# bench\n_TEXT_GENERATION_MODELS = {", 1))
        patch = work / "one.patch"
        patch.write_text(sh(["git", "diff"], co))
        sh(["git", "checkout", "-q", "--", "."], co)

        proj = work / "proj"
        (proj / "recipes").mkdir(parents=True)
        (proj / "patches").mkdir()
        shutil.copyfile(patch, proj / "patches/one.patch")
        sha = hashlib.sha256(patch.read_bytes()).hexdigest()
        recipe = proj / "recipes/onto-bench.toml"
        recipe.write_text(f'platform = "b70"\n\n[sources.vllm]\npath = "{co}"\n\n'
                          f'[[patches]]\nfile = "patches/one.patch"\nsource = "vllm"\nsha256 = "{sha}"\n')
        env = {"STACKBUILD_CACHE": str(work / "cache"), "STACKBUILD_ALLOW_DIRS": str(co)}

        def raw(_i: int) -> None:
            sh(["git", "apply", str(patch)], co)
            sh(["git", "add", "-A"], co)
            sh(["git", "commit", "-q", "-m", "one"], co)

        def raw_timed(i: int) -> float:
            t0 = time.perf_counter()
            raw(i)
            dt = time.perf_counter() - t0
            sh(["git", "reset", "-q", "--hard", "HEAD~1"], co)
            return dt

        t_raw = min(raw_timed(i) for i in range(RUNS))

        wd = work / "ws"
        t0 = time.perf_counter()
        sh([*STACKBUILD, "apply", str(recipe), "--workdir", str(wd)], proj, env)
        t_first = time.perf_counter() - t0
        t_cached = best(lambda _i: sh([*STACKBUILD, "apply", str(recipe), "--workdir", str(wd), "--force"], proj, env))
        t_onto = best(lambda i: sh([*STACKBUILD, "apply", str(recipe), "--onto", str(co), "--branch", f"bench/{i}"], proj, env))
        t_dry = best(lambda _i: sh([*STACKBUILD, "apply-patch", str(patch), "--onto", str(co)], proj, env))
        t_start = best(lambda _i: sh([*STACKBUILD, "--version"], proj, env))
        py = [sys.executable, "-c"]
        # start-up differences are a few ms: best of 3x as many runs, interleaved
        starts: dict[str, list[float]] = {}
        for _ in range(RUNS * 3):
            for key, code in (("pass", "pass"), ("cli", "import stackbuild.cli"),
                              ("onto", "import stackbuild.cli, stackbuild.onto"),
                              ("workspace", "import stackbuild.cli, stackbuild.workspace")):
                t0 = time.perf_counter()
                sh([*py, code], proj, env)
                starts.setdefault(key, []).append(time.perf_counter() - t0)
        t_py, t_cli = min(starts["pass"]), min(starts["cli"])
        t_mods = {m: min(starts[m]) for m in ("onto", "workspace")}
        timed = {
            "apply --force, cached local base": (["apply", str(recipe), "--workdir", str(wd), "--force"], "workspace"),
            "apply --onto (new branch)": (["apply", str(recipe), "--onto", str(co), "--branch", "bench/timed-{i}"], "onto"),
            "apply-patch --onto (dry verdict)": (["apply-patch", str(patch), "--onto", str(co)], "onto"),
        }
        breakdowns = {}
        for name, (args, mod) in timed.items():
            runs = []
            for i in range(3):
                r = subprocess.run([*py, _TIMED_RUN, *(a.format(i=i) for a in args)], cwd=proj, capture_output=True,
                                   text=True, env={**os.environ, **GIT_ENV, **env})
                runs.append(json.loads(r.stderr.strip().splitlines()[-1]))
                assert runs[-1]["rc"] == 0, r.stderr[-2000:]
            breakdowns[name] = (min(runs, key=lambda x: x["run"]), mod)
        assert sh(["git", "status", "--porcelain"], co) == "", "the checkout changed"

        print(f"vLLM 0.19.0 clean checkout, one patch; best of {RUNS}, wall clock, process start included")
        print(f"  raw git apply + add + commit:             {t_raw * 1000:7.0f} ms")
        print(f"  first apply of the local source (import): {t_first * 1000:7.0f} ms")
        rows = [("apply --force, cached local base", t_cached), ("apply --onto (new branch)", t_onto),
                ("apply-patch --onto (dry verdict)", t_dry)]
        missed = []
        for name, t in rows:
            ratio = t / t_raw
            ok = ratio <= TARGET
            print(f"  {name + ':':41} {t * 1000:7.0f} ms  {ratio:5.1f}x raw  (target <= {TARGET:.0f}x: {'ok' if ok else 'MISSED'})")
            if not ok:
                missed.append(name)
        print(f"  (stackbuild --version alone: {t_start * 1000:.0f} ms)")
        print("where the time goes (ms): interpreter start, imports (typer + CLI, then the command's modules),")
        print("  then one in-process run: git processes (count, total, by subcommand) and the rest (our Python)")
        for name, (run, mod) in breakdowns.items():
            git_total = sum(d for _c, d in run["git"])
            per: dict[str, float] = {}
            for c, d in run["git"]:
                per[c] = per.get(c, 0.0) + d
            top = ", ".join(f"{c} {d * 1000:.0f}" for c, d in sorted(per.items(), key=lambda x: -x[1])[:6])
            print(f"  {name}: interpreter {t_py * 1000:.0f}, imports {(t_cli - t_py) * 1000:.0f} + "
                  f"{(t_mods[mod] - t_cli) * 1000:.0f}, run {run['run'] * 1000:.0f} = git {git_total * 1000:.0f} "
                  f"in {len(run['git'])} processes ({top}) + Python {(run['run'] - git_total) * 1000:.0f}")
        return 1 if missed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
