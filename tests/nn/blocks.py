"""Hand-written blocks of the architectures channel groups are for (no torchvision, no timm).

Each factory returns a small seeded model in eval mode with non-trivial BatchNorm statistics;
``BLOCKS`` maps a name to ``(factory, make_input)`` like ``models.ARCHITECTURES``.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import _finish, _images

__all__ = ["BLOCKS", "GatedMLP", "SqueezeExcite"]


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> list:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck: 1x1 → 3x3 (optionally grouped: ResNeXt) → 1x1, with downsample."""

    def __init__(self, cin: int, mid: int, cout: int, groups: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, mid)
        self.conv2, self.bn2 = _conv_bn(mid, mid, 3, groups=groups)
        self.conv3, self.bn3 = _conv_bn(mid, cout)
        self.downsample = nn.Sequential(*_conv_bn(cin, cout)) if cin != cout else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50Stem(nn.Module):
    """7x7 stem, BN, ReLU, max pool, one bottleneck with downsample, pooled head."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(3, 8, 7, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Bottleneck(8, 8, 16, groups=groups))
        self.fc = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.layer1(x).mean((2, 3)), 1))


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(silu(fc1(pool(x)))))`` (EfficientNet/MobileNetV3 SE)."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(self.pool(x)))))


class MBConv(nn.Module):
    """EfficientNet MBConv: expand, depthwise, SE, project, residual; stem and head around."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 8, 3), nn.SiLU())
        self.expand = nn.Sequential(*_conv_bn(8, 32), nn.SiLU())
        self.depthwise = nn.Sequential(*_conv_bn(32, 32, 3, groups=32), nn.SiLU())
        self.se = SqueezeExcite(32, 6)
        self.project = nn.Sequential(*_conv_bn(32, 8))
        self.head = nn.Sequential(*_conv_bn(8, 16), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.project(self.se(self.depthwise(self.expand(x)))))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * growth), nn.ReLU()
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseNet(nn.Module):
    """Stem, a dense block of two layers (growth 4), transition, classifier (DenseNet-121)."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layer1, self.layer2 = DenseLayer(8, 4), DenseLayer(12, 4)
        self.transition = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(),
                                        nn.Conv2d(16, 8, 1, bias=False), nn.AvgPool2d(2))
        self.classifier = nn.Linear(8, 5)

    def forward(self, x):
        features = [self.conv0(x)]
        features.append(self.layer1(features))
        features.append(self.layer2(features))
        x = self.transition(torch.cat(features, 1))
        return self.classifier(x.mean((2, 3)))


class Inception(nn.Module):
    """Stem conv fanning out to four branches (1x1; 1x1→3x3; 1x1→5x5; pool→1x1), concat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 12, 3), nn.ReLU())
        self.branch1 = nn.Sequential(*_conv_bn(12, 4), nn.ReLU())
        self.branch2 = nn.Sequential(*_conv_bn(12, 6), nn.ReLU(), *_conv_bn(6, 4, 3), nn.ReLU())
        self.branch3 = nn.Sequential(*_conv_bn(12, 2), nn.ReLU(), *_conv_bn(2, 4, 5), nn.ReLU())
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *_conv_bn(12, 4), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)
        return self.fc(x.mean((2, 3)))


class Fire(nn.Module):
    """SqueezeNet fire module after a stem: squeeze 1x1 → (expand 1x1, expand 3x3) → concat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2))
        self.squeeze = nn.Conv2d(16, 6, 1)
        self.squeeze_activation = nn.ReLU()
        self.expand1x1 = nn.Conv2d(6, 8, 1)
        self.expand3x3 = nn.Conv2d(6, 8, 3, padding=1)
        self.classifier = nn.Sequential(nn.Conv2d(16, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                        nn.Flatten())

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(self.stem(x)))
        x = torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)
        return self.classifier(x)


class GatedMLP(nn.Module):
    """A LLaMA-style block: RMS-normed residual stream, SwiGLU MLP ``down(silu(gate) * up)``."""

    def __init__(self, hidden: int = 8, inner: int = 24):
        super().__init__()
        self.embed = nn.Linear(4, hidden)
        self.norm = nn.RMSNorm(hidden)
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.act_fn = nn.SiLU()
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        h = self.embed(x)
        y = self.norm(h)
        h = h + self.down_proj(self.act_fn(self.gate_proj(y)) * self.up_proj(y))
        return self.head(h)


BLOCKS = {
    "resnet50_stem": (ResNet50Stem, _images(3, 16, 16)),
    "resnext": (lambda: ResNet50Stem(groups=4), _images(3, 16, 16)),
    "mbconv_se": (MBConv, _images(3, 8, 8)),
    "densenet": (DenseNet, _images(3, 8, 8)),
    "inception": (Inception, _images(3, 8, 8)),
    "fire": (Fire, _images(3, 17, 17)),
    "gated_mlp": (GatedMLP, _images(5, 4)),
}


def make_block(name: str, seed: int = 0) -> nn.Module:
    """The named block, seeded, eval mode, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    return _finish(BLOCKS[name][0](), seed)
