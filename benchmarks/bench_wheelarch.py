"""Kernel-wheel arch reader benchmark (issue 8): `read_wheel_archs` on the real
vllm-xpu-kernels 0.1.16.2 wheel (150 MB, 780 MB of .so) against the raw baseline
measured in the same run: inflating every .so member of the wheel to a file (the part
no reader can skip, since section headers sit at the end of each deflated member).

Targets: <= 1.5x the raw inflate time; peak RSS growth <= 100 MB. Exit 1 when missed.
"""

from __future__ import annotations

import resource
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from test_wheelarch import kernel_wheel  # noqa: E402

from stackbuild.wheelarch import read_wheel_archs  # noqa: E402

VERSION = "0.1.16.2"


def raw_inflate(wheel: Path) -> float:
    t0 = time.perf_counter()
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
        for info in zf.infolist():
            if info.filename.endswith(".so"):
                with zf.open(info) as src, open(Path(tmp) / "m.so", "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    return time.perf_counter() - t0


def main() -> int:
    wheel = kernel_wheel(VERSION)
    raw = min(raw_inflate(wheel) for _ in range(2))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        report = read_wheel_archs(wheel)
        times.append(time.perf_counter() - t0)
    ours = min(times)
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    so_bytes = sum(o.size for o in report.objects)
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 1e6:.0f} MB, .so total {so_bytes / 1e6:.0f} MB")
    print(f"found: {', '.join(report.ip_versions)}")
    print(f"raw inflate        {raw:6.2f} s")
    print(f"read_wheel_archs   {ours:6.2f} s  ratio {ours / raw:.2f}x (target <= 1.5x)")
    print(f"peak RSS growth    {rss_growth_mb:6.1f} MB (target <= 100 MB)")
    # issue 18: the field's ELF library instead of our header reader, same walker
    from elf_pyelftools import PyElftoolsElf

    import stackbuild.wheelarch as wa

    own, wa._Elf = wa._Elf, PyElftoolsElf  # type: ignore[misc]
    try:
        t0 = time.perf_counter()
        same = read_wheel_archs(wheel).to_dict() == report.to_dict()
        lib = time.perf_counter() - t0
    finally:
        wa._Elf = own  # type: ignore[misc]
    print(f"with pyelftools    {lib:6.2f} s  {lib / ours:.2f}x ours (adopt if <= 1.5x); same result: {same}")
    ok = ours <= 1.5 * raw and rss_growth_mb <= 100
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
