"""Small deterministic test architectures for the nn half (no torchvision, no downloads).

Every factory returns a model in eval mode, seeded, with non-trivial BatchNorm statistics.
``ARCHITECTURES`` maps a name to ``(factory, make_input)``; ``make_input(n=2, seed=0)``
returns one batch as the compressor receives it: a tensor, or a dict of tensors for the
BERT-style model (``model(**batch)``). ``call_args(batch)`` turns a batch into
``(args, kwargs)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torch.utils._pytree as _pytree
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "call_args",
    "make_bert_layer",
    "make_cnn1d",
    "make_cnn2d",
    "make_cnn3d",
    "make_mlp",
    "make_mobilenetv2_block",
    "make_resnet_basic",
    "make_resnet_bottleneck",
    "make_unprunable",
    "make_vgg",
]


def call_args(batch) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)``: dict batches are keyword inputs."""
    if isinstance(batch, dict):
        return (), dict(batch)
    return (batch,), {}


def _finish(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic BatchNorm statistics and affine parameters; eval mode."""
    gen = torch.Generator().manual_seed(seed + 1000)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            module.weight.data.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
            module.bias.data.copy_(0.1 * torch.randn(n, generator=gen))
    return model.eval()


def _images(*shape):
    """Input maker for image-like tensors of shape (n, *shape)."""
    def make_input(n: int = 2, seed: int = 0) -> torch.Tensor:
        return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    return make_input


# ----------------------------------------------------------------------------------------
# Sequential stacks

def make_mlp(seed: int = 0) -> nn.Module:
    """Linear(8,16) ReLU Linear(16,12) GELU Dropout Linear(12,4): units 0→2 and 2→5."""
    torch.manual_seed(seed)
    return _finish(nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(12, 4)), seed)


def make_cnn1d(seed: int = 0) -> nn.Module:
    """Conv1d BN ReLU Conv1d ReLU AdaptiveAvgPool Flatten Linear: units 0→3 (BN), 3→7."""
    torch.manual_seed(seed)
    return _finish(nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 6, 3),
        nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(6, 5)), seed)


def make_cnn2d(seed: int = 0) -> nn.Module:
    """Conv2d ReLU MaxPool Conv2d BN SiLU Flatten Linear: units 0→3, 3→7 (4 positions)."""
    torch.manual_seed(seed)
    return _finish(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 6, 3),
        nn.BatchNorm2d(6), nn.SiLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 5)), seed)


def make_cnn3d(seed: int = 0) -> nn.Module:
    """Conv3d ReLU Conv3d BN Hardswish AvgPool Flatten Linear: units 0→2, 2→6 (8 positions)."""
    torch.manual_seed(seed)
    return _finish(nn.Sequential(
        nn.Conv3d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 5, 3, padding=1),
        nn.BatchNorm3d(5), nn.Hardswish(), nn.AvgPool3d(2), nn.Flatten(),
        nn.Linear(5 * 2 * 2 * 2, 3)), seed)


# ----------------------------------------------------------------------------------------
# VGG-style

class VGG(nn.Module):
    """Conv-BN-ReLU-MaxPool features, a flatten, and a dropout MLP classifier."""

    def __init__(self, flatten: str = "module"):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (8, 12, 16):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten() if flatten == "module" else None
        self.classifier = nn.Sequential(
            nn.Linear(16 * 2 * 2, 24), nn.ReLU(True), nn.Dropout(),
            nn.Linear(24, 20), nn.ReLU(True), nn.Dropout(), nn.Linear(20, 10))

    def forward(self, x):
        x = self.features(x)
        x = self.flatten(x) if self.flatten is not None else x.view(x.size(0), -1)
        return self.classifier(x)


def make_vgg(seed: int = 0, flatten: str = "module") -> nn.Module:
    """VGG on 16×16 images; ``flatten="module"`` (nn.Flatten) or ``"view"`` (x.view)."""
    torch.manual_seed(seed)
    return _finish(VGG(flatten), seed)


# ----------------------------------------------------------------------------------------
# ResNet blocks

class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn, ``out += identity``, relu."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1×1 → 3×3 → 1×1 (expansion 4), ``out += identity``."""

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = 4 * width
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """Stem, two residual blocks (the second downsamples), global pool, classifier."""

    def __init__(self, block: str):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        if block == "basic":
            self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 12, stride=2))
            c_out = 12
        else:
            self.layer1 = nn.Sequential(Bottleneck(8, 2), Bottleneck(8, 3, stride=2))
            c_out = 12
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_out, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def make_resnet_basic(seed: int = 0) -> nn.Module:
    """ResNet with two BasicBlocks; units: each block's conv1 → conv2."""
    torch.manual_seed(seed)
    return _finish(ResNet("basic"), seed)


