"""API closure: imports from and keyword calls into vllm_xpu_kernels resolve in the
pinned kernel release, read from its wheel. Tiny wheels built here for the rules, the
real wheels from the package index for the shipped series on a real vLLM 0.19.0."""

from __future__ import annotations

import dataclasses
import os
import shutil
import textwrap
import zipfile
from pathlib import Path

import pytest

from stackbuild.checks import CheckContext, CheckResult, CheckStatus, api_closure
from stackbuild.checks.api_closure import check_tree
from stackbuild.checks.wheel_api import WheelAPI
from stackbuild.recipe import Pin, load_recipe

REPO = Path(__file__).resolve().parents[2]

# A kernel package shaped like 0.1.16: the class API, no xpu_fused_moe function.
KERNEL_016 = {
    "vllm_xpu_kernels/__init__.py": "from .flash_attn_interface import flash_attn_varlen_func  # noqa\n",
    "vllm_xpu_kernels/flash_attn_interface.py": "def flash_attn_varlen_func(q, k, v, *, causal=False, out=None):\n    pass\n",
    "vllm_xpu_kernels/fused_moe_interface.py": textwrap.dedent("""\
        import torch

        class XpuFusedMoe:
            def __init__(self, w13, w13_scales, w2, w2_scales, n_experts_per_token, ep_rank=0, ep_size=1):
                self.w13 = w13

            def apply(self, output, hidden_states, topk_weights, topk_ids, expert_map=None):
                pass

            @staticmethod
            def plan(num_tokens, *, block=64):
                pass

        class Child(XpuFusedMoe):
            pass

        class Plain:
            pass
        """),
}
# ... and shaped like 0.1.5: the function API with is_int4.
KERNEL_015 = {
    "vllm_xpu_kernels/__init__.py": "",
    "vllm_xpu_kernels/fused_moe_interface.py": textwrap.dedent("""\
        def xpu_fused_moe(hidden_states, w13, w13_scales, w2, w2_scales, topk_weights, topk_ids,
                          n_experts_per_token, ep_rank=0, ep_size=1, output=None, is_int4=False):
            pass
        """),
}

# The signature 0.1.3.1 (on the index) and the 0.1.4/0.1.5 GitHub releases share.
MIRROR_015 = {
    "vllm_xpu_kernels/__init__.py": "",
    "vllm_xpu_kernels/fused_moe_interface.py": textwrap.dedent("""\
        def xpu_fused_moe(hidden_states, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, topk_weights,
                          topk_ids, n_experts_per_token, activation, num_experts, ep_rank=0, ep_size=1,
                          output=None, is_fp8=False, is_int4=False, is_mxfp4=False):
            pass
        """),
}


def seed_kernel_wheel(cache: Path, version: str) -> Path:
    """The real index wheel of `version` (downloaded once into the test cache) placed in
    a stackbuild cache where the check's fetch finds it, as after a first download."""
    from test_wheelarch import kernel_wheel

    src = kernel_wheel(version)
    dest = cache / "wheels" / "vllm-xpu-kernels" / version / src.name
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
    return dest


def make_wheel(dest: Path, version: str, files: dict[str, str], extensions: tuple[str, ...] = ("_C",),
               ops: dict[str, list[str]] | None = None) -> Path:
    """A wheel of vllm-xpu-kernels holding these Python files and extension modules
    (`ops`: extension -> operator schema strings its .so holds, as torch registers them)."""
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"vllm_xpu_kernels-{version}-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        for ext in extensions:
            schemas = b"".join(b"\0" + schema.encode() for schema in (ops or {}).get(ext, []))
            z.writestr(f"vllm_xpu_kernels/{ext}.abi3.so", b"\x7fELF\0\0garbage) -> x" + schemas + b"\0tail")
        z.writestr(f"vllm_xpu_kernels-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: vllm-xpu-kernels\nVersion: {version}\n")
    return wheel


XPU_OPS = {"_xpu_C": [
    "int4_gemm_w4a16(Tensor A, Tensor B, Tensor? bias, Tensor B_scale, Tensor B_zp, int group_size, "
    "Tensor? g_idx) -> Tensor",
    "fp8_gemm_out(Tensor(a!) out, Tensor A, Tensor B, ScalarType? out_dtype, Tensor? A_scale_, Tensor? B_scale_, "
    "Tensor? bias_) -> Tensor",
    "scaled(Tensor x, *, float scale=1.0) -> Tensor",
]}


