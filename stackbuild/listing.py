"""`stackbuild list`: one line per recipe. Kept apart from cli.py so the console entry
(launch.py) can answer the plain `list` and `list --json` without importing typer:
about a third of start-up, paid by the command people run most to look around."""

from __future__ import annotations

from typing import Any

from stackbuild.errors import ExitCode, StackbuildError
from stackbuild.recipe import list_recipe_names, load_recipe
from stackbuild.report import Table, to_json


def recipe_rows() -> tuple[list[dict[str, Any]], int]:
    """A row per recipe in the project, and how many failed to load (shown as errors:
    one broken recipe must not hide the others)."""
    rows: list[dict[str, Any]] = []
    broken = 0
    for name in list_recipe_names():
        try:
            r = load_recipe(name)
        except StackbuildError as e:
            broken += 1
            rows.append({"name": name, "platform": "?", "sources": "", "patches": "", "description": f"error: {e.render()}"})
            continue
        srcs = ", ".join(s.requirement or s.url or s.path or s.name for s in r.sources if s.name in r.patched_sources)
        rows.append({"name": r.name, "platform": r.platform.name, "sources": srcs if not r.is_base else "(base)",
                     "patches": len(r.patches), "description": r.description, "base": r.is_base})
    return rows, broken


def render_list(as_json: bool) -> tuple[str, int]:
    """The whole output of `list` and its exit code (2 when a recipe is broken)."""
    rows, broken = recipe_rows()
    if as_json:
        text = to_json(rows)
    else:
        text = Table("", ("recipe", "platform", "patched", "patches", "description"),
                     tuple((x["name"], x["platform"], x["sources"], str(x["patches"]), x["description"])
                           for x in rows)).render()
    return text, int(ExitCode.BAD_INPUT) if broken else 0
