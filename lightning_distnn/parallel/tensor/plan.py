"""Plan and apply tensor parallelism: :func:`plan_tp` (plain data, no processes) and :func:`apply_tp`.

:func:`plan_tp` walks the network in forward order (:mod:`.walk`) and asks the table of rules
(:mod:`.rules`) what each module does given the layout of its input. The only thing it adds to the
rules is the one move that spans modules: when a module needs the whole activation while it is
sharded, the column-wise layer that produced the shard gathers its output instead, and the rows in
between are re-laid out as replicated.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from lightning_distnn.parallel.tensor.data import REPLICATE, STYLES, PlanEntry, TPPlan
from lightning_distnn.parallel.tensor.rules import WHOLE, Step, is_depthwise, rule_for
from lightning_distnn.parallel.tensor.styles import ChannelShardedNorm, ColwiseConv, DepthwiseConv, RowwiseConv
from lightning_distnn.parallel.tensor.walk import Unit, leaves, overridden_chain, units, walkable

__all__ = ["apply_tp", "plan_tp"]

_OUTPUT = "the network output"


def _no_partner(rest: list[Unit], end: str) -> Optional[str]:
    """Why a column-wise layer here would have no row-wise partner (``None`` when it has one)."""
    for unit in rest:
        if is_depthwise(unit.module):
            continue  # runs on the shard: the conv after it is the partner
        if isinstance(unit.module, (nn.Conv2d, nn.Linear)):
            return None
        if unit.residual is not None:
            kind = type(unit.module).__name__
            return f"no row-wise partner before {unit.name!r} (a {kind} takes the whole activation)"
    return f"no row-wise partner before {end}"


class _Planner:
    """Threads the activation layout through the units; the rules decide, this only records and gathers."""

    def __init__(self, tp: int, user: Mapping[str, str]) -> None:
        self.tp, self.user = tp, user
        self.entries: list[PlanEntry] = []
        self.layout = REPLICATE
        self.producer: Optional[int] = None  # entry index of the column-wise layer that made the current shard
        self.seen = 0

    def gather(self, reason: str) -> None:
        """Make the producer of the current shard gather its output; re-lay out the rows after it."""
        if self.layout == REPLICATE:
            return
        p = self.entries[self.producer]  # only a column-wise layer makes a shard
        p.output, p.note = REPLICATE, (p.note + "; " if p.note else "") + f"output gathered for {reason}"
        for e in self.entries[self.producer + 1:]:
            if e.style == "sharded_norm":
                e.style, e.note = "replicate", "replicated (input gathered)"
            elif e.note == "runs on the shard":
                e.note = ""
            e.input = e.output = REPLICATE
        self.layout, self.producer = REPLICATE, None

    def chain(self, chain: list[Unit], end: str) -> None:
        for i, unit in enumerate(chain):
            self.unit(unit, _no_partner(chain[i + 1:], end))

    def unit(self, unit: Unit, no_partner: Optional[str]) -> None:
        rule, user, kind = rule_for(unit.module), self.user.get(unit.name), type(unit.module).__name__
        if user is not None and user not in rule.user_styles and not (user == "depthwise" and is_depthwise(unit.module)):
            *head, last = rule.user_styles
            raise ValueError(f"plan[{unit.name!r}]={user!r} does not apply to {kind}; use {', '.join(head)} or {last}.")
        if rule.expands and user == "replicate":
            rule = WHOLE
        if self.layout not in rule.takes:
            self.gather(f"{unit.name!r} ({kind})")
        step = Step(unit.name, unit.module, self.layout, user, self.tp, self.seen == 0, no_partner)
        self.seen += 1
        decision = rule.decide(step)
        if decision.whole:
            self.gather(decision.whole)
        if rule.expands:
            self.residual(unit)
        self.entries.append(PlanEntry(unit.name, kind, decision.style, self.layout, decision.output, decision.note))
        if decision.style == "colwise":
            self.producer = len(self.entries) - 1
        self.layout = decision.output
        if self.layout == REPLICATE:
            self.producer = None

    def residual(self, block: Unit) -> None:
        """The branch planned by the rules and whole again before the add; the shortcut stays replicated."""
        add = f"the residual add of {block.name!r}"
        self.chain(block.residual.branch, add)
        self.gather(add)
        shortcut = block.residual.shortcut
        if shortcut is None:
            return
        if self.user.get(shortcut.name, "replicate") != "replicate":
            raise ValueError(
                f"plan[{shortcut.name!r}]={self.user[shortcut.name]!r}: the shortcut of a residual block stays "
                "replicated (sharding it would add a collective before the add); remove it from the plan."
            )
        n = sum(p.numel() for p in shortcut.module.parameters())
        note = f"shortcut replicated ({n:,} weights): sharding it would add a collective before the add"
        self.entries.append(PlanEntry(shortcut.name, type(shortcut.module).__name__, "replicate" if n else "pass",
                                      REPLICATE, REPLICATE, note))


def plan_tp(module: nn.Module, tp: int, *, plan: Optional[Mapping[str, str]] = None) -> TPPlan:
    """The tensor-parallel plan of a network, with the user's choices (``plan``) applied.

    Automatic choices follow :data:`~lightning_distnn.parallel.tensor.rules.RULES`: a Conv2d or
    Linear whose input is replicated is ``colwise`` (if its output channels/features divide by
    ``tp`` and a Conv2d/Linear can pair with it before the next residual block, else ``replicate``,
    with the reason in the note); one whose input is sharded is ``rowwise``. A residual block is
    sharded inside (one all-reduce per block forward) and whole at its add. Whenever a module needs
    the whole activation while it is sharded (a Linear after a conv with no Flatten, LayerNorm, an
    unknown module, a residual block, the network's output), the layer that produced the shard
    gathers its output instead (``colwise`` with output ``replicate``).

    Args:
        module: an ``nn.Sequential`` (blocks may nest), e.g. the whole network or one pipeline stage,
            or a network whose forward is a chain of its children (torchvision's ResNet).
        tp: tensor-parallel degree.
        plan: module name -> style name (:data:`STYLES`); overrides the automatic choice.
    """
    if not walkable(module):
        base = overridden_chain(module)
        hint = "" if base is None else (
            f" ({type(module).__name__} overrides the forward of {base}, so the order of its children is unknown)")
        raise TypeError(
            f"tensor parallelism plans an nn.Sequential of blocks or a network whose forward is a chain of its "
            f"children (torchvision ResNet), got {type(module).__name__}{hint}: pass the network (e.g. "
            "ImageClassifier.net), a slice of it, or its layers in an nn.Sequential."
        )
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp={tp!r} must be a positive integer.")
    names = {name for name, _ in leaves(module)}
    plan = dict(plan or {})
    all_names = {name for name, _ in module.named_modules() if name}
    for name, style in plan.items():
        if name not in names:
            hint = " (it is inside a module that is planned as one unit)" if name in all_names else ""
            raise ValueError(
                f"plan names module {name!r}, which is not a planned module of this network{hint}; valid names: "
                f"{', '.join(sorted(names))}."
            )
        if style not in STYLES:
            raise ValueError(f"plan[{name!r}]={style!r} is not a style; valid styles: {', '.join(STYLES)}.")
    planner = _Planner(tp, plan)
    planner.chain(units(module), _OUTPUT)
    planner.gather(_OUTPUT)
    planned = {e.name for e in planner.entries}
    unused = sorted(set(plan) - planned)
    if unused:
        raise ValueError(
            f"plan names {', '.join(map(repr, unused))}, inside a residual block the plan keeps whole ('replicate'): "
            "drop one of the two entries."
        )
    return TPPlan(tp=tp, entries=planner.entries)


def _style_of(entry: PlanEntry, module: nn.Module) -> Optional[ParallelStyle]:
    def layout(text: str, conv: bool) -> Placement:
        if text == REPLICATE:
            return Replicate()
        return Shard(1) if conv else Shard(-1)

    conv = isinstance(module, nn.Conv2d)
    if entry.style == "colwise":
        if conv:
            return ColwiseConv(input_layouts=layout(entry.input, True), output_layouts=layout(entry.output, True))
        return ColwiseParallel(input_layouts=layout(entry.input, False), output_layouts=layout(entry.output, False))
    if entry.style == "rowwise":
        if conv:
            return RowwiseConv(input_layouts=layout(entry.input, True))
        return RowwiseParallel(input_layouts=layout(entry.input, False), output_layouts=Replicate())
    if entry.style == "sharded_norm":
        return ChannelShardedNorm()
    if entry.style == "depthwise":
        return DepthwiseConv()
    return None


def apply_tp(
    module: nn.Module,
    tp_mesh: DeviceMesh,
    *,
    plan: Union[None, Mapping[str, str], TPPlan] = None,
) -> TPPlan:
    """Shard ``module`` in place over the 1-D ``tp_mesh`` (e.g. ``mesh["tp"]``); returns the plan used.

    ``plan`` is ``None`` (automatic, :func:`plan_tp`), a mapping of module name -> style name that
    overrides the automatic choices, or a finished :class:`TPPlan`. Parameters of sharded layers become
    ``DTensor`` s (full shape in ``state_dict``, a shard per rank); the rest stay plain tensors,
    identical on every rank. Works on any ``nn.Sequential`` of blocks (e.g. one pipeline stage) and on
    torchvision ResNets, whose own forward then runs unchanged over the sharded layers.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(
            f"apply_tp needs a 1-D mesh, got {tp_mesh.ndim} axes {tp_mesh.mesh_dim_names}: pass mesh['tp']."
        )
    tp = tp_mesh.size()
    finished = plan if isinstance(plan, TPPlan) else plan_tp(module, tp, plan=plan)
    if finished.tp != tp:
        raise ValueError(f"the plan was made for tp={finished.tp}, the mesh has {tp} ranks: re-plan with plan_tp(..., {tp}).")
    if tp == 1:
        return finished
    modules = dict(leaves(module))
    styles = {}
    for entry in finished.entries:
        if entry.name not in modules:
            raise ValueError(f"the plan names {entry.name!r}, which this module does not have.")
        style = _style_of(entry, modules[entry.name])
        if style is not None:
            styles[entry.name] = style
    for name, style in styles.items():  # one by one: nested names of different depth
        parallelize_module(modules[name], tp_mesh, style)
    module._tp_plan = finished
    return finished