def check(tmp_path: Path, code: str, files: dict[str, str] = KERNEL_016, version: str = "0.1.16.2",
          extra: dict[str, str] | None = None) -> CheckResult:
    """Run the check on one file `pkg/mod.py` holding `code` (touched by the series)."""
    api = WheelAPI(make_wheel(tmp_path / "wheels", version, files, ("_C", "_xpu_C"), XPU_OPS))
    tree = tmp_path / "tree"
    for rel, text in {"pkg/__init__.py": "", "pkg/mod.py": textwrap.dedent(code), **(extra or {})}.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    files, touched = api_closure.kernel_files(tree, ("pkg/mod.py",))
    results = [r for r in check_tree(api, tree, files, touched) if r.subject == "pkg/mod.py"]
    assert len(results) == 1, results
    return results[0]


# ---------------------------------------------------------------- rules, on tiny wheels


def test_a_correct_keyword_call_passes(tmp_path: Path) -> None:
    r = check(tmp_path, """
        from vllm_xpu_kernels.fused_moe_interface import XpuFusedMoe
        def f(a, b, c, d):
            moe = XpuFusedMoe(w13=a, w13_scales=b, w2=c, w2_scales=d, n_experts_per_token=2)
            moe.apply(output=a, hidden_states=b, topk_weights=c, topk_ids=d)
        """)
    assert r.status is CheckStatus.PASS, r.detail
    assert r.data["imports"] == 1 and r.data["calls"] == 2


def test_a_planted_wrong_keyword_fails_naming_it_and_the_signature(tmp_path: Path) -> None:
    r = check(tmp_path, """
        from vllm_xpu_kernels.fused_moe_interface import XpuFusedMoe
        def f(a, b, c, d):
            return XpuFusedMoe(w13=a, w13_scales=b, w2=c, w2_scales=d, n_experts_per_token=2, is_int4=True)
        """)
    assert r.status is CheckStatus.FAIL
    assert "pkg/mod.py:4:" in r.detail and "unexpected keyword argument 'is_int4'" in r.detail
    assert "vllm_xpu_kernels/fused_moe_interface.py:4" in r.detail  # where the signature was read


def test_a_wrong_keyword_on_a_method_of_an_instance_fails(tmp_path: Path) -> None:
    r = check(tmp_path, """
        import vllm_xpu_kernels.fused_moe_interface as fmi
        def f(a):
            moe = fmi.XpuFusedMoe(a, a, a, a, 2)
            moe.apply(outptu=a, hidden_states=a, topk_weights=a, topk_ids=a)
        """)
    assert r.status is CheckStatus.FAIL
    assert "unexpected keyword argument 'outptu'" in r.detail and "missing required argument(s) 'output'" in r.detail


def test_missing_required_argument_and_too_many_positionals(tmp_path: Path) -> None:
    r = check(tmp_path, """
        from vllm_xpu_kernels.fused_moe_interface import XpuFusedMoe, Plain
        XpuFusedMoe(1, 2, 3, w2_scales=4)
        Plain(x=1)
        XpuFusedMoe.plan(1, 2)
        """)
    assert r.status is CheckStatus.FAIL
    assert "missing required argument(s) 'n_experts_per_token'" in r.detail
    assert "pkg/mod.py:4: Plain(...)" in r.detail and "unexpected keyword argument 'x'" in r.detail
    assert "takes 1 positional argument(s), 2 given" in r.detail


def test_inherited_constructor_is_checked(tmp_path: Path) -> None:
    r = check(tmp_path, """
        from vllm_xpu_kernels.fused_moe_interface import Child
        Child(w13=1, w13_scales=2, w2=3, w2_scales=4, n_experts_per_token=2, bogus=1)
        """)
    assert r.status is CheckStatus.FAIL and "'bogus'" in r.detail


def test_keywords_through_a_dict_bundle_are_checked(tmp_path: Path) -> None:
    code = """
        from vllm_xpu_kernels.fused_moe_interface import XpuFusedMoe
        def f(a):
            common = dict(w13=a, w13_scales=a, w2=a, w2_scales=a, n_experts_per_token=2)
            common["{key}"] = 1
            return XpuFusedMoe(**common)
        """
    assert check(tmp_path / "ok", code.replace("{key}", "ep_size")).status is CheckStatus.PASS
    bad = check(tmp_path / "bad", code.replace("{key}", "is_int4"))
    assert bad.status is CheckStatus.FAIL and "'is_int4'" in bad.detail


