"""The platform check: torch XPU in a real venv (CPU torch here: no Intel GPU), and
the kernel wheel read for the platform's IP version, synthetic and real."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_environment import build_wheel, make_venv, write_recipe
from test_wheelarch import fat_binary, host_so, kernel_wheel, spirv_container, zebin

from stackbuild.checks import CheckContext, CheckResult, CheckStatus
from stackbuild.checks.platform import check_devices, run_platform
from stackbuild.platforms import B70, LUNAR_LAKE
from stackbuild.recipe import Recipe


def _ctx(recipe: Recipe, python: Path | None, **options: object) -> CheckContext:
    return CheckContext(recipe=recipe, workspace=Path("/nonexistent"), python=python, options=dict(options))


def _one(results: list[CheckResult], subject: str) -> CheckResult:
    [r] = [r for r in results if r.subject == subject]
    return r


@pytest.fixture()
def no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "empty-cache"))


@pytest.fixture(scope="module")
def fake_kernels_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kernel wheel whose one .so carries BMG-G31 code and SPIR-V, nothing for LNL."""
    import base64
    import hashlib
    import zipfile

    d = tmp_path_factory.mktemp("kw")
    so = host_so([fat_binary({"64.20.2.0": zebin("20.2.0"), "generic_ir": spirv_container()})],
                 rodata=b"lnl\x0020.4.0\x00")
    whl = build_wheel(d, "vllm-xpu-kernels", "0.1.99", {"vllm_xpu_kernels/__init__.py": ""})
    # add the binary member (and its RECORD line) to the pure-Python wheel
    with zipfile.ZipFile(whl) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    record_name = next(n for n in members if n.endswith("RECORD"))
    digest = base64.urlsafe_b64encode(hashlib.sha256(so).digest()).rstrip(b"=").decode()
    members["vllm_xpu_kernels/_C.abi3.so"] = so
    members[record_name] += f"vllm_xpu_kernels/_C.abi3.so,sha256={digest},{len(so)}\n".encode()
    with zipfile.ZipFile(whl, "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)
    return whl


@pytest.fixture(scope="module")
def torch_venv(tmp_path_factory: pytest.TempPathFactory, fake_kernels_wheel: Path) -> Path:
    """A venv that sees the test environment's CPU torch, with the fake kernel wheel installed."""
    return make_venv(tmp_path_factory.mktemp("tv") / "venv", [fake_kernels_wheel], see_test_env=True)


def test_cpu_torch_skips_the_device_part_and_reads_installed_kernels(tmp_path: Path, torch_venv: Path) -> None:
    b70 = write_recipe(tmp_path, "p-b70", 'platform = "b70"\n')
    results = run_platform(_ctx(b70, torch_venv))
    assert _one(results, "torch").status is CheckStatus.PASS
    assert _one(results, "device").status_text == "skipped: no Intel GPU (torch.xpu.is_available() is False)"
    kern = _one(results, "vllm-xpu-kernels")
    assert kern.status is CheckStatus.PASS
    assert kern.detail == "vllm-xpu-kernels 0.1.99 carries device code for 20.2.0 (BMG-G31)"
    assert "site-packages/vllm_xpu_kernels" in kern.data["source"]


def test_kernels_without_the_platform_ip_fail_naming_what_they_carry(tmp_path: Path, torch_venv: Path) -> None:
    lnl = write_recipe(tmp_path, "p-lnl", 'platform = "lunar-lake"\n')
    kern = _one(run_platform(_ctx(lnl, torch_venv)), "vllm-xpu-kernels")
    assert kern.status is CheckStatus.FAIL
    assert kern.detail == (
        "vllm-xpu-kernels 0.1.99 has no device code for lunar-lake (20.4.0 (LNL)); it carries "
        "20.2.0 (BMG-G31); 1 object(s) also hold generic SPIR-V, compiled at first use if the driver can"
    )


def test_missing_torch_fails(tmp_path: Path, no_cache: None) -> None:
    recipe = write_recipe(tmp_path, "p-notorch", 'platform = "b70"\n')
    python = make_venv(tmp_path / "bare", [])
    results = run_platform(_ctx(recipe, python))
    torch = _one(results, "torch")
    assert torch.status is CheckStatus.FAIL
    assert "torch is not importable" in torch.detail and "ModuleNotFoundError" in torch.detail
    assert _one(results, "vllm-xpu-kernels").status is CheckStatus.SKIP


def test_wheel_from_the_lockfile_is_read_without_an_interpreter(
        tmp_path: Path, fake_kernels_wheel: Path, no_cache: None) -> None:
    recipe = write_recipe(tmp_path, "p-lock", 'platform = "b70"\n')
    lock = tmp_path / "p-lock.txt"
    lock.write_text(f"vllm-xpu-kernels @ file://{fake_kernels_wheel} \\\n    --hash=sha256:{'0' * 64}\n")
    results = run_platform(_ctx(recipe, None, lockfile=str(lock)))
    assert _one(results, "device").status is CheckStatus.SKIP
    kern = _one(results, "vllm-xpu-kernels")
    assert kern.status is CheckStatus.PASS and kern.data["source"] == str(fake_kernels_wheel)
    # nothing anywhere: skipped, with what was looked for
    lock.write_text("")
    kern = _one(run_platform(_ctx(recipe, None, lockfile=str(lock))), "vllm-xpu-kernels")
    assert kern.status is CheckStatus.SKIP and "no vllm-xpu-kernels to read" in kern.detail


def test_wheel_found_in_the_cache(tmp_path: Path, fake_kernels_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    dest = cache / "wheels" / "vllm-xpu-kernels" / "0.1.99"
    dest.mkdir(parents=True)
    (dest / fake_kernels_wheel.name).write_bytes(fake_kernels_wheel.read_bytes())
    monkeypatch.setenv("STACKBUILD_CACHE", str(cache))
    recipe = write_recipe(tmp_path, "p-cache", 'platform = "b70"\n[pins]\nvllm-xpu-kernels = "==0.1.99"\n')
    kern = _one(run_platform(_ctx(recipe, None, lockfile=str(tmp_path / "none.txt"))), "vllm-xpu-kernels")
    assert kern.status is CheckStatus.PASS
    assert kern.data["source"] == str(dest / fake_kernels_wheel.name)


def test_device_names_and_count() -> None:
    """The comparison applied to what torch.xpu reports (no GPU here to ask)."""
    info = {"executable": "py", "torch": "2.10.0+xpu", "xpu_available": True,
            "devices": ["Intel(R) Arc(TM) Pro B70 Graphics"] * 4}
    assert all(r.status is CheckStatus.PASS for r in check_devices(B70, info))
    info["devices"] = ["Intel(R) Arc(TM) Pro B70 Graphics", "Intel(R) Arc(TM) B580 Graphics"]
    results = check_devices(B70, info)
    assert _one(results, "xpu:1").status is CheckStatus.FAIL
    assert "'Intel(R) Arc(TM) B580 Graphics'; the recipe's platform b70 is" in _one(results, "xpu:1").detail
    count = _one(results, "device count")
    assert count.status is CheckStatus.FAIL and count.detail.startswith("2 device(s); platform b70 runs on 4")
    lnl = check_devices(LUNAR_LAKE, {"executable": "py", "torch": "x", "xpu_available": True,
                                     "devices": ["Intel(R) Arc(TM) 140V GPU (16GB)"]})
    assert [r.status for r in lnl] == [CheckStatus.PASS, CheckStatus.PASS]


@pytest.mark.network
@pytest.mark.slow
def test_real_kernel_wheel_for_b70_and_lunar_lake(tmp_path: Path) -> None:
    wheel = kernel_wheel("0.1.3.1")
    b70 = write_recipe(tmp_path, "r-b70", 'platform = "b70"\n')
    lnl = write_recipe(tmp_path, "r-lnl", 'platform = "lunar-lake"\n')
    ok = _one(run_platform(_ctx(b70, None, kernel_wheel=str(wheel))), "vllm-xpu-kernels")
    assert ok.status is CheckStatus.PASS
    assert ok.detail == "vllm-xpu-kernels 0.1.3.1 carries device code for 20.2.0 (BMG-G31)"
    bad = _one(run_platform(_ctx(lnl, None, kernel_wheel=str(wheel))), "vllm-xpu-kernels")
    assert bad.status is CheckStatus.FAIL
    assert bad.detail.startswith(
        "vllm-xpu-kernels 0.1.3.1 has no device code for lunar-lake (20.4.0 (LNL)); it carries "
        "12.60.7 (PVC), 20.1.0 (BMG-G21), 20.2.0 (BMG-G31); 8 object(s) also hold generic SPIR-V"
    )
