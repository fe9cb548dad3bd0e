"""torchvision's MobileNetV2 at a CPU width (issue 14: bring your own model).

The network is torchvision's ``MobileNetV2`` as is (its own forward), so every strategy takes it:
data parallel as any module; pipeline through its chain of children (``features.0 .. features.18``,
the functional pooling and flatten as glue, ``classifier``); tensor parallel inside each inverted
residual block (expand conv on output channels, depthwise conv on the channel shard, project conv on
input channels: one all-reduce per block). ``width_mult`` (torchvision's) scales the channels; 0.25
trains on a CPU. ``blocks`` keeps only the first blocks of torchvision's setting (a shorter network
for tests).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def mobilenet_v2_cpu(
    *,
    width_mult: float = 0.25,
    num_classes: int = 10,
    blocks: Optional[int] = None,
    dropout: float = 0.0,
    seed: Optional[int] = None,
) -> nn.Module:
    """torchvision's ``MobileNetV2(width_mult=...)`` with ``num_classes`` outputs.

    Args:
        width_mult: channel multiplier (1.0 is the published network); channels are rounded to multiples of 8.
        num_classes: outputs of the classifier.
        blocks: keep the first ``blocks`` rows of torchvision's inverted-residual setting (7 rows; ``None``: all).
        dropout: the classifier's dropout (0 by default: tensor parallelism refuses dropout on a replicated
            activation, and equivalence tests need determinism).
        seed: if given, ``torch.manual_seed(seed)`` before the weights are drawn.
    """
    from torchvision.models.mobilenetv2 import MobileNetV2

    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    if blocks is not None:
        if not isinstance(blocks, int) or not 1 <= blocks <= len(setting):
            raise ValueError(f"blocks={blocks!r} must be an integer from 1 to {len(setting)} (rows of MobileNetV2's setting).")
        setting = setting[:blocks]
    if seed is not None:
        torch.manual_seed(seed)
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=setting, dropout=dropout)