def test_missing_names_and_modules_fail(tmp_path: Path) -> None:
    r = check(tmp_path, """
        from vllm_xpu_kernels.fused_moe_interface import xpu_fused_moe
        import vllm_xpu_kernels._C
        import vllm_xpu_kernels._moe_C
        from vllm_xpu_kernels import nothing_here
        """)
    assert r.status is CheckStatus.FAIL
    assert "pkg/mod.py:2: cannot import name 'xpu_fused_moe' from vllm_xpu_kernels.fused_moe_interface" in r.detail
    assert "pkg/mod.py:4: module vllm_xpu_kernels._moe_C does not exist" in r.detail  # _C exists (a .so)
    assert "pkg/mod.py:3" not in r.detail
    assert "'nothing_here'" in r.detail


def test_an_import_error_fallback_is_reported_not_failed_unless_it_raises(tmp_path: Path) -> None:
    fallback = check(tmp_path / "a", """
        try:
            from vllm_xpu_kernels.fused_moe_interface import xpu_fused_moe
        except ImportError:
            xpu_fused_moe = None
        """)
    assert fallback.status is CheckStatus.PASS
    assert "falls back to line 5" in fallback.detail
    raises = check(tmp_path / "b", """
        try:
            from vllm_xpu_kernels.fused_moe_interface import xpu_fused_moe
        except ImportError as e:
            raise RuntimeError("need 0.1.5") from e
        """)
    assert raises.status is CheckStatus.FAIL and "whose handler raises" in raises.detail


def test_feature_detection_follows_the_pinned_release(tmp_path: Path) -> None:
    # the shape of xpu-int4-moe.patch: pick the API by getattr, call each its own way
    code = """
        import inspect
        from vllm_xpu_kernels import fused_moe_interface as module

        def detect():
            cls = getattr(module, "XpuFusedMoe", None)
            if cls is not None and callable(getattr(cls, "apply", None)):
                return "class", cls
            fn = getattr(module, "xpu_fused_moe", None)
            if fn is not None:
                if "is_int4" not in inspect.signature(fn).parameters:
                    raise RuntimeError("too old")
                return "function", fn
            raise RuntimeError("unsupported")

        def run(a):
            api, impl = detect()
            common = dict(w13=a, w13_scales=a, w2=a, w2_scales=a, n_experts_per_token=2, is_int4=True)
            if api == "class":
                impl(**common).apply(output=a, hidden_states=a, topk_weights=a, topk_ids=a)
            else:
                impl(hidden_states=a, topk_weights=a, topk_ids=a, **common)
        """
    new = check(tmp_path / "new", code)
    assert new.status is CheckStatus.FAIL
    assert [p.split(": ", 1)[0] for p in new.data["problems"]] == ["pkg/mod.py:20"]
    assert "'is_int4'" in new.detail
    assert "pkg/mod.py:9: lines 9-14 not checked: `if cls is not None and callable(getattr(cls, 'apply', None))` " \
           "(line 7) is decided by vllm-xpu-kernels 0.1.16.2" in new.detail
    old = check(tmp_path / "old", code, KERNEL_015, "0.1.5")
    assert old.status is CheckStatus.PASS, old.detail
    assert "pkg/mod.py:7: branch `if cls is not None and" in old.detail  # the class branch, unchecked
    assert old.data["calls"] == 1
    # the function without is_int4: the signature test raises instead of calling
    no_int4 = {**KERNEL_015, "vllm_xpu_kernels/fused_moe_interface.py":
               KERNEL_015["vllm_xpu_kernels/fused_moe_interface.py"].replace(", is_int4=False", "")}
    r = check(tmp_path / "noint4", code, no_int4, "0.1.3.1")
    assert r.status is CheckStatus.PASS and r.data["calls"] == 0, r.detail


