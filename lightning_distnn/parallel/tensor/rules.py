"""The automatic plan's rules: one row per module kind.

A rule says which incoming activation layouts a kind takes as they are (any other is gathered
first: the column-wise layer that produced the shard all-gathers its output), which style the
module gets given that layout (and the user's choice), and the layout it hands on. The planner
(:func:`lightning_distnn.parallel.tensor.plan.plan_tp`) only threads the layout through the walk and
applies these rows. ``print(rules_table())`` shows the table; docs/tensor_parallel.md explains it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from lightning_distnn.parallel.tensor.data import REPLICATE, SHARD_CHANNELS, SHARD_FEATURES
from lightning_distnn.parallel.tensor.styles import CHANNEL_NORMS
from lightning_distnn.parallel.tensor.walk import residual_of

__all__ = ["is_depthwise", "RULES", "Decision", "Rule", "Step", "rule_for", "rules_table"]

ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d)
DROPOUTS = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
_WHOLE_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_ANY = frozenset({REPLICATE, SHARD_CHANNELS, SHARD_FEATURES})


@dataclass(frozen=True)
class Step:
    """What a rule sees: one module, the layout of its input, the user's style for it (or ``None``)."""

    name: str
    module: nn.Module
    layout: str
    user: Optional[str]
    tp: int
    first: bool  # the network's first module (its input is the data, never a shard)
    no_partner: Optional[str]  # why no Conv2d/Linear can pair with this one; None when one can

    @property
    def kind(self) -> str:
        return type(self.module).__name__


@dataclass(frozen=True)
class Decision:
    """A rule's answer: the style, the layout out, a note; ``whole`` = the reason it needs the whole input."""

    style: str
    output: str
    note: str = ""
    whole: Optional[str] = None


@dataclass(frozen=True)
class Rule:
    """One row of the table: which modules, which layouts they take, which styles a user may give."""

    kind: str
    matches: Callable[[nn.Module], bool]
    takes: frozenset
    user_styles: tuple[str, ...]
    decide: Callable[[Step], Decision]
    summary: str  # what it does, for the printed table
    expands: bool = False  # a residual block: the planner walks its branch and shortcut


def _on_shard(step: Step) -> Decision:
    return Decision("pass", step.layout, "runs on the shard" if step.layout != REPLICATE else "")


