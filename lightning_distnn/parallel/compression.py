"""Gradient compression: DDP communication hooks for all-reduce, codecs for the parameter server.

Compressors (``compression=`` in the strategies):

=========  ==========================================  ====================================
name       all-reduce (DDP comm hook)                  parameter server (worker -> server)
=========  ==========================================  ====================================
none       bucket / W, all-reduce fp32                  dense fp32
fp16       bucket cast to fp16, all-reduce, cast back   dense fp16
bf16       bucket cast to bf16, all-reduce, cast back   dense bf16
powersgd   torch ``powerSGD_hook`` (rank r, error       rank-r P, Q per matrix (one power
           feedback, warm start)                        iteration, warm start, error feedback)
topk       top-k of (grad + error), all-gather values   top-k values + int32 indices, error
           and int32 indices, error feedback            feedback
=========  ==========================================  ====================================

(Hooks carry no type annotations: DDP checks them and rejects postponed ones.) Every hook and codec
reports its payload to a :class:`~lightning_distnn.parallel.accounting.CommCounter`.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powerSGD

from lightning_distnn.parallel.accounting import CommCounter, nbytes, powersgd_values, topk_values

COMPRESSORS = ("none", "fp16", "bf16", "powersgd", "topk")


@dataclass
class CompressionConfig:
    """Which compressor and its knobs (plain data; Hydra passes these as strategy arguments).

    Args:
        name: one of :data:`COMPRESSORS`.
        rank: PowerSGD matrix approximation rank ``r``.
        start_iter: PowerSGD runs plain all-reduce for this many steps first (torch needs >= 2).
        min_compression_rate: PowerSGD compresses a matrix only when it shrinks at least this much.
        topk_ratio: fraction of values top-k keeps.
    """

    name: str = "none"
    rank: int = 2
    start_iter: int = 10
    min_compression_rate: float = 2.0
    topk_ratio: float = 0.01

    def __post_init__(self) -> None:
        self.name = str(self.name).lower()
        if self.name not in COMPRESSORS:
            raise ValueError(f"Unknown compression={self.name!r}; valid compressors: {', '.join(COMPRESSORS)}.")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"powersgd_rank={self.rank!r} must be a positive integer (e.g. 2 or 4).")
        if self.start_iter < 2:
            raise ValueError(
                f"powersgd_start_iter={self.start_iter} must be >= 2: torch's PowerSGD with error feedback needs "
                "at least 2 plain all-reduce steps first."
            )
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio={self.topk_ratio} must be in (0, 1], e.g. 0.01 to keep 1% of the values.")


# ---- DDP communication hooks --------------------------------------------------------------


class HookState:
    """What every hook of this module needs: the group, its size, the counter, per-bucket memory."""

    def __init__(self, process_group: Optional[dist.ProcessGroup], counter: CommCounter, config: CompressionConfig):
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.counter = counter
        self.config = config
        self.errors: dict[int, torch.Tensor] = {}
        self.powersgd: Optional[powerSGD.PowerSGDState] = None
        self.enabled = True  # local SGD turns communication off after its warm-up
        self.buckets = 0  # how many DDP buckets the hook has seen (bucket indices are 0..buckets-1)


def _done(tensor: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def allreduce_hook(state: HookState, bucket):
    """Plain fp32 all-reduce of the mean (DDP's default, counted)."""
    buffer = bucket.buffer()
    if not state.enabled:
        return _done(buffer)
    buffer.div_(state.world_size)
    state.counter.allreduce(nbytes(buffer), state.world_size)
    work = dist.all_reduce(buffer, group=state.process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _cast_hook(dtype: torch.dtype):
    def hook(state: HookState, bucket):
        buffer = bucket.buffer()
        if not state.enabled:
            return _done(buffer)
        compressed = buffer.to(dtype).div_(state.world_size)
        state.counter.allreduce(nbytes(compressed), state.world_size)
        work = dist.all_reduce(compressed, group=state.process_group, async_op=True)

        def decompress(fut):
            buffer.copy_(fut.value()[0])
            return buffer

        return work.get_future().then(decompress)

    hook.__name__ = f"{str(dtype).split('.')[-1]}_hook"
    return hook


fp16_hook = _cast_hook(torch.float16)
bf16_hook = _cast_hook(torch.bfloat16)


def powersgd_hook(state: HookState, bucket):
    """torch's ``powerSGD_hook`` (not the batched variant), with its payload counted.

    On CPU (gloo) each bucket's collectives finish before the hook returns. torch's hook issues a
    bucket's P and Q all-reduces from future callbacks, i.e. from gloo's worker threads, while
    the autograd thread goes on to the next bucket's hook and issues that bucket's first
    all-reduce. Gloo matches collectives by the order they are issued on each rank, so with
    several buckets two ranks can issue them in different orders and gloo aborts with
    "Received data size doesn't match expected size". Waiting here keeps one order on every rank; it gives up overlapping a
    bucket's communication with the rest of the backward pass, which gloo barely had anyway.
    """
    ps = state.powersgd
    buffer = bucket.buffer()
    state.buckets = max(state.buckets, bucket.index() + 1)
    if not state.enabled:
        return _done(buffer)
    if ps.iter < ps.start_powerSGD_iter:
        values = buffer.numel()
    else:
        values = powersgd_values([g.shape for g in bucket.gradients()], ps.matrix_approximation_rank, ps.min_compression_rate)
    state.counter.allreduce(values * buffer.element_size(), state.world_size)
    fut = powerSGD.powerSGD_hook(ps, bucket)
    if buffer.device.type == "cpu":
        return _done(fut.wait())
    return fut


def topk_hook(state: HookState, bucket):
    """Top-k sparsification with error feedback: all-gather k values and k int32 indices per rank."""
    buffer = bucket.buffer()
    if not state.enabled:
        return _done(buffer)
    index = bucket.index()
    error = state.errors.get(index)
    corrected = buffer if error is None else buffer + error
    k = topk_values(corrected.numel(), state.config.topk_ratio)
    _, idx = corrected.abs().topk(k, sorted=False)
    values = corrected[idx]
    residual = corrected.clone()
    residual[idx] = 0.0
    state.errors[index] = residual
    idx32 = idx.to(torch.int32)
    gathered_v = [torch.empty_like(values) for _ in range(state.world_size)]
    gathered_i = [torch.empty_like(idx32) for _ in range(state.world_size)]
    dist.all_gather(gathered_v, values, group=state.process_group)
    dist.all_gather(gathered_i, idx32, group=state.process_group)
    state.counter.allgather(nbytes(values) + nbytes(idx32), state.world_size)
    out = torch.zeros_like(buffer)
    for v, i in zip(gathered_v, gathered_i):
        out.index_add_(0, i.long(), v)
    out.div_(state.world_size)
    return _done(out)


HOOKS = {"none": allreduce_hook, "fp16": fp16_hook, "bf16": bf16_hook, "powersgd": powersgd_hook, "topk": topk_hook}


def register_compression_hook(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    *,
    config: CompressionConfig,
    counter: CommCounter,
    process_group: Optional[dist.ProcessGroup] = None,
) -> HookState:
    """Register the hook of ``config.name`` on a DDP model (on CPU/gloo as well as CUDA/NCCL)."""
    state = HookState(process_group, counter, config)
    if config.name == "powersgd":
        state.powersgd = powerSGD.PowerSGDState(
            process_group=process_group,
            matrix_approximation_rank=config.rank,
            start_powerSGD_iter=config.start_iter,
            min_compression_rate=config.min_compression_rate,
            use_error_feedback=True,
            warm_start=True,
            random_seed=0,
        )
    ddp_model.register_comm_hook(state, HOOKS[config.name])
    return state


# ---- parameter-server codecs ---------------------------------------------------------------


class Codec:
    """Encodes a worker's gradient shard into fixed-shape payload tensors; the server decodes.

    One codec object per (worker, server) pair holds that pair's error-feedback memory.
    ``specs(shapes)`` gives the payload's shapes and dtypes so a receiver can allocate buffers.
    """

    name = "none"

    def specs(self, shapes: Sequence[torch.Size]) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [((sum(int(torch.Size(s).numel()) for s in shapes),), torch.float32)]

    def encode(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat([g.reshape(-1) for g in grads]).float()]

    def decode(self, payload: Sequence[torch.Tensor], shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
        return _split(payload[0].float(), shapes)


def _split(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    out, offset = [], 0
    for s in shapes:
        n = int(torch.Size(s).numel())
        out.append(flat[offset : offset + n].view(s))
        offset += n
    return out


class CastCodec(Codec):
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.name = str(dtype).split(".")[-1]

    def specs(self, shapes):
        return [((sum(int(torch.Size(s).numel()) for s in shapes),), self.dtype)]

    def encode(self, grads):
        return [torch.cat([g.reshape(-1) for g in grads]).to(self.dtype)]


class TopKCodec(Codec):
    name = "topk"

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.error: Optional[torch.Tensor] = None

    def _k(self, shapes) -> int:
        return topk_values(sum(int(torch.Size(s).numel()) for s in shapes), self.ratio)

    def specs(self, shapes):
        k = self._k(shapes)
        return [((k,), torch.float32), ((k,), torch.int32)]

    def encode(self, grads):
        flat = torch.cat([g.reshape(-1) for g in grads]).float()
        if self.error is not None:
            flat = flat + self.error
        k = topk_values(flat.numel(), self.ratio)
        _, idx = flat.abs().topk(k, sorted=False)
        values = flat[idx]
        self.error = flat.clone()
        self.error[idx] = 0.0
        return [values, idx.to(torch.int32)]

    def decode(self, payload, shapes):
        total = sum(int(torch.Size(s).numel()) for s in shapes)
        flat = torch.zeros(total)
        flat.index_add_(0, payload[1].long(), payload[0].float())
        return _split(flat, shapes)


class PowerSGDCodec(Codec):
    """Rank-r PowerSGD for one worker: ``M + e ~ P Q^T``, one power iteration per step, warm start."""

    name = "powersgd"

    def __init__(self, rank: int, min_compression_rate: float = 2.0, seed: int = 0) -> None:
        self.rank = rank
        self.min_rate = min_compression_rate
        self.seed = seed
        self.q: dict[int, torch.Tensor] = {}
        self.error: dict[int, torch.Tensor] = {}

    def _plan(self, shapes):
        plan = []
        for s in shapes:
            s = torch.Size(s)
            n = s[0] if len(s) else 1
            m = s.numel() // max(n, 1)
            r = min(n, m, self.rank)
            plan.append((n, m, r, len(s) >= 2 and (n + m) * r * self.min_rate < n * m))
        return plan

    def specs(self, shapes):
        values = sum(r * (n + m) if c else n * m for n, m, r, c in self._plan(shapes))
        return [((values,), torch.float32)]

    def encode(self, grads):
        dense, factors = [], []
        for i, (g, (n, m, r, compress)) in enumerate(zip(grads, self._plan([g.shape for g in grads]))):
            if not compress:
                dense.append(g.reshape(-1).float())
                continue
            matrix = g.reshape(n, m).float()
            if i in self.error:
                matrix = matrix + self.error[i]
            q = self.q.get(i)
            if q is None:
                q = torch.randn(m, r, generator=torch.Generator().manual_seed(self.seed + i))
            p = torch.linalg.qr(matrix @ q).Q
            q = matrix.t() @ p
            self.q[i] = q
            self.error[i] = matrix - p @ q.t()
            factors += [p.reshape(-1), q.reshape(-1)]
        return [torch.cat(dense + factors) if dense or factors else torch.zeros(0)]

    def decode(self, payload, shapes):
        flat = payload[0].float()
        plan = self._plan(shapes)
        offset = 0
        out: list[Optional[torch.Tensor]] = [None] * len(shapes)
        for i, (n, m, r, compress) in enumerate(plan):
            if not compress:
                out[i] = flat[offset : offset + n * m].view(shapes[i])
                offset += n * m
        for i, (n, m, r, compress) in enumerate(plan):
            if compress:
                p = flat[offset : offset + n * r].view(n, r)
                offset += n * r
                q = flat[offset : offset + m * r].view(m, r)
                offset += m * r
                out[i] = (p @ q.t()).view(shapes[i])
        return out  # type: ignore[return-value]


def make_codec(config: CompressionConfig) -> Codec:
    """A fresh parameter-server codec (its own error-feedback memory) for ``config``."""
    if config.name == "none":
        return Codec()
    if config.name == "fp16":
        return CastCodec(torch.float16)
    if config.name == "bf16":
        return CastCodec(torch.bfloat16)
    if config.name == "topk":
        return TopKCodec(config.topk_ratio)
    return PowerSGDCodec(config.rank, config.min_compression_rate)