def make_resnet_bottleneck(seed: int = 0) -> nn.Module:
    """ResNet with two Bottlenecks; units: conv1 → conv2 and conv2 → conv3 in each block."""
    torch.manual_seed(seed)
    return _finish(ResNet("bottleneck"), seed)


# ----------------------------------------------------------------------------------------
# MobileNetV2

class InvertedResidual(nn.Module):
    """Expand 1×1 + BN + ReLU6, depthwise 3×3 + BN + ReLU6, project 1×1 + BN (+ residual)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        self.expand = nn.Conv2d(c_in, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        out = F.relu6(self.bn1(self.expand(x)))
        out = F.relu6(self.bn2(self.depthwise(out)))
        out = self.bn3(self.project(out))
        return x + out if self.use_residual else out


class MobileNetV2Block(nn.Module):
    """Stem conv, one inverted residual block, head 1×1 conv, global pool, classifier."""

    def __init__(self, residual: bool):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(6), nn.ReLU6(inplace=True))
        self.block = InvertedResidual(6, 6 if residual else 8, stride=1 if residual else 2)
        c_block = 6 if residual else 8
        self.head = nn.Sequential(nn.Conv2d(c_block, 16, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU6(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 5))

    def forward(self, x):
        x = self.head(self.block(self.stem(x)))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def make_mobilenetv2_block(seed: int = 0, residual: bool = True) -> nn.Module:
    """MobileNetV2-style net; unit ``block.expand`` → ``block.project`` through
    ``(block.bn1, block.depthwise, block.bn2)``, with or without the residual add."""
    torch.manual_seed(seed)
    return _finish(MobileNetV2Block(residual), seed)


# ----------------------------------------------------------------------------------------
# BERT-style encoder in the Hugging Face layout

class ModelOutput(OrderedDict):
    """Dict with attribute access, like transformers' ``ModelOutput``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error

    def to_tuple(self):
        return tuple(self.values())


# Like transformers, so torch.export can return it.
_pytree.register_pytree_node(
    ModelOutput, lambda out: (list(out.values()), list(out.keys())),
    lambda values, keys: ModelOutput(zip(keys, values, strict=True)),
    serialized_type_name="tests.nn.models.ModelOutput")


class GELUActivation(nn.Module):
    """Like transformers' GELUActivation: wraps ``F.gelu`` (an unknown module kind)."""

    def __init__(self):
        super().__init__()
        self.act = F.gelu

    def forward(self, input):
        return self.act(input)


class NewGELUActivation(nn.Module):
    """transformers' tanh-approximate GELU written out elementwise (GPT-2)."""

    def forward(self, input):
        return 0.5 * input * (1.0 + torch.tanh(
            math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_size = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(0.1)

    def split_heads(self, x):
        new_shape = x.size()[:-1] + (self.heads, self.head_size)
        return x.view(new_shape).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask=None):
        q = self.split_heads(self.query(hidden_states))
        k = self.split_heads(self.key(hidden_states))
        v = self.split_heads(self.value(hidden_states))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.dropout(nn.functional.softmax(scores, dim=-1))
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return context.view(context.size()[:-2] + (self.heads * self.head_size,))


class SelfOutput(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.self = SelfAttention(hidden, heads)
        self.output = SelfOutput(hidden)

    def forward(self, hidden_states, attention_mask=None):
        return self.output(self.self(hidden_states, attention_mask), hidden_states)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)
        self.intermediate_act_fn = GELUActivation() if act == "gelu" else NewGELUActivation()

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class Output(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(intermediate, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states, input_tensor):
        hidden_states = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(hidden_states + input_tensor)


class Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, act: str):
        super().__init__()
        self.attention = Attention(hidden, heads)
        self.intermediate = Intermediate(hidden, intermediate, act)
        self.output = Output(hidden, intermediate)

    def forward(self, hidden_states, attention_mask=None):
        attention_output = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class Encoder(nn.Module):
    def __init__(self, n_layers: int, **sizes):
        super().__init__()
        self.layer = nn.ModuleList(Layer(**sizes) for _ in range(n_layers))

    def forward(self, hidden_states, attention_mask=None):
        for layer_module in self.layer:
            hidden_states = layer_module(hidden_states, attention_mask)
        return hidden_states


class Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_positions: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(embeddings))


