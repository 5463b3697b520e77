"""Find the prunable units of a torch model by following one forward pass.

Offers :func:`find_units`, which records the executed dataflow graph of one forward pass on
a small example batch (:mod:`skid.nn._trace`) and follows the output channels of every
``Linear``/``Conv`` layer: it returns the :class:`~skid.nn._plan.ChannelGroup` records
(producers → per-channel ops and gates → every consumer) in forward order, and a
:class:`~skid.nn._plan.Skipped` record with the reason for every other candidate. An op skid
does not know is never assumed to preserve channels; it blocks the whole group and says so.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from torch import nn

from .._validation import nearest_names
from ..exceptions import InvalidParameterError
from ._plan import ChannelGroup, Consumer, Skipped
from ._surgery import surgery_for
from ._trace import (
    CONCAT_OPS,
    ELEMENTWISE_OPS,
    NORM_OPS,
    REDUCE_OPS,
    RESHAPE_OPS,
    TRANSPOSE_OPS,
    Graph,
    Node,
    module_kind,
    pool_dims,
    record,
)

__all__ = ["find_units"]

# ----------------------------------------------------------------------------------------
# Following the channels of a group: from its producers to every consumer.

@dataclass(frozen=True)
class _Channels:
    """Where the group's channels are: value, axis, and channel-major positions per channel."""

    value: int
    axis: int
    width: int
    positions: int = 1
    before: tuple = ()  # what precedes the group's channels on the axis (a concatenation)

    def length(self, graph: Graph) -> int:
        """Size of the channel axis: the group's channels and any concatenated with them."""
        return graph.values[self.value].shape[self.axis]


class _Blocked(Exception):
    """The channels cannot be followed to a consumer; the message says why."""


# Elementwise ops that may join two tensors carrying the group's channels (a gate). An
# ``add`` of two varying tensors is a residual connection: it joins only when the walk is
# asked for residual streams (``residual=True``): the group is then a ``"residual_stage"``.
_GATE_OPS = frozenset({"mul", "rmul", "imul", "div", "truediv", "true_divide"})
_RESIDUAL_OPS = frozenset({"add", "radd", "iadd", "sub", "rsub", "isub"})


