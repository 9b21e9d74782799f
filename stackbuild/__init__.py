"""stackbuild: a patch-and-build manager for the Intel XPU LLM inference stack."""

from __future__ import annotations

__version__ = "0.1.0"
