"""Draw a pipeline schedule as it ran: one Gantt row per rank, one box per F/B/I/W task.

The records come from :class:`lightning_distnn.parallel.pipeline.Timeline` (gather them over the
ranks with ``PipelineStrategy.gather_timeline()``; the strategy's ``gantt_path`` option draws the
last training step at the end of ``fit``). The title carries the measured bubble fraction beside
the theoretical one. Ranks of one machine share ``time.perf_counter``'s clock; across machines
each rank's row is aligned to its own step start.

Command (the benchmark draws one too)::

    python benchmarks/bench_pipeline.py --gantt docs/pipeline_gantt.png
"""

from __future__ import annotations

import math
from typing import Optional

COLORS = {"F": "#4c72b0", "B": "#dd8452", "I": "#c44e52", "W": "#55a868"}


def measured_bubble(records: list, step: Optional[int] = None) -> float:
    """Idle fraction over all ranks of one step: 1 - busy time / (ranks x makespan)."""
    if not records:
        return math.nan
    step = max(r.step for r in records) if step is None else step
    chosen = [r for r in records if r.step == step]
    ranks = sorted({r.rank for r in chosen})
    start, end = min(r.start for r in chosen), max(r.end for r in chosen)
    busy = sum(r.duration for r in chosen)
    return max(0.0, 1.0 - busy / (len(ranks) * (end - start))) if end > start else math.nan


def plot_timeline(
    records: list,
    path: str,
    *,
    step: Optional[int] = None,
    title: str = "pipeline schedule",
    bubble: Optional[dict] = None,
) -> str:
    """Write a Gantt chart (PNG) of one step's tasks (default: the last recorded step); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not records:
        raise ValueError("no task records to draw: train at least one step with record_timeline=True.")
    step = max(r.step for r in records) if step is None else step
    chosen = [r for r in records if r.step == step]
    ranks = sorted({r.rank for r in chosen})
    t0 = min(r.start for r in chosen)
    fig, ax = plt.subplots(figsize=(10, 0.7 * len(ranks) + 1.4))
    for r in chosen:
        y = ranks.index(r.rank)
        ax.barh(y, (r.end - r.start) * 1e3, left=(r.start - t0) * 1e3, color=COLORS.get(r.kind, "grey"),
                edgecolor="black", linewidth=0.4)
        width = (r.end - r.start) * 1e3
        ax.text((r.start - t0) * 1e3 + width / 2, y, f"{r.kind}{r.microbatch}\ns{r.stage}", ha="center",
                va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("time in the step (ms)")
    measured = measured_bubble(chosen, step)
    text = f"{title}: bubble measured {measured:.2f}"
    if bubble is not None and not math.isnan(bubble.get("theory", math.nan)):
        text += f", theory {bubble['theory']:.2f}"
    ax.set_title(text)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items() if any(r.kind == k for r in chosen)],
              loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
