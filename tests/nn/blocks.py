"""Hand-written blocks of the architectures channel groups are for (no torchvision, no timm).

Each factory returns a small seeded model in eval mode with non-trivial BatchNorm statistics;
``BLOCKS`` maps a name to ``(factory, make_input)`` like ``models.ARCHITECTURES``. The attention
blocks (``ATTENTION_BLOCKS``) are shaped and named as in timm and torchvision: timm's
``Attention`` (fused ``qkv``) in a ViT, Swin's ``WindowAttention`` (relative position bias
table) and Swin-V2's (``logit_scale``, ``cpb_mlp``, ``q/k/v_bias``), torchvision's ViT
``EncoderBlock`` and ``nn.TransformerEncoder`` (``nn.MultiheadAttention``), and torchvision's
``ShiftedWindowAttention`` (functional, ``head_dim`` from the input width).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .models import _finish, _images

__all__ = ["ATTENTION_BLOCKS", "BLOCKS", "GatedMLP", "SqueezeExcite"]


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


# ------------------------------------------------------------------ attention (timm, torchvision)


class Attention(nn.Module):
    """timm's ``Attention`` (timm/layers/attention.py): ``qkv`` → heads → ``norm`` → ``proj``."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """timm's ViT ``Block``: pre-norm attention and MLP, each on the residual stream."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm's ViT in small: patch embedding, class token, position embedding, blocks, head."""

    def __init__(self, dim=32, depth=2, num_heads=4, patch=4, image=8, channels=3, classes=5,
                 qk_norm=False):
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, dim, patch, patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, qk_norm) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def _relative_position_index(window):
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                        indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
    return relative[:, :, 0] * (2 * window - 1) + relative[:, :, 1]