class _GroupWalk:
    """Collect one channel group by following the executed graph from a producer.

    Every tensor computed from the group's channels by per-channel ops is a member; every op
    that uses a member is visited: per-channel ops add members, dense layers are consumers,
    an elementwise product with a tensor that another producer makes (through per-channel
    ops) adds that producer, and anything else blocks the whole group with its reason.
    """

    def __init__(self, graph: Graph, seed: int, residual: bool = False):
        self.graph = graph
        self.join_ops = _GATE_OPS | _RESIDUAL_OPS if residual else _GATE_OPS
        self.residual = False  # whether an add joined producers (a residual stream)
        node = graph.nodes[seed]
        self.width = _out_width(graph.modules[node.module], node.kind)
        self.members: dict[int, _Channels] = {}
        self.producers: dict[str, int] = {}
        self.passthroughs: dict[str, tuple[int, tuple]] = {}  # name -> (node, before)
        # name -> (node, positions, value read, before)
        self.consumers: dict[str, tuple[int, int, int, tuple]] = {}
        self.joins: list[tuple[int, int]] = []  # (node index, output channel axis)
        self.handled: set[int] = set()
        self.queue: list[int] = []
        self.deferred: list[tuple[int, _Channels]] = []
        self.blocks: dict[int, str] = {}  # groups of a grouped conv -> its name
        self.add_producer(seed)

    # -- building -------------------------------------------------------------------------

    def add_producer(self, index: int) -> None:
        graph = self.graph
        node = graph.nodes[index]
        module = graph.modules[node.module]
        width = _out_width(module, node.kind)
        if width != self.width:
            raise _Blocked(f"{node.describe()} joins its channels with {width} channels, not "
                           f"{self.width}")
        out = node.outputs[0]
        ndim = len(graph.values[out].shape)
        if node.kind == "conv" and ndim != _conv_dims(module) + 2:
            raise _Blocked("unbatched convolution input is not supported")
        if node.kind == "conv" and module.groups > 1:
            if module.out_channels == module.groups:
                raise _Blocked(f"the grouped convolution {node.module!r} has one output "
                               "channel per group")
            self.blocks.setdefault(module.groups, node.module)
        self.producers[node.module] = index
        self.handled.add(index)
        self.add_member(_Channels(out, ndim - 1 if node.kind == "linear" else 1, width))

    def add_member(self, state: _Channels) -> None:
        known = self.members.get(state.value)
        if known is None:
            self.members[state.value] = state
            self.queue.append(state.value)
        elif known != state:
            raise _Blocked("its channels reach one tensor on two different axes")

    def run(self) -> ChannelGroup:
        graph = self.graph
        while True:
            while self.queue:
                value = self.queue.pop(0)
                if value in graph.outputs:
                    raise _Blocked("its channels reach the model output")
                for user in graph.values[value].users:
                    if user not in self.handled:
                        self.handled.add(user)
                        self.visit(self.members[value], user)
            if not self.deferred:
                break
            # Elementwise ops whose other operand was not a member yet: those whose operands
            # all are now lie inside the group (``x + 0.04 * x**3``); if none, the first gate
            # brings in its other producer (or, not being a product, blocks the group).
            ready = [(i, st) for i, st in self.deferred if self.others(i, st) == []]
            gates = [(i, st) for i, st in self.deferred if self.graph.nodes[i].name in _GATE_OPS]
            index, state = (ready or gates or self.deferred)[0]
            self.deferred.remove((index, state))
            self.elementwise(state, index, final=True)
        for index, axis in self.joins:
            self.check_join(index, axis)
        if not self.consumers:
            raise _Blocked("its output is never used")
        return self.record()

    def record(self) -> ChannelGroup:
        order = sorted(self.consumers.items(), key=lambda item: item[1][0])
        readings: dict[tuple[int, int], int] = {}
        consumers = tuple(
            Consumer(name, positions, readings.setdefault((value, positions), len(readings)),
                     before)
            for name, (_, positions, value, before) in order)
        passthroughs = sorted(self.passthroughs, key=lambda name: self.passthroughs[name][0])
        if len(self.blocks) > 1:
            names = " and ".join(repr(n) for n in self.blocks.values())
            raise _Blocked(f"grouped convolutions with different groups share its channels "
                           f"({names})")
        blocks = next(iter(self.blocks), 1)
        if blocks > 1 and (any(c[3] for c in self.consumers.values())
                           or any(p[1] for p in self.passthroughs.values())):
            raise _Blocked("its channels are concatenated and enter a grouped convolution")
        return ChannelGroup(
            producers=tuple(sorted(self.producers, key=self.producers.get)),
            consumers=consumers,
            width=self.width,
            passthroughs=tuple(passthroughs),
            offsets=tuple((name, self.passthroughs[name][1]) for name in passthroughs
                          if self.passthroughs[name][1]),
            blocks=blocks,
            kind="residual_stage" if self.residual else "channels",
        )

    # -- one op using a member ------------------------------------------------------------

    def visit(self, state: _Channels, index: int) -> None:
        graph = self.graph
        node = graph.nodes[index]
        if _is_elementwise_op(graph, node):
            self.elementwise(state, index)
            return
        if node.kind == "function":
            if node.name in _CAT_OPS:
                self.add_member(_concatenate(graph, state, node))
            else:
                self.add_member(_step_function(graph, state, node))
            return
        if node.first != state.value or node.inputs.count(state.value) != 1:
            raise _Blocked(f"its channels are a secondary input of {node.describe()}")
        module = graph.modules[node.module]
        out_state = dataclasses.replace(state, value=node.outputs[0]) if node.outputs else None
        ndim = len(graph.values[state.value].shape)
        if node.kind == "linear":
            _check_linear_consumer(graph, module, node, state, ndim)
            self.consumers[node.module] = (index, state.positions, state.value, state.before)
        elif node.kind == "conv":
            if _conv_step(graph, module, node, state, ndim):
                if module.groups > 1:
                    self.blocks.setdefault(module.groups, node.module)
                self.consumers[node.module] = (index, 1, state.value, state.before)
            else:
                self.passthroughs[node.module] = (index, state.before)
                self.add_member(out_state)
        elif node.kind in ("norm", "prelu"):
            _check_per_channel_module(graph, module, node, state, ndim)
            self.passthroughs[node.module] = (index, state.before)
            self.add_member(out_state)
        elif node.kind == "pool":
            _check_pool(graph, node, state, pool_dims(type(module).__name__))
            self.add_member(out_state)
        elif node.kind == "reshape":
            self.add_member(_reshape(graph, state, node))
        else:
            raise _Blocked(f"its channels enter {node.describe()}, which mixes channels")

    def elementwise(self, state: _Channels, index: int, final: bool = False) -> None:
        """An elementwise op: other operands constant along the channels, or a gate."""
        graph = self.graph
        node = graph.nodes[index]
        shape = graph.values[state.value].shape
        out_shape = graph.values[node.outputs[0]].shape
        axis = state.axis + len(out_shape) - len(shape)  # broadcasting aligns on the right
        length = shape[state.axis]
        if axis < 0 or out_shape[axis] != length:
            raise _Blocked(f"{node.describe()} broadcasts its channels to another axis")
        varying = [v for v in node.inputs
                   if not _constant_along_channels(graph.values[v].shape, out_shape, axis)]
        others = self.others(index, state)
        if others and not final:
            self.deferred.append((index, state))
            return
        if others:
            if state.before:
                raise _Blocked(f"`{node.name}` joins concatenated channels with another tensor")
            if node.kind != "function" or node.name not in self.join_ops:
                raise _Blocked(
                    f"its channels enter `{node.name}` with another tensor that varies along "
                    "the channels (a residual connection or a gate)")
            self.residual |= node.name in _RESIDUAL_OPS
            for value in others:
                for producer in self.joined_producers(node, value):
                    self.add_producer(producer)
            self.joins.append((index, axis))
        if out_shape != shape and not any(graph.values[v].shape == out_shape for v in varying):
            raise _Blocked(f"{node.describe()} broadcasts its channels over new axes")
        self.add_member(dataclasses.replace(state, value=node.outputs[0], axis=axis))

    def others(self, index: int, state: _Channels) -> list[int]:
        """The operands of an elementwise op that vary along the channels but are not members."""
        graph = self.graph
        node = graph.nodes[index]
        out_shape = graph.values[node.outputs[0]].shape
        axis = state.axis + len(out_shape) - len(graph.values[state.value].shape)
        return [v for v in node.inputs if v not in self.members
                and not _constant_along_channels(graph.values[v].shape, out_shape, axis)]

    def joined_producers(self, join: Node, value: int) -> list[int]:
        """The producers whose channels reach ``value`` through per-channel ops (and, in a
        residual stream, through other adds: ``a + (b + c)``, or a stream entered mid-way)."""
        graph = self.graph
        found, todo = [], [value]
        while todo:
            value = todo.pop()
            if value in self.members:
                continue
            index = graph.values[value].producer
            node = graph.nodes[index] if index is not None else None
            if node is not None and node.kind in ("linear", "conv") and _is_candidate(
                    graph.modules[node.module]):
                found.append(index)
                continue
            if node is not None and (_is_elementwise_op(graph, node)
                                     or node.kind in ("norm", "prelu", "pool")):
                shape = graph.values[node.outputs[0]].shape
                varying = [v for v in node.inputs if graph.values[v].shape == shape]
                if len(varying) == 1 and node.first == varying[0]:
                    todo.append(varying[0])
                    continue
                if node.kind == "function" and node.name in self.join_ops & _RESIDUAL_OPS:
                    todo.extend(varying)
                    continue
            raise _Blocked(
                f"its channels enter `{join.name}` with another tensor that varies along the "
                "channels and is not made by a Linear/Conv layer through per-channel operations")
        return found

    def check_join(self, index: int, axis: int) -> None:
        """After the walk, every varying operand of a gate carries the group's channels."""
        graph = self.graph
        node = graph.nodes[index]
        out_shape = graph.values[node.outputs[0]].shape
        for value in node.inputs:
            if _constant_along_channels(graph.values[value].shape, out_shape, axis):
                continue
            state = self.members.get(value)
            offset = len(out_shape) - len(graph.values[value].shape)
            if (state is None or state.axis + offset != axis or state.positions != 1
                    or state.before):
                raise _Blocked(f"`{node.name}` joins its channels with a tensor whose channels "
                               "are not the same")


