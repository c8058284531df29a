"""Loading classifiers and generators safely, and listing their layers.

Architectures are named by spec: ``torchvision:NAME`` (any torchvision
classification builder, built with ``weights=None``), ``timm:NAME`` (any timm
model, built with ``pretrained=False``: nothing is downloaded), ``builtin:NAME``
(:data:`dissect_core.archs.ARCHS`), ``exported`` (a ``torch.export`` archive,
:mod:`dissect_core.exported`) or ``torchscript`` (the weights file is a
TorchScript archive). Generators (latent vector in, image out) are loaded by
:func:`dissect_core.generators.load_generator` into the same :class:`LoadedModel`,
with ``kind="generator"``. Weights are read only as ``.safetensors`` or through
``torch.load(weights_only=True)``: a pickle that would run code is refused, never
executed.
"""

from __future__ import annotations

import difflib
import inspect
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import LayerError, ModelLoadError
from .layouts import LayerLayout, infer_layout, model_token_grid
from .nethook import evaluating, forward_hooks, get_module, module_names

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LayerInfo",
    "LoadedModel",
    "infer_num_classes_from_state_dict",
    "layer_layouts",
    "layout_from_output",
    "list_layers",
    "load_model",
    "load_state_dict_file",
    "unwrap_state_dict",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_PROBE_BATCH = 2  # the probe's batch: a dimension of this size first is the batch
_WIDER = 32  # the second probe's extra width (pixels)
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "generator", "netG", "g_ema")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedModel:
    """A network ready to dissect.

    Attributes:
        module: the network in eval mode, on the CPU.
        arch: the spec it was built from (``torchvision:resnet18``, ``builtin:scenecnn``,
            ``torchscript``).
        num_classes: number of output classes (None when unknown, e.g. TorchScript).
        input_size: (H, W) the network expects.
        mean: per-channel normalisation mean (RGB, for images scaled to [0, 1]).
        std: per-channel normalisation std.
        kind: ``"torchvision"``, ``"builtin"``, ``"torchscript"`` or ``"generator"``
            (a generator of any spec: it takes latents, not images).
        classes: class names, if known.
        latent_dim: a generator's latent size Z (None for classifiers).
        output_range: the (low, high) values a generator's output pixels span;
            low maps to 0 and high to 255.
        latent_shape: the shape of one latent as the generator takes it
            (``(Z,)`` or ``(Z, 1, 1)``); None means ``(latent_dim,)``.
        layouts: layer name -> how its output is laid out as unit maps, as far as known
            (registration records them; the engine reads the rest off its first batch).
    """

    module: nn.Module
    arch: str
    num_classes: int | None
    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    kind: str = "torchvision"
    classes: list[str] = field(default_factory=list)
    latent_dim: int | None = None
    output_range: tuple[float, float] = (-1.0, 1.0)
    latent_shape: tuple[int, ...] | None = None
    layouts: dict[str, LayerLayout] = field(default_factory=dict)

    @property
    def is_generator(self) -> bool:
        """Whether the network maps latents to images."""
        return self.kind == "generator"

    def latent_input(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, Z] shaped as the generator takes them ([B, *latent_shape])."""
        if self.latent_shape is None or tuple(z.shape[1:]) == tuple(self.latent_shape):
            return z
        return z.reshape(z.shape[0], *self.latent_shape)


@dataclass(frozen=True)
class LayerInfo:
    """One layer whose output can be laid out as unit maps (:mod:`dissect_core.layouts`).

    Attributes:
        name: dotted module name.
        type: module class name.
        units: channels of the output (the units).
        height: map height for the model's input size (1 for a vector; patch rows for tokens).
        width: map width.
        kind: the layout: ``map``, ``channels_last``, ``tokens`` or ``vector``.
        prefix: tokens only: the names of the leading tokens left out of the map.
        element: for a tuple output, the index of the tensor laid out.
    """

    name: str
    type: str
    units: int
    height: int
    width: int
    kind: str = "map"
    prefix: tuple[str, ...] = ()
    element: int | None = None

    @property
    def layout(self) -> LayerLayout:
        """The :class:`~dissect_core.layouts.LayerLayout` that turns this layer's output into maps."""
        return LayerLayout(self.kind, self.units, self.height, self.width, self.prefix, self.element)


