"""The numerics worker: runs inside the target environment.

Two ways in:

    python -m stackbuild.checks.numerics.worker '{"device": "auto", ...}'
        what runner.py launches: one JSON object of arguments in, one JSON line out
        (the last line of stdout). Keys: device ("auto" | "xpu" | "cuda" | "cpu"),
        suites, adapters ("module:function" strings), builtin (names of built-in adapters
        to run; default all), workspace, thresholds ({"bf16.rel": 2e-2, ...}), repeats,
        threads (torch CPU threads, default 1).

    python -m stackbuild.checks.numerics.worker --device cuda [--suite int4-linear]
        [--adapter module:function] [--workspace DIR] [--threshold bf16.rel=2e-2] [--json]
        standalone: prints the per-adapter table (or --json); exit 0 when everything
        that ran passed and every negative control was caught, 1 otherwise, 2 on bad input.

Only the standard library is imported before torch, so a missing torch is reported as
such instead of as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .config import SUITES


def run(args: dict[str, Any]) -> dict[str, Any]:
    """Run the suite for one argument object; returns the JSON-ready result or an error."""
    try:
        import torch
    except ModuleNotFoundError as exc:
        return {"error": f"the target python lacks {exc.name}", "missing": exc.name}
    # the shapes are small; on a shared machine OpenMP threads waiting on each other cost
    # far more than they bring (2-core box under load: 35 s with 2 threads, 2.6 s with 1)
    torch.set_num_threads(int(args.get("threads") or 1))

    from . import reference as ref
    from .adapters import BUILTIN, builtin_adapters, load_user_adapter
    from .suite import resolve_device, run_suite

    suites = list(args.get("suites") or SUITES)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        return {"error": f"unknown numerics suite {unknown[0]!r}: expected one of {SUITES}"}
    try:
        limits = ref.thresholds(args.get("thresholds") or {})
    except KeyError as exc:
        return {"error": str(exc.args[0])}
    device = resolve_device(args.get("device"))
    if device not in ("cpu", "cuda", "xpu"):
        return {"error": f"unknown device {device!r}: expected xpu, cuda or cpu"}

    adapters = builtin_adapters(device, args.get("workspace"))
    wanted = args.get("builtin")
    if wanted is not None:
        bad = [n for n in wanted if n not in BUILTIN]
        if bad:
            return {"error": f"unknown built-in adapter {bad[0]!r}: expected one of {BUILTIN}"}
        adapters = [a for a in adapters if a.name in wanted]
    for spec in args.get("adapters") or []:
        try:
            adapters.append(load_user_adapter(spec))
        except ValueError as exc:
            return {"error": str(exc)}
    result = run_suite(
        adapters, device=device, suites=suites, limits=limits, repeats=int(args.get("repeats", 2))
    )
    return result.to_dict()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].lstrip().startswith("{"):
        out = run(json.loads(argv[0]))
        sys.stdout.write("\n" + json.dumps(out) + "\n")
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m stackbuild.checks.numerics.worker",
        description="INT4 W4A16 GEMM / MoE numerics against an fp64 reference",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "xpu", "cuda", "cpu"))
    parser.add_argument("--suite", action="append", choices=SUITES, dest="suites")
    parser.add_argument(
        "--adapter", action="append", default=[], dest="adapters", metavar="MODULE:FUNCTION"
    )
    parser.add_argument(
        "--builtin",
        action="append",
        default=None,
        help="run only these built-in adapters (repeatable)",
    )
    parser.add_argument("--workspace", default=None, help="applied workspace (patch-layout)")
    parser.add_argument(
        "--threshold", action="append", default=[], metavar="KEY=VALUE", help="e.g. bf16.rel=2e-2"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per shape")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args(argv)
    thresholds: dict[str, float] = {}
    for item in ns.threshold:
        key, sep, value = item.partition("=")
        try:
            thresholds[key] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            parser.error(f"--threshold {item!r}: expected KEY=FLOAT")
    out = run(
        {
            "device": ns.device,
            "suites": ns.suites,
            "adapters": ns.adapters,
            "builtin": ns.builtin,
            "workspace": ns.workspace,
            "thresholds": thresholds,
            "repeats": ns.repeats,
            "threads": ns.threads,
        }
    )
    if "error" in out:
        print(f"error: {out['error']}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps(out, indent=2))
    else:
        from .suite import tables

        for table in tables(out):
            print(table.render())
            print()
        print(f"{'OK' if out['ok'] else 'FAILED'} in {out['wall_s']:.1f} s")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