def _out_width(module: nn.Module, kind: str) -> int:
    return surgery_for(module, "slice_out").out_width(module)


def _conv_dims(conv: nn.Module) -> int:
    return len(conv.kernel_size)


def _is_elementwise_op(graph: Graph, node: Node) -> bool:
    """Whether ``node`` acts on each element alone (other operands are checked by the caller)."""
    if node.kind == "function":
        known = node.name in ELEMENTWISE_OPS
    else:
        known = node.kind == "elementwise" or (
            node.kind == "prelu" and _prelu_parameters(graph, node) == 1)
    return known and len(node.outputs) == 1


def _prelu_parameters(graph: Graph, node: Node) -> int:
    return graph.modules[node.module].num_parameters


def _constant_along_channels(other: tuple, shape: tuple, axis: int) -> bool:
    """Whether a tensor of shape ``other`` broadcast against ``shape`` is constant per channel."""
    if len(other) > len(shape):
        return False
    offset = axis - (len(shape) - len(other))  # the channel axis in ``other``, right-aligned
    return offset < 0 or other[offset] == 1


def _check_linear_consumer(graph: Graph, module: nn.Module, node: Node, state: _Channels,
                           ndim: int) -> None:
    if state.axis != ndim - 1:
        raise _Blocked(f"{node.describe()} does not act on the channel axis")
    in_features = surgery_for(module, "fold_in").in_width(module, 1)
    if in_features != state.length(graph):
        raise _Blocked(
            f"{node.describe()} has in_features={in_features}, not "
            f"{state.width} channels x {state.positions} positions")