def test_a_version_gated_branch_is_not_checked_and_is_reported(tmp_path: Path) -> None:
    code = """
        from importlib import metadata
        from packaging.version import Version
        from vllm_xpu_kernels.fused_moe_interface import XpuFusedMoe

        def f(a):
            if Version(metadata.version("vllm-xpu-kernels")) >= Version("0.2"):
                return XpuFusedMoe(future_arg=a)
            return XpuFusedMoe(a, a, a, a, 2)
        """
    r = check(tmp_path / "a", code)
    assert r.status is CheckStatus.PASS, r.detail
    assert "pkg/mod.py:7: branch `if Version(metadata.version('vllm-xpu-kernels')) >= Version('0.2')` " \
           "not checked: false with vllm-xpu-kernels 0.1.16.2" in r.detail
    r = check(tmp_path / "b", code, version="0.2.0")  # true there: checked, and wrong
    assert r.status is CheckStatus.FAIL and "'future_arg'" in r.detail


def test_a_name_bound_in_another_file_of_the_tree_is_followed(tmp_path: Path) -> None:
    r = check(tmp_path, """
        from pkg.kern import Moe
        Moe(wrong=1)
        """, extra={"pkg/kern.py": "from vllm_xpu_kernels.fused_moe_interface import XpuFusedMoe as Moe\n"})
    assert r.status is CheckStatus.FAIL and "'wrong'" in r.detail


