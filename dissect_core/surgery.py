"""Splitting a network at a layer: the prefix up to it, the suffix from its output on.

Interventions (unit ablation in a classifier, unit removal, insertion and
painting in a generator) change one layer's output many times for the same
inputs. Running the layer's prefix once and only the suffix for each change is
what makes them fast; this module finds the suffix, in the spirit of baukit's
``nethook.subsequence``, without editing the model:

- ``"explicit"``: the stages after the layer, read off the containers on its
  dotted path when their forward is known (a plain ``nn.Sequential``,
  torchvision ResNet, VGG, AlexNet): :func:`explicit_suffix`;
- ``"chain"``: the stages after the layer as one forward pass runs them (every
  container on the layer's path calls its children after the layer's branch once
  each, each on the previous one's output, and returns the last output):
  :func:`chain_suffix`;
- ``"graph"``: the network's ``torch.fx`` graph (traced with the layer as one opaque
  call), cut at the layer: everything the output computes from the layer's output
  and nothing from the input otherwise (:func:`graph_suffix`); this covers custom
  forwards with functional calls (``x.mean([2, 3])``, ``torch.flatten``) and blocks
  with branches after the layer (a ResNet block's shortcut);
- ``"hook"``: the whole network on a zero input with the layer's output replaced
  (always correct when the layer runs once and nothing bypasses it, but it
  recomputes the prefix): :class:`HookSuffix`;
- ``"full"``: none of those reproduces the network (a skip connection around the
  layer, a layer that runs more than once); the caller runs the whole network
  with an edit hook (:func:`dissect_core.nethook.trace`).

:func:`split_module` tries the ways the caller allows on a probe batch and keeps
the first whose output matches the full forward pass (:func:`outputs_match`);
:func:`prefix` runs the network up to the layer only::

    split = split_module(net, "layer3", probe, ways=("explicit", "hook"))
    a = prefix(net, "layer3", images)            # [B, C, h, w]
    logits = split.suffix(edit(a))               # == net(images) with layer3 edited
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .nethook import evaluating, forward_hooks, get_module, trace

__all__ = [
    "SPLIT_WAYS",
    "HookSuffix",
    "ModuleSplit",
    "chain_suffix",
    "exact_float32",
    "explicit_suffix",
    "graph_suffix",
    "outputs_match",
    "prefix",
    "split_module",
    "trace_graph",
]

SPLIT_WAYS: tuple[str, ...] = ("explicit", "chain", "graph", "hook")
"""The ways :func:`split_module` knows, in the order it would try them all."""

_SUFFIX_ERRORS = (RuntimeError, ValueError, TypeError, AttributeError)


@contextmanager
def exact_float32() -> Iterator[None]:
    """Float32 convolutions and matrix products in IEEE float32 inside (no TF32 on CUDA, where
    it is the default for convolutions), the settings as they were after. The checks that a
    suffix or a rank-one plan reproduces the network compare at 1e-4 (:func:`outputs_match`),
    which TF32's 10-bit mantissa does not hold to. No effect on the CPU."""
    conv, matmul = getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        saved = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    legacy = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)  # torch before the fp32_precision API
    torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = False, False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = legacy