def _size2(value: int | Sequence[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    if value is None:
        return default
    if isinstance(value, int):
        return (value, value)
    h, w = (int(v) for v in value)
    return (h, w)


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file without executing code.

    Args:
        path: ``.safetensors``, or a ``torch.save`` file (``.pt``, ``.pth``, ``.bin``)
            read with ``weights_only=True``.

    Returns:
        the (unwrapped, see :func:`unwrap_state_dict`) state dict.

    Raises:
        ModelLoadError: missing, truncated, corrupt or code-carrying files.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist", path=str(path))
    if path.stat().st_size == 0:
        raise ModelLoadError(f"weights file {path} is empty", path=str(path))
    kind = "safetensors" if path.suffix == ".safetensors" else _sniff(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(
                f"weights file {path} is not a readable safetensors file (truncated or corrupt?): {exc}",
                path=str(path),
            ) from None
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ModelLoadError(
                f"refusing to load {path}: it is not a plain weights file (torch.load with "
                f"weights_only=True rejected it: {str(exc).splitlines()[0][:300]})",
                path=str(path),
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError) as exc:
            raise ModelLoadError(
                f"weights file {path} is unreadable (truncated or corrupt?): {str(exc).splitlines()[0][:300]}",
                path=str(path),
            ) from None
    return unwrap_state_dict(obj, source=str(path))


def unwrap_state_dict(obj: Any, *, source: str = "weights") -> dict[str, torch.Tensor]:
    """Find the state dict in a checkpoint and strip wrapper prefixes.

    Accepts a bare state dict, a dict holding one under ``state_dict`` /
    ``model_state_dict`` / ``model`` / ``net`` / ``module``, and keys prefixed by
    ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile).

    Args:
        obj: what was loaded.
        source: names the file in error messages.

    Returns:
        name -> tensor.

    Raises:
        ModelLoadError: no state dict found.
    """
    for _ in range(3):
        if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _STATE_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ModelLoadError(f"{source} holds no state dict (found {type(obj).__name__})", path=source)
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ModelLoadError(f"{source} holds no tensors", path=source)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _size_from_state(build: Callable[[int], nn.Module], state: Mapping[str, torch.Tensor]) -> int | None:
    """The size argument of ``build`` that made ``state`` (a class count, a latent size).

    The architecture is built on the meta device with 7 and with 11; the first
    tensor whose shape follows the argument gives it, read off ``state``.

    Args:
        build: ``size -> module``.
        state: a state dict of a module that ``build`` makes.

    Returns:
        the size, or None when no tensor follows it or the build fails.
    """
    try:
        with torch.device("meta"):
            a, b = build(7).state_dict(), build(11).state_dict()
    except (ModelLoadError, RuntimeError, TypeError, ValueError, NotImplementedError):
        return None
    for key, ta in a.items():
        tb, ts = b.get(key), state.get(key)
        if tb is None or ts is None or ta.shape == tb.shape or ta.dim() != ts.dim():
            continue
        for i, (da, db) in enumerate(zip(ta.shape, tb.shape)):
            if (da, db) == (7, 11):
                return int(ts.shape[i])
    return None


def infer_num_classes_from_state_dict(state: Mapping[str, torch.Tensor], arch: str | None = None) -> int | None:
    """Guess the number of classes a state dict was trained for.

    With ``arch`` (``torchvision:NAME`` or ``builtin:NAME``) the architecture is
    built twice on the meta device with different class counts; the tensors whose
    shapes follow the class count give it exactly. Without it, the classifier is
    taken to be the 2-D (or 1x1 conv) weight whose output size feeds no other
    weight, the last in natural key order.

    Args:
        state: a (possibly wrapped) state dict.
        arch: the architecture spec, if known.

    Returns:
        the number of classes, or None when it cannot be told.
    """
    try:
        state = unwrap_state_dict(state)
    except ModelLoadError:
        return None
    if arch is not None and not arch.startswith("torchscript"):
        # Built inside the helper, so that an unknown spec counts as a failed build.
        found = _size_from_state(lambda n: _builder(arch)(n), state)
        if found is not None:
            return found
    weights = [
        (k, v)
        for k, v in state.items()
        if k.endswith("weight") and (v.dim() == 2 or (v.dim() == 4 and tuple(v.shape[2:]) == (1, 1)))
    ]
    if not weights:
        return None
    inputs = {int(v.shape[1]) for _, v in weights}
    sinks = [(k, v) for k, v in weights if int(v.shape[0]) not in inputs] or weights

    def natural(key: str) -> list[Any]:
        return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]

    return int(max(sinks, key=lambda kv: natural(kv[0]))[1].shape[0])


def _check_and_load(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {show(mismatched)}")
        raise ModelLoadError(
            f"weights {source} do not fit the architecture; " + "; ".join(parts),
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    module.load_state_dict(state, strict=False)


def _build_torchvision(name: str, num_classes: int, image_size: tuple[int, int] | None = None) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ModelLoadError(
            f"unknown torchvision classifier {name!r}; known: " + ", ".join(known), arch=f"torchvision:{name}"
        )
    builder = torchvision.models.get_model_builder(name)
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if image_size is not None and name.startswith("vit_"):  # its position embedding is sized by the image
        if image_size[0] != image_size[1]:
            raise ModelLoadError(
                f"torchvision:{name} takes square images, not {image_size}", arch=f"torchvision:{name}"
            )
        kwargs["image_size"] = image_size[0]
    params = inspect.signature(builder).parameters
    if "aux_logits" in params or name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = False
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"cannot build torchvision:{name}: {exc}", arch=f"torchvision:{name}") from None


def _timm_config(name: str) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """((H, W), mean, std) of a timm model name's own configuration (ImageNet's when it has none)."""
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
        raise ModelLoadError(
            f"unknown timm model {name!r}" + (f"; similar names: {', '.join(close)}" if close else ""),
            arch=f"timm:{name}",
        )
    cfg = get_pretrained_cfg(name)
    size = tuple(int(v) for v in (getattr(cfg, "input_size", None) or (3, 224, 224))[1:])
    mean = tuple(float(v) for v in (getattr(cfg, "mean", None) or IMAGENET_MEAN))
    std = tuple(float(v) for v in (getattr(cfg, "std", None) or IMAGENET_STD))
    return (size[0], size[1]), mean, std


def _build_timm(name: str, num_classes: int, img_size: tuple[int, int] | None = None) -> nn.Module:
    """A timm model with random weights (``pretrained=False``: nothing is downloaded); ``img_size``
    goes to the models that take it (vision transformers size their position embedding by it)."""
    import timm

    _timm_config(name)
    try:
        if img_size is not None:
            try:
                return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size)
            except TypeError:  # a model without an image size (a CNN)
                pass
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise ModelLoadError(
            f"cannot build timm:{name}: {str(exc).splitlines()[0][:300]}", arch=f"timm:{name}"
        ) from None


def _builder(arch: str, img_size: tuple[int, int] | None = None) -> Callable[[int], nn.Module]:
    """The constructor ``num_classes -> module`` of an architecture spec."""
    scheme, _, name = arch.partition(":")
    if scheme == "torchvision" and name:
        return lambda n: _build_torchvision(name, n, img_size)
    if scheme == "timm" and name:
        return lambda n: _build_timm(name, n, img_size)
    if scheme == "builtin" and name:
        from .archs import ARCHS

        if name not in ARCHS:
            raise ModelLoadError(
                f"unknown builtin architecture {name!r}; known: " + ", ".join(f"builtin:{k}" for k in sorted(ARCHS)),
                arch=arch,
            )
        return ARCHS[name]
    raise ModelLoadError(
        f"unknown model spec {arch!r}: expected torchvision:NAME, timm:NAME, builtin:NAME, torchscript or exported",
        arch=arch,
    )


def _load_torchscript(weights: str | Path) -> torch.jit.ScriptModule:
    """A TorchScript archive, on the CPU; a missing or unloadable file raises :class:`ModelLoadError`."""
    path = Path(weights)
    if not path.is_file():
        raise ModelLoadError(f"TorchScript file {path} does not exist", path=str(path))
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"{path} is not a loadable TorchScript archive: {str(exc).splitlines()[0][:300]}", path=str(path)
        ) from None


def _load_exported_model(
    weights: str | Path | None,
    num_classes: int | None,
    input_size: int | Sequence[int] | None,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    classes: Sequence[str] | None,
) -> LoadedModel:
    """A ``torch.export`` archive (:mod:`dissect_core.exported`: checked before torch reads it), at the
    input size it was exported for."""
    from .exported import load_exported

    if weights is None:
        raise ModelLoadError("an exported model needs its .pt2 archive as weights")
    net = load_exported(weights)
    if input_size is not None and _size2(input_size, net.input_size) != net.input_size:
        raise ModelLoadError(
            f"the program was exported for {net.input_size[0]} x {net.input_size[1]} images, not "
            f"{_size2(input_size, net.input_size)}: leave input_size out or export it at that size",
            path=str(weights),
        )
    if num_classes is None:
        with torch.no_grad():
            out = net.module(torch.zeros(_PROBE_BATCH, 3, *net.input_size))
        num_classes = int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None
    return LoadedModel(net.module, "exported", num_classes, net.input_size, mean, std, "exported", list(classes or []))


def load_model(
    arch: str,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    *,
    input_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
) -> LoadedModel:
    """Build an architecture and load its weights, safely.

    Args:
        arch: ``torchvision:NAME``, ``timm:NAME`` (built with ``pretrained=False``),
            ``builtin:NAME``, ``torchscript`` or ``exported`` (a ``torch.export`` .pt2
            archive, checked by :mod:`dissect_core.exported` before torch reads it).
        weights: the weights file (required for ``torchscript`` and ``exported``;
            without it the network keeps its random initialisation).
        num_classes: output classes; inferred from the weights when omitted
            (torchvision and timm fall back to 1000).
        input_size: (H, W) or one int; default 224 x 224 (timm: the model's own
            configuration; a timm transformer is built for the size given).
        mean: normalisation mean, default ImageNet's (timm: the model's own).
        std: normalisation std, default ImageNet's (timm: the model's own).
        classes: class names, if known.

    Returns:
        the :class:`LoadedModel` (module in eval mode, on the CPU).

    Raises:
        ModelLoadError: unknown spec, unreadable or unsafe file, or weights that
            do not fit (the message names missing, unexpected and mismatched keys).
    """
    scheme, _, name = arch.partition(":")
    default_size: tuple[int, int] = (224, 224)
    default_mean: tuple[float, ...] = IMAGENET_MEAN
    default_std: tuple[float, ...] = IMAGENET_STD
    if scheme == "timm" and name:
        default_size, default_mean, default_std = _timm_config(name)
    size = _size2(input_size, default_size)
    mean_t = tuple(float(v) for v in (mean if mean is not None else default_mean))
    std_t = tuple(float(v) for v in (std if std is not None else default_std))
    if len(mean_t) != 3 or len(std_t) != 3 or any(s <= 0 for s in std_t):
        raise ModelLoadError("mean and std must hold 3 values each, std positive")
    if scheme == "exported":
        return _load_exported_model(weights, num_classes, input_size, mean_t, std_t, classes)
    if scheme == "torchscript":
        if weights is None:
            raise ModelLoadError("a torchscript model needs its file as weights")
        script = _load_torchscript(weights)
        script.eval()
        return LoadedModel(script, "torchscript", num_classes, size, mean_t, std_t, "torchscript", list(classes or []))
    build = _builder(arch, size if input_size is not None else None)
    state = load_state_dict_file(weights) if weights is not None else None
    if num_classes is None and state is not None:
        num_classes = infer_num_classes_from_state_dict(state, arch)
    if num_classes is None and scheme in ("torchvision", "timm"):
        num_classes = 1000
    if num_classes is None:
        raise ModelLoadError(f"{arch}: give num_classes (no weights to infer it from)", arch=arch)
    module = build(int(num_classes))
    kind = scheme
    if state is not None:
        _check_and_load(module, state, str(weights))
    module.eval()
    return LoadedModel(module, arch, num_classes, size, mean_t, std_t, kind, list(classes or []))


def list_layers(
    model: LoadedModel | nn.Module,
    input_size: int | Sequence[int] | None = None,
    *,
    problems: dict[str, str] | None = None,
) -> list[LayerInfo]:
    """The layers whose output can be laid out as unit maps, in execution order.

    Runs one forward pass of two zero images (a generator: two zero latents) with a hook on
    every module, and a second one on wider images when the model takes them (to tell
    [B, C, H, W] from [B, H, W, C]); see :func:`dissect_core.layouts.infer_layout`.

    Args:
        model: a :class:`LoadedModel` or a bare module.
        input_size: (H, W) to probe with (default: the model's input size, or 224;
            ignored for generators, whose input is a latent).
        problems: if given, filled with layer name -> why it cannot be dissected, for the
            layers left out.

    Returns:
        one :class:`LayerInfo` per module whose output is a map, channels-last map, token
        sequence or vector (a module run several times reports its last run).

    Raises:
        ModelLoadError: the forward pass fails at that input size.
    """
    module = model.module if isinstance(model, LoadedModel) else model
    default = model.input_size if isinstance(model, LoadedModel) else (224, 224)
    h, w = _size2(input_size, default)
    generator = isinstance(model, LoadedModel) and model.latent_dim is not None
    device = next(iter(module.parameters()), torch.zeros(0)).device
    x = torch.zeros(_PROBE_BATCH, 3, h, w, device=device)
    if generator:
        assert isinstance(model, LoadedModel) and model.latent_dim is not None
        x = torch.zeros(_PROBE_BATCH, *(model.latent_shape or (model.latent_dim,)), device=device)
    names = module_names(module)
    if isinstance(module, torch.jit.ScriptModule):
        return _list_script_layers(module, names, x)
    wider = (
        {} if generator else _probe_shapes(module, names, torch.zeros(_PROBE_BATCH, 3, h, w + _WIDER, device=device))
    )
    grid = None if generator else model_token_grid(module, (h, w))
    found: dict[str, LayerInfo] = {}
    order: list[str] = []
    modules = dict(module.named_modules())

    def make_hook(name: str) -> Any:
        def hook(_: nn.Module, __: Any, output: Any) -> None:
            try:
                layout = infer_layout(
                    name, output, batch=_PROBE_BATCH, input_size=(h, w), grid=grid, wider=wider.get(name)
                )
            except LayerError as exc:
                if problems is not None:
                    problems[name] = exc.message
                return
            found[name] = LayerInfo(
                name,
                getattr(modules[name], "original_name", type(modules[name]).__name__),
                layout.units,
                layout.height,
                layout.width,
                layout.kind,
                layout.prefix,
                layout.element,
            )
            if name in order:
                order.remove(name)
            order.append(name)

        return hook

    try:
        with evaluating(module), forward_hooks(module, {n: make_hook(n) for n in names}), torch.no_grad():
            module(x)
    except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
        raise ModelLoadError(
            f"the model does not run on a {'x'.join(str(v) for v in x.shape[1:])} input: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"
        ) from None
    for name in order:
        if problems is not None:
            problems.pop(name, None)
    return [found[n] for n in order]


def _probe_shapes(module: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Each module's output tensor shape on ``x``; empty when the model does not take it."""
    shapes: dict[str, tuple[int, ...]] = {}

    def make_hook(name: str) -> Any:
        def hook(_: nn.Module, __: Any, output: Any) -> None:
            t = output if isinstance(output, torch.Tensor) else None
            if isinstance(output, (tuple, list)):
                t = next((o for o in output if isinstance(o, torch.Tensor)), None)
            if t is not None:
                shapes[name] = tuple(int(v) for v in t.shape)

        return hook

    try:
        with evaluating(module), forward_hooks(module, {n: make_hook(n) for n in names}), torch.no_grad():
            module(x)
    except Exception:  # a model bound to one input size (a ViT): the shapes alone decide
        return {}
    return shapes


def layer_layouts(model: LoadedModel, layers: Sequence[str]) -> dict[str, LayerLayout]:
    """The layouts of some layers of a model: those it knows, the rest from one probe (kept on it).

    Args:
        model: the network.
        layers: dotted layer names.

    Returns:
        layer name -> :class:`~dissect_core.layouts.LayerLayout`.

    Raises:
        LayerError: a name is not a module, or its output cannot be laid out as maps (the
            message says why).
    """
    cache = model.layouts
    missing = [name for name in layers if name not in cache]
    if missing:
        for name in missing:
            get_module(model.module, name)
        problems: dict[str, str] = {}
        infos = {info.name: info for info in list_layers(model, problems=problems)}
        for name in missing:
            if name in infos:
                cache[name] = infos[name].layout
            elif name in problems:
                raise LayerError(problems[name], layer=name, valid=list(infos))
            else:
                raise LayerError(
                    f"layer {name!r} produced no output on a probe of the model", layer=name, valid=list(infos)
                )
    return {name: cache[name] for name in layers}


def layout_from_output(model: LoadedModel, layer: str, output: Any, batch: int) -> LayerLayout:
    """A layer's layout, known to the model or read off one output of a pass of ``batch`` images
    (kept on the model); no extra forward pass.

    Raises:
        LayerError: the output cannot be laid out as maps (the message says why).
    """
    known = model.layouts.get(layer)
    if known is not None:
        return known
    size = (int(model.input_size[0]), int(model.input_size[1]))
    grid = None if model.latent_dim is not None else model_token_grid(model.module, size)
    layout = infer_layout(layer, output, batch=batch, input_size=size, grid=grid)
    model.layouts[layer] = layout
    return layout


def _list_script_layers(module: torch.jit.ScriptModule, names: list[str], x: torch.Tensor) -> list[LayerInfo]:
    from .nethook import _script_layers_fn

    fn, kept = _script_layers_fn(module, tuple(names), keep_output=False, clone=False, strict=False)
    with torch.no_grad():
        try:
            values = fn(module._c, x)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"the model does not run on a {tuple(x.shape)} input: {str(exc).splitlines()[0][:300]}"
            ) from None
    found = []
    for name, out in zip(kept, values):
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            sub = get_module(module, name)
            type_name = getattr(sub, "original_name", type(sub).__name__)
            found.append(LayerInfo(name, type_name, out.shape[1], out.shape[2], out.shape[3]))
    return found