def _conv_step(graph: Graph, module: nn.Module, node: Node, state: _Channels,
               ndim: int) -> bool:
    """A conv after the channels: True for a consumer (groups == 1), False for depthwise."""
    if state.positions != 1 or state.axis != 1 or ndim != _conv_dims(module) + 2:
        raise _Blocked(f"its channels do not reach {node.describe()} on its channel axis")
    if module.in_channels != state.length(graph):
        raise _Blocked(f"{node.describe()} expects {module.in_channels} input channels")
    if module.groups == 1:
        return True
    if module.groups == module.in_channels == module.out_channels:
        return False
    if module.groups == module.in_channels:
        raise _Blocked(
            f"its channels enter the grouped convolution {node.module!r} (groups="
            f"{module.groups}, out_channels={module.out_channels}), whose groups read one "
            "channel each")
    return True  # a grouped consumer: selection within each group


def _check_per_channel_module(graph: Graph, module: nn.Module, node: Node, state: _Channels,
                              ndim: int) -> None:
    """BatchNorm/InstanceNorm/PReLU with one parameter set per channel: a passthrough."""
    size = module.num_parameters if node.kind == "prelu" else module.num_features
    batched = True  # BatchNorm checks its input rank itself
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):  # (C, L) input: unbatched
        batched = ndim == module._get_no_batch_dim() + 1
    if state.positions != 1 or state.axis != 1 or not batched or size != state.length(graph):
        raise _Blocked(f"{node.describe()} does not act on its channels one by one")


def _check_pool(graph: Graph, node: Node, state: _Channels, dims: int) -> None:
    """A pooling op keeps the channels when it pools only trailing spatial axes."""
    shape = graph.values[state.value].shape
    if len(node.outputs) != 1 or state.positions != 1 or dims == 0:
        raise _Blocked(f"its channels enter {node.describe()}, which skid cannot follow")
    if state.axis >= len(shape) - dims:
        raise _Blocked(f"{node.describe()} pools over the channel axis")
    if graph.values[node.outputs[0]].shape[state.axis] != state.length(graph):
        raise _Blocked(f"{node.describe()} changes the number of channels")


