"""The dynamic registry check against a real target environment: the patched vLLM
0.19.0 built as a pure-Python wheel, installed with its import-time dependencies
(transformers 5.5.0; the test environment's CPU torch 2.13.0 linked in) into a venv of its own,
no system packages."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fixtures
import pytest
import vllm_backport as vb

from stackbuild.checks import CheckStatus
from stackbuild.checks import registry as registry_check
from stackbuild.checks import transformers_support as ts

pytestmark = [pytest.mark.slow, pytest.mark.network]

# What importing 0.19.0's model registry and gemma4_mm on CPU needs (found by importing
# until nothing was missing), plus what building the wheel without isolation needs.
RUNTIME = ["transformers==5.5.0", "psutil", "pyzmq", "urllib3", "cbor2", "gguf",
           "aiohttp", "pillow", "einops", "pybase64", "cachetools"]
BUILD = ["setuptools>=77,<81", "setuptools-scm>=8", "wheel", "jinja2"]
ARCHS = ("Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration")


def _run(cmd: list[str], **kw: object) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


def _link_torch(venv: Path) -> None:
    """The venv imports the test environment's CPU torch 2.13.0 (the dev extras pin it)
    instead of a 750 MB copy in the test cache: a .pth names a folder of links to torch
    and the distributions it requires, nothing else of the test environment."""
    from importlib import metadata

    from packaging.requirements import Requirement

    links = venv / "torch-from-test-env"
    links.mkdir(exist_ok=True)
    todo, seen = ["torch"], set()
    while todo:
        dist = metadata.distribution(todo.pop())
        name = dist.metadata["Name"].lower()
        if name in seen:
            continue
        seen.add(name)
        for f in dist.files or ():
            top = f.parts[0]
            if top.endswith(".dist-info") or not top.startswith(("..", "__pycache__")):
                src = Path(str(dist.locate_file(top)))
                if src.exists() and not (links / top).exists():
                    (links / top).symlink_to(src)
        for req in dist.requires or ():
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "zz-torch-from-test-env.pth").write_text(f"{links}\n")


def target_venv() -> Path:
    """A venv with the runtime and build requirements, made once and cached."""
    key = hashlib.sha256("\n".join([sys.version, "torch-linked", *RUNTIME, *BUILD]).encode()).hexdigest()[:12]
    venv = fixtures.test_cache_dir() / "venvs" / f"vllm-0.19.0-cpu-{key}"
    if (venv / ".complete").exists():
        return venv
    tmp = venv.with_name(venv.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(venv)])  # venvs do not survive a rename: build in place
    _link_torch(venv)
    _run([str(venv / "bin/python"), "-m", "pip", "install", "-q", *RUNTIME, *BUILD])
    _run([str(venv / "bin/python"), "-c", "import torch; assert torch.__version__.startswith('2.13.0')"])
    (venv / ".complete").write_text("\n".join(RUNTIME + BUILD))
    return venv


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, float]]:
    """(workspace, target python, timings): the applied tree built and installed."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ws = tmp_path_factory.mktemp("verify-dynamic")
    out = vb.applied_tree(ws)
    if out is None:
        pytest.skip("the Gemma 4 patch series is not complete")
    venv = target_venv()
    python = venv / "bin/python"
    timings["venv"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    build = tmp_path_factory.mktemp("vllm-wheel")
    # the build writes build/ and *.egg-info: do it in a copy, not in the checked tree
    src = build / "src"
    shutil.copytree(ws / "vllm", src, symlinks=True)
    env = {**os.environ, "VLLM_TARGET_DEVICE": "empty", "VLLM_VERSION_OVERRIDE": "0.19.0"}
    _run([str(python), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".", "-w", str(build)],
         cwd=src, env=env)
    timings["wheel"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    [wheel] = build.glob("vllm-0.19.0-*.whl")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--force-reinstall", str(wheel)])
    timings["install"] = time.perf_counter() - t2
    return ws, python, timings


def test_gemma4_resolves_on_cpu_with_transformers_5_5_0(target: tuple[Path, Path, dict[str, float]]) -> None:
    ws, python, timings = target
    t0 = time.perf_counter()
    ctx = vb.context(ws, [], python=python, registry=ARCHS, model_types=("gemma4", "gemma4_unified"))
    by = {r.subject: r for r in registry_check.run_dynamic(ctx)}
    timings["check"] = time.perf_counter() - t0
    print("dynamic registry timings (s):", {k: round(v, 1) for k, v in timings.items()})
    g4 = by["Gemma4ForConditionalGeneration"]
    assert g4.status is CheckStatus.PASS, g4.detail
    assert g4.data["got"] == "vllm.model_executor.models.gemma4_mm.Gemma4ForConditionalGeneration"
    assert "transformers 5.5.0" in g4.detail
    assert by["model type gemma4"].status is CheckStatus.PASS
    # 5.5.0 predates gemma4_unified: both fail, naming what is missing
    assert by["model type gemma4_unified"].status is CheckStatus.FAIL
    unified = by["Gemma4UnifiedForConditionalGeneration"]
    assert unified.status is CheckStatus.FAIL
    assert "module 'transformers.models.gemma4_unified' is missing" in unified.detail


def test_unified_is_skipped_without_torchvision(target: tuple[Path, Path, dict[str, float]], tmp_path: Path) -> None:
    # the same environment with transformers 5.10.2 laid over it (a --target install
    # first on PYTHONPATH): gemma4_unified's processor imports torchvision, absent here
    ws, python, _ = target
    overlay = fixtures.test_cache_dir() / "overlays" / "transformers-5.10.2"
    if not (overlay / "transformers").is_dir():
        _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--target", str(overlay),
              str(ts.fetch_wheel("5.10.2"))])
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={overlay} exec {python} "$@"\n')
    wrapper.chmod(0o755)
    ctx = vb.context(ws, [], python=wrapper, registry=ARCHS, model_types=("gemma4_unified",))
    by = {r.subject: r for r in registry_check.run_dynamic(ctx)}
    assert by["model type gemma4_unified"].status is CheckStatus.PASS
    unified = by["Gemma4UnifiedForConditionalGeneration"]
    assert unified.status is CheckStatus.SKIP
    assert "needs torchvision" in unified.detail
    # in 5.10.2 the plain Gemma 4 image processor imports torchvision too (5.5.0's does
    # not), re-raised by transformers as a nameless ImportError: traced to its root
    g4 = by["Gemma4ForConditionalGeneration"]
    assert g4.status is CheckStatus.SKIP and "needs torchvision" in g4.detail


def test_a_missing_package_fails_naming_it(tmp_path: Path) -> None:
    # a bare venv: no transformers, no vLLM
    venv = tmp_path / "bare"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    ws = tmp_path / "ws"
    shutil.copytree(fixtures.vllm_tree("0.19.0") / "vllm/model_executor/models",
                    ws / "vllm/vllm/model_executor/models")
    ctx = vb.context(ws, [], python=venv / "bin/python", registry=("Gemma4ForConditionalGeneration",),
                     model_types=("gemma4",))
    mt, arch = registry_check.run_dynamic(ctx)
    assert mt.status is CheckStatus.FAIL and "module 'transformers' is missing" in mt.detail
    assert arch.status is CheckStatus.FAIL and "module 'vllm' is missing" in arch.detail
