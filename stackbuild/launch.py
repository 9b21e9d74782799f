"""The console entry point. It imports nothing heavy itself, so a Ctrl-C while the CLI
(typer, rich, ...) is still loading exits 130 with one line instead of a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from stackbuild.cli import main as cli_main
    except KeyboardInterrupt:
        print("stackbuild: interrupted while starting; nothing was done", file=sys.stderr)
        return 130
    try:
        return cli_main()
    except KeyboardInterrupt:  # between main's own handlers (e.g. while printing)
        print("stackbuild: interrupted", file=sys.stderr)
        return 130