def _step_function(graph: Graph, state: _Channels, node: Node) -> _Channels:
    """Follow the channels through a functional op, or raise _Blocked saying why not."""
    name = node.name
    others = [v for v in node.inputs if v != state.value]
    if name in CONCAT_OPS:
        raise _Blocked(f"its channels are concatenated with other tensors (`{name}`)")
    if others and name in ELEMENTWISE_OPS:
        raise _Blocked(f"its channels enter `{name}` with another tensor that varies along the "
                       "channels (a residual connection or a gate)")
    if name in NORM_OPS:
        raise _Blocked(f"its channels enter `{name}`, a normalization that mixes values along "
                       "an axis (channels are not followed through it)")
    if others or node.first != state.value:
        raise _Blocked(f"its channels enter `{name}` together with another tensor")
    if name in RESHAPE_OPS:
        return _reshape(graph, state, node)
    if name in TRANSPOSE_OPS:
        return _transpose(graph, state, node)
    if name in REDUCE_OPS:
        return _reduce(graph, state, node)
    if pool_dims(name):
        _check_pool(graph, node, state, pool_dims(name))
        return dataclasses.replace(state, value=node.outputs[0])
    raise _Blocked(f"its channels enter `{name}`, which skid does not know to preserve "
                   "channels")


_CAT_OPS = frozenset({"cat", "concat", "concatenate"})


def _concatenate(graph: Graph, state: _Channels, node: Node) -> _Channels:
    """Follow the channels into a concatenation along their axis, at an offset.

    What precedes them is recorded by source (see :func:`_sources`), so that the offset can
    be recomputed on a model whose other concatenated widths were pruned already.
    """
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim",
                                                                  node.kwargs.get("axis", 0))
    ndim = len(graph.values[state.value].shape)
    if not isinstance(tensors, (list, tuple)) or node.inputs.count(state.value) != 1:
        raise _Blocked(f"its channels are concatenated with themselves (`{node.name}`)")
    if int(dim) % ndim != state.axis or state.positions != 1:
        raise _Blocked(f"its channels are concatenated with other tensors (`{node.name}`) "
                       "along another axis")
    position = node.inputs.index(state.value)
    before = tuple(source for value in node.inputs[:position]
                   for source in _sources(graph, value, state.axis))
    # (0,) at the start of a concatenation: the axis holds more than the group's channels
    return dataclasses.replace(state, value=node.outputs[0],
                               before=before + state.before or (0,))


def _sources(graph: Graph, value: int, axis: int) -> tuple:
    """What sets the width of a tensor's channel axis ``axis`` (as concatenated).

    The nearest module upstream whose output width is the tensor's (its name), through ops
    that keep that axis's length; the sources of each part of a concatenation; the width
    itself for a model input or a parameter. Anything else blocks: an offset that could not
    follow the pruning of what precedes it would corrupt the fold.
    """
    length = graph.values[value].shape[axis]
    while True:
        index = graph.values[value].producer
        if index is None:
            return (length,)
        node = graph.nodes[index]
        if node.module is not None and node.kind in ("linear", "conv", "norm", "prelu"):
            entry = surgery_for(graph.modules[node.module])
            if entry.out_width(graph.modules[node.module]) == length:
                return (node.module,)
        if node.kind == "function" and node.name in _CAT_OPS:
            return tuple(source for v in node.inputs for source in _sources(graph, v, axis))
        first = node.first
        if (len(node.outputs) == 1 and first is not None
                and len(graph.values[first].shape) == len(graph.values[value].shape)
                and graph.values[first].shape[axis] == length):
            value = first
            continue
        raise _Blocked(f"skid cannot tell what sets the width of the tensors concatenated "
                       f"before its channels ({node.describe()})")


