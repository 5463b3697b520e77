"""Record the dataflow graph of one forward pass of a torch model.

Offers :func:`record`, which runs the model once (eval, ``no_grad``) and returns a
:class:`Graph` of :class:`Node` (executed ops) and :class:`Value` (tensors), and the op
vocabulary the graph walk in :mod:`skid.nn._graph` reads (module kinds, op names by role).

A :class:`torch.overrides.TorchFunctionMode` sees every torch function and tensor method
call (so models ``torch.fx`` cannot trace, with Python control flow, work), while forward
hooks make each module of a known kind (``Linear``, ``Conv``, ``BatchNorm``, activations,
pooling, ``LayerNorm`` ...) one atomic node. Modules of unknown kinds are transparent: the
ops inside them are recorded. Tensors are identified by ``id()`` and kept alive during the
pass so ids are not reused; an in-place op makes a new value for the same tensor.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._surgery import registered

__all__ = [
    "CONCAT_OPS", "ELEMENTWISE_OPS", "METADATA_OPS", "MODULE_KINDS", "NORM_OPS", "REDUCE_OPS",
    "RESHAPE_OPS", "TRANSPOSE_OPS", "Graph", "Node", "Value", "module_kind", "op_name",
    "paused_trace", "pool_dims", "record",
]

# ----------------------------------------------------------------------------------------
# Vocabulary: module kinds recorded as one node, and functional op names by role.


def _newer(*names: str) -> tuple:
    """The torch.nn classes of these names that this torch version has."""
    return tuple(getattr(nn, name) for name in names if hasattr(nn, name))


ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    *_newer("LPPool3d"),
)
MIXING = (
    nn.LayerNorm, nn.GroupNorm, *_newer("RMSNorm"), nn.LocalResponseNorm, nn.Softmax,
    nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.Embedding, nn.EmbeddingBag, nn.Bilinear, nn.GLU,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.PixelShuffle,
    nn.PixelUnshuffle, nn.ChannelShuffle, nn.Upsample,
)
# Kinds without state to slice. Layers with state (Linear, Conv, BatchNorm, InstanceNorm,
# PReLU and every registered kind) take their role from their surgery entry's ``walk``.
MODULE_KINDS: dict[type, str] = {
    nn.Flatten: "reshape", nn.Unflatten: "reshape",
    **dict.fromkeys(ACTIVATIONS, "elementwise"), **dict.fromkeys(POOLS, "pool"),
    **dict.fromkeys(MIXING, "mixing"),
}

METADATA_OPS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous",
    "is_floating_point", "is_complex", "element_size", "data_ptr", "get_device",
    "storage_offset", "len", "get:shape", "get:dtype", "get:device", "get:ndim", "get:is_cuda",
    "get:requires_grad", "get:layout", "get:is_leaf", "get:grad_fn", "get:names",
    "get:is_sparse", "get:is_quantized", "get:is_meta", "get:itemsize", "get:nbytes",
    "get:grad", "get:is_nested",
})
ELEMENTWISE_OPS = frozenset({
    # activations and dropout (functional, torch.* and Tensor methods; in-place forms too)
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "hardtanh", "softsign",
    "tanhshrink", "log_sigmoid", "logsigmoid", "hardshrink", "softshrink", "threshold",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_dropout",
    "feature_alpha_dropout",
    # copies and casts
    "clone", "contiguous", "to", "float", "double", "half", "bfloat16", "type", "detach",
    # unary math
    "neg", "negative", "abs", "exp", "exp2", "expm1", "log", "log2", "log1p", "sqrt", "rsqrt",
    "square", "reciprocal", "erf", "erfc", "sin", "cos", "sinh", "cosh", "atan", "asinh",
    "sign", "sgn", "clamp", "clip", "clamp_min", "clamp_max", "nan_to_num", "floor", "ceil",
    "round", "trunc", "frac", "logit",
    # binary arithmetic (the other operand must not vary along the channels)
    "add", "radd", "iadd", "sub", "rsub", "isub", "mul", "rmul", "imul", "div", "rdiv",
    "idiv", "truediv", "rtruediv", "itruediv", "true_divide", "floor_divide", "floordiv",
    "remainder", "mod", "pow", "rpow", "ipow", "maximum", "minimum", "fmax", "fmin", "where",
    "masked_fill", "lerp", "copysign", "atan2", "hypot",
})
RESHAPE_OPS = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"})
TRANSPOSE_OPS = frozenset({"transpose", "swapaxes", "swapdims", "permute", "movedim", "t"})
REDUCE_OPS = frozenset({"mean", "sum", "amax", "amin", "nanmean", "nansum"})
CONCAT_OPS = frozenset({"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"})
NORM_OPS = frozenset({"layer_norm", "group_norm", "rms_norm", "softmax", "log_softmax",
                       "normalize", "local_response_norm", "instance_norm", "batch_norm"})


def pool_dims(name: str) -> int:
    """Spatial dims pooled by a pooling op or module class name (``max_pool2d`` → 2), else 0."""
    lowered = name.lower()
    if "pool" not in lowered or lowered[-2:] not in ("1d", "2d", "3d"):
        return 0
    return int(lowered[-2])


def module_kind(module: nn.Module) -> str | None:
    """The kind of a module recorded as one node, or None (transparent: ops inside recorded).

    A subclass that overrides ``forward`` is unknown: its forward might do anything.
    """
    for cls in type(module).__mro__:
        entry = registered(cls)
        kind = getattr(entry, "walk", None) if entry is not None else None
        kind = kind or MODULE_KINDS.get(cls)
        if kind is not None:
            return kind if type(module).forward is cls.forward else None
    return None


def op_name(func) -> str:
    """Normalized name of a torch function/method: ``Tensor.add_`` and ``__add__`` → ``add``."""
    name = getattr(func, "__name__", "") or repr(func)
    if name == "__get__":  # a property such as Tensor.shape or Tensor.T
        return "get:" + getattr(getattr(func, "__self__", None), "__name__", "?")
    return name.strip("_")


# ----------------------------------------------------------------------------------------
# The recorded graph.

@dataclass
class Node:
    """One executed op: a known module call or a torch function/method call."""

    name: str  # op name, or the module's class name
    module: str | None  # qualified module name for module nodes
    kind: str  # module kind, or "function"
    inputs: list[int]  # value ids of all tensor inputs, in call order
    first: int | None  # value id of the first positional argument when it is a tensor
    outputs: list[int]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.name} {self.module!r}" if self.module is not None else f"`{self.name}`"


@dataclass
class Value:
    """One tensor value; an in-place op makes a new value for the same tensor object."""

    shape: tuple
    producer: int | None
    users: list[int] = field(default_factory=list)


class Graph:
    """Dataflow graph recorded during one forward pass."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules  # qualified name -> module
        self.nodes: list[Node] = []
        self.values: list[Value] = []
        self.outputs: set[int] = set()
        self.calls: dict[str, int] = {}  # module name -> number of calls
        self._current: dict[int, int] = {}  # id(tensor) -> latest value id
        self._alive: list[torch.Tensor] = []  # keeps ids unique during the trace

    def resolve(self, tensors) -> list[int]:
        """Value ids of tensors, creating source values for tensors not produced by an op."""
        ids = []
        for t in tensors:
            if id(t) not in self._current:
                self._new_value(t, None)
            ids.append(self._current[id(t)])
        return ids

    def add_node(self, node: Node, output) -> None:
        """Append a node, link it to its inputs' users and create its output values."""
        index = len(self.nodes)
        for value in dict.fromkeys(node.inputs):
            self.values[value].users.append(index)
        node.outputs = [self._new_value(t, index) for t in _tensor_leaves(output)]
        self.nodes.append(node)

    def _new_value(self, tensor: torch.Tensor, producer: int | None) -> int:
        self._alive.append(tensor)
        self.values.append(Value(tuple(tensor.shape), producer))
        self._current[id(tensor)] = len(self.values) - 1
        return len(self.values) - 1

    def mark_outputs(self, output) -> None:
        self.outputs = set(self.resolve(_tensor_leaves(output)))

    def source_tensors(self):
        """(value id, tensor) of the tensors that no recorded op produced (inputs, weights)."""
        by_id = {}
        for tensor in self._alive:
            by_id.setdefault(id(tensor), tensor)
        for tensor_id, value_id in self._current.items():
            if self.values[value_id].producer is None:
                yield value_id, by_id[tensor_id]