def _weights(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def is_depthwise(m: nn.Module) -> bool:
    """A depthwise convolution: one filter per channel (``groups == in_channels == out_channels > 1``)."""
    return isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels


def _depthwise(step: Step) -> Optional[Decision]:
    """A depthwise conv on a channel shard runs on it in place (no traffic); ``None``: the ordinary rule."""
    m, user = step.module, step.user
    if user == "depthwise" and not is_depthwise(m):
        raise ValueError(f"plan[{step.name!r}]='depthwise' needs a depthwise Conv2d (groups == in_channels == "
                         f"out_channels), got groups={m.groups}, {m.in_channels} -> {m.out_channels} channels.")
    if not is_depthwise(m) or user not in (None, "depthwise"):
        return None
    if step.layout == SHARD_CHANNELS and m.groups % step.tp == 0:
        return Decision("depthwise", SHARD_CHANNELS, "depthwise: runs on its channel shard, no traffic")
    if user == "depthwise":
        raise ValueError(f"plan[{step.name!r}]='depthwise' needs a channel-sharded input with channels divisible by "
                         f"tp={step.tp}: plan the conv before it 'colwise', or this one 'replicate'.")
    return None


def _matmul(step: Step) -> Decision:
    """Conv2d and Linear: colwise on a replicated input (when it pays off), rowwise on a shard; a depthwise
    conv on a channel shard stays on it."""
    m, tp, user = step.module, step.tp, step.user
    depthwise = _depthwise(step)
    if depthwise is not None:
        return depthwise
    conv = isinstance(m, nn.Conv2d)
    shard = SHARD_CHANNELS if conv else SHARD_FEATURES
    out_size, in_size = (m.out_channels, m.in_channels) if conv else (m.out_features, m.in_features)
    unit = "channels" if conv else "features"
    shardable = not (conv and m.groups != 1)
    note = ""
    if user is None:
        if not shardable:
            style, note = "replicate", f"not sharded: grouped convolution (groups={m.groups})"
        elif step.layout != REPLICATE:
            style = "rowwise"
        elif out_size % tp:
            style, note = "replicate", f"not sharded: out_{unit}={out_size} not divisible by tp={tp}"
        elif step.no_partner is not None:
            style = "replicate"
            note = f"replicated ({_weights(m):,} weights): {step.no_partner}; sharding it would all-gather its output"
        else:
            style = "colwise"
    else:
        style = user
        if style != "replicate" and not shardable:
            raise ValueError(f"plan[{step.name!r}]={style!r}: a Conv2d with groups={m.groups} cannot be "
                             "sharded; plan it 'replicate'.")
        need = out_size if style == "colwise" else in_size
        if style != "replicate" and need % tp:
            what = ("out_" if style == "colwise" else "in_") + unit
            raise ValueError(
                f"plan[{step.name!r}]={style!r} splits {what}={need} over tp={tp}, which does not divide it: "
                f"plan it 'replicate' or pick tp dividing {need}."
            )
        note = "not sharded (user plan)" if style == "replicate" else ""
    if style == "replicate":
        return Decision("replicate", REPLICATE, note, whole=f"{step.name!r} (replicate)")
    if style == "colwise":
        return Decision("colwise", shard, "input gathered (all-gather)" if step.layout != REPLICATE else "")
    return Decision("rowwise", REPLICATE, "input split locally" if step.layout == REPLICATE else "")


def _dropout(step: Step) -> Decision:
    p = step.module.p
    if p > 0 and step.layout == REPLICATE and not step.first and step.tp > 1:
        raise ValueError(
            f"{step.name!r} ({step.kind}, p={p}) acts on a replicated activation: each rank would drop different "
            "elements of what must stay identical. Move it right after a column-wise layer (a sharded "
            "activation), or set p=0."
        )
    return _on_shard(step)


def _flatten(step: Step) -> Decision:
    m = step.module
    if step.layout == SHARD_CHANNELS and m.start_dim == 1 and m.end_dim == -1:
        return Decision("pass", SHARD_FEATURES, "channel shard = contiguous feature block")
    return Decision("pass", REPLICATE, whole=f"{step.name!r} (Flatten(start_dim={m.start_dim}, end_dim={m.end_dim}))")


def _channel_norm(step: Step) -> Decision:
    m, tp = step.module, step.tp
    want = step.user or ("sharded_norm" if step.layout != REPLICATE else "replicate")
    if want != "sharded_norm":
        return Decision(want, REPLICATE, whole=f"{step.name!r} (replicate)")
    if step.layout == REPLICATE:
        raise ValueError(
            f"plan[{step.name!r}]='sharded_norm' needs a channel-sharded input, but its input is replicated: "
            "plan the layer before it 'colwise' or this one 'replicate'."
        )
    if m.num_features % tp:
        return Decision("replicate", REPLICATE, f"not sharded: num_features={m.num_features} not divisible by tp={tp}",
                        whole=f"{step.name!r} (num_features={m.num_features} not divisible by tp={tp})")
    return Decision("sharded_norm", step.layout, "per-channel statistics on the shard")


def _residual(step: Step) -> Decision:
    return Decision("pass", REPLICATE, "residual add and ReLU on whole tensors",
                    whole=f"{step.name!r} ({step.kind}: its shortcut needs the whole input)")


def _whole(step: Step) -> Decision:
    if step.user == "replicate" and residual_of(step.module) is not None:
        note = "not sharded (user plan): the block runs whole"
    elif isinstance(step.module, _WHOLE_NORMS):
        note = "needs the whole activation"
    else:
        note = "unknown module: runs unsharded"
    has_params = any(True for _ in step.module.parameters())
    return Decision("replicate" if has_params else "pass", REPLICATE, note, whole=f"{step.name!r} ({step.kind})")


_MATMUL_STYLES = ("colwise", "rowwise", "replicate")  # and "depthwise" for a depthwise Conv2d (plan.py lets it through)
_OTHER_STYLES = ("pass", "replicate", "sharded_norm")

#: The table, first match wins; the last row matches every module.
RULES: tuple[Rule, ...] = (
    Rule("Conv2d", lambda m: isinstance(m, nn.Conv2d), frozenset({REPLICATE, SHARD_CHANNELS}), _MATMUL_STYLES, _matmul,
         "replicate in: colwise -> shard(1) if it divides and pairs, else replicate; shard(1) in: rowwise -> replicate; "
         "depthwise on shard(1): depthwise -> shard(1)"),
    Rule("Linear", lambda m: isinstance(m, nn.Linear), frozenset({REPLICATE, SHARD_FEATURES}), _MATMUL_STYLES, _matmul,
         "as Conv2d on features (shard(-1))"),
    Rule("elementwise", lambda m: isinstance(m, ELEMENTWISE), _ANY, _OTHER_STYLES, _on_shard, "pass, layout unchanged"),
    Rule("pooling", lambda m: isinstance(m, POOLS), frozenset({REPLICATE, SHARD_CHANNELS}), _OTHER_STYLES, _on_shard,
         "pass, layout unchanged"),
    Rule("Dropout", lambda m: isinstance(m, DROPOUTS), _ANY, _OTHER_STYLES, _dropout,
         "pass; refused with p>0 on a replicated activation"),
    Rule("Flatten", lambda m: isinstance(m, nn.Flatten), _ANY, _OTHER_STYLES, _flatten,
         "Flatten(1, -1) of shard(1) -> shard(-1); otherwise the whole activation"),
    Rule("BatchNorm1d/2d", lambda m: isinstance(m, CHANNEL_NORMS), _ANY, _OTHER_STYLES, _channel_norm,
         "shard in: sharded_norm (per-channel statistics); replicate in: replicate"),
    Rule("residual block", lambda m: residual_of(m) is not None, frozenset({REPLICATE}), ("pass", "replicate"),
         _residual, "branch by these rules, whole before the add; shortcut replicated", expands=True),
    Rule("anything else", lambda m: True, frozenset({REPLICATE}), _OTHER_STYLES, _whole,
         "replicate (pass without parameters)"),
)

#: The row a residual block the user plans 'replicate' falls back to (kept whole, not sharded inside).
WHOLE = RULES[-1]


def rule_for(module: nn.Module) -> Rule:
    """The first row of :data:`RULES` that matches ``module``."""
    return next(rule for rule in RULES if rule.matches(module))


def rules_table() -> str:
    """The rules as a text table: kind, layouts taken as they are, styles a user plan may give, what it does."""
    rows = [("kind", "takes", "user styles", "does")] + [
        (r.kind, ", ".join(sorted(r.takes)), ", ".join(r.user_styles), r.summary) for r in RULES
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