def outputs_match(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a suffix's output ``a`` reproduces the network's output ``b``.

    Args:
        a: any tensor.
        b: the reference, same shape as ``a``.

    Returns:
        True when the shapes agree and every element is within ``1e-4`` relative
        and ``1e-4 * (1 + max |b|)`` absolute tolerance.
    """
    if a.shape != b.shape:
        return False
    scale = 1.0 + float(b.abs().max()) if b.numel() else 1.0
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-4 * scale))


def prefix(module: nn.Module, layer: str, *inputs: Any) -> torch.Tensor:
    """A layer's output, the network after it not run (eval mode, restored after).

    Args:
        module: the network.
        layer: dotted layer name.
        *inputs: the network's inputs, e.g. images [B, 3, H, W].

    Returns:
        a copy of the layer's output, e.g. [B, C, h, w].

    Raises:
        LayerError: the layer is unknown or did not run.
    """
    with trace(module, [layer], stop_after_last=True) as tr:
        tr(*inputs)
    return tr[layer]


def _stages(module: nn.Module) -> list[tuple[str | None, nn.Module]] | None:
    """The modules a container applies one after the other, or None when unknown."""
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return list(module.named_children())
    try:
        from torchvision.models import VGG, AlexNet, ResNet
    except ImportError:
        return None
    kind = type(module)
    if (
        isinstance(module, ResNet)
        and kind.forward is ResNet.forward
        and getattr(kind, "_forward_impl", None) is ResNet._forward_impl
    ):
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
        return [(n, getattr(module, n)) for n in names] + [(None, nn.Flatten(1)), ("fc", module.fc)]
    for base in (VGG, AlexNet):
        if isinstance(module, base) and kind.forward is base.forward:
            return [
                ("features", module.features),
                ("avgpool", module.avgpool),
                (None, nn.Flatten(1)),
                ("classifier", module.classifier),
            ]
    return None


def _containers(module: nn.Module, layer: str) -> tuple[list[str], list[nn.Module]]:
    """The layer's dotted path and the containers along it (``module`` first, the layer's parent last)."""
    parts = layer.split(".")
    containers = [module]
    for name in parts[:-1]:
        containers.append(getattr(containers[-1], name))
    return parts, containers


def explicit_suffix(module: nn.Module, layer: str) -> nn.Sequential | None:
    """The stages after a layer, read off containers whose forward is known.

    Args:
        module: the network.
        layer: dotted layer name.

    Returns:
        the stages after the layer (innermost container's first), or None when a
        container on the path is not a plain ``nn.Sequential``, torchvision
        ResNet, VGG or AlexNet. Not checked against the network
        (:func:`split_module` does that).
    """
    parts, containers = _containers(module, layer)
    rest: list[nn.Module] = []
    for parent, name in zip(reversed(containers), reversed(parts)):
        stages = _stages(parent)
        if stages is None:
            return None
        names = [n for n, _ in stages]
        if name not in names:
            return None
        rest.extend(m for _, m in stages[names.index(name) + 1 :])
    return nn.Sequential(*rest)


def chain_suffix(module: nn.Module, layer: str, *inputs: Any) -> nn.Sequential | None:
    """The stages after a layer, as one forward pass on ``inputs`` runs them.

    Every container on the layer's dotted path must call each of its children
    after the layer's branch once, each on the previous one's output (a single
    positional argument), and return the last one's output.

    Args:
        module: the network.
        layer: dotted layer name.
        *inputs: the network's inputs for the watched pass (run without gradients).

    Returns:
        the stages after the layer (innermost container's first), or None when
        the pass is not such a chain. Not checked against the network
        (:func:`split_module` does that).
    """
    parts, containers = _containers(module, layer)
    records: list[list[tuple[str, Any, Any]]] = [[] for _ in containers]

    def make_hook(j: int, name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            records[j].append((name, args[0] if len(args) == 1 and not kwargs else None, output))

        return hook

    hooks = [
        (child, make_hook(j, name))
        for j, container in enumerate(containers)
        for name, child in container.named_children()
    ]
    with forward_hooks(module, hooks, with_kwargs=True), torch.no_grad():
        result = module(*inputs)
    rest: list[nn.Module] = []
    for j in range(len(containers) - 1, -1, -1):
        calls = records[j]
        names = [n for n, _, _ in calls]
        if names.count(parts[j]) != 1:
            return None
        k = names.index(parts[j])
        prev = calls[k][2]
        for name, inp, out in calls[k + 1 :]:
            if names.count(name) != 1 or inp is None or inp is not prev:
                return None
            prev = out
        if j == 0:
            container_out = result
        else:
            parent = [c for c in records[j - 1] if c[0] == parts[j - 1]]
            if len(parent) != 1:
                return None
            container_out = parent[0][2]
        if container_out is not prev:
            return None
        rest.extend(getattr(containers[j], name) for name, _, _ in calls[k + 1 :])
    return nn.Sequential(*rest)


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, with one more module kept as a single call (the layer)."""

    def __init__(self, leaf: str) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.leaf or super().is_leaf_module(m, module_qualified_name)


def trace_graph(module: nn.Module, leaf: str | None = None) -> fx.Graph | None:
    """The ``torch.fx`` graph of a network, or None when it cannot be traced symbolically.

    Args:
        module: the network.
        leaf: a dotted module name to keep as one ``call_module`` node (not traced into).

    Returns:
        the graph (its nodes refer to ``module``'s submodules and parameters by name).
    """
    try:
        return _LeafTracer(leaf or "").trace(module)
    except Exception:  # tracing runs the model's own Python, which may raise anything
        return None


def graph_suffix(module: nn.Module, layer: str) -> fx.GraphModule | None:
    """The network after a layer, cut out of its ``torch.fx`` graph.

    Args:
        module: the network.
        layer: dotted layer name.

    Returns:
        a module mapping the layer's output to the network's output, or None when
        the network cannot be traced, the layer is called other than once, or the
        output also depends on the inputs other than through the layer (a skip
        connection around it). Not checked against the network
        (:func:`split_module` does that).
    """
    graph = trace_graph(module, layer)
    if graph is None:
        return None
    starts = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(starts) != 1:
        return None
    start = starts[0]
    after: set[fx.Node] = {start}
    from_input: set[fx.Node] = set()
    for node in graph.nodes:
        if node is start:
            continue
        inputs = node.all_input_nodes
        if any(i in after for i in inputs):
            after.add(node)
        if node.op == "placeholder" or any(i in from_input for i in inputs):
            from_input.add(node)
    output = next(n for n in graph.nodes if n.op == "output")
    needed: set[fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in needed or node is start:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    if any(n in from_input and n not in after for n in needed):
        return None
    cut = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: cut.placeholder("activation")}
    for node in graph.nodes:
        if node in needed:
            env[node] = cut.node_copy(node, lambda n: env[n])
    return fx.GraphModule(module, cut)


class HookSuffix:
    """The whole network on zero inputs, the layer's output replaced by the given tensor.

    Args:
        module: the network.
        layer: dotted layer name.
        input_shapes: the shape of each network input without the batch
            dimension, e.g. ``[(3, H, W)]``.
    """

    def __init__(self, module: nn.Module, layer: str, input_shapes: Sequence[tuple[int, ...]]) -> None:
        self.module = module
        self.layer = layer
        self.input_shapes = [tuple(int(v) for v in shape) for shape in input_shapes]

    def __call__(self, a: torch.Tensor) -> Any:
        """The network's output [R, ...] with the layer's output set to ``a`` [R, ...]."""
        xs = [torch.zeros((a.shape[0], *shape), dtype=a.dtype, device=a.device) for shape in self.input_shapes]
        with trace(self.module, [], edit={self.layer: lambda _out: a}) as tr:
            return tr(*xs)


@dataclass
class ModuleSplit:
    """A network split at one layer, as found by :func:`split_module`.

    Attributes:
        layer: the dotted layer name.
        kind: ``"explicit"``, ``"chain"``, ``"graph"`` or ``"hook"`` (the way that reproduced
            the network; module docstring), or ``"full"`` (none did).
        suffix: maps the layer's output [R, ...] to the network's output [R, ...];
            None for ``"full"``.
        activation: the layer's output on the probe inputs.
        output: the network's output on the probe inputs.
    """

    layer: str
    kind: str
    suffix: Callable[[torch.Tensor], Any] | None
    activation: Any
    output: Any


def _suffix(way: str, module: nn.Module, layer: str, inputs: tuple[Any, ...]) -> Callable[[torch.Tensor], Any] | None:
    if way == "explicit":
        return explicit_suffix(module, layer)
    if way == "chain":
        return chain_suffix(module, layer, *inputs)
    if way == "graph":
        return graph_suffix(module, layer)
    return HookSuffix(module, layer, [tuple(x.shape[1:]) for x in inputs])


def split_module(
    module: nn.Module,
    layer: str,
    *inputs: Any,
    ways: Sequence[str] = SPLIT_WAYS,
    check: Callable[[Any, Any], None] | None = None,
) -> ModuleSplit:
    """Find how to run a network from one layer's output to its output.

    Runs the network once on the probe inputs (eval mode, no gradients; the mode
    is restored), then tries each allowed way in order and keeps the first whose
    suffix reproduces the network's output from the layer's output. A layer that
    runs more than once in the pass gives ``"full"`` at once.

    Args:
        module: the network (not TorchScript), already on the probe's device.
        layer: dotted layer name.
        *inputs: probe inputs, e.g. a random batch [P, 3, H, W].
        ways: the ways to try, in order, from :data:`SPLIT_WAYS`.
        check: ``check(activation, output)`` on the probe pass, before any way is
            tried; raises when the layer's or the network's output is not what
            the caller can use.

    Returns:
        the :class:`ModuleSplit`.

    Raises:
        LayerError: the layer is unknown.
        ValueError: an unknown way.
    """
    unknown = [way for way in ways if way not in SPLIT_WAYS]
    if unknown:
        raise ValueError(f"unknown way to split a network {unknown[0]!r}; known: {', '.join(SPLIT_WAYS)}")
    get_module(module, layer)
    calls = [0]

    def count(out: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return out

    with torch.no_grad(), evaluating(module), exact_float32():
        with trace(module, [layer], edit={layer: count}) as tr:
            output = tr(*inputs)
        activation = tr[layer]
        if check is not None:
            check(activation, output)
        if calls[0] == 1:
            for way in ways:
                try:
                    suffix = _suffix(way, module, layer, inputs)
                    found = suffix is not None and outputs_match(suffix(activation.clone()), output)
                except _SUFFIX_ERRORS:
                    found = False
                if found:
                    return ModuleSplit(layer, way, suffix, activation, output)
    return ModuleSplit(layer, "full", None, activation, output)
