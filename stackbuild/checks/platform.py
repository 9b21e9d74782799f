"""Platform check: the target's GPU is the recipe's platform, and the kernel wheel
carries device code for it.

Device part (needs --python): torch imports, torch.xpu sees devices, their names
match the platform (B70: BMG-G31, Lunar Lake: LNL), and there are as many as the
platform runs on. Without an Intel GPU this part is skipped, not failed.

Kernel part (no GPU needed): the vllm-xpu-kernels installed in the target, or else
its wheel (`ctx.options["kernel_wheel"]`, a file named in the lockfile, or one in the
stackbuild cache), is read with `stackbuild.wheelarch` for native code for the
platform's IP version (B70 20.2.0, Lunar Lake 20.4.0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from stackbuild.cache import cache_dir
from stackbuild.checks import CheckContext, CheckResult, CheckStatus
from stackbuild.checks.environment import default_lockfile, read_locked_versions
from stackbuild.checks.probe import run_probe
from stackbuild.errors import StackbuildError
from stackbuild.platforms import Platform
from stackbuild.recipe import Recipe
from stackbuild.wheelarch import WheelArchReport, ip_label, read_package_archs, read_wheel_archs

CHECK = "platform"
KERNELS = "vllm-xpu-kernels"
KERNELS_MODULE = "vllm_xpu_kernels"
PROBE_TIMEOUT_S = 300

# Runs in the target interpreter. vllm_xpu_kernels is located, never imported: its
# native ops need the XPU runtime, and the question here is what it was built for.
PROBE = r"""
import importlib.metadata as md, importlib.util, json, sys
out = {"executable": sys.executable}
try:
    spec = importlib.util.find_spec("vllm_xpu_kernels")
    out["kernels_dir"] = list(spec.submodule_search_locations or [])[0] if spec else None
except Exception as e:
    out["kernels_dir"] = None
try:
    out["kernels_version"] = md.version("vllm-xpu-kernels")
except md.PackageNotFoundError:
    out["kernels_version"] = None
try:
    import torch
    out["torch"] = torch.__version__
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
else:
    xpu = getattr(torch, "xpu", None)
    try:
        out["xpu_available"] = bool(xpu is not None and xpu.is_available())
    except Exception as e:
        out["xpu_available"] = False
        out["xpu_error"] = f"{type(e).__name__}: {e}"
    if out["xpu_available"]:
        n = xpu.device_count()
        out["devices"] = [xpu.get_device_name(i) for i in range(n)]
