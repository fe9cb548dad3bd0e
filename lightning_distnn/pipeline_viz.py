"""Draw a pipeline schedule as it ran: one Gantt row per rank, compute, transfers and waits in their own colours.

The records come from :class:`lightning_distnn.parallel.pipeline.Timeline` (gather them over the
ranks with ``PipelineStrategy.gather_timeline()``; the strategy's ``gantt_path`` option draws the
last training step at the end of ``fit``). Each rank's row has one lane per stage it holds for
the compute tasks (F, B, I, W; labelled with the micro-batch where the box is wide enough for the
label, so labels never overlap) and a thin lane below for communication: blocked receiving (R)
and sending (S). The title carries the measured bubble beside the theoretical one. Ranks of one
machine share ``time.perf_counter``'s clock; across machines each rank's row is aligned to its
own step start.

Command (the benchmark draws one too)::

    python benchmarks/bench_pipeline.py --gantt docs/pipeline_gantt.png
"""

from __future__ import annotations

import math
from typing import Optional

COLORS = {
    "F": "#4c72b0",
    "B": "#dd8452",
    "I": "#c44e52",
    "W": "#55a868",
    "R": "#bbbbbb",  # blocked receiving
    "S": "#8172b3",  # sending
}
LABELS = {"F": "forward", "B": "backward", "I": "input grad", "W": "weight grad", "R": "wait (recv)", "S": "send"}
COMPUTE = ("F", "B", "I", "W")
FIG_WIDTH_IN, FONT_PT = 12.0, 6.5


def measured_bubble(records: list, step: Optional[int] = None) -> float:
    """Idle fraction over all ranks of one step: 1 - compute time / (ranks x makespan)."""
    if not records:
        return math.nan
    step = max(r.step for r in records) if step is None else step
    chosen = [r for r in records if r.step == step]
    ranks = sorted({r.rank for r in chosen})
    start, end = min(r.start for r in chosen), max(r.end for r in chosen)
    busy = sum(r.duration for r in chosen if r.kind in COMPUTE)
    return max(0.0, 1.0 - busy / (len(ranks) * (end - start))) if end > start else math.nan


def _lanes(chosen: list) -> tuple[dict[tuple[int, int], float], dict[int, float], list[tuple[float, str]]]:
    """y positions: one lane per (rank, stage) for compute, one comm lane per rank; and the rank tick labels."""
    ranks = sorted({r.rank for r in chosen})
    y, lanes, comm, ticks = 0.0, {}, {}, []
    for rank in ranks:
        stages = sorted({r.stage for r in chosen if r.rank == rank and r.kind in COMPUTE})
        top = y
        for stage in stages:
            lanes[(rank, stage)] = y
            y += 1.0
        comm[rank] = y - 0.2
        ticks.append(((top + y - 0.2) / 2, f"rank {rank}\n" + " ".join(f"s{s}" for s in stages)))
        y += 0.9
    return lanes, comm, ticks


def plot_timeline(
    records: list,
    path: str,
    *,
    step: Optional[int] = None,
    title: str = "pipeline schedule",
    bubble: Optional[dict] = None,
) -> str:
    """Write a Gantt chart (PNG) of one step (default: the last recorded step); returns ``path``."""
    import matplotlib.pyplot as plt

    fig = draw_timeline(records, step=step, title=title, bubble=bubble)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_timeline(
    records: list,
    *,
    step: Optional[int] = None,
    title: str = "pipeline schedule",
    bubble: Optional[dict] = None,
):
    """The Gantt chart of one step as a matplotlib Figure (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not records:
        raise ValueError("no task records to draw: train at least one step with record_timeline=True.")
    step = max(r.step for r in records) if step is None else step
    chosen = [r for r in records if r.step == step]
    lanes, comm, ticks = _lanes(chosen)
    t0 = min(r.start for r in chosen)
    span_ms = max(r.end for r in chosen) * 1e3 - t0 * 1e3
    height = max(ticks[-1][0] + 1.5, 2.0)
    fig, ax = plt.subplots(figsize=(FIG_WIDTH_IN, 0.45 * height + 1.4))
    # ms per character of label at FONT_PT, over the ~85% of the figure width the axis gets
    ms_per_char = span_ms / (0.85 * FIG_WIDTH_IN * 72.0) * FONT_PT * 0.62
    for r in sorted(chosen, key=lambda r: r.kind in COMPUTE):
        left, width = (r.start - t0) * 1e3, r.duration * 1e3
        if r.kind in COMPUTE:
            y, h = lanes[(r.rank, r.stage)], 0.8
        else:
            y, h = comm[r.rank], 0.35
        ax.barh(y, width, left=left, height=h, color=COLORS.get(r.kind, "grey"), edgecolor="black",
                linewidth=0.3 if r.kind in COMPUTE else 0.0)
        label = f"{r.kind}{r.microbatch}"
        if r.kind in COMPUTE and width > (len(label) + 0.5) * ms_per_char:
            ax.text(left + width / 2, y, label, ha="center", va="center", fontsize=FONT_PT, color="white")
    ax.set_yticks([t for t, _ in ticks])
    ax.set_yticklabels([name for _, name in ticks], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time in the step (ms)")
    text = f"{title}: bubble measured {measured_bubble(chosen, step):.2f}"
    if bubble is not None and not math.isnan(bubble.get("structural", math.nan)):
        text += f", structural {bubble['structural']:.2f}"
    if bubble is not None and not math.isnan(bubble.get("theory", math.nan)):
        text += f", theory {bubble['theory']:.2f}"
    ax.set_title(text)
    kinds = [k for k in COLORS if any(r.kind == k for r in chosen)]
    ax.legend(handles=[Patch(color=COLORS[k], label=LABELS[k]) for k in kinds], loc="upper center",
              bbox_to_anchor=(0.5, -0.18), ncol=len(kinds), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig
