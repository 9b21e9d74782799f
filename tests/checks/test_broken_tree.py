"""No check crashes on a broken tree: `stackbuild verify` on the shipped lunar-lake-moe
series applied to the real vLLM 0.19.0, with faults planted afterwards. A syntax error
or an unreadable file is a `compile` fail naming file:line; the other checks skip that
file with the reason; the exit code is 1 (a check failed), never 3."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_api_closure import MIRROR_015, make_wheel

from stackbuild.checks import CheckStatus
from stackbuild.checks import compile as compile_check
from stackbuild.checks import registry as registry_check

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "lunar-lake-moe.toml"
STACKBUILD = Path(sys.executable).parent / "stackbuild"
REGISTRY = "vllm/model_executor/models/registry.py"
# a kernel package with the API vLLM 0.19.0 and the series use (0.1.5's MoE function, flash attention)
KERNELS = {**MIRROR_015, "vllm_xpu_kernels/flash_attn_interface.py":
           "def flash_attn_varlen_func(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, **kwargs):\n    pass\n"}


@pytest.fixture
def broken_ws(lunar_lake_moe_ws, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """A private copy of the applied workspace, to break."""
    ws = tmp_path / "ws"
    shutil.copytree(lunar_lake_moe_ws.workdir, ws, symlinks=True)
    return ws


def _verify(ws: Path, tmp_path: Path, *extra: str, only: str = "compile,registry,imports,api",
            wheel: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`stackbuild verify` as a user runs it (the venv's entry point, a clean environment)."""
    wheel = wheel or make_wheel(tmp_path / "wheels", "0.1.5", KERNELS, ("_C", "_moe_C", "_xpu_C"))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "STACKBUILD_CACHE": str(tmp_path / "cache")}
    return subprocess.run([str(STACKBUILD), "verify", str(RECIPE), "--workdir", str(ws),
                           "--only", only, "--kernel-wheel", str(wheel), *extra],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def _insert_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(lineno - 1, text)
    path.write_text("".join(lines))


def test_a_syntax_error_in_the_registry_is_a_compile_fail_not_a_crash(broken_ws: Path, tmp_path: Path) -> None:
    tree = broken_ws / "vllm"
    last = len((tree / REGISTRY).read_text().splitlines())
    _insert_line(tree / REGISTRY, last + 1, "def broken(:\n")
    proc = _verify(broken_ws, tmp_path, only="compile,registry,imports")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "internal error" not in out
    assert f"{REGISTRY}:{last + 1}: SyntaxError" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].endswith("passed, 1 failed, 1 skipped")  # only that row fails
    assert "read by the registry check, not touched by the series" in proc.stdout
    assert "skipped: not checked:" in proc.stdout  # the registry row for Qwen3_5MoeForConditionalGeneration


def test_unreadable_files_and_missing_modules(broken_ws: Path, tmp_path: Path) -> None:
    tree = broken_ws / "vllm"
    moe = "vllm/model_executor/layers/fused_moe/xpu_int4_moe.py"  # touched: a dangling symlink now
    (tree / moe).unlink()
    (tree / moe).symlink_to(tree / "nowhere.py")
    layout = "vllm/model_executor/layers/quantization/utils/xpu_int4_layout.py"  # touched: a directory now
    (tree / layout).unlink()
    (tree / layout).mkdir()
    gptq = "vllm/model_executor/layers/quantization/gptq_marlin.py"  # touched: invalid UTF-8 at line 3
    _insert_line(tree / gptq, 3, "")
    data = (tree / gptq).read_bytes().split(b"\n")
    data[2] = b'BAD = "\xff\xfe"'
    (tree / gptq).write_bytes(b"\n".join(data))
    qwen = "vllm/model_executor/models/qwen3_5.py"  # the registered architecture's module: a syntax error
    _insert_line(tree / qwen, 12, "class (:\n")
    (tree / "vllm/model_executor/layers/fused_moe/fused_marlin_moe.py").unlink()  # awq_marlin imports it

    proc = _verify(broken_ws, tmp_path, "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    rows = {(r["check"], r["subject"]): r for r in report["results"]}

    def row(check: str, subject: str) -> tuple[str, str]:
        r = rows[(check, subject)]
        return r["status"], r["detail"]

    status, detail = row("compile", moe)
    assert status == "fail" and detail.startswith(f"{moe}: cannot read: dangling symlink")
    status, detail = row("compile", layout)
    assert status == "fail" and detail == f"{layout}: cannot read: a directory where a file is expected"
    status, detail = row("compile", gptq)
    assert status == "fail" and detail.startswith(f"{gptq}:3: SyntaxError") and "utf-8" in detail
    status, detail = row("compile", qwen)
    assert status == "fail" and detail.startswith(f"{qwen}:12: SyntaxError")
    assert "module of Qwen3_5MoeForConditionalGeneration (registry), not touched by the series" in detail

    for check in ("imports", "api"):
        status, detail = row(check, moe)
        assert status == "skipped" and "dangling symlink" in detail and "see the compile check" in detail
    status, detail = row("imports", gptq)
    assert status == "skipped" and f"{gptq}:3: SyntaxError" in detail
    status, detail = row("registry", "Qwen3_5MoeForConditionalGeneration")
    assert status == "skipped" and f"{qwen}:12: SyntaxError" in detail
    # a missing module is an ordinary fail of the import closure
    status, detail = row("imports", "vllm/model_executor/layers/quantization/awq_marlin.py")
    assert status == "fail" and "module vllm.model_executor.layers.fused_moe.fused_marlin_moe does not exist" in detail
    assert report["exit_code"] == 1


def test_checks_called_directly_on_a_broken_registry_do_not_raise(broken_ws: Path) -> None:
    # the library entry points too, not only the CLI's error handler
    from stackbuild.checks import CheckContext
    from stackbuild.manifest import read_manifest
    from stackbuild.recipe import load_recipe

    tree = broken_ws / "vllm"
    (tree / REGISTRY).write_bytes(b"\xff\xfe not python\n")
    manifest = read_manifest(broken_ws)
    assert manifest is not None
    ctx = CheckContext(recipe=load_recipe(RECIPE), workspace=broken_ws, touched=manifest.touched())
    [reg] = registry_check.run(ctx)
    assert reg.status is CheckStatus.SKIP and f"{REGISTRY}:1: SyntaxError" in reg.detail
    fails = [r for r in compile_check.run(ctx) if r.status is CheckStatus.FAIL]
    assert [r.subject for r in fails] == [REGISTRY]


@pytest.mark.network
@pytest.mark.slow
def test_a_syntax_error_in_a_kernel_using_file_with_the_real_kernel_wheel(broken_ws: Path, tmp_path: Path) -> None:
    from test_wheelarch import kernel_wheel

    moe = "vllm/model_executor/layers/fused_moe/xpu_int4_moe.py"
    last = len((broken_ws / "vllm" / moe).read_text().splitlines())
    _insert_line(broken_ws / "vllm" / moe, last + 1, "def broken(:\n")
    proc = _verify(broken_ws, tmp_path, "--json", wheel=kernel_wheel("0.1.3.1"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    fails = [(r["check"], r["subject"]) for r in report["results"] if r["status"] == "fail"]
    assert fails == [("compile", moe)]
    [api] = [r for r in report["results"] if r["check"] == "api" and r["subject"] == moe]
    assert api["status"] == "skipped" and f"{moe}:{last + 1}: SyntaxError" in api["detail"]
    others = [r for r in report["results"] if r["check"] == "api" and r["subject"] not in (moe, "vllm-xpu-kernels")]
    assert len(others) >= 5 and all(r["status"] == "pass" for r in others)
