"""Recording and editing the outputs of named layers, through a context manager only.

>>> with trace(model, ["layer3", "layer4"], stop_after_last=True) as tr:
...     tr(images)
>>> tr["layer4"].shape
torch.Size([8, 512, 7, 7])

Layers are named by their dotted module path (``model.named_modules()``). Hooks
are always removed on exit and ``model.training`` is restored. ``edit`` maps a
layer to a callback whose return value replaces the layer's output (ablation,
insertion) without touching the model. With ``stop_after_last`` the forward pass
is abandoned as soon as every requested layer has produced its output.

TorchScript modules do not run Python hooks. For them the compiled graph is
inlined, the requested layers' values are found by their module hierarchy and a
function returning exactly those values is compiled (the rest of the network is
dropped by dead-code elimination); ``edit`` is not supported there.

Every forward hook in ``dissect_core`` is registered here, by :func:`forward_hooks`
(any callback on named layers or given modules, removed on exit whatever
happens) or by :func:`trace` on top of it; :func:`evaluating` puts a module in
eval mode for a block and restores its mode.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import DissectError, LayerError

__all__ = ["ForwardHook", "Trace", "evaluating", "forward_hooks", "get_module", "module_names", "trace"]

ForwardHook = Callable[..., Any]
"""``fn(module, inputs, output)`` (``fn(module, args, kwargs, output)`` with ``with_kwargs``);
a return value other than None replaces the module's output."""


class _StopForward(Exception):
    """Raised inside a hook to abandon the rest of the forward pass."""


def module_names(model: nn.Module) -> list[str]:
    """Dotted names of every submodule (the root excluded), in definition order.

    Args:
        model: any module, TorchScript included.

    Returns:
        the names.
    """
    return [name for name, _ in model.named_modules() if name]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule with a dotted name.

    Args:
        model: the model.
        name: dotted path such as ``"layer4.1.conv2"``.

    Returns:
        the submodule.

    Raises:
        LayerError: the name is unknown; ``details['valid']`` lists the valid names.
    """
    modules = dict(model.named_modules())
    if not name or name not in modules:
        valid = module_names(model)
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
        shown = ", ".join(valid[:200]) + (f", ... ({len(valid)} in all)" if len(valid) > 200 else "")
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise LayerError(f"unknown layer {name!r}; {hint}valid layers: {shown}", layer=name, valid=valid)
    return modules[name]


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration of a block; ``module.training`` is restored on exit.

    Args:
        module: the network.

    Yields:
        None.
    """
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def forward_hooks(
    model: nn.Module,
    hooks: Mapping[str, ForwardHook] | Iterable[tuple[str | nn.Module, ForwardHook]],
    *,
    with_kwargs: bool = False,
) -> Iterator[list[RemovableHandle]]:
    """Forward hooks on layers of a model for the duration of a block, always removed on exit.

    >>> with forward_hooks(model, {"layer4": lambda m, i, out: seen.append(out.shape)}):
    ...     model(images)

    Args:
        model: the network.
        hooks: layer name -> hook, or (layer name or submodule, hook) pairs (a
            module may then get several hooks, in order). Each hook runs after the
            module's forward as ``fn(module, inputs, output)``; a return value
            other than None replaces the output downstream.
        with_kwargs: call the hooks as ``fn(module, args, kwargs, output)``.

    Yields:
        the registered handles (removed on exit, also when the block raises).

    Raises:
        LayerError: a layer name is unknown (checked before any hook is registered).
    """
    pairs = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
    modules: dict[str, nn.Module] | None = None
    targets: list[tuple[nn.Module, ForwardHook]] = []
    for target, fn in pairs:
        if isinstance(target, str):
            if modules is None:
                modules = dict(model.named_modules())
            targets.append((modules[target] if target and target in modules else get_module(model, target), fn))
        else:
            targets.append((target, fn))
    handles: list[RemovableHandle] = []
    try:
        for module, fn in targets:
            handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))
        yield handles
    finally:
        for handle in handles:
            handle.remove()


class Trace:
    """What :func:`trace` yields: call it to run the model; index it for outputs.

    Attributes:
        outputs: layer name -> recorded output (the edited one where edited).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], runner: Callable[..., Any]) -> None:
        self.model = model
        self.layers = list(layers)
        self.outputs: dict[str, Any] = {}
        self._runner = runner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model on the inputs.

        Returns:
            the model's output, or None when the pass stopped after the last layer.
        """
        try:
            return self._runner(*args, **kwargs)
        except _StopForward:
            return None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            raise LayerError(f"layer {name!r} produced no output in this pass", layer=name, valid=self.layers)
        return self.outputs[name]


