"""CNNs with residual stages of several blocks (the streams ``prune="residual"`` narrows).

``STAGES`` maps a name to ``(factory, make_input)`` like ``models.ARCHITECTURES``;
``factory(seed=0)`` returns a seeded model in eval mode with non-trivial BatchNorm statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import Bottleneck, InvertedResidual, _finish, _images

__all__ = ["STAGES", "make_stages"]


class ResNet50Stages(nn.Module):
    """Stem, two bottleneck stages (torchvision's layout): each opens with a projection
    shortcut (the second also downsamples) and goes on with identity shortcuts; pooled fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(Bottleneck(8, 4), Bottleneck(16, 4))
        self.layer2 = nn.Sequential(Bottleneck(16, 6, stride=2), Bottleneck(24, 6),
                                    Bottleneck(24, 6))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MobileNetV2Stages(nn.Module):
    """Stem, two inverted-residual stages (a strided block, then residual ones), 1×1 head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(
            InvertedResidual(8, 12, 2), InvertedResidual(12, 12, 1), InvertedResidual(12, 12, 1),
            InvertedResidual(12, 16, 2), InvertedResidual(16, 16, 1))
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU6(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(32, 5)

    def forward(self, x):
        return self.classifier(self.head(self.blocks(self.stem(x))))


class DepthwiseBlock(nn.Module):
    """ConvNeXt's block with a BatchNorm (``norm="batch"``) or its channels-last LayerNorm:
    ``x + pw2(gelu(pw1(norm(dw(x)))))``, the depthwise 7×7 reading the stream."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.BatchNorm2d(channels) if norm == "batch" else nn.LayerNorm(channels)
        self.pw1, self.act = nn.Conv2d(channels, 4 * channels, 1), nn.GELU()
        self.pw2 = nn.Conv2d(4 * channels, channels, 1)

    def forward(self, x):
        h = self.dw(x)
        if isinstance(self.norm, nn.LayerNorm):
            h = self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            h = self.norm(h)
        return x + self.pw2(self.act(self.pw1(h)))


class DepthwiseStage(nn.Module):
    """Patchify stem and two depthwise blocks (ConvNeXt-style), pooled linear head."""

    def __init__(self, norm: str = "batch"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), nn.BatchNorm2d(8))
        self.blocks = nn.Sequential(DepthwiseBlock(8, norm), DepthwiseBlock(8, norm))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class StreamOut(nn.Module):
    """A feature extractor: its last residual stage is the model's output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Bottleneck(8, 2)  # 8 → 8: identity shortcut

    def forward(self, x):
        return self.block(self.stem(x))


STAGES = {
    "resnet50_stages": (ResNet50Stages, _images(3, 16, 16)),
    "mobilenetv2_stages": (MobileNetV2Stages, _images(3, 16, 16)),
    "depthwise_stage": (DepthwiseStage, _images(3, 16, 16)),
    "convnext_stage": (lambda: DepthwiseStage("layer"), _images(3, 16, 16)),
    "stream_out": (StreamOut, _images(3, 8, 8)),
}


def make_stages(name: str, seed: int = 0) -> nn.Module:
    """The named model, seeded, eval mode, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    return _finish(STAGES[name][0](), seed)
