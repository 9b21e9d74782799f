"""Tables and JSON. Domain results expose `to_dict()` (for --json) and `table()`
(for people); only cli.py prints them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    summary: str = ""

    def render(self) -> str:
        widths = [len(c) for c in self.columns]
        last = len(self.columns) - 1
        for row in self.rows:
            for i, cell in enumerate(row):
                first = str(cell).splitlines()[0] if str(cell) else ""
                # one long cell (a skip reason, a URL) must not push every row's detail
                # off the screen: it overflows its column instead
                widths[i] = max(widths[i], min(len(first), 100 if i == last else 48))
        lines = []
        if self.title:
            lines.append(self.title)
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(self.columns)).rstrip())
        lines.append("  ".join("-" * w for w in widths))
        for row in self.rows:
            cells = [str(c) for c in row]
            lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip())
        if self.summary:
            lines.append(self.summary)
        return "\n".join(lines)


class Result(Protocol):
    def to_dict(self) -> dict[str, Any]: ...

    def tables(self) -> Sequence[Table]: ...


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)
