"""The environment check against real virtual environments made here, with tiny
distributions built locally (never from the index) and installed by pip."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from stackbuild.checks import CheckContext, CheckResult, CheckStatus
from stackbuild.checks.environment import read_locked_versions, run_environment
from stackbuild.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[2]
FORBID_REASON = "archived; left installed it silently changed benchmark results on vLLM 0.19"


def build_wheel(dest: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal valid wheel (purelib) for `name`, with the given package files."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    contents[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = "\n".join(record) + "\n"
    whl = dest / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for path, text in contents.items():
            zf.writestr(path, text)
    return whl


def make_venv(path: Path, wheels: list[Path], *, see_test_env: bool = False) -> Path:
    """A real venv (python -m venv) with the wheels installed by pip, offline.

    `see_test_env` lets it import the test environment's packages (the project venv,
    where the dev extras put CPU torch) after its own, through a .pth file. Never the
    base interpreter's site-packages: what is installed there by hand differs per machine.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    if see_test_env:
        own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
        Path(own, "zz-test-env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    if wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
             "--no-cache-dir", "--disable-pip-version-check", "-q", *map(str, wheels)],
            check=True,
        )
    return python


def write_recipe(root: Path, name: str, body: str) -> Recipe:
    (root / "recipes").mkdir(parents=True, exist_ok=True)
    (root / "patches").mkdir(exist_ok=True)
    (root / "recipes" / f"{name}.toml").write_text(f'name = "{name}"\n' + body)
    return load_recipe(name, root=root)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("envcheck")
    wheels = [
        build_wheel(d, "tinypkg", "1.0", {"tinypkg/__init__.py": "VERSION = '1.0'\n"}),
        build_wheel(d, "vllm", "0.19.0", {"vllm/__init__.py": "__version__ = '0.19.0'\n"}),
        build_wheel(d, "intel_extension_for_pytorch", "2.8.10", {"intel_extension_for_pytorch/__init__.py": ""}),
    ]
    return make_venv(d / "venv", wheels)


@pytest.fixture()
def neutral(tmp_path: Path) -> Path:
    d = tmp_path / "neutral"
    d.mkdir()
    return d


def _ctx(recipe: Recipe, python: Path | None, **options: object) -> CheckContext:
    return CheckContext(recipe=recipe, workspace=Path("/nonexistent"), python=python, options=dict(options))


def _fails(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.status is CheckStatus.FAIL]


def _by_subject(results: list[CheckResult], subject: str) -> CheckResult:
    return next(r for r in results if r.subject == subject)


PLAIN = 'platform = "b70"\n'
FORBIDDING = PLAIN + f"""
[environment.forbid]
intel_extension_for_pytorch = "{FORBID_REASON}"
intel-extension-for-pytorch = "{FORBID_REASON}"
"""


def test_matching_lockfile_passes(tmp_path: Path, venv: Path, neutral: Path) -> None:
    recipe = write_recipe(tmp_path, "env-ok", PLAIN)
    lock = tmp_path / "env-ok.txt"
    lock.write_text(
        "# stackbuild lockfile for recipe env-ok\n"
        "--index-url https://pypi.org/simple\n"
        "tinypkg==1.0 \\\n"
        "    --hash=sha256:" + "a" * 64 + " \\\n"
        "    --hash=sha256:" + "b" * 64 + "\n"
        "    # via recipe pins\n"
        "vllm==0.19.0  # the patched build\n"
        'pywin32==306 ; sys_platform == "win32"\n'
    )
    results = run_environment(_ctx(recipe, venv, lockfile=str(lock), cwd=str(neutral)))
    assert _fails(results) == []
    assert _by_subject(results, "versions").detail == f"2 packages match {lock}"
    assert _by_subject(results, "interpreter").status is CheckStatus.PASS
    imp = _by_subject(results, "vllm import")
    assert imp.status is CheckStatus.PASS
    assert "site-packages/vllm/__init__.py" in imp.detail


def test_version_mismatch_and_missing_package_fail(tmp_path: Path, venv: Path, neutral: Path) -> None:
    recipe = write_recipe(tmp_path, "env-bad", PLAIN)
    lock = tmp_path / "env-bad.txt"
    lock.write_text("tinypkg==2.0 \\\n    --hash=sha256:" + "a" * 64 + "\nabsentpkg==1.2.3\nvllm==0.19.0\n")
    results = run_environment(_ctx(recipe, venv, lockfile=str(lock), cwd=str(neutral)))
    fails = {r.subject: r.detail for r in _fails(results)}
    assert fails == {
        "tinypkg": f"tinypkg 1.0 is installed; {lock} line 1 wants 2.0",
        "absentpkg": f"absentpkg is not installed; {lock} line 3 wants 1.2.3",
    }
    assert not any(r.subject == "versions" for r in results)


