"""Single-unit ablations as rank-one updates of the first linear operations after a layer.

Zeroing unit u of a layer's output ``a`` changes only channel u of everything computed
from ``a`` by operations that act on each channel alone (BatchNorm in eval mode,
ReLU and other elementwise activations, pooling, dropout in eval mode, flattening):
there channel u becomes what those operations make of a zero map, ``z_u``, the same
for every image. The first linear operations after the layer (convolutions without
groups, fully connected layers; a ResNet block's main path and shortcut are two)
therefore see their input change by ``e_u (z_u - c_u)``, and their output changes by
the rank-one term ``-L_u(c_u - z_u)``: the operation restricted to input channel u,
without its bias. One unfolding of ``c - z`` and one batched product per linear
operation give that term for every unit at once (as many multiply-adds as the
operation itself), so the prefix and the operations between the layer and the
linear ones run once per image, and only what follows the linear operations runs
once per (image, unit). When nothing follows (pooling then the classifier), every
unit's effect on the logits is that one product.

A plan is built from a network suffix that ``torch.fx`` can trace (an explicit or a
graph split of :mod:`dissect_core.surgery`) and checked on a probe against the
suffix run on zeroed maps; where the structure is not there (a normalisation over
channels, an attention block, a layer the output also uses directly), there is no
plan and the caller runs the suffix on zeroed copies as before::

    plan = rank_one_plan(split.suffix, probe_activation, layout)
    if plan is not None:
        logits = plan.logits(a, torch.tensor([-1, 0, 1, 2]))   # [4, B, K]; -1 removes nothing
"""

from __future__ import annotations

import copy
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layouts import LayerLayout
from .surgery import exact_float32, outputs_match

__all__ = ["PLAN_ROWS", "RankOnePlan", "rank_one_plan"]

_CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
)
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_CHANNELWISE_FUNCTIONS: set[Any] = {
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
}
_POOL_FUNCTIONS: set[Any] = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool2d, F.avg_pool2d}
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}


@dataclass
class _Consumer:
    """A linear operation fed by the channel-wise region: its node, its input's node, how it
    makes the ablated rows, and the eval BatchNorm after it folded into them (or None)."""

    node: fx.Node
    source: fx.Node
    rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    norm: fx.Node | None = None


def _flat_dims(node: fx.Node) -> tuple[int, int] | None:
    """(start_dim, end_dim) of a ``torch.flatten`` / ``x.flatten`` node, or None when it is not one."""
    if not (
        (node.op == "call_function" and node.target is torch.flatten)
        or (node.op == "call_method" and node.target == "flatten")
    ):
        return None
    args = [*node.args[1:], None, None]
    start = node.kwargs.get("start_dim", args[0] if args[0] is not None else 0)
    end = node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    return start, end


def _spatial_mean(node: fx.Node, ndim: int) -> bool | None:
    """For ``x.mean(dims)`` / ``torch.mean(x, dims)`` over the spatial dimensions of a 4-D map:
    whether it keeps them (None when it is not such a mean)."""
    if not (
        (node.op == "call_method" and node.target == "mean")
        or (node.op == "call_function" and node.target is torch.mean)
    ):
        return None
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if ndim != 4 or not isinstance(dims, (list, tuple)) or "dtype" in node.kwargs:
        return None
    if sorted(int(d) % 4 for d in dims) != [2, 3]:
        return None
    return bool(keep)