class WindowAttention(nn.Module):
    """timm's Swin ``WindowAttention``: ``qkv``, a relative position bias per head, ``proj``."""

    def __init__(self, dim, num_heads, window=2):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, (window, window), num_heads
        self.window_area = window * window
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            0.5 * torch.randn((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * head_dim * num_heads)
        self.proj = nn.Linear(head_dim * num_heads, dim)
        self.softmax = nn.Softmax(dim=-1)

    def _get_rel_pos_bias(self):
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(B_ // num_win, num_win, self.num_heads, N, N) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, N, N)
        x = (self.softmax(attn) @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj(x)


class WindowAttentionV2(nn.Module):
    """timm's Swin-V2 ``WindowAttention`` (cosine attention, ``logit_scale`` per head, a
    continuous position bias ``cpb_mlp`` with one output per head, ``q/k/v_bias``). timm's
    forward reshapes the heads to the input width ``C`` (``reshape_to_input``), which fixes the
    head count; with ``reshape_to_input=False`` it reshapes to ``-1`` as Swin-V1 does."""

    def __init__(self, dim, num_heads, window=2, reshape_to_input=True):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, (window, window), num_heads
        self.reshape_to_input = reshape_to_input
        self.logit_scale = nn.Parameter(torch.log(10 * (1 + torch.rand(num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(inplace=True),
                                     nn.Linear(8, num_heads, bias=False))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(0.1 * torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = nn.Parameter(0.1 * torch.randn(dim))
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)
        span = torch.arange(-(window - 1), window, dtype=torch.float32) / (window - 1) * 8
        table = torch.stack(torch.meshgrid(span, span, indexing="ij")).permute(1, 2, 0)[None]
        table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
        self.register_buffer("relative_coords_table", table, persistent=False)
        self.register_buffer("relative_position_index", _relative_position_index(window),
                             persistent=False)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        attn = attn + 16 * torch.sigmoid(bias).unsqueeze(0)
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, N, N)
        x = (self.softmax(attn) @ v).transpose(1, 2)
        x = x.reshape(B_, N, C) if self.reshape_to_input else x.reshape(B_, N, -1)
        return self.proj(x)


def _shift_mask(size, window, shift):
    """Swin's attention mask of a cyclic shift: -100 between tokens of different regions."""
    img = torch.zeros(1, size, size, 1)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
        img[:, h, w, :] = i
    windows = _partition(img, window).view(-1, window * window)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _partition(x, window):
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C)


class SwinBlock(nn.Module):
    """timm's ``SwinTransformerBlock``: windows (cyclically shifted), attention, MLP."""

    def __init__(self, dim, num_heads, size, window=2, shift=0, attention=WindowAttention):
        super().__init__()
        self.size, self.window, self.shift = size, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)
        self.register_buffer("attn_mask", _shift_mask(size, window, shift) if shift else None)

    def forward(self, x):
        B, L, C = x.shape
        y = self.norm1(x).view(B, self.size, self.size, C)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = self.attn(_partition(y, self.window).view(-1, self.window ** 2, C), self.attn_mask)
        y = y.view(B, self.size // self.window, self.size // self.window, self.window,
                   self.window, C).permute(0, 1, 3, 2, 4, 5).reshape(B, self.size, self.size, C)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y.reshape(B, L, C)
        return x + self.mlp(self.norm2(x))


class Swin(nn.Module):
    """Patch embedding, a window block and a shifted-window block, pooled head."""

    def __init__(self, attention=WindowAttention, dim=16, num_heads=4, patch=2, image=8):
        super().__init__()
        size = image // patch
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.layers = nn.Sequential(SwinBlock(dim, num_heads, size, attention=attention),
                                    SwinBlock(dim, num_heads, size, shift=1, attention=attention))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.layers(x)).mean(1))


class ShiftedWindowAttention(nn.Module):
    """torchvision's Swin attention (unshifted here): its functional attention takes the
    projections' weights and derives ``head_dim`` as ``C // num_heads``."""

    def __init__(self, dim, num_heads, window=2):
        super().__init__()
        self.window_size, self.num_heads = [window, window], num_heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            0.5 * torch.randn((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(window))

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(
            2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = (q * (C // self.num_heads) ** -0.5) @ k.transpose(-2, -1)
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, C)
        return F.linear(x, self.proj.weight, self.proj.bias)


class EncoderBlock(nn.Module):
    """torchvision's ViT ``EncoderBlock``: ``ln_1``, ``self_attention`` (an
    ``nn.MultiheadAttention``, batch first), ``ln_2``, ``mlp``."""

    def __init__(self, num_heads, hidden_dim, mlp_dim):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, mlp_dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(mlp_dim, hidden_dim), nn.Dropout(0.0))

    def forward(self, input):
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class TorchvisionViT(nn.Module):
    """torchvision's ``VisionTransformer`` in small: ``conv_proj``, ``class_token``,
    ``encoder.layers`` of ``EncoderBlock``, ``heads``."""

    def __init__(self, image=8, patch=4, hidden_dim=32, num_heads=4, depth=2, classes=5,
                 channels=3):
        super().__init__()
        self.conv_proj = nn.Conv2d(channels, hidden_dim, patch, patch)
        self.class_token = nn.Parameter(0.02 * torch.randn(1, 1, hidden_dim))
        self.pos_embedding = nn.Parameter(
            0.02 * torch.randn(1, (image // patch) ** 2 + 1, hidden_dim))
        self.encoder = nn.Module()
        self.encoder.layers = nn.Sequential(*[EncoderBlock(num_heads, hidden_dim, 2 * hidden_dim)
                                              for _ in range(depth)])
        self.encoder.ln = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.heads = nn.Sequential(nn.Linear(hidden_dim, classes))

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embedding
        return self.heads(self.encoder.ln(self.encoder.layers(x))[:, 0])


class TransformerEncoder(nn.Module):
    """Token embedding, ``nn.TransformerEncoder`` (post-norm layers, fast path in eval), head."""

    def __init__(self, d_model=32, nhead=4, layers=2, batch_first=True, norm_first=False):
        super().__init__()
        self.embed = nn.Linear(6, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, 2 * d_model, dropout=0.0,
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 3)
        self.batch_first = batch_first

    def forward(self, x, src_key_padding_mask=None):
        x = self.embed(x) if self.batch_first else self.embed(x).transpose(0, 1)
        x = self.encoder(x, src_key_padding_mask=src_key_padding_mask)
        return self.head(x if self.batch_first else x.transpose(0, 1))


ATTENTION_BLOCKS = {
    # name: (factory, make_input, attention blocks, prunable)
    "timm_vit": (VisionTransformer, _images(3, 8, 8), "blocks.{}.attn", True),
    "timm_vit_qk_norm": (lambda: VisionTransformer(qk_norm=True), _images(3, 8, 8),
                         "blocks.{}.attn", True),
    "timm_swin": (Swin, _images(3, 8, 8), "layers.{}.attn", True),
    "timm_swin_v2": (lambda: Swin(WindowAttentionV2), _images(3, 8, 8), "layers.{}.attn", False),
    "swin_v2_reshape_any": (
        lambda: Swin(lambda d, h, w: WindowAttentionV2(d, h, w, reshape_to_input=False)),
        _images(3, 8, 8), "layers.{}.attn", True),
    "torchvision_swin": (lambda: Swin(ShiftedWindowAttention), _images(3, 8, 8),
                         "layers.{}.attn", False),
    "torchvision_vit": (TorchvisionViT, _images(3, 8, 8), "encoder.layers.{}.self_attention",
                        True),
    "transformer_encoder": (TransformerEncoder, _images(7, 6),
                            "encoder.layers.{}.self_attn", True),
    "transformer_encoder_seq_first": (lambda: TransformerEncoder(batch_first=False),
                                      _images(7, 6), "encoder.layers.{}.self_attn", True),
}


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
    """The named block (of ``BLOCKS`` or ``ATTENTION_BLOCKS``), seeded, eval mode, with
    non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    return _finish((BLOCKS[name] if name in BLOCKS else ATTENTION_BLOCKS[name])[0](), seed)
