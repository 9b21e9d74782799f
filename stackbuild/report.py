"""Tables and JSON. Domain results expose `to_dict()` (for --json) and `table()`
(for people); only cli.py prints them."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    summary: str = ""

    def render(self, width: int | None = -1) -> str:
        """The table as text. `width` (default -1: the terminal's, when stdout is one, or
        COLUMNS; None: no limit) caps the line length: the widest columns shrink and their cells wrap
        onto continuation lines, so a long detail never runs off an 80-column screen."""
        width = terminal_width() if width == -1 else width
        cells = [[str(c) for c in row] for row in self.rows]
        widths = [len(c) for c in self.columns]
        for row in cells:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], *(len(ln) for ln in cell.splitlines() or [""]))
        if width:
            widths = _fit(widths, [len(c) for c in self.columns], width)
        lines = []
        if self.title:
            lines.append(self.title)
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(self.columns)).rstrip())
        lines.append("  ".join("-" * w for w in widths))
        for row in cells:
            wrapped = [_wrap(c, widths[i]) for i, c in enumerate(row)]
            for k in range(max(len(w) for w in wrapped) if wrapped else 0):
                parts = [(w[k] if k < len(w) else "").ljust(widths[i]) for i, w in enumerate(wrapped)]
                lines.append("  ".join(parts).rstrip())
        if self.summary:
            lines.extend(_wrap(self.summary, width) if width else [self.summary])
        return "\n".join(lines)


def terminal_width() -> int | None:
    """The width tables fit: COLUMNS if set, else the terminal's when stdout is one;
    None (no limit) for a pipe or file, so scripts and logs get whole lines."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if sys.stdout.isatty():
        return shutil.get_terminal_size((80, 24)).columns
    return None


def _fit(widths: list[int], headers: list[int], limit: int) -> list[int]:
    """Shrink the widest columns, one character at a time, until the row fits."""
    widths = list(widths)
    floor = [max(h, 6) for h in headers]
    while sum(widths) + 2 * (len(widths) - 1) > limit:
        i = max(range(len(widths)), key=lambda j: widths[j] - floor[j])
        if widths[i] <= floor[i]:
            break  # every column at its floor: overflow rather than lose the headers
        widths[i] -= 1
    return widths


def _wrap(cell: str, width: int) -> list[str]:
    out: list[str] = []
    for line in cell.splitlines() or [""]:
        if len(line) <= width:
            out.append(line)
        else:
            out.extend(textwrap.wrap(line, width, break_long_words=True, break_on_hyphens=False) or [""])
    return out


class Result(Protocol):
    def to_dict(self) -> dict[str, Any]: ...

    def tables(self) -> Sequence[Table]: ...


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)
