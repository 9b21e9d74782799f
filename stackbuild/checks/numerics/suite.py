"""Run adapters and negative controls over the vectors; one result object, no printing."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from stackbuild.report import Table

from . import reference as ref
from .adapters import Adapter, kernels_version
from .controls import CONTROLS, Control
from .vectors import SUITES, Spec, Vector, build_vectors, default_specs

PASS, FAIL, SKIP = "pass", "fail", "skipped"


@dataclass(frozen=True)
class AdapterRow:
    adapter: str
    suite: str
    case: str  # spec name; "" for a row that stands for the whole suite (skipped)
    shape: str  # "M33xK256xN320"
    dtype: str
    status: str  # pass | fail | skipped
    detail: str = ""
    max_abs: float | None = None
    rel: float | None = None
    corr: float | None = None
    ms_per_call: float | None = None

    @property
    def subject(self) -> str:
        parts = [self.adapter, self.suite]
        if self.case:
            parts.append(f"{self.case}:{self.shape}:{self.dtype}")
        return "/".join(parts)


@dataclass(frozen=True)
class ControlRow:
    control: str
    suite: str
    status: str  # pass: caught on every vector; fail: it passed somewhere (harness broken)
    detail: str
    vectors: int
    caught: int
    min_rel: float | None  # the closest a control came to passing

    @property
    def subject(self) -> str:
        return f"control:{self.control}/{self.suite}"


@dataclass(frozen=True)
class NumericsRun:
    device: str
    torch_version: str
    kernels_version: str | None
    thresholds: dict[str, float]
    rows: tuple[AdapterRow, ...]
    controls: tuple[ControlRow, ...]
    wall_s: float
    notes: tuple[str, ...] = field(default=())

    def tables(self) -> list[Table]:
        return tables(self.to_dict())

    @property
    def ok(self) -> bool:
        return all(r.status != FAIL for r in self.rows) and all(
            c.status != FAIL for c in self.controls
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "torch": self.torch_version,
            "vllm_xpu_kernels": self.kernels_version,
            "thresholds": self.thresholds,
            "ok": self.ok,
            "wall_s": self.wall_s,
            "rows": [asdict(r) for r in self.rows],
            "controls": [asdict(c) for c in self.controls],
            "notes": list(self.notes),
        }


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize()
    elif t.device.type == "xpu":
        torch.xpu.synchronize()


def resolve_device(device: str | None) -> str:
    """xpu, then cuda, then cpu, unless one is asked for."""
    if device and device != "auto":
        return device
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _evaluate(
    fn: Callable[..., torch.Tensor], vec: Vector, limits: dict[str, float], repeats: int
) -> tuple[str, str, ref.Metrics | None, float | None]:
    try:
        out = fn(vec.case, vec.x)
        _sync(out)
    except NotImplementedError as exc:
        return SKIP, str(exc) or "not supported", None, None
    except Exception as exc:  # a kernel failing in any way fails its row, not the run
        return FAIL, f"{type(exc).__name__}: {exc}".splitlines()[0][:300], None, None
    ms = None
    if repeats > 0:
        t0 = time.perf_counter()
        for _ in range(repeats):
            again = fn(vec.case, vec.x)
        _sync(again)
        ms = (time.perf_counter() - t0) / repeats * 1000
    try:
        metrics = ref.compare(out, vec.ref)
    except ref.ZeroReferenceError as exc:
        return FAIL, f"guard: {exc}", None, ms
    except ValueError as exc:
        return FAIL, str(exc), None, ms
    passed, why = ref.verdict(metrics, vec.case.dtype, limits)
    return (PASS if passed else FAIL), why, metrics, ms


def _run_control(
    control: Control,
    suite: str,
    vectors: list[Vector],
    dtypes: Sequence[str],
    limits: dict[str, float],
) -> ControlRow | None:
    """A control is computed once per (spec, M) and judged under every dtype's thresholds
    of the run: it must fail all of them, or the harness hides that bug."""
    seen = caught = 0
    escaped: list[str] = []
    errors: list[str] = []
    min_rel: float | None = None
    for vec in vectors:
        if vec.case.suite != suite:
            continue
        try:
            out = control.fn(vec.case, vec.x)
        except Exception as exc:
            errors.append(f"{vec.case.name}:{vec.shape}: {type(exc).__name__}: {exc}")
            continue
        for dtype in dtypes:
            seen += 1
            where = f"{vec.case.name}:{vec.shape}:{dtype}"
            try:
                m = ref.compare(out.to(ref.DTYPES[dtype]), vec.ref)
            except ValueError as exc:  # the zero-reference guard included
                errors.append(f"{where}: {exc}")
                continue
            min_rel = m.rel if min_rel is None else min(min_rel, m.rel)
            if ref.verdict(m, dtype, limits)[0]:
                escaped.append(f"{where} (rel {m.rel:.3g}, corr {m.corr:.6f})")
            else:
                caught += 1
    if seen == 0 and not errors:
        return None
    if escaped:
        why = (
            f"harness broken: negative control '{control.what}' passed on "
            f"{len(escaped)}/{seen} vectors: {', '.join(escaped[:3])}"
        )
        return ControlRow(control.name, suite, FAIL, why, seen, caught, min_rel)
    if errors:
        why = f"harness broken: control '{control.what}' could not be judged: {errors[0]}"
        return ControlRow(control.name, suite, FAIL, why, seen, caught, min_rel)
    return ControlRow(
        control.name,
        suite,
        PASS,
        f"caught on {caught}/{seen} vectors (min rel err {min_rel:.3g})",
        seen,
        caught,
        min_rel,
    )


def run_suite(
    adapters: Sequence[Adapter],
    *,
    device: str = "cpu",
    suites: Sequence[str] = SUITES,
    limits: dict[str, float] | None = None,
    controls: Sequence[Control] = CONTROLS,
    specs: list[Spec] | None = None,
    repeats: int = 2,
) -> NumericsRun:
    t_start = time.perf_counter()
    limits = ref.thresholds() if limits is None else limits
    specs = (
        default_specs(tuple(suites)) if specs is None else [s for s in specs if s.suite in suites]
    )
    runnable = [a for a in adapters if a.unavailable is None]
    dtypes = sorted({d for a in runnable for d in a.dtypes} | {"fp32"})
    vectors = build_vectors(specs, dtypes, device)

    rows: list[AdapterRow] = []
    for adapter in adapters:
        for suite in suites:
            if suite not in adapter.suites:
                continue
            if adapter.unavailable is not None:
                rows.append(AdapterRow(adapter.name, suite, "", "", "", SKIP, adapter.unavailable))
                continue
            for dtype in adapter.dtypes:
                for vec in vectors[dtype]:
                    if vec.case.suite != suite:
                        continue
                    status, detail, m, ms = _evaluate(adapter.fn, vec, limits, repeats)
                    rows.append(
                        AdapterRow(
                            adapter.name,
                            suite,
                            vec.case.name,
                            vec.shape,
                            dtype,
                            status,
                            detail,
                            m.max_abs if m else None,
                            m.rel if m else None,
                            m.corr if m else None,
                            ms,
                        )
                    )

    control_rows = [
        row
        for control in controls
        for suite in suites
        if (row := _run_control(control, suite, vectors["fp32"], dtypes, limits)) is not None
    ]

    return NumericsRun(
        device=device,
        torch_version=torch.__version__,
        kernels_version=kernels_version(),
        thresholds=dict(limits),
        rows=tuple(rows),
        controls=tuple(control_rows),
        wall_s=time.perf_counter() - t_start,
    )


def tables(run: dict[str, Any]) -> list[Table]:
    """The per-adapter and control tables of a NumericsRun.to_dict()."""
    adapter_rows = [
        (
            r["adapter"],
            r["suite"],
            r["case"],
            r["shape"],
            r["dtype"],
            r["status"],
            _fmt(r["max_abs"], ".3g"),
            _fmt(r["rel"], ".3g"),
            _fmt(r["corr"], ".6f"),
            _fmt(r["ms_per_call"], ".3f"),
            r["detail"],
        )
        for r in run["rows"]
    ]
    control_rows = [
        (
            c["control"],
            c["suite"],
            c["status"],
            f"{c['caught']}/{c['vectors']}",
            _fmt(c["min_rel"], ".3g"),
            c["detail"],
        )
        for c in run["controls"]
    ]
    return [
        Table(
            f"numerics on {run['device']} (torch {run['torch']}, vllm-xpu-kernels "
            f"{run['vllm_xpu_kernels'] or '-'})",
            (
                "adapter",
                "suite",
                "case",
                "shape",
                "dtype",
                "status",
                "max abs",
                "rel err",
                "corr",
                "ms/call",
                "detail",
            ),
            tuple(adapter_rows),
        ),
        Table(
            "negative controls (must be caught)",
            ("control", "suite", "status", "caught", "min rel", "detail"),
            tuple(control_rows),
        ),
    ]
