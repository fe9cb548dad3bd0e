"""Networks of the seed document, as plain ``nn.Sequential`` stacks of blocks.

Each top-level child of the returned ``nn.Sequential`` is one *layer* in the sense of the
model partitioners: a conv block (Conv2d, ReLU, optional MaxPool2d) or an FC block
(optional Flatten, Linear, ReLU except on the last). Pipeline stages split between blocks;
tensor parallelism walks into them.
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import nn


class CaseStudyCNN(nn.Sequential):
    """The seed's case-study network: ``conv_layers`` conv layers then ``fc_layers`` FC layers.

    Defaults are the case study: 5 conv layers of 512 filters and 3 fully connected layers,
    the first two of 1024 units and the last mapping to ``num_classes``.

    Each conv layer is a 3x3 convolution (padding 1) followed by ReLU. A 2x2 max-pool follows
    the conv layers listed in ``pool_after`` (1-based; default: the first four, so a 32x32 input
    is 2x2 when it reaches the fifth conv layer and the flattened features are
    ``conv_filters * 2 * 2``). No dropout or batch norm, so every layout is deterministic and
    comparable with one process.

    ``conv_filters`` and ``fc_width`` are the width knobs for CPU runs (e.g. 32 and 256).
    """

    def __init__(
        self,
        conv_layers: int = 5,
        conv_filters: int = 512,
        fc_layers: int = 3,
        fc_width: int = 1024,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        pool_after: Optional[Iterable[int]] = None,
    ) -> None:
        if conv_layers < 1 or fc_layers < 1:
            raise ValueError(
                f"CaseStudyCNN needs at least one conv and one FC layer, got conv_layers={conv_layers}, "
                f"fc_layers={fc_layers}."
            )
        pools = set(range(1, min(conv_layers, 4) + 1)) if pool_after is None else set(pool_after)
        bad = sorted(p for p in pools if not 1 <= p <= conv_layers)
        if bad:
            raise ValueError(f"pool_after={sorted(pools)} names conv layers {bad} outside 1..{conv_layers}.")
        size = image_size
        for _ in pools:
            size //= 2
        if size < 1:
            raise ValueError(
                f"image_size={image_size} is too small for {len(pools)} 2x2 poolings: "
                "use larger images or fewer entries in pool_after."
            )
        blocks: list[nn.Module] = []
        channels = in_channels
        for i in range(1, conv_layers + 1):
            block = [nn.Conv2d(channels, conv_filters, kernel_size=3, padding=1), nn.ReLU()]
            if i in pools:
                block.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*block))
            channels = conv_filters
        features = conv_filters * size * size
        widths = [fc_width] * (fc_layers - 1) + [num_classes]
        for i, width in enumerate(widths):
            block = [nn.Flatten()] if i == 0 else []
            block.append(nn.Linear(features, width))
            if i < len(widths) - 1:
                block.append(nn.ReLU())
            blocks.append(nn.Sequential(*block))
            features = width
        super().__init__(*blocks)
        init_relu_network(self)


class SeedNet(nn.Sequential):
    """The seed's LeNet-style ``Net`` (conv 3->6->16, FC 120, 84, 10), repaired.

    The seed's version called an undefined ``F`` and hard-coded the flatten size; here it is a
    ``nn.Sequential`` of five blocks that works for 32x32 inputs (CIFAR-10 and upsampled digits).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__(
            nn.Sequential(nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU()),
            nn.Sequential(nn.Linear(120, 84), nn.ReLU()),
            nn.Sequential(nn.Linear(84, num_classes)),
        )


def init_relu_network(net: nn.Module) -> None:
    """He (Kaiming) normal weights and zero biases for every Conv2d/Linear.

    PyTorch's default init shrinks activations layer by layer; without batch norm an 8-layer
    ReLU stack then trains slowly or not at all. He init keeps their scale.
    """
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements held by this process (local shards count their local size)."""
    total = 0
    for p in module.parameters():
        local = getattr(p, "to_local", None)
        total += (local() if callable(local) else p).numel()
    return total
