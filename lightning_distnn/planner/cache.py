"""The planner's disk cache: profiles, links and calibrations as JSON files keyed by what shaped them.

Default directory ``~/.cache/lightning_distnn/planner`` (or ``$DISTNN_PLANNER_CACHE``). Writes are
atomic (a temporary file renamed), so a process never reads a half-written file; a broken file
reads as missing and is measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lightning_distnn.planner.profile import model_signature

DEFAULT_CACHE = Path(os.environ.get("DISTNN_PLANNER_CACHE", Path.home() / ".cache" / "lightning_distnn" / "planner"))


def cache_key(net: nn.Module, example_input: torch.Tensor, *, world_size: int, **options: Any) -> str:
    """The cache key of a profile: :func:`model_signature` plus whatever else shaped it (``options``)."""
    device = next((p.device for p in net.parameters()), example_input.device)
    base = model_signature(net, example_input, device=device, world_size=world_size)
    return hashlib.sha256(f"{base}|{sorted(options.items())}".encode()).hexdigest()[:24]


def read_cache(cache_dir: Optional[os.PathLike], key: str) -> Optional[dict[str, Any]]:
    """The cached JSON for ``key`` or ``None`` (no cache, no file, or a broken file)."""
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_cache(cache_dir: Optional[os.PathLike], key: str, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (a half-written file is never read)."""
    if cache_dir is None:
        return
    path = Path(cache_dir) / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