def test_without_lockfile_the_recipe_pins_are_compared(tmp_path: Path, venv: Path, neutral: Path) -> None:
    recipe = write_recipe(tmp_path, "env-pins", PLAIN + '[pins]\ntinypkg = "==1.0"\nvllm = "==0.23.0"\nother = ">=1"\n')
    missing = tmp_path / "lockfiles" / "env-pins.txt"
    results = run_environment(_ctx(recipe, venv, lockfile=str(missing), cwd=str(neutral)))
    lock_note = _by_subject(results, "lockfile")
    assert lock_note.status is CheckStatus.SKIP
    assert f"no lockfile {missing}" in lock_note.detail and "compared the recipe's pins only" in lock_note.detail
    assert [(r.subject, r.detail) for r in _fails(results)] == [
        ("vllm", "vllm 0.19.0 is installed; recipe env-pins pins vllm==0.23.0 (pins.vllm)"),
        ("other", "other is not installed; recipe env-pins pins other>=1 (pins.other)"),
    ]


@pytest.fixture(scope="module")
def cpu_torch_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv (no system site-packages) with a CPU-like torch 2.13.0, the 0.1.16.2 kernels and
    transformers 5.5.0: tiny stand-ins with the real names and versions."""
    d = tmp_path_factory.mktemp("cputorch")
    wheels = [
        build_wheel(d, "torch", "2.13.0", {"torch/__init__.py": "__version__ = '2.13.0'\n"}),
        build_wheel(d, "triton-xpu", "3.6.0", {"triton/__init__.py": ""}),
        build_wheel(d, "vllm-xpu-kernels", "0.1.16.2", {"vllm_xpu_kernels/__init__.py": ""}),
        build_wheel(d, "transformers", "5.5.0", {"transformers/__init__.py": ""}),
        build_wheel(d, "tinypkg", "1.0", {"tinypkg/__init__.py": ""}),
    ]
    return make_venv(d / "venv", wheels)


def test_a_pin_the_lockfile_does_not_carry_is_still_checked(tmp_path: Path, cpu_torch_venv: Path,
                                                            neutral: Path) -> None:
    # the shipped recipe with the shipped lockfile: the lockfile body has no torch line
    recipe = load_recipe(REPO / "recipes" / "lunar-lake-moe.toml")
    lock = REPO / "lockfiles" / "lunar-lake-moe.txt"
    assert not any(v.name == "torch" for v in read_locked_versions(lock))
    results = run_environment(_ctx(recipe, cpu_torch_venv, lockfile=str(lock), cwd=str(neutral)))
    torch = [r for r in _fails(results) if r.subject == "torch"]
    assert [r.detail for r in torch] == [
        "torch 2.13.0 is installed; recipe lunar-lake-moe pins torch==2.10.0+xpu (pins.torch)"]
    kernels = [r.detail for r in _fails(results) if r.subject == "vllm-xpu-kernels"]
    assert kernels == ["vllm-xpu-kernels 0.1.16.2 is installed; recipe lunar-lake-moe pins "
                       "vllm-xpu-kernels==0.1.5 (pins.vllm-xpu-kernels)"]  # the version of the URL pin's wheel
    assert not [r for r in _fails(results) if r.subject in ("triton-xpu", "transformers")]


def test_pins_alone_a_cpu_torch_fails_and_the_xpu_build_passes(tmp_path: Path, cpu_torch_venv: Path,
                                                               neutral: Path) -> None:
    body = PLAIN + '[pins]\ntorch = { version = "==2.10.0+xpu", index = "https://download.pytorch.org/whl/xpu" }\n'
    recipe = write_recipe(tmp_path, "env-torch", body)
    lock = tmp_path / "env-torch.txt"
    lock.write_text("tinypkg==1.0\n")  # a lockfile that does not carry torch
    results = run_environment(_ctx(recipe, cpu_torch_venv, lockfile=str(lock), cwd=str(neutral)))
    assert [(r.subject, r.detail) for r in _fails(results)] == [
        ("torch", "torch 2.13.0 is installed; recipe env-torch pins torch==2.10.0+xpu (pins.torch)")]
    d = tmp_path / "xpu"
    d.mkdir()
    xpu = make_venv(d / "venv", [build_wheel(d, "torch", "2.10.0+xpu", {"torch/__init__.py": ""}),
                                 build_wheel(d, "tinypkg", "1.0", {"tinypkg/__init__.py": ""})])
    ok = run_environment(_ctx(recipe, xpu, lockfile=str(lock), cwd=str(neutral)))
    assert _fails(ok) == []
    assert _by_subject(ok, "versions").detail == f"1 packages match {lock}; 1 pins of recipe env-torch match"
    cpu_label = tmp_path / "cpu"
    cpu_label.mkdir()
    cpu = make_venv(cpu_label / "venv", [build_wheel(cpu_label, "torch", "2.10.0+cpu", {"torch/__init__.py": ""}),
                                         build_wheel(cpu_label, "tinypkg", "1.0", {"tinypkg/__init__.py": ""})])
    [bad] = _fails(run_environment(_ctx(recipe, cpu, lockfile=str(lock), cwd=str(neutral))))
    assert bad.detail == "torch 2.10.0+cpu is installed; recipe env-torch pins torch==2.10.0+xpu (pins.torch)"


def test_forbidden_package_fails_with_the_reason(tmp_path: Path, venv: Path, neutral: Path) -> None:
    recipe = write_recipe(tmp_path, "env-forbid", FORBIDDING)
    lock = tmp_path / "l.txt"
    lock.write_text("tinypkg==1.0\n")
    results = run_environment(_ctx(recipe, venv, lockfile=str(lock), cwd=str(neutral)))
    fails = _fails(results)
    assert len(fails) == 1  # the two spellings are one distribution
    assert fails[0].subject == "intel_extension_for_pytorch"
    assert "intel_extension_for_pytorch 2.8.10 is installed but forbidden" in fails[0].detail
    assert FORBID_REASON in fails[0].detail
    assert "pip uninstall intel_extension_for_pytorch" in fails[0].detail


def test_forbidden_package_absent_passes(tmp_path: Path, neutral: Path) -> None:
    recipe = write_recipe(tmp_path, "env-clean", FORBIDDING)
    python = make_venv(tmp_path / "clean", [])
    lock = tmp_path / "l.txt"
    lock.write_text("")
    results = run_environment(_ctx(recipe, python, lockfile=str(lock), cwd=str(neutral)))
    assert _fails(results) == []
    assert _by_subject(results, "intel_extension_for_pytorch").status is CheckStatus.PASS
    assert _by_subject(results, "vllm import").status_text == "skipped: vllm is not installed in the target"


def test_vllm_folder_in_cwd_shadows_the_installed_package(tmp_path: Path, venv: Path) -> None:
    recipe = write_recipe(tmp_path, "env-shadow", PLAIN)
    src = tmp_path / "checkout"
    (src / "vllm").mkdir(parents=True)
    (src / "vllm" / "__init__.py").write_text("")
    lock = tmp_path / "l.txt"
    lock.write_text("vllm==0.19.0\n")
    results = run_environment(_ctx(recipe, venv, lockfile=str(lock), cwd=str(src)))
    fails = _fails(results)
    assert [r.subject for r in fails] == ["vllm import"]
    assert f"a vllm/ folder in {src} shadows the installed package at" in fails[0].detail
    assert "site-packages/vllm/__init__.py" in fails[0].detail
    # a vllm folder without __init__.py is a namespace portion: the installed package wins
    (src / "vllm" / "__init__.py").unlink()
    results = run_environment(_ctx(recipe, venv, lockfile=str(lock), cwd=str(src)))
    assert _fails(results) == []


def test_python_outside_the_window_fails(tmp_path: Path, venv: Path, neutral: Path) -> None:
    recipe = write_recipe(tmp_path, "env-py", PLAIN + '[environment]\npython = ">=3.12,<3.13"\n')
    lock = tmp_path / "l.txt"
    lock.write_text("")
    results = run_environment(_ctx(recipe, venv, lockfile=str(lock), cwd=str(neutral)))
    fail = _by_subject(results, "interpreter")
    assert fail.status is CheckStatus.FAIL
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in fail.detail
    assert "outside the recipe's window >=3.12,<3.13" in fail.detail


def test_no_interpreter_skips_and_a_missing_one_fails(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "env-none", PLAIN)
    [skip] = run_environment(_ctx(recipe, None))
    assert skip.status is CheckStatus.SKIP and "--python" in skip.detail
    [fail] = run_environment(_ctx(recipe, tmp_path / "nope" / "python"))
    assert fail.status is CheckStatus.FAIL and "no such interpreter" in fail.detail


def test_lockfile_parsing(tmp_path: Path) -> None:
    lock = tmp_path / "x.txt"
    lock.write_text(
        "# header\n"
        "--extra-index-url https://example.invalid/simple\n"
        "\n"
        "Torch==2.10.0+xpu \\\n"
        "    --hash=sha256:" + "c" * 64 + "\n"
        "    # via\n"
        "    #   recipe pins\n"
        "vllm-xpu-kernels @ https://example.invalid/v0.1.5/vllm_xpu_kernels-0.1.5-cp38-abi3-manylinux_2_28_x86_64.whl \\\n"
        "    --hash=sha256:" + "d" * 64 + "\n"
        "zope.interface[test]==7.0 ; python_version >= \"3.9\"\n"
    )
    got = [(v.name, v.version, v.marker, v.line) for v in read_locked_versions(lock)]
    assert got == [
        ("torch", "2.10.0+xpu", None, 4),
        ("vllm-xpu-kernels", "0.1.5", None, 8),
        ("zope-interface", "7.0", 'python_version >= "3.9"', 10),
    ]
