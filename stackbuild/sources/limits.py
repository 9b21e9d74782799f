"""What one source archive may expand to. Its own small module so that loading a recipe
(which may override the limits) does not import the archive readers."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """The defaults hold any vLLM release (0.23.0: 6,155 members, 86 MiB expanded,
    37 MB packed) with room to spare; `[sources.NAME.limits]` overrides them."""

    max_total_mb: int = 1024
    max_members: int = 100_000
    max_member_mb: int = 256

    @property
    def stream_cap(self) -> int:
        """Decompressed bytes allowed in all: the data plus generous room for headers."""
        return (self.max_total_mb + 16) * MiB + self.max_members * 4096


DEFAULT_LIMITS = ArchiveLimits()