@contextlib.contextmanager
def trace(
    model: nn.Module,
    layers: Sequence[str],
    *,
    edit: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    stop_after_last: bool = False,
    clone: bool = True,
    train: bool = False,
) -> Iterator[Trace]:
    """Record (and optionally edit) the outputs of named layers.

    Args:
        model: the network.
        layers: dotted names of the layers to record.
        edit: layer name -> callback ``f(output) -> new_output``; the new output
            replaces the layer's output downstream.
        stop_after_last: abandon the forward pass once every layer has run.
        clone: record copies (a later in-place op such as ``ReLU(inplace=True)``
            would otherwise change a recorded tensor).
        train: the mode to run in (``model.training`` is restored on exit).

    Yields:
        a :class:`Trace`.

    Raises:
        LayerError: a layer name is unknown.
    """
    layers = list(dict.fromkeys(layers))
    edit = dict(edit or {})
    for name in list(layers) + list(edit):
        get_module(model, name)
    was_training = model.training
    model.train(train)
    try:
        if isinstance(model, torch.jit.ScriptModule):
            if edit:
                raise DissectError("editing layer outputs is not supported for TorchScript models")
            fn = _script_layers_fn(model, tuple(layers), keep_output=not stop_after_last, clone=clone)
            tr = Trace(model, layers, lambda *a, **k: None)

            def run_script(*args: Any, **kwargs: Any) -> Any:
                result = fn(model._c, *args, **kwargs)
                values = result[1:] if not stop_after_last else result
                tr.outputs.update(zip(layers, values))
                return result[0] if not stop_after_last else None

            tr._runner = run_script
            yield tr
            return
        tr = Trace(model, layers, model)
        pending = set(layers)

        def make_hook(name: str) -> Callable[..., Any]:
            def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
                if name in edit:
                    output = edit[name](output)
                if name in pending or name in tr.outputs:
                    tr.outputs[name] = output.clone() if clone and isinstance(output, torch.Tensor) else output
                    pending.discard(name)
                    if stop_after_last and not pending:
                        raise _StopForward()
                return output if name in edit else None

            return hook

        hooks = {name: make_hook(name) for name in dict.fromkeys(layers + list(edit))}
        with forward_hooks(model, hooks), contextlib.suppress(_StopForward):
            yield tr
    finally:
        model.train(was_training)


_SCRIPT_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Any]] = weakref.WeakKeyDictionary()


_HIERARCHY_PART = re.compile(r"([^.()]+)\(([^()]*)\)")


def _hierarchy_path(node: torch._C.Node) -> str:
    names = [m.group(1) for m in _HIERARCHY_PART.finditer(node.getModuleHierarchy())]
    if names and names[0] == "SELF":
        names = names[1:]
    parts = []
    for name in names:
        if name in ("SELF", "UNKNOWN_INSTANCE"):
            break
        parts.append(name)
    return ".".join(parts)


def _script_layers_fn(
    model: torch.jit.ScriptModule, layers: tuple[str, ...], keep_output: bool, clone: bool, strict: bool = True
) -> Any:
    """Compile ``f(model._c, *inputs) -> (output?, *layer_values)``.

    With ``strict=False`` layers without a tensor value are skipped, and
    ``(fn, kept_layers)`` is returned instead of ``fn``.
    """
    cache = _SCRIPT_CACHE.setdefault(model, {})
    key = (layers, keep_output, clone, strict)
    if key in cache:
        return cache[key]
    # torch types ScriptModule.forward as a plain callable; it is a ScriptMethod, with a graph.
    graph = cast(torch._C.ScriptMethod, model.forward).graph.copy()
    torch._C._jit_pass_inline(graph)
    nodes = list(graph.nodes())
    paths = {node: _hierarchy_path(node) for node in nodes}

    def inside(node: torch._C.Node, layer: str) -> bool:
        path = paths.get(node)
        if path is None:
            path = _hierarchy_path(node)
        return path == layer or path.startswith(layer + ".")

    values = []
    kept = []
    for layer in layers:
        found = None
        for node in nodes:
            if not inside(node, layer):
                continue
            for value in node.outputs():
                if value.type().kind() != "TensorType":
                    continue
                if any(not inside(use.user, layer) or use.user.kind() == "prim::Return" for use in value.uses()):
                    found = value
        if found is None and not strict:
            continue
        if found is None:
            raise LayerError(
                f"layer {layer!r} produces no tensor in the TorchScript graph",
                layer=layer,
                valid=module_names(model),
            )
        if clone:
            none = cast(Any, graph).insertConstant(None)  # missing from torch's stubs
            none.node().moveBefore(nodes[0])
            copy = graph.create("aten::clone", [found, none], 1)
            copy.output().setType(found.type())
            copy.insertAfter(found.node())
            found = copy.output()
        values.append(found)
        kept.append(layer)
    originals = list(graph.outputs())
    for i in reversed(range(len(originals))):
        graph.eraseOutput(i)
    outs = ([originals[0]] if keep_output else []) + values
    tup = graph.create("prim::TupleConstruct", outs, 1)
    tup.output().setType(torch._C.TupleType([v.type() for v in outs]))
    graph.appendNode(tup)
    graph.registerOutput(tup.output())
    torch._C._jit_pass_dce(graph)
    fn = torch._C._create_function_from_graph("dissect_layers", graph)
    cache[key] = fn if strict else (fn, kept)
    return cache[key]
