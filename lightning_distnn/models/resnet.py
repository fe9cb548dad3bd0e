"""torchvision's ResNet with a CIFAR stem and a width knob (the "bring your own model" network).

The networks returned here are plain ``torchvision.models.resnet.ResNet`` instances (their
``forward`` is torchvision's), so every strategy sees exactly what a Lightning user's model is:
a chain of children (``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, torch.flatten, fc``)
with residual blocks. Only the stem and the widths differ from ImageNet's ResNet:

* ``conv1`` is a 3x3 convolution with stride 1 (CIFAR-sized 16-32 px images keep their resolution),
* ``maxpool`` is ``nn.Identity``,
* stage ``i`` has ``width * 2**i`` channels (``width=64`` is the usual ResNet-18; 8-16 trains on a CPU).
"""

from __future__ import annotations

from typing import Sequence, Type, Union

import torch
from torch import nn


def _torchvision_resnet():
    try:
        from torchvision.models import resnet
    except ImportError as exc:  # pragma: no cover - torchvision is a dependency of the recipes
        raise ImportError(
            "lightning_distnn.models.resnet needs torchvision: `pip install torchvision`."
        ) from exc
    return resnet


def cifar_resnet(
    block: Union[str, Type[nn.Module]] = "basic",
    layers: Sequence[int] = (2, 2, 2, 2),
    *,
    width: int = 64,
    num_classes: int = 10,
    in_channels: int = 3,
    seed: Union[int, None] = None,
) -> nn.Module:
    """A torchvision ``ResNet`` with a CIFAR stem (3x3 conv, stride 1, no max-pool) and widths ``width * 2**i``.

    Args:
        block: ``"basic"`` / ``"bottleneck"`` or torchvision's ``BasicBlock`` / ``Bottleneck`` class.
        layers: residual blocks per stage (four stages), e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        width: channels of the stem and of ``layer1``; ``64`` is the published ResNet-18.
        num_classes: outputs of the final ``fc``.
        in_channels: channels of the input images.
        seed: if given, ``torch.manual_seed(seed)`` before the weights are drawn (reproducible models).
    """
    resnet = _torchvision_resnet()
    blocks = {"basic": resnet.BasicBlock, "bottleneck": resnet.Bottleneck}
    if isinstance(block, str):
        if block.lower() not in blocks:
            raise ValueError(f"block={block!r} is not a ResNet block; valid: 'basic', 'bottleneck'.")
        block = blocks[block.lower()]
    if block not in blocks.values():
        raise TypeError(f"block={block!r} must be torchvision's BasicBlock or Bottleneck (or 'basic'/'bottleneck').")
    layers = list(layers)
    if len(layers) != 4 or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in layers):
        raise ValueError(f"layers={layers!r} must be four positive block counts, e.g. (2, 2, 2, 2) for ResNet-18.")
    for name, value in (("width", width), ("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if seed is not None:
        torch.manual_seed(seed)
    net = resnet.ResNet(block, layers, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.maxpool = nn.Identity()
    inplanes = width
    for i, n in enumerate(layers):
        planes, stride = width * 2**i, 1 if i == 0 else 2
        down = None
        if stride != 1 or inplanes != planes * block.expansion:
            down = nn.Sequential(
                resnet.conv1x1(inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        stage = [block(inplanes, planes, stride, down)]
        inplanes = planes * block.expansion
        stage += [block(inplanes, planes) for _ in range(1, n)]
        setattr(net, f"layer{i + 1}", nn.Sequential(*stage))
    net.fc = nn.Linear(inplanes, num_classes)
    for m in net.modules():  # torchvision's initialisation, for the replaced layers too
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def resnet18_cifar(*, width: int = 64, num_classes: int = 10, in_channels: int = 3, seed: Union[int, None] = None) -> nn.Module:
    """ResNet-18 (BasicBlock, 2-2-2-2) with the CIFAR stem; ``width`` scales every stage (64 = published)."""
    return cifar_resnet("basic", (2, 2, 2, 2), width=width, num_classes=num_classes, in_channels=in_channels, seed=seed)