class BertForSequenceClassification(nn.Module):
    """Embeddings, encoder (``encoder.layer.N``), pooler (dense + tanh), classifier."""

    def __init__(self, vocab=50, hidden=16, heads=2, intermediate=32, n_layers=2,
                 n_labels=3, act="gelu"):
        super().__init__()
        self.embeddings = Embeddings(vocab, hidden, max_positions=32)
        self.encoder = Encoder(n_layers, hidden=hidden, heads=heads,
                               intermediate=intermediate, act=act)
        self.pooler = nn.Sequential(OrderedDict(dense=nn.Linear(hidden, hidden),
                                                activation=nn.Tanh()))
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(hidden, n_labels)

    def forward(self, input_ids, attention_mask=None, return_dict=True):
        extended_mask = None
        if attention_mask is not None:
            extended_mask = attention_mask[:, None, None, :].to(torch.float32)
            extended_mask = (1.0 - extended_mask) * torch.finfo(torch.float32).min
        hidden = self.encoder(self.embeddings(input_ids), extended_mask)
        logits = self.classifier(self.dropout(self.pooler(hidden[:, 0])))
        if not return_dict:
            return logits, hidden
        return ModelOutput(logits=logits, last_hidden_state=hidden)


def make_bert_layer(seed: int = 0, act: str = "gelu", n_layers: int = 2) -> nn.Module:
    """Tiny BERT classifier; units ``encoder.layer.N.intermediate.dense`` →
    ``encoder.layer.N.output.dense`` and ``pooler.dense`` → ``classifier``.

    ``act="gelu"`` wraps ``F.gelu`` in a custom module; ``"new_gelu"`` writes the tanh
    approximation out elementwise (GPT-2's NewGELUActivation).
    """
    torch.manual_seed(seed)
    return _finish(BertForSequenceClassification(act=act, n_layers=n_layers), seed)


def make_text_input(n: int = 2, seed: int = 0, length: int = 6) -> dict:
    """``{"input_ids", "attention_mask"}``; the second half of the last sequence is padding."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 50, (n, length), generator=gen)
    attention_mask = torch.ones(n, length, dtype=torch.long)
    attention_mask[-1, length // 2:] = 0
    input_ids[attention_mask == 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ----------------------------------------------------------------------------------------
# Nothing prunable

class ConvResidual(nn.Module):
    """conv → bn → add to the input: the only conv feeds a residual add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x))).mean(dim=(2, 3))


def make_unprunable(seed: int = 0, kind: str = "linear") -> nn.Module:
    """A model with no unit: ``kind="linear"`` (a single Linear, input (n, 8)) or
    ``"residual"`` (a conv whose output enters a residual add, input (n, 3, 8, 8))."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 4)) if kind == "linear" else ConvResidual()
    return _finish(model, seed)


ARCHITECTURES = {
    "mlp": (make_mlp, _images(8)),
    "cnn1d": (make_cnn1d, _images(3, 10)),
    "cnn2d": (make_cnn2d, _images(3, 8, 8)),
    "cnn3d": (make_cnn3d, _images(2, 4, 4, 4)),
    "vgg": (make_vgg, _images(3, 16, 16)),
    "vgg_view": (lambda seed=0: make_vgg(seed, flatten="view"), _images(3, 16, 16)),
    "resnet_basic": (make_resnet_basic, _images(3, 8, 8)),
    "resnet_bottleneck": (make_resnet_bottleneck, _images(3, 8, 8)),
    "mobilenetv2_residual": (make_mobilenetv2_block, _images(3, 8, 8)),
    "mobilenetv2_plain": (lambda seed=0: make_mobilenetv2_block(seed, residual=False),
                          _images(3, 8, 8)),
    "bert": (make_bert_layer, make_text_input),
    "bert_new_gelu": (lambda seed=0: make_bert_layer(seed, act="new_gelu"), make_text_input),
}