def _tensor_leaves(obj) -> list[torch.Tensor]:
    """Tensors inside nested tuples, lists, dicts (HF ModelOutput included) and dataclasses."""
    leaves = []
    _add_leaves(obj, leaves)
    return leaves


#: Argument types that hold no tensor: answered before the container checks (an ABC's
#: ``isinstance`` costs a microsecond, and the trace asks for every argument of every op).
_NO_TENSORS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size,
               slice, type(Ellipsis))


def _add_leaves(obj, leaves: list) -> None:
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
    elif isinstance(obj, _NO_TENSORS):
        return
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _add_leaves(item, leaves)
    elif isinstance(obj, Mapping):
        for item in list(obj.values()):
            _add_leaves(item, leaves)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _add_leaves(getattr(obj, f.name), leaves)


class _Recorder(TorchFunctionMode):
    """Records torch function calls made outside atomic modules."""

    def __init__(self, graph: Graph):
        super().__init__()
        self.graph = graph
        self.depth = 0  # > 0 while inside a module recorded as one node
        self.pending: list[tuple[list[int], int | None]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth:  # inside a module recorded as one node (most calls): nothing to name
            return func(*args, **kwargs)
        name = op_name(func)
        if name in METADATA_OPS:
            return func(*args, **kwargs)
        inputs = self.graph.resolve(_tensor_leaves((args, kwargs)))  # before in-place ops run
        output = func(*args, **kwargs)
        if inputs or _tensor_leaves(output):
            first = inputs[0] if args and isinstance(args[0], torch.Tensor) else None
            node = Node(name, None, "function", inputs, first, [], args, kwargs)
            self.graph.add_node(node, output)
        return output

    def pre_hook(self, module, args, kwargs):
        if self.depth == 0:
            inputs = self.graph.resolve(_tensor_leaves((args, kwargs)))
            first = inputs[0] if args and isinstance(args[0], torch.Tensor) else None
            self.pending.append((inputs, first))
        self.depth += 1

    def make_post_hook(self, name: str):
        def post_hook(module, args, kwargs, output):
            self.depth -= 1
            if self.depth == 0:
                inputs, first = self.pending.pop()
                node = Node(type(module).__name__, name, module_kind(module), inputs, first, [])
                self.graph.add_node(node, output)
                self.graph.calls[name] = self.graph.calls.get(name, 0) + 1
        return post_hook


#: The recorder of the pass under way (its hooks see other code run inside the pass).
_ACTIVE = contextvars.ContextVar("skid_trace_recorder", default=None)


@contextlib.contextmanager
def paused_trace():
    """Nothing run inside is recorded by the trace under way, if any: e.g. a copy of a block
    that another finder's hook runs during the trace's pass (its modules carry copies of the
    trace's hooks, which see the recorder inside an atomic module and record nothing)."""
    recorder = _ACTIVE.get()
    if recorder is None:
        yield
        return
    recorder.depth += 1
    try:
        yield
    finally:
        recorder.depth -= 1


def record(model: nn.Module, args: tuple, kwargs: dict) -> Graph:
    """Run ``model(*args, **kwargs)`` once (eval, no_grad) and return the recorded graph."""
    graph = Graph(dict(model.named_modules()))
    recorder = _Recorder(graph)
    handles, modes = [], {m: m.training for m in model.modules()}

    def pre_hook(module, args, kwargs):  # a function, not a bound method: a deep copy of a
        recorder.pre_hook(module, args, kwargs)  # module (a probe's) keeps the same recorder

    for name, module in graph.modules.items():
        if module_kind(module) is not None:
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(
                recorder.make_post_hook(name), with_kwargs=True, always_call=True))
    active = _ACTIVE.set(recorder)
    try:
        model.eval()
        with torch.no_grad(), recorder:
            output = model(*args, **kwargs)
            graph.mark_outputs(output)
    except Exception as error:  # the user's model: any error means the input did not fit it
        raise ValueError(
            f"the forward pass on the example input failed ({type(error).__name__}: {error}); "
            "pass an input the model accepts") from error
    finally:
        _ACTIVE.reset(active)
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return graph


def map_tensors(value, fn):
    """``value`` with ``fn`` applied to every tensor (in tuples, lists, dicts, ModelOutputs)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        mapped = {k: map_tensors(v, fn) for k, v in value.items()}
        try:
            return type(value)(**mapped)
        except TypeError:
            return mapped
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value