def _reshape(graph: Graph, state: _Channels, node: Node) -> _Channels:
    """Follow the channels through a row-major reshape (view, flatten, squeeze ...).

    The channel axis (length ``width * positions``) either stays one axis, or is merged with
    all the axes after it into the last axis, channel-major (a flatten before a Linear), or a
    flattened axis is split back into channels and positions (an unflatten).
    """
    shape_in = graph.values[state.value].shape
    shape_out = graph.values[node.outputs[0]].shape
    if state.before or shape_in[state.axis] != state.width * state.positions:
        raise _Blocked(f"{node.describe()} reshapes channels concatenated with others")
    length = state.width * state.positions
    before, after = math.prod(shape_in[:state.axis]), math.prod(shape_in[state.axis + 1:])
    running = 1
    for axis, size in enumerate(shape_out):
        if running == before:
            rest = math.prod(shape_out[axis + 1:])
            if size == length and rest == after:
                return _Channels(node.outputs[0], axis, state.width, state.positions)
            if size == state.width and rest == state.positions * after:  # unflatten
                return _Channels(node.outputs[0], axis, state.width)
            if size == length * after and axis == len(shape_out) - 1:
                return _Channels(node.outputs[0], axis, state.width, state.positions * after)
        running *= size
    heads = ""
    split = shape_out[state.axis:state.axis + 2]
    if (len(shape_out) == len(shape_in) + 1 and tuple(shape_out[:state.axis]) ==
            tuple(shape_in[:state.axis]) and len(split) == 2 and math.prod(split) == length):
        if state.axis == len(shape_in) - 1:
            heads = (f"; it splits the channels into {split[0]} attention heads of "
                     f"{split[1]} (not prunable as channels; prune='heads' prunes whole heads)")
        else:
            heads = (f"; it splits the channels into {split[0]} groups of {split[1]} (a "
                     "channel shuffle or a grouped view: left alone)")
    raise _Blocked(f"{node.describe()} reshapes {tuple(shape_in)} to {tuple(shape_out)}, which "
                   f"is not a channel-major flatten of the channel axis {state.axis}{heads}")


def _transpose(graph: Graph, state: _Channels, node: Node) -> _Channels:
    """Follow the channel axis through transpose/permute/movedim."""
    ndim = len(graph.values[state.value].shape)
    order = _axis_order(node, ndim)
    return dataclasses.replace(state, value=node.outputs[0], axis=order.index(state.axis))


def _axis_order(node: Node, ndim: int) -> list[int]:
    """For each output axis, the input axis it comes from."""
    params = list(node.args[1:]) + list(node.kwargs.values())
    if node.name == "t":
        params = [0, 1] if ndim == 2 else [0, 0]
    if node.name == "permute":
        dims = params[0] if len(params) == 1 and isinstance(params[0], (list, tuple)) else params
        return [d % ndim for d in dims]
    order = list(range(ndim))
    if node.name == "movedim":
        src, dst = (_as_list(p, ndim) for p in params[:2])
        rest = [d for d in order if d not in src]
        result = [None] * ndim
        for s, d in zip(src, dst, strict=True):
            result[d] = s
        filler = iter(rest)
        return [r if r is not None else next(filler) for r in result]
    a, b = (int(p) % ndim for p in params[:2])
    order[a], order[b] = order[b], order[a]
    return order


def _as_list(dims, ndim: int) -> list[int]:
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return [int(d) % ndim for d in dims]


def _reduce(graph: Graph, state: _Channels, node: Node) -> _Channels:
    """Follow the channels through mean/sum/amax over other axes (global pooling)."""
    shape = graph.values[state.value].shape
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        raise _Blocked(f"`{node.name}` reduces over every axis, the channels included")
    dims = _as_list(dim, len(shape))
    if state.axis in dims or state.positions != 1:
        raise _Blocked(f"`{node.name}` reduces over the channel axis")
    axis = state.axis if keepdim else state.axis - sum(d < state.axis for d in dims)
    return dataclasses.replace(state, value=node.outputs[0], axis=axis)


# ----------------------------------------------------------------------------------------
# Public entry point.

