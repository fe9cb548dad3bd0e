"""The tensor-parallel plan as plain data: one row per planned module, printable as a table.

An activation between modules is a plain local tensor in one of three layouts: ``replicate``
(whole on every rank), ``shard(1)`` (the channels of an NCHW tensor split over the ranks) or
``shard(-1)`` (the features of an ``(N, F)`` tensor split over the ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["REPLICATE", "SHARD_CHANNELS", "SHARD_FEATURES", "STYLES", "PlanEntry", "TPPlan"]

#: Style names a user plan may use.
STYLES = ("colwise", "rowwise", "replicate", "sharded_norm", "depthwise", "pass")

REPLICATE, SHARD_CHANNELS, SHARD_FEATURES = "replicate", "shard(1)", "shard(-1)"


@dataclass
class PlanEntry:
    """One planned module: its style and the activation layout before and after it."""

    name: str
    kind: str
    style: str
    input: str
    output: str
    note: str = ""


@dataclass
class TPPlan:
    """A tensor-parallel plan for one network (module names relative to it), in forward order."""

    tp: int
    entries: list[PlanEntry] = field(default_factory=list)

    def styles(self) -> dict[str, str]:
        """Module name -> style name (the form a user plan takes)."""
        return {e.name: e.style for e in self.entries}

    def __str__(self) -> str:
        head = ("module", "kind", "style", "input", "output", "note")
        rows = [head] + [(e.name, e.kind, e.style, e.input, e.output, e.note) for e in self.entries]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
        lines = [f"tensor-parallel plan, tp={self.tp}"]
        for j, row in enumerate(rows):
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