print(json.dumps(out))
"""


def probe_torch(python: Path) -> dict[str, Any]:
    return run_probe(python, PROBE, timeout=PROBE_TIMEOUT_S)


def device_matches(platform: Platform, name: str) -> bool:
    text = name.lower()
    return any(p.lower() in text for p in (*platform.device_name_patterns, platform.gpu_codename))


def check_devices(platform: Platform, info: dict[str, Any]) -> list[CheckResult]:
    if "torch_error" in info:
        return [CheckResult(CHECK, CheckStatus.FAIL, f"torch is not importable in {info['executable']}: "
                            f"{info['torch_error']}", subject="torch")]
    results = [CheckResult(CHECK, CheckStatus.PASS, f"torch {info['torch']}", subject="torch")]
    if not info.get("xpu_available"):
        why = f" ({info['xpu_error']})" if info.get("xpu_error") else ""
        results.append(CheckResult(CHECK, CheckStatus.SKIP,
                                   f"no Intel GPU (torch.xpu.is_available() is False){why}", subject="device"))
        return results
    devices: list[str] = info.get("devices", [])
    wanted = f"{platform.product}: {platform.gpu_codename}, names containing " + \
        " / ".join(platform.device_name_patterns)
    for i, name in enumerate(devices):
        ok = device_matches(platform, name)
        results.append(CheckResult(
            CHECK, CheckStatus.PASS if ok else CheckStatus.FAIL,
            f"xpu:{i} is {name!r}" + ("" if ok else f"; the recipe's platform {platform.name} is {wanted}"),
            subject=f"xpu:{i}", data={"name": name},
        ))
    if platform.device_count > 1 or not devices:
        ok = len(devices) >= platform.device_count
        results.append(CheckResult(
            CHECK, CheckStatus.PASS if ok else CheckStatus.FAIL,
            f"{len(devices)} device(s); platform {platform.name} runs on {platform.device_count}"
            + ("" if ok else f" (tensor parallel {platform.tensor_parallel})"),
            subject="device count", data={"found": len(devices), "expected": platform.device_count},
        ))
    return results


# ---------------------------------------------------------------- kernel wheel


def _locked_kernel_wheel(recipe: Recipe, lockfile: Path) -> tuple[Path | None, str | None]:
    """A local kernel wheel named by the lockfile or recipe pin, and the wanted version."""
    urls: list[str] = []
    version = None
    if lockfile.exists():
        for v in read_locked_versions(lockfile):
            if v.name == KERNELS:
                version = v.version
                if " @ " in v.requirement:
                    urls.append(v.requirement.split(" @ ", 1)[1].split(";")[0].strip())
    pin = recipe.pin(KERNELS)
    if pin is not None:
        if pin.url:
            urls.append(pin.url)
        elif version is None and pin.spec.startswith("=="):
            version = pin.spec[2:].strip()
    for url in urls:
        parsed = urlparse(url)
        name = unquote(Path(parsed.path).name)
        if version is None and name.endswith(".whl") and len(name.split("-")) >= 5:
            version = name.split("-")[1]
        if parsed.scheme in ("", "file") and Path(unquote(parsed.path)).is_file():
            return Path(unquote(parsed.path)), version
    return None, version


def _cached_kernel_wheel(version: str | None) -> Path | None:
    root = cache_dir()
    pattern = f"vllm_xpu_kernels-{version}-*.whl" if version else "vllm_xpu_kernels-*.whl"
    found = sorted([*(root / "wheels" / KERNELS).glob(f"*/{pattern}"), *(root / "builds").glob(f"*/{pattern}")])
    return found[-1] if found else None


def find_kernels(ctx: CheckContext, info: dict[str, Any] | None) -> tuple[str, Path | None]:
    """Where the kernel code to check is: ("installed"|"wheel", path) or ("", None)."""
    given = ctx.options.get("kernel_wheel")
    if given:
        return "wheel", Path(given)
    if info and info.get("kernels_dir"):
        return "installed", Path(info["kernels_dir"])
    lockfile = Path(ctx.options.get("lockfile") or default_lockfile(ctx.recipe))
    wheel, version = _locked_kernel_wheel(ctx.recipe, lockfile)
    if wheel is None:
        wheel = _cached_kernel_wheel(version)
    return ("wheel", wheel) if wheel else ("", None)


def check_kernel_archs(platform: Platform, report: WheelArchReport) -> CheckResult:
    target = platform.ip_version
    data = report.to_dict()
    spirv = sum(1 for o in report.objects if o.spirv_images)
    if report.carries(target):
        without = report.objects_without(target)
        extra = f"; {len(without)} object(s) hold code for other GPUs only: {', '.join(without)}" if without else ""
        return CheckResult(CHECK, CheckStatus.PASS,
                           f"{report.project} {report.version} carries device code for {ip_label(target)}{extra}",
                           subject=KERNELS, data=data)
    carried = ", ".join(ip_label(ip) for ip in report.ip_versions) or "no native device code"
    jit = (f"; {spirv} object(s) also hold generic SPIR-V, compiled at first use if the driver can"
           if spirv else "")
    return CheckResult(
        CHECK, CheckStatus.FAIL,
        f"{report.project} {report.version} has no device code for {platform.name} "
        f"({ip_label(target)}); it carries {carried}{jit}",
        subject=KERNELS, data=data,
    )


def run_platform(ctx: CheckContext) -> list[CheckResult]:
    platform = ctx.recipe.platform
    results: list[CheckResult] = []
    info: dict[str, Any] | None = None
    if ctx.python is None:
        results.append(CheckResult(CHECK, CheckStatus.SKIP,
                                   "no target interpreter (give --python) for the device check", subject="device"))
    else:
        try:
            info = probe_torch(ctx.python)
        except StackbuildError as e:
            results.append(CheckResult(CHECK, CheckStatus.FAIL, e.render(), subject=str(ctx.python)))
        else:
            results += check_devices(platform, info)
    kind, where = find_kernels(ctx, info)
    if where is None:
        results.append(CheckResult(CHECK, CheckStatus.SKIP,
                                   f"no {KERNELS} to read (not installed in the target, no local wheel named by "
                                   "the lockfile or recipe, none in the stackbuild cache)", subject=KERNELS))
        return results
    try:
        if kind == "installed":
            report = read_package_archs(where, KERNELS, (info or {}).get("kernels_version") or "")
        else:
            report = read_wheel_archs(where)
    except StackbuildError as e:
        results.append(CheckResult(CHECK, CheckStatus.FAIL, e.render(), subject=KERNELS))
        return results
    results.append(check_kernel_archs(platform, report))
    return results