def find_units(model: nn.Module, example_args, example_kwargs=None, *, layers="auto",
               exclude=(), residual=False) -> tuple[list[ChannelGroup], list[Skipped]]:
    """Find the prunable channel groups of ``model`` by following one forward pass.

    A group starts at a producer (``nn.Linear`` or ``nn.Conv{1,2,3}d`` with ``groups=1``).
    Its channels may pass through per-channel operations (BatchNorm/InstanceNorm,
    elementwise activations, dropout, pooling and reductions over other axes, reshapes and
    transposes that keep the channel axis, PReLU and depthwise convolutions) and elementwise
    products with another producer's channels (a gated MLP, a squeeze-excitation gate), which
    joins that producer to the group. Every use of every such tensor must be one of these or a
    consuming ``Linear``/``Conv`` (``groups=1``, possibly after a channel-major flatten into a
    ``Linear``); any other use (a residual add, a concatenation, a channel-mixing op, the
    model output) blocks the whole group.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it is run once in eval mode under ``no_grad`` and its training flags are
        restored afterwards. Its parameters are not modified.
    example_args : torch.Tensor or tuple or list
        Positional inputs of one small batch (a couple of samples is enough); a tensor is
        the single positional input, a tuple or list holds all of them.
    example_kwargs : dict, default=None
        Keyword inputs of the same batch (e.g. ``input_ids``, ``attention_mask``).
    layers : "auto" or list of str or (str, str), default="auto"
        Restrict the result to these producers, or ``(producer, consumer)`` pairs.
    exclude : iterable of str, default=()
        Modules never to prune: a unit is dropped if its producer, its consumer or one of
        its passthroughs is named here or lies inside a named module.
    residual : bool, default=False
        Let an ``add``/``sub`` join producers as a product does: the channels of a CNN stage's
        residual stream (every writer added into it, every dense reader of it) become one
        group of kind ``"residual_stage"``. Groups that meet no such add are found as without it.

    Returns
    -------
    units : list of ChannelGroup
        Prunable groups in forward order (of their first producer).
    skipped : list of Skipped
        Every other ``Linear``/``Conv`` producer candidate, with the reason.

    Raises
    ------
    ValueError
        If a name in ``layers``/``exclude`` is not a module of ``model`` (with a did-you-mean
        hint), if a producer in ``layers`` is not a ``Linear``/``Conv`` module, or if the
        forward pass fails on the example input.
    """
    modules = dict(model.named_modules())
    wanted = _check_layers(layers, modules)
    excluded = _check_names(exclude, modules, "exclude")
    args = example_args if isinstance(example_args, (tuple, list)) else (example_args,)
    graph = record(model, tuple(args), dict(example_kwargs or {}))
    units, skipped = _restrict(*_all_units(graph, model, residual), wanted, excluded)
    first_call = {}
    for index, node in enumerate(graph.nodes):
        first_call.setdefault(node.module, index)
    skipped.sort(key=lambda s: first_call.get(s.producer, len(graph.nodes)))  # forward order
    return units, skipped


def _all_units(graph: Graph, model: nn.Module, residual: bool = False):
    """Groups and skip records for every Linear/Conv producer candidate, in forward order."""
    units, skipped, seen = [], [], set()
    shared = _shared_parameter_owners(model)
    used_directly = _parameters_used_by_ops(graph)
    for index, node in enumerate(graph.nodes):
        if node.kind not in ("linear", "conv") or node.module in seen:
            continue
        if not _is_candidate(graph.modules[node.module]):
            seen.add(node.module)
            continue
        walk = None
        try:
            walk = _GroupWalk(graph, index, residual)
            unit = walk.run()
            _check_single_use(graph, unit, shared, used_directly)
            units.append(unit)
            seen.update(unit.producers)
        except _Blocked as reason:
            skipped += _skip_all(walk, node.module, str(reason), seen)
        except Exception as error:  # unknown means blocked, even for an op skid misreads
            reason = f"skid could not follow its channels ({error})"
            skipped += _skip_all(walk, node.module, reason, seen)
    for name, module in graph.modules.items():
        if _is_candidate(module) and name not in seen:
            skipped.append(Skipped(name, "it is not called in the forward pass"))
    return units, skipped


def _skip_all(walk, seed: str, reason: str, seen: set) -> list[Skipped]:
    """A blocked group: every producer found so far is skipped with the same reason."""
    names = [seed] + [p for p in (walk.producers if walk else ()) if p != seed]
    names = [n for n in names if n not in seen]
    seen.update(names)
    return [Skipped(name, reason) for name in names]


def _is_candidate(module: nn.Module) -> bool:
    """A dense layer, or a grouped (not depthwise) convolution: it creates channels."""
    kind = module_kind(module)
    depthwise = kind == "conv" and module.groups == module.in_channels == module.out_channels
    return kind == "linear" or (kind == "conv" and not depthwise)