def test_native_operators_are_checked_against_the_schemas_in_the_so(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    ok = check(tmp_path / "ok", """
        import torch
        def f(x, w, s, z, g):
            torch.ops._xpu_C.int4_gemm_w4a16(x, w, None, s, z, 128, g)
            torch.ops._xpu_C.fp8_gemm_out.default(x, x, w, None, None, None, None)
            torch.ops._xpu_C.scaled(x, scale=2.0)
            torch.ops._C.anything_vllm_builds(x)  # the tree builds its own _C: not judged here
        """, extra={"setup.py": 'ext_modules = [CMakeExtension(name="pkg._C")]\n'})
    assert ok.status is CheckStatus.PASS, ok.detail
    assert ok.data["calls"] == 3
    bad = check(tmp_path / "bad", """
        import torch
        def f(x, w, s, z, g):
            torch.ops._xpu_C.int4_gemm_w4a16(x, w, None, s, z, 128, g, None)
            torch.ops._xpu_C.int4_gemm_w4a16(x, w, None, s, z, group_sz=128, g_idx=g)
            torch.ops._xpu_C.int4_gemm_w4a16(x, w, s, z, 128)
            torch.ops._xpu_C.int4_gemm_w4a8(x, w)
            torch.ops._xpu_C.scaled(x, 2.0)
        """)
    assert bad.status is CheckStatus.FAIL
    problems = "\n".join(bad.data["problems"])
    assert "pkg/mod.py:4: torch.ops._xpu_C.int4_gemm_w4a16(...) -> torch.ops._xpu_C.int4_gemm_w4a16(A, B, bias, " \
           "B_scale, B_zp, group_size, g_idx) at vllm_xpu_kernels/_xpu_C.abi3.so (int4_gemm_w4a16): takes 7 " \
           "positional argument(s), 8 given" in problems
    assert "pkg/mod.py:5:" in problems and "unexpected keyword argument 'group_sz'" in problems
    assert "pkg/mod.py:6:" in problems and "missing required argument(s) 'g_idx', 'group_size'" in problems
    assert "pkg/mod.py:7: torch.ops._xpu_C has no operator 'int4_gemm_w4a8' in vllm-xpu-kernels 0.1.16.2" in problems
    assert "pkg/mod.py:8:" in problems and "takes 1 positional argument(s), 2 given" in problems


def test_an_operator_feature_test_is_decided_for_the_pinned_release(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    r = check(tmp_path, """
        import torch
        if hasattr(torch.ops._xpu_C, "int4_gemm_w4a8"):
            def w4a8(x):
                return torch.ops._xpu_C.int4_gemm_w4a8(x)
        """)
    assert r.status is CheckStatus.PASS
    assert "pkg/mod.py:3: branch `if hasattr(torch.ops._xpu_C, 'int4_gemm_w4a8')` not checked: false" in r.detail


def test_operators_in_an_extension_the_tree_builds_itself_are_not_judged(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    # vLLM builds its own _C (CUDA): torch.ops._C there is not the kernel package's
    setup = 'ext_modules = [CMakeExtension(name="pkg._xpu_C")]\n'
    r = check(tmp_path, "import vllm_xpu_kernels\nimport torch\ntorch.ops._xpu_C.not_an_op(1)\n",
              extra={"setup.py": setup})
    assert r.status is CheckStatus.PASS and r.data["calls"] == 0 and r.data["imports"] == 1


def test_a_file_that_does_not_parse_is_skipped_with_the_reason(tmp_path: Path) -> None:
    r = check(tmp_path, "from vllm_xpu_kernels import fused_moe_interface\ndef f(:\n")
    assert r.status is CheckStatus.SKIP
    assert "not checked: pkg/mod.py:2: SyntaxError" in r.detail and "see the compile check" in r.detail


def test_the_untouched_files_that_use_the_kernels_are_checked_too(tmp_path: Path) -> None:
    api = WheelAPI(make_wheel(tmp_path / "wheels", "0.1.16.2", KERNEL_016))
    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg/touched.py").write_text("x = 1\n")
    (tree / "pkg/old.py").write_text("from vllm_xpu_kernels.fused_moe_interface import xpu_fused_moe\n")
    files, touched = api_closure.kernel_files(tree, ("pkg/touched.py",))
    assert files == ["pkg/old.py", "pkg/touched.py"]
    results = check_tree(api, tree, files, touched)
    assert [(r.subject, r.status) for r in results] == [("pkg/old.py", CheckStatus.FAIL)]
    assert "(not touched by the series)" in results[0].detail


# ---------------------------------------------------------------- the shipped series on vLLM 0.19.0


def _ctx(ws, recipe_pin: Pin | None = None, **options: object) -> CheckContext:  # type: ignore[no-untyped-def]
    recipe = load_recipe(REPO / "recipes" / "lunar-lake-moe.toml")
    if recipe_pin is not None:
        recipe = dataclasses.replace(recipe, pins=tuple(p for p in recipe.pins if p.name != recipe_pin.name)
                                     + (recipe_pin,))
    assert ws.manifest is not None
    return CheckContext(recipe=recipe, workspace=ws.workdir, touched=ws.manifest.touched(), options=dict(options))


def _by_file(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.subject.rsplit("/", 1)[-1]: r for r in results}


def test_the_shipped_recipe_pins_a_github_release_and_says_why_it_is_skipped(
        lunar_lake_moe_ws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("STACKBUILD_MIRRORS_FILE", str(tmp_path / "no-mirrors.toml"))
    monkeypatch.delenv("STACKBUILD_GIT_MIRRORS", raising=False)
    results = api_closure.run(_ctx(lunar_lake_moe_ws))
    assert [r.status for r in results] == [CheckStatus.SKIP]
    assert "0.1.5 is a release outside the package index" in results[0].detail
    assert "--kernel-wheel" in results[0].detail


def test_a_mirror_of_the_github_release_is_read(lunar_lake_moe_ws, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    mirror = tmp_path / "mirror"
    make_wheel(mirror, "0.1.5", MIRROR_015, ("_C", "_moe_C", "_xpu_C"))
    monkeypatch.setenv("STACKBUILD_GIT_MIRRORS",
                       f"https://github.com/vllm-project/vllm-xpu-kernels/releases/download/v0.1.5/=file://{mirror}/")
    monkeypatch.setenv("STACKBUILD_MIRRORS_FILE", str(tmp_path / "no-mirrors.toml"))
    by = _by_file(api_closure.run(_ctx(lunar_lake_moe_ws)))
    assert by["xpu_int4_moe.py"].data["version"] == "0.1.5"
    assert by["xpu_int4_moe.py"].status is CheckStatus.PASS, by["xpu_int4_moe.py"].detail
    # vLLM's own flash-attention import needs a module this small mirror lacks: named, not hidden
    assert by["_xpu_ops.py"].status is CheckStatus.FAIL and "flash_attn_interface" in by["_xpu_ops.py"].detail


@pytest.mark.network
@pytest.mark.slow
def test_kernels_0_1_16_2_from_the_index_name_the_removed_function_and_is_int4(
        lunar_lake_moe_ws, seeded_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from test_wheelarch import KERNEL_WHEELS

    monkeypatch.setenv("STACKBUILD_CACHE", str(seeded_cache))
    pin = Pin("vllm-xpu-kernels", "==0.1.16.2", sha256=KERNEL_WHEELS["0.1.16.2"])
    results = api_closure.run(_ctx(lunar_lake_moe_ws, pin))
    by = _by_file(results)
    moe = by["xpu_fused_moe.py"]  # vLLM 0.19.0's own file, not touched by the series
    assert moe.status is CheckStatus.FAIL and not moe.data["touched"]
    assert "xpu_fused_moe.py:24: cannot import name 'xpu_fused_moe' from vllm_xpu_kernels.fused_moe_interface " \
           "in vllm-xpu-kernels 0.1.16.2" in moe.detail
    # the fixed series calls only xpu_fused_moe (0.1.5-0.1.11), so on 0.1.16.2 it cannot import either
    int4 = by["xpu_int4_moe.py"]
    assert int4.status is CheckStatus.FAIL and int4.data["touched"]
    assert "cannot import name 'xpu_fused_moe'" in int4.detail
    assert by["_xpu_ops.py"].status is CheckStatus.PASS and by["xpu.py"].status is CheckStatus.PASS
    wheel = seeded_cache / "wheels" / "vllm-xpu-kernels" / "0.1.16.2"
    assert len(list(wheel.glob("*.whl"))) == 1  # cached for the next run


@pytest.mark.network
@pytest.mark.slow
def test_the_pre_fix_moe_patch_s_is_int4_keyword_is_named_on_0_1_16_2(
        lunar_lake_moe_ws, seeded_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The series as it was before issue 15 called XpuFusedMoe(..., is_int4=True) on
    kernels >= 0.1.11: the check must name that keyword (planted from git history)."""
    import os
    import subprocess

    from test_wheelarch import KERNEL_WHEELS

    old = subprocess.run(["git", "show", "89b51dc:patches/vllm/0.19.0/xpu-int4-moe.patch"], cwd=REPO,
                         capture_output=True, text=True)
    if old.returncode != 0:
        pytest.skip("the pre-fix patch is not in this clone's history")
    rel = "vllm/model_executor/layers/fused_moe/xpu_int4_moe.py"
    body = old.stdout.split(f"+++ b/{rel}\n", 1)[1].split("\ndiff --git", 1)[0]
    text = "".join(ln[1:] + "\n" for ln in body.splitlines() if ln.startswith("+"))
    ws = tmp_path / "ws"
    shutil.copytree(lunar_lake_moe_ws.workdir, ws, symlinks=True, copy_function=os.link)
    [target] = [p for p in ws.rglob("xpu_int4_moe.py") if p.as_posix().endswith(rel)]
    target.unlink()
    target.write_text(text)
    monkeypatch.setenv("STACKBUILD_CACHE", str(seeded_cache))
    pin = Pin("vllm-xpu-kernels", "==0.1.16.2", sha256=KERNEL_WHEELS["0.1.16.2"])
    ctx = dataclasses.replace(_ctx(lunar_lake_moe_ws, pin), workspace=ws)
    int4 = _by_file(api_closure.run(ctx))["xpu_int4_moe.py"]
    assert int4.status is CheckStatus.FAIL
    assert "XpuFusedMoe" in int4.detail and "unexpected keyword argument 'is_int4'" in int4.detail


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize(("version", "fails"), [("0.1.3.1", set()), ("0.1.12.1", {"xpu_fused_moe.py", "xpu_int4_moe.py"})])
def test_real_kernel_wheels(lunar_lake_moe_ws, version: str, fails: set[str]) -> None:  # type: ignore[no-untyped-def]
    from test_wheelarch import kernel_wheel

    results = api_closure.run(_ctx(lunar_lake_moe_ws, kernel_wheel=kernel_wheel(version)))
    # the recipe pins 0.1.5: that release stays unchecked, and the report says so
    pin_row = results[0]
    assert (pin_row.subject, pin_row.status) == ("vllm-xpu-kernels", CheckStatus.SKIP)
    assert pin_row.detail.startswith("the pinned vllm-xpu-kernels 0.1.5 was not checked: --kernel-wheel ")
    by = _by_file(results[1:])
    assert {"_xpu_ops.py", "xpu_fused_moe.py", "xpu_int4_moe.py", "xpu.py"} <= set(by)
    assert {f for f, r in by.items() if r.status is CheckStatus.FAIL} == fails, [r.detail for r in results]
    assert all(r.data["version"] == version for r in results)
    [int4] = [r for r in results if r.subject == "vllm/model_executor/kernels/linear/mixed_precision/xpu.py"]
    assert int4.status is CheckStatus.PASS and int4.data["calls"] == 2  # int4_gemm_w4a16, int4_gemm_w4a8


@pytest.mark.network
@pytest.mark.slow
def test_a_planted_extra_argument_in_the_series_int4_gemm_call_fails_on_the_real_wheel(
        lunar_lake_moe_ws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from test_wheelarch import kernel_wheel

    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    rel = "vllm/model_executor/kernels/linear/mixed_precision/xpu.py"
    tree = tmp_path / "tree"
    (tree / rel).parent.mkdir(parents=True)
    text = (lunar_lake_moe_ws.workdir / "vllm" / rel).read_text()
    assert text.count("            self._g_idx,\n        )") == 1
    (tree / rel).write_text(text.replace("            self._g_idx,\n        )",
                                         "            self._g_idx,\n            True,\n        )"))
    api = WheelAPI(kernel_wheel("0.1.16.2"))
    [r] = check_tree(api, tree, [rel], {rel})
    assert r.status is CheckStatus.FAIL
    assert "torch.ops._xpu_C.int4_gemm_w4a16(A, B, bias, B_scale, B_zp, group_size, g_idx)" in r.detail
    assert "takes 7 positional argument(s), 8 given" in r.detail


# ---------------------------------------------------------------- fetching the pinned release


def _index_ctx(tmp_path: Path, pin: Pin) -> CheckContext:
    tree = tmp_path / "ws" / "src"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "mod.py").write_text("import vllm_xpu_kernels\n")
    recipe = load_recipe(REPO / "recipes" / "lunar-lake-moe.toml")
    recipe = dataclasses.replace(recipe, pins=tuple(p for p in recipe.pins if p.name != pin.name) + (pin,))
    return CheckContext(recipe=recipe, workspace=tmp_path / "ws", touched={"src": ("pkg/mod.py",)},
                        options={"lockfile": str(tmp_path / "no-lockfile.txt")})


def test_an_index_release_is_fetched_once_and_checked_against_the_pinned_sha256(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lock.tinyindex import build_index, sha256

    from stackbuild.errors import SourceError

    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    index = build_index(tmp_path / "index", {("vllm-xpu-kernels", "0.1.16.2"): ()})
    good = sha256(next((tmp_path / "index" / "files").glob("*.whl")))
    with pytest.raises(SourceError) as e:  # the recipe pins another artifact: refused, nothing cached
        api_closure.run(_index_ctx(tmp_path / "a", Pin("vllm-xpu-kernels", "==0.1.16.2", index=index, sha256="0" * 64)))
    assert "no wheel of vllm-xpu-kernels==0.1.16.2 with sha256 " + "0" * 64 in e.value.render()
    assert not list((tmp_path / "cache").glob("wheels/vllm-xpu-kernels/*/*.whl"))
    pin = Pin("vllm-xpu-kernels", "==0.1.16.2", index=index, sha256=good)
    [r] = api_closure.run(_index_ctx(tmp_path / "b", pin))
    assert r.status is CheckStatus.PASS and r.data["version"] == "0.1.16.2"
    cached = next((tmp_path / "cache").glob("wheels/vllm-xpu-kernels/0.1.16.2/*.whl"))
    shutil.rmtree(tmp_path / "index")  # the second run reads the cache only
    [r] = api_closure.run(_index_ctx(tmp_path / "c", pin))
    assert r.status is CheckStatus.PASS
    cached.write_bytes(b"damaged")  # a cached file that is not the pinned artifact is not used
    with pytest.raises(SourceError):
        api_closure.run(_index_ctx(tmp_path / "d", pin))
    assert not cached.exists()


def test_a_wheel_module_nested_past_the_parsers_recursion_is_unknown_not_a_crash(tmp_path: Path) -> None:
    """The wheel is input: a module the parser cannot take (6,000 terms deep) answers every
    name as unknown, like any unreadable module; a call into it is not called missing."""
    files = {**KERNEL_016, "vllm_xpu_kernels/deep.py": "X = " + " + ".join(["1"] * 6000) + "\n"}
    r = check(tmp_path, "from vllm_xpu_kernels.deep import anything\nanything(1, 2)\n", files)
    assert r.status is not CheckStatus.FAIL, r.detail
