"""The console entry point. It imports nothing heavy itself, so a Ctrl-C while the CLI
(typer, rich, ...) is still loading exits 130 with one line instead of a traceback.

The plain `list` and `list --json` (no other option) are answered without typer: the
output comes from the same function the typer command calls (stackbuild.listing), and
any exception while computing it hands the command to the full CLI, which runs it
again (it only reads) and reports the error its usual way."""

from __future__ import annotations

import sys

_FAST_LIST = (["list"], ["list", "--json"])


def _fast_list(argv: list[str]) -> int | None:
    """The exit code of a plain `list`, or None to let the full CLI run it."""
    if argv not in _FAST_LIST:
        return None
    try:
        from stackbuild.listing import render_list

        text, rc = render_list(as_json=argv[-1] == "--json")
    except KeyboardInterrupt:
        raise
    except Exception:  # noqa: BLE001 - the full CLI runs it again and reports it
        return None
    print(text)
    return rc


def main() -> int:
    try:
        rc = _fast_list(sys.argv[1:])
        if rc is not None:
            return rc
        from stackbuild.cli import main as cli_main
    except KeyboardInterrupt:
        print("stackbuild: interrupted while starting; nothing was done", file=sys.stderr)
        return 130
    try:
        return cli_main()
    except KeyboardInterrupt:  # between main's own handlers (e.g. while printing)
        print("stackbuild: interrupted", file=sys.stderr)
        return 130