def _check_single_use(graph: Graph, unit: ChannelGroup, shared: dict, used_directly: set) -> None:
    """Every module of the group runs once and owns its weights alone."""
    for name in unit.modules():
        role = "it" if name == unit.producer else repr(name)
        calls = graph.calls.get(name, 0)
        if calls != 1:
            raise _Blocked(f"{role} is called {calls} times (shared weights)")
        if name in shared:
            raise _Blocked(f"{role} shares parameters with {shared[name]!r}")
        if name in used_directly:
            raise _Blocked(f"{role} has parameters that other operations use directly")


def _shared_parameter_owners(model: nn.Module) -> dict[str, str]:
    """Module name -> another module holding one of its parameters (tied weights)."""
    owners: dict[int, tuple[str, nn.Module]] = {}
    shared = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            other, owner = owners.setdefault(id(param), (name, module))
            if owner is not module:  # one module under two names is not sharing
                shared[name] = other
                shared.setdefault(other, name)
    return shared


def _parameters_used_by_ops(graph: Graph) -> set[str]:
    """Names of modules whose parameters feed a recorded op (e.g. ``F.linear(x, m.weight)``)."""
    used = {id(t) for value_id, t in graph.source_tensors() if graph.values[value_id].users}
    return {name for name, module in graph.modules.items()
            if any(id(p) in used for p in module.parameters(recurse=False))}


def _check_names(names, modules: dict, what: str) -> set[str]:
    """Validate module names; InvalidParameterError with a did-you-mean hint for unknown ones."""
    if names is None:
        return set()
    if isinstance(names, str):
        names = [names]
    checked = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{what} must hold module names (str); got {name!r}")
        if name not in modules:
            raise InvalidParameterError(
                f"{what}: the model has no module {name!r}"
                f"{nearest_names(name, [n for n in modules if n])}"
            )
        checked.add(name)
    return checked


def _check_layers(layers, modules: dict):
    """None for "auto", else (producer names, (producer, consumer) pairs)."""
    if layers is None or (isinstance(layers, str) and layers == "auto"):
        return None
    if isinstance(layers, str):
        layers = [layers]
    producers, pairs = set(), set()
    for entry in layers:
        if isinstance(entry, (tuple, list)) and len(entry) == 2:
            _check_names(list(entry), modules, "layers")
            pairs.add(tuple(entry))
        elif isinstance(entry, str):
            producers |= _check_names([entry], modules, "layers")
        else:
            raise TypeError("layers must be 'auto' or a list of module names or "
                            f"(producer, consumer) pairs; got {entry!r}")
    for name in producers | {p for p, _ in pairs}:
        if not _is_candidate(modules[name]):
            raise ValueError(f"layers: {name!r} is a {type(modules[name]).__name__}, not a "
                             "Linear or Conv (groups=1) module that can produce channels")
    return producers, pairs


def _restrict(units, skipped, wanted, excluded):
    """Apply ``layers`` and ``exclude`` to the groups found."""
    kept = []
    for unit in units:
        reason = _exclusion(unit, excluded) or _not_wanted(unit, wanted)
        if reason:
            skipped.extend(Skipped(producer, reason) for producer in unit.producers)
        else:
            kept.append(unit)
    return kept, skipped


def _exclusion(unit: ChannelGroup, excluded: set) -> str | None:
    """Why the group is excluded (one of its modules is in, or inside, ``exclude``), or None."""
    for name in unit.modules():
        if name in excluded:
            return f"excluded: {name!r} is in `exclude`"
        inside = [e for e in excluded if e == "" or name.startswith(e + ".")]
        if inside:
            return f"excluded: {name!r} is inside {inside[0]!r}, which is in `exclude`"
    return None


def _not_wanted(unit: ChannelGroup, wanted) -> str | None:
    if wanted is None:
        return None
    producers, pairs = wanted
    consumers = {c.name for c in unit.consumers}
    if set(unit.producers) & producers or any(
            p in unit.producers and c in consumers for p, c in pairs):
        return None
    if any(p in unit.producers for p, _ in pairs):
        return f"its channels feed {unit.consumer!r}, not the consumer named in `layers`"
    return "not listed in `layers`"