def _only_input(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``source`` is the node's first argument and no other argument is a node."""
    if not node.args or node.args[0] is not source:
        return False
    rest = list(node.args[1:]) + list(node.kwargs.values())
    return not any(isinstance(v, fx.Node) for v in fx.node.map_aggregate(rest, lambda x: x))


def _channelwise(node: fx.Node, modules: dict[str, nn.Module], source_shape: torch.Size, units: int) -> str | None:
    """How a node maps the units of its input: ``"same"`` (each unit's values to its own),
    ``"flatten"`` ([B, U, h, w] -> [B, U * h * w]), ``"squeeze"`` (a spatial mean without
    keepdim, [B, U, h, w] -> [B, U]), or None when it mixes units or is unknown."""
    ndim = len(source_shape)
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if isinstance(mod, nn.Flatten):
            return "flatten" if ndim == 4 and mod.start_dim == 1 and mod.end_dim in (-1, 3) else None
        if isinstance(mod, _POOL_MODULES):
            return "same" if ndim == 4 else None
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return "same" if not mod.training and mod.track_running_stats else None
        if isinstance(mod, (nn.Dropout, nn.Dropout2d)):
            return "same" if not mod.training else None
        return "same" if isinstance(mod, _CHANNELWISE_MODULES) else None
    if node.op == "call_function":
        if node.target in _CHANNELWISE_FUNCTIONS:
            return "same"
        if node.target in _POOL_FUNCTIONS:
            return "same" if ndim == 4 else None
        if node.target in (F.dropout, F.dropout2d):
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            return "same" if training is False else None
        if node.target in (operator.mul, operator.truediv, operator.add, operator.sub) and isinstance(
            node.args[1] if len(node.args) > 1 else None, (int, float)
        ):
            return "same"
    if node.op == "call_method" and node.target in _CHANNELWISE_METHODS:
        return "same"
    dims = _flat_dims(node)
    if dims is not None:
        return "flatten" if ndim == 4 and dims[0] == 1 and dims[1] in (-1, 3) else None
    keep = _spatial_mean(node, ndim)
    if keep is not None:
        return "same" if keep else "squeeze"
    return None


def _bn_scale(bn: nn.Module | None, like: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scale of an eval BatchNorm folded into the operation before it (ones without)."""
    if bn is None:
        return torch.ones((), dtype=like.dtype, device=like.device)
    assert isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    return scale * bn.weight if bn.weight is not None else scale


def _conv_delta(
    conv: nn.Conv2d, bn: nn.Module | None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    padding = conv.padding
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(padding, str):
        return None
    k = conv.kernel_size
    kk = k[0] * k[1]
    out_ch = conv.out_channels
    with torch.no_grad():
        scaled = conv.weight * _bn_scale(bn, conv.weight).view(-1, 1, 1, 1)
        weight = scaled.permute(1, 2, 3, 0).reshape(conv.in_channels, kk, out_ch).contiguous()

    def rows(base: torch.Tensor, d: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """base [B, O, h', w'], d [B, G, h, w] (channel g: unit units[g]) -> [G * B, O, h', w']
        (channels-last in memory), block g = base minus unit units[g]'s term."""
        b, g = d.shape[:2]
        oh, ow = base.shape[2:]
        cols = F.unfold(d, k, dilation=conv.dilation, padding=padding, stride=conv.stride)
        cols = cols.view(b, g, kk, oh * ow).permute(1, 0, 3, 2).reshape(g, b * oh * ow, kk)
        flat = base.permute(0, 2, 3, 1).reshape(b * oh * ow, out_ch)
        out = torch.baddbmm(flat, cols, weight[units], alpha=-1)
        return out.view(g * b, oh, ow, out_ch).permute(0, 3, 1, 2)

    return rows


def _linear_delta(
    linear: nn.Linear, bn: nn.Module | None, units: int
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    if linear.in_features % units:
        return None
    per_unit = linear.in_features // units
    with torch.no_grad():
        scaled = linear.weight * _bn_scale(bn, linear.weight).view(-1, 1)
        weight = scaled.view(linear.out_features, units, per_unit).permute(1, 2, 0).contiguous()

    def rows(base: torch.Tensor, d: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """base [B, O], d [B, G, P] (the P inputs of unit chosen[g]) -> [G * B, O]."""
        out = torch.baddbmm(base, d.transpose(0, 1), weight[chosen], alpha=-1)
        return out.view(-1, base.shape[1])

    return rows


class RankOnePlan:
    """How to evaluate every single-unit ablation of a layer from one pass of its suffix's first
    linear operations (module docstring).

    Built by :func:`rank_one_plan`; :meth:`logits` does the work.
    """

    def __init__(
        self,
        module: fx.GraphModule,
        region: list[fx.Node],
        unit_form: dict[fx.Node, int],
        consumers: list[_Consumer],
        rest: fx.GraphModule,
        zero: torch.Tensor,
    ) -> None:
        self.module = module
        self.region = region
        self.unit_form = unit_form
        self.consumers = consumers
        self.zeros = {c.source: v for c, v in zip(consumers, self._run_region(zero), strict=True)}
        shapes = [base.shape for _, _, base in self._linear_outputs(zero)]  # what rest takes, one image
        self.rest, self.memory_format = _fastest_rest(_inference_copy(rest), shapes, zero)

    def _linear_outputs(self, a: torch.Tensor) -> list[tuple[_Consumer, torch.Tensor, torch.Tensor]]:
        """For the layer's output ``a``: each linear operation, its input, and its output (the
        BatchNorm after it applied)."""
        modules = dict(self.module.named_modules())
        outputs = []
        for consumer, value in zip(self.consumers, self._run_region(a), strict=True):
            base = modules[str(consumer.node.target)](value)
            if consumer.norm is not None:
                base = modules[str(consumer.norm.target)](base)
            outputs.append((consumer, value, base))
        return outputs

    def use_memory_format(self, memory_format: torch.memory_format) -> None:
        """Run ``rest`` in this memory format (rows and weights) instead of the measured choice."""
        self.rest = self.rest.to(memory_format=memory_format)
        self.memory_format = memory_format

    @property
    def direct(self) -> bool:
        """True when the linear operations' outputs are the network's outputs (nothing follows)."""
        return all(n.op in ("placeholder", "output") for n in self.rest.graph.nodes)

    def _run_region(self, a: torch.Tensor) -> list[torch.Tensor]:
        """The consumers' inputs, computed from the layer's output (each op on a copy: in-place
        activations must not touch the caller's tensor or a value read again)."""
        env: dict[fx.Node, Any] = {self.region[0]: a}
        modules = dict(self.module.named_modules())
        for node in self.region[1:]:
            args = fx.node.map_arg(node.args, lambda n: env[n].clone())
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            if node.op == "call_module":
                env[node] = modules[str(node.target)](*args, **kwargs)
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)  # type: ignore[operator]
            else:
                self_obj, *rest = args
                env[node] = getattr(self_obj, str(node.target))(*rest, **kwargs)
        return [env[c.source] for c in self.consumers]

    def bind(self, a: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Prepare a batch of layer outputs for ablation.

        Args:
            a: the layer's output [B, U, ...] for B images (not modified).

        Returns:
            ``logits(units)``: for int [G] units (``-1``: none), the network's outputs
            [G, B, K], block g with unit ``units[g]`` zeroed.
        """
        b = int(a.shape[0])
        prepared = []
        for consumer, value, base in self._linear_outputs(a):
            d = value - self.zeros[consumer.source]
            if d.dim() == 2:
                d = d.view(b, -1, self.unit_form[consumer.source])
            prepared.append((consumer, base, d))

        def logits(units: torch.Tensor) -> torch.Tensor:
            g = int(units.shape[0])
            chosen = units.clamp(min=0).to(a.device)
            removes = units >= 0  # a row with unit -1 removes nothing: its term is zeroed
            active = removes.to(a.device, a.dtype)
            rows = []
            for consumer, base, d in prepared:
                picked = d.index_select(1, chosen)
                if not bool(removes.all()):
                    picked = picked * active.view(1, g, *([1] * (picked.dim() - 2)))
                rows.append(consumer.rows(base, picked, chosen))
            if self.memory_format is torch.contiguous_format:  # the rows are made channels-last
                rows = [r.contiguous() for r in rows]
            out = self.rest(*rows)
            return out.view(g, b, *out.shape[1:])

        return logits

    def logits(self, a: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """The network's outputs with one unit removed per row block (:meth:`bind` for one call).

        Args:
            a: the layer's output [B, U, ...] for B images.
            units: int [G], the unit removed in block g (``-1``: none).

        Returns:
            [G, B, K]: block g is the suffix's output on ``a`` with unit ``units[g]`` zeroed.
        """
        return self.bind(a)(units)


def rank_one_plan(
    suffix: Callable[[torch.Tensor], Any] | None, activation: torch.Tensor, layout: LayerLayout
) -> RankOnePlan | None:
    """A :class:`RankOnePlan` for a layer, or None where its suffix does not have the structure.

    Args:
        suffix: maps the layer's output to the network's output (an ``nn.Module`` that
            ``torch.fx`` can trace; anything else has no plan).
        activation: the layer's output on a probe batch [P, U, ...] (P >= 1), on the
            device the plan will run on; the plan is checked on it.
        layout: the layer's layout; only ``map`` and ``vector`` layers of one tensor
            have plans.

    Returns:
        the plan, or None.
    """
    if not isinstance(suffix, nn.Module) or layout.kind not in ("map", "vector") or layout.element is not None:
        return None
    if not isinstance(activation, torch.Tensor) or activation.dim() != (4 if layout.kind == "map" else 2):
        return None
    try:
        module = suffix if isinstance(suffix, fx.GraphModule) else fx.symbolic_trace(suffix)
    except Exception:  # tracing runs the model's own Python, which may raise anything
        return None
    plan = _build(module, activation, layout.units)
    if plan is None:
        return None
    with torch.no_grad(), exact_float32():  # the check at 1e-4: no TF32 on CUDA
        probe = activation[:2]
        units = torch.tensor([-1, 0, layout.units - 1, layout.units // 2])
        got = plan.logits(probe, units)
        for i, u in enumerate(units.tolist()):
            zeroed = probe.clone()
            if u >= 0:
                zeroed[:, u] = 0
            want = module(zeroed)
            if not isinstance(want, torch.Tensor) or not outputs_match(got[i], want):
                return None
    return plan


def _build(module: fx.GraphModule, activation: torch.Tensor, units: int) -> RankOnePlan | None:
    nodes = list(module.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    modules = dict(module.named_modules())
    shapes = _shapes(module, activation)
    if shapes is None:
        return None
    start = placeholders[0]
    region = [start]
    unit_form: dict[fx.Node, int] = {start: 1}
    consumers: list[_Consumer] = []
    in_region = {start}
    for node in nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        sources = [n for n in node.all_input_nodes if n in in_region]
        if not sources:
            continue
        source = sources[0]
        if len(node.all_input_nodes) != 1 or not _only_input(node, source):
            return None
        form = _channelwise(node, modules, shapes[source], units)
        if form is not None:
            region.append(node)
            in_region.add(node)
            src_shape = shapes[source]
            unit_form[node] = (
                int(src_shape[2] * src_shape[3]) if form == "flatten" else 1 if form == "squeeze" else unit_form[source]
            )
            continue
        consumer = _consumer(node, modules, shapes[source], units, unit_form[source], source)
        if consumer is None:
            return None
        consumers.append(consumer)
    if not consumers:
        return None
    last = [c.norm or c.node for c in consumers]
    rest = _rest(module, {c.node for c in consumers} | set(last), in_region, last)
    if rest is None:
        return None
    zero = torch.zeros((1, *activation.shape[1:]), dtype=activation.dtype, device=activation.device)
    with torch.no_grad():
        return RankOnePlan(module, region, unit_form, consumers, rest, zero)


def _consumer(
    node: fx.Node, modules: dict[str, nn.Module], shape: torch.Size, units: int, per_unit: int, source: fx.Node
) -> _Consumer | None:
    if node.op != "call_module" or node.kwargs or len(node.args) != 1:
        return None
    mod = modules[str(node.target)]
    norm = _folded_norm(node, modules)
    bn = modules[str(norm.target)] if norm is not None else None
    if isinstance(mod, nn.Conv2d) and len(shape) == 4 and per_unit == 1 and shape[1] == units:
        conv = _conv_delta(mod, bn)
        return None if conv is None else _Consumer(node, source, conv, norm)
    if isinstance(mod, nn.Linear) and len(shape) == 2 and shape[1] == units * per_unit:
        linear = _linear_delta(mod, bn, units)
        return None if linear is None else _Consumer(node, source, linear, norm)
    return None


def _folded_norm(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The eval BatchNorm that alone reads a linear operation's output, to fold into it."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module" or users[0].kwargs or users[0].args != (node,):
        return None
    bn = modules[str(users[0].target)]
    if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and not bn.training and bn.track_running_stats:
        return users[0]
    return None


def _shapes(module: fx.GraphModule, activation: torch.Tensor) -> dict[fx.Node, torch.Size] | None:
    """Every node's output shape on the probe (tensors only)."""
    shapes: dict[fx.Node, torch.Size] = {}

    class _Shapes(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n] = out.shape
            return out

    try:
        with torch.no_grad():
            _Shapes(module).run(activation[:1].clone())
    except Exception:  # the model's own code runs here
        return None
    return shapes


def _inference_copy(rest: fx.GraphModule) -> fx.GraphModule:
    """The network after the linear operations as it runs fastest in eval mode: each BatchNorm
    that alone reads a convolution or linear layer folded into a copy of it. Equal to ``rest``
    to float rounding."""
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(rest, inplace=False, no_trace=True)
    except (RuntimeError, ValueError, TypeError, AttributeError, AssertionError):
        return rest
    if not isinstance(fused, fx.GraphModule):
        return rest
    return fused


PLAN_ROWS = 256
"""Rows per call of the network after a plan's linear operations, at least (convolutions
there run far below their speed on fewer): the sweeps of :mod:`dissect_core.ablation` batch
that many, and the choice of memory format times calls of that size."""


_FORMAT_CHOICES: dict[tuple[Any, ...], torch.memory_format] = {}
"""The memory format chosen for each network after a layer (its code and parameter shapes, the
rows' shapes, the device and dtype), in this process: a second plan for it (the set ablations
after the sweep, the next job on a worker) takes the choice without timing again."""


def _fastest_rest(
    rest: fx.GraphModule, shapes: list[torch.Size], like: torch.Tensor
) -> tuple[fx.GraphModule, torch.memory_format | None]:
    """``rest`` in the memory format that runs it faster on this machine, and that format
    (None where it holds no convolution: the rows then run as they are made).

    The rows arrive channels-last; which layout a convolution runs faster in depends on the
    CPU (or GPU) and the map's size: on one 2-core AVX-512 machine a 512-channel 3x3
    convolution over 4x4 maps ran 40% faster with contiguous rows and weights, over 7x7 maps
    the same in both. So each layout runs ``rest`` once to warm up and twice timed (alternated
    with the other), on random rows of the sweep's size, and the faster one is kept (with
    fewer rows the two came out close enough to choose the slower), once per process for each
    network after a layer (:data:`_FORMAT_CHOICES`). Both give the same outputs to float
    rounding."""
    if not any(isinstance(m, nn.Conv2d) for m in rest.modules()) or any(len(s) != 4 for s in shapes):
        return rest, None
    device, dtype = like.device, like.dtype
    key = (
        str(device),
        str(dtype),
        tuple(tuple(s[1:]) for s in shapes),
        rest.code,
        tuple((name, tuple(p.shape)) for name, p in rest.named_parameters()),
    )
    known = _FORMAT_CHOICES.get(key)
    if known is not None:  # the same network after the same layer, on the same device
        return rest.to(memory_format=known), known
    generator = torch.Generator(device=device).manual_seed(0)
    rows = [torch.randn((PLAN_ROWS, *s[1:]), generator=generator, device=device, dtype=dtype) for s in shapes]
    formats = (torch.channels_last, torch.contiguous_format)
    modules = {f: copy.deepcopy(rest).to(memory_format=f) for f in formats}
    inputs = {f: [r.contiguous(memory_format=f) for r in rows] for f in formats}
    seconds = {f: float("inf") for f in formats}
    try:
        with torch.no_grad():
            for f in formats:  # the first call builds the convolutions' kernels
                modules[f](*inputs[f])
            for _ in range(2):  # alternated, the best of two: a busy moment does not decide
                for f in formats:
                    _synchronize(device)
                    start = time.perf_counter()
                    modules[f](*inputs[f])
                    _synchronize(device)
                    seconds[f] = min(seconds[f], time.perf_counter() - start)
    except Exception:  # the model's own code, on random rows: run it as the rows come
        return rest, None
    best = min(formats, key=lambda f: seconds[f])
    _FORMAT_CHOICES[key] = best
    return modules[best], best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rest(
    module: fx.GraphModule, consumer_nodes: set[fx.Node], region: set[fx.Node], order: list[fx.Node]
) -> fx.GraphModule | None:
    """The graph after the linear operations, taking their outputs as inputs (None when a later
    node reads the region directly)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: graph.placeholder(f"linear_{i}") for i, n in enumerate(order)}
    for node in module.graph.nodes:
        if node in region or node in consumer_nodes:
            continue
        if any(i in region for i in node.all_input_nodes):
            return None
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(module, graph)
