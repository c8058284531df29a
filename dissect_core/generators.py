"""The generator half of the method: dissecting a GAN and intervening on its units.

A generator maps a latent vector z [Z] to an image. Here it is a
:class:`~dissect_core.models.LoadedModel` with ``kind="generator"``,
``latent_dim`` Z and ``output_range`` (the values its output pixels span):

- :func:`load_generator` loads ``builtin:NAME`` (:mod:`dissect_core.gan`) or a
  TorchScript archive; :func:`wrap_generator` wraps a module already built.
- :func:`sample_latents` draws latents reproducibly: latent i depends only on
  ``(seed, start + i)``, so shards and the painting endpoint see the same sample.
- :func:`generate` turns latents into uint8 images, optionally with layer edits.
- :class:`GeneratedDataset` is a concept dataset of generated images labelled by a
  segmenter (or by the colour-name rule, ``"colors"``); :func:`dissect_core.dissect.dissect`
  on it runs the same engine as for classifiers, feeding the samples' latents to
  the generator, and labels each unit by the concept its activation overlaps.

Interventions (paper, "Role of Units in a GAN") are output-editing callbacks for
:func:`dissect_core.nethook.trace`, never edits of the model:

- removal: :func:`remove_units_edit` zeros units; :func:`removal_curve` measures
  the concept's pixel share as the k best units are zeroed (paper: removing 20
  tree units removes 53.3% of the tree pixels);
- insertion: :func:`insert_units_edit` forces units to high values (by default
  each unit's 0.995 activation quantile, :func:`unit_quantiles`) at chosen
  positions; :func:`insertion_map` counts the new concept pixels for every
  feature-map position (paper, Figure 4d: where a door can be added);
- painting: :func:`paint` / :func:`paint_pair` add or erase units under a brush mask.

Concept pixels are counted at the concept source's resolution (a segmenter's
output; the colour rule's ``mask_size``, by default the image size).

Removal and insertion run the part of the generator before the layer once per
batch of samples, and only the part after it for each edit, when that part is a
chain of modules: for every container on the layer's dotted path, the children
its forward calls after the layer's branch, each once, each taking the previous
one's output, the container returning the last one's output. This is found by
watching one forward pass and checked against the full forward pass
(:func:`dissect_core.surgery.split_module`, way ``"chain"``); otherwise every
edit runs the whole generator with an edit hook on the layer.

TorchScript generators run no Python hooks: they can be dissected and their
quantiles taken, but not edited. Output pixels map to uint8 by rounding
(:func:`to_uint8`).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, Required, TypedDict, TypeVar, Unpack

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .ablation import zero_units
from .colors import (
    _PROTOTYPE_INDEX,
    _PROTOTYPES_LAB,
    COLOR_CATEGORY,
    COLOR_CONCEPT_NAMES,
    rgb_to_lab,
)
from .concepts import Concept, ConceptDataset, Sample
from .errors import DissectError, LayerError, ModelLoadError
from .gan import _cpu_threads
from .models import (
    LoadedModel,
    _check_and_load,
    _load_torchscript,
    _size_from_state,
    load_state_dict_file,
)
from .nethook import evaluating, get_module, trace
from .options import check_keywords, resolve_device
from .progress import ProgressFn, StopFn, check_stop
from .surgery import prefix, split_module

__all__ = [
    "DEFAULT_KS",
    "ColorSegmenter",
    "ConceptSource",
    "ExperimentOptions",
    "GeneratedDataset",
    "InsertionResult",
    "PaintEdit",
    "RemovalResult",
    "concept_pixels",
    "generate",
    "insert_units_edit",
    "insertion_map",
    "load_generator",
    "paint",
    "paint_pair",
    "removal_curve",
    "remove_units_edit",
    "resize_mask",
    "sample_latents",
    "to_uint8",
    "unit_quantiles",
    "wrap_generator",
]

DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 20, 24, 28, 32)
"""Default numbers of removed units for :func:`removal_curve` (cut at the number of ranked units)."""

Edit = Callable[[torch.Tensor], torch.Tensor]


class ConceptSource(Protocol):
    """What labels generated images: a :class:`~dissect_core.segmenter.Segmenter` or a
    :class:`ColorSegmenter`.

    Attributes:
        concepts: ``concepts[i].number == i + 1``.
        categories: the concepts' categories.
    """

    concepts: list[Concept]
    categories: list[str]

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> int32 [B, K, h, w] concept numbers (0 = none)."""
        ...


# ---------------------------------------------------------------------------------------------
# Loading


def _probe_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = module(x)
    if not isinstance(out, torch.Tensor):
        raise ModelLoadError(f"the generator returned {type(out).__name__}, not an image tensor")
    return out


def wrap_generator(
    module: nn.Module,
    latent_dim: int,
    *,
    arch: str = "module",
    output_range: Sequence[float] = (-1.0, 1.0),
    latent_shape: Sequence[int] | None = None,
) -> LoadedModel:
    """A generator module as a :class:`LoadedModel` (``kind="generator"``).

    The module is put in eval mode and run once on one latent to find the image
    size and whether it takes latents as [B, Z] or [B, Z, 1, 1].

    Args:
        module: maps latents to images [B, 3, H, W] with values in ``output_range``.
        latent_dim: Z.
        arch: the spec it was built from (for display).
        output_range: (low, high) of the output pixel values.
        latent_shape: the shape of one latent as the module takes it (default:
            ``(Z,)``, else ``(Z, 1, 1)`` when the module refuses [1, Z]).

    Returns:
        the model, ``input_size`` set to the generated image size (H, W).

    Raises:
        ModelLoadError: the module does not run on a latent or does not return
            an RGB image batch.
    """
    if int(latent_dim) < 1:
        raise ModelLoadError(f"latent_dim must be positive, got {latent_dim}")
    z_dim = int(latent_dim)
    lo, hi = (float(v) for v in output_range)
    if not hi > lo:
        raise ModelLoadError(f"output_range must be (low, high) with low < high, got {tuple(output_range)}")
    module.eval()
    z = sample_latents(z_dim, 1, seed=0)
    shapes = [tuple(int(v) for v in latent_shape)] if latent_shape is not None else [(z_dim,), (z_dim, 1, 1)]
    out, error, shape = None, "", shapes[0]
    for shape in shapes:
        try:
            out = _probe_output(module, z.reshape(1, *shape))
            break
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            if not error:
                error = str(exc).splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if out is None:
        raise ModelLoadError(f"the generator does not run on a latent of size {z_dim}: {error}", arch=arch)
    if out.dim() != 4 or out.shape[0] != 1 or out.shape[1] != 3:
        raise ModelLoadError(
            f"the generator returned {tuple(out.shape)}, expected an image batch [1, 3, H, W]", arch=arch
        )
    return LoadedModel(
        module,
        arch,
        None,
        (int(out.shape[2]), int(out.shape[3])),
        kind="generator",
        latent_dim=z_dim,
        output_range=(lo, hi),
        latent_shape=None if shape == (z_dim,) else shape,
    )


def _gan_archs() -> tuple[Any, Any]:
    try:
        from . import gan
    except ImportError as exc:
        raise ModelLoadError(f"builtin generators need dissect_core.gan, which cannot be imported: {exc}") from None
    return gan, gan.GENERATOR_ARCHS


def load_generator(
    arch: str,
    weights: str | Path | None,
    *,
    latent_dim: int | None = None,
    output_range: Sequence[float] = (-1.0, 1.0),
) -> LoadedModel:
    """Build a generator and load its weights, safely.

    Args:
        arch: ``builtin:NAME`` (a name of ``dissect_core.gan.GENERATOR_ARCHS``) or
            ``torchscript`` (``weights`` is the archive).
        weights: ``.safetensors`` or a ``torch.save`` state dict read with
            ``weights_only=True`` (a checkpoint holding it under ``generator``,
            ``state_dict``, ... is unwrapped); None keeps a builtin's random
            initialisation.
        latent_dim: Z; required for TorchScript; for a builtin, inferred from the
            weights when omitted (128 without weights).
        output_range: (low, high) of the output pixel values.

    Returns:
        the :class:`LoadedModel` (``kind="generator"``, eval mode, on the CPU,
        ``input_size`` = generated image size).

    Raises:
        ModelLoadError: unknown spec, unreadable or unsafe file, weights that do
            not fit (naming missing, unexpected and mismatched keys), or a network
            that does not map a latent to an image.
    """
    scheme, _, name = arch.partition(":")
    if scheme == "torchscript":
        if latent_dim is None:
            raise ModelLoadError("a torchscript generator needs latent_dim (its input size)", arch=arch)
        if weights is None:
            raise ModelLoadError("a torchscript generator needs its file as weights", arch=arch)
        script = _load_torchscript(weights)
        return wrap_generator(script, latent_dim, arch="torchscript", output_range=output_range)
    if scheme != "builtin" or not name:
        raise ModelLoadError(f"unknown generator spec {arch!r}: expected builtin:NAME or torchscript", arch=arch)
    gan, archs = _gan_archs()
    key = name if name in archs else arch if arch in archs else None
    if key is None:
        raise ModelLoadError(
            f"unknown builtin generator {name!r}; known: " + ", ".join(f"builtin:{k}" for k in sorted(archs)),
            arch=arch,
        )

    def build(z: int) -> nn.Module:
        return gan.build_generator(key, latent_dim=z)

    state = load_state_dict_file(weights) if weights is not None else None
    if latent_dim is None:
        latent_dim = _size_from_state(build, state) if state is not None else 128
        if latent_dim is None:
            raise ModelLoadError(f"{arch}: cannot tell the latent size from the weights; give latent_dim", arch=arch)
    module = build(int(latent_dim))
    if state is not None:
        _check_and_load(module, state, str(weights))
    return wrap_generator(module, int(latent_dim), arch=arch, output_range=output_range)


# ---------------------------------------------------------------------------------------------
# Latents and images


def sample_latents(latent_dim: int, count: int, *, seed: int = 0, start: int = 0) -> torch.Tensor:
    """Standard normal latents, each a function of (seed, index) only.

    Latent i is ``numpy.random.default_rng([seed, start + i]).standard_normal(Z, float32)``,
    so any shard or a single painted sample draws exactly the same vector.

    Args:
        latent_dim: Z.
        count: number of latents.
        seed: non-negative seed.
        start: index of the first latent.

    Returns:
        float32 tensor [count, Z].
    """
    if latent_dim < 1 or count < 0 or seed < 0 or start < 0:
        raise ValueError(
            f"need latent_dim >= 1 and count, seed, start >= 0 (got {latent_dim}, {count}, {seed}, {start})"
        )
    out = np.empty((count, latent_dim), np.float32)
    for i in range(count):
        out[i] = np.random.default_rng([seed, start + i]).standard_normal(latent_dim, dtype=np.float32)
    return torch.from_numpy(out)


def to_uint8(images: torch.Tensor, output_range: Sequence[float] = (-1.0, 1.0)) -> torch.Tensor:
    """Generator output to uint8 pixels: low -> 0, high -> 255, rounded, clamped.

    Args:
        images: float [B, 3, H, W].
        output_range: (low, high).

    Returns:
        uint8 tensor [B, 3, H, W] on the same device.
    """
    lo, hi = (float(v) for v in output_range)
    return (images.to(torch.float32) - lo).mul_(255.0 / (hi - lo)).round_().clamp_(0, 255).to(torch.uint8)


def _check_generator(gen: LoadedModel) -> int:
    if gen.kind != "generator" or gen.latent_dim is None:
        raise DissectError(f"{gen.arch} is not a generator (kind {gen.kind!r}); load it with load_generator")
    return int(gen.latent_dim)


def _check_image(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[1] != 3:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DissectError(f"the generator returned {shape}, not an image batch [B, 3, H, W]")
    return out


def generate(
    gen: LoadedModel,
    z: torch.Tensor,
    *,
    edits: dict[str, Edit] | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Generate images from latents, optionally with layer outputs edited.

    Args:
        gen: the generator.
        z: float latents [B, Z].
        edits: layer -> output-editing callback (:func:`remove_units_edit`,
            :func:`insert_units_edit`); not for TorchScript generators.
        device: where to run (default: CUDA when available).
        batch_size: latents per forward pass.

    Returns:
        uint8 tensor [B, 3, H, W] on the CPU.
    """
    _check_generator(gen)
    dev = resolve_device(device)
    module = gen.module.to(dev)
    out = []
    with torch.no_grad(), evaluating(module):
        for chunk in z.split(max(1, int(batch_size))):
            x = gen.latent_input(chunk.to(dev, torch.float32))
            if edits:
                with trace(module, [], edit=edits) as tr:
                    y = tr(x)
            else:
                y = module(x)
            out.append(to_uint8(_check_image(y), gen.output_range).cpu())
    if not out:
        h, w = gen.input_size
        return torch.zeros((0, 3, h, w), dtype=torch.uint8)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Concept sources


class ColorSegmenter:
    """The 11 colour-name concepts (:mod:`dissect_core.colors`) as a segmenter.

    Concepts ``1..11`` are :data:`~dissect_core.colors.COLOR_CONCEPT_NAMES` in order
    (``red-c`` is 9), category ``"color"``. Each mask pixel gets the colour of the
    nearest prototype in CIELab, after area averaging to ``mask_size`` (the same
    rule as :func:`~dissect_core.colors.color_index_map`). At full resolution the
    names of the 8-bit colours met so far are memoised in a table.

    Args:
        mask_size: (h, w) of the label maps (default: the image size).
    """

    _table = np.zeros(1 << 24, np.int8)
    _lock = threading.Lock()

    def __init__(self, mask_size: tuple[int, int] | None = None) -> None:
        self.mask_size = tuple(int(v) for v in mask_size) if mask_size is not None else None
        self.labels = ["-", *COLOR_CONCEPT_NAMES]
        self.concepts = [Concept(i + 1, n, COLOR_CATEGORY) for i, n in enumerate(COLOR_CONCEPT_NAMES)]
        self.categories = [COLOR_CATEGORY]

    @staticmethod
    def _name(rgb: np.ndarray) -> np.ndarray:
        lab = rgb_to_lab(rgb)
        d = ((lab[..., None, :] - _PROTOTYPES_LAB) ** 2).sum(axis=-1)
        return _PROTOTYPE_INDEX[d.argmin(axis=-1)]

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Name the colour of every mask pixel.

        Args:
            images: uint8 tensor [B, 3, H, W] (RGB).

        Returns:
            int32 tensor [B, 1, h, w] of colour concepts 1..11, on the images' device.
        """
        b, _, height, width = images.shape
        h, w = self.mask_size or (height, width)
        x = images.detach().to("cpu").numpy()
        if (h, w) == (height, width):
            packed = (x[:, 0].astype(np.int32) << 16) | (x[:, 1].astype(np.int32) << 8) | x[:, 2].astype(np.int32)
            names = self._table[packed]
            missing = names == 0
            if missing.any():
                new = np.unique(packed[missing])
                rgb = np.stack([(new >> 16) & 255, (new >> 8) & 255, new & 255], axis=-1).astype(np.float64)
                with self._lock:
                    self._table[new] = self._name(rgb).astype(np.int8)
                names = self._table[packed]
            out = names.astype(np.int32)
        else:
            if height % h == 0 and width % w == 0:
                small = x.transpose(0, 2, 3, 1).reshape(b, h, height // h, w, width // w, 3)
                small = small.astype(np.float64).mean(axis=(2, 4))
            else:
                t = torch.from_numpy(x).double()
                small = F.interpolate(t, size=(h, w), mode="area").permute(0, 2, 3, 1).numpy()
            out = self._name(small).astype(np.int32)
        return torch.from_numpy(out[:, None]).to(images.device)


def _source(source: Any) -> ConceptSource:
    if isinstance(source, str):
        if source in ("colors", "colours"):
            return ColorSegmenter()
        raise DissectError(f"unknown concept source {source!r}: give a Segmenter or 'colors'")
    if not hasattr(source, "segment") or not hasattr(source, "concepts"):
        raise DissectError(f"{type(source).__name__} is not a concept source (needs .segment and .concepts)")
    return source


def _check_concept(src: ConceptSource, concept_number: int) -> int:
    numbers = [c.number for c in src.concepts]
    if int(concept_number) not in numbers:
        raise DissectError(f"concept number {concept_number} is not one of the source's 1..{len(numbers)}")
    return int(concept_number)


def _concept_mask(images: torch.Tensor, src: ConceptSource, concept_number: int) -> torch.Tensor:
    """bool [B, h, w]: where the concept is (on any label map)."""
    labels = src.segment(images)
    if labels.dim() == 3:
        labels = labels[:, None]
    return (labels == concept_number).any(dim=1)


def concept_pixels(images: torch.Tensor, source: Any, concept_number: int) -> torch.Tensor:
    """The share of each image's pixels labelled with a concept.

    Args:
        images: uint8 tensor [B, 3, H, W].
        source: a :class:`~dissect_core.segmenter.Segmenter`, a :class:`ColorSegmenter`
            or ``"colors"``.
        concept_number: the concept (1-based, as in ``source.concepts``).

    Returns:
        float64 tensor [B] in [0, 1] (counted at the source's label resolution), on the CPU.
    """
    src = _source(source)
    c = _check_concept(src, concept_number)
    mask = _concept_mask(images, src, c)
    return mask.flatten(1).sum(1).cpu().to(torch.float64) / float(mask.shape[1] * mask.shape[2])


class GeneratedDataset(ConceptDataset):
    """Images generated from latents ``(seed, 0..count-1)``, labelled by a concept source.

    Images are generated and labelled ``batch_size`` at a time when first asked
    for (the chunk holding the index; the two most recent chunks are kept), so a
    shard generates only its own images. Each :class:`Sample` carries its latent,
    which :func:`~dissect_core.dissect.dissect` feeds to the generator.

    Args:
        gen: the generator.
        source: a :class:`~dissect_core.segmenter.Segmenter`, a :class:`ColorSegmenter`
            or ``"colors"`` (colour names at the image resolution).
        count: number of images.
        seed: latent seed (see :func:`sample_latents`).
        batch_size: images generated per forward pass (a chunk).
        device: where to generate and segment (default: CUDA when available).
    """

    def __init__(
        self,
        gen: LoadedModel,
        source: Any,
        count: int,
        *,
        seed: int = 0,
        batch_size: int = 64,
        device: torch.device | str | None = None,
    ) -> None:
        self.latent_dim = _check_generator(gen)
        if count < 1:
            raise DissectError(f"a generated dataset needs at least one image, got count={count}")
        self.gen = gen
        self.source = _source(source)
        self.count = int(count)
        self.seed = int(seed)
        self.batch_size = max(1, int(batch_size))
        self.device = resolve_device(device)
        self.name = f"generated:{gen.arch}:{self.seed}"
        self.concepts = list(self.source.concepts)
        self.categories = list(dict.fromkeys(c.category for c in self.concepts))
        self.classes = []
        self._chunks: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        images, maps, _ = self._chunk(0)
        self.image_size = (int(images.shape[1]), int(images.shape[2]))
        self.mask_size = (int(maps.shape[2]), int(maps.shape[3]))

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_chunks"] = OrderedDict()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _chunk(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._lock:
            if k in self._chunks:
                self._chunks.move_to_end(k)
                return self._chunks[k]
            start = k * self.batch_size
            z = sample_latents(self.latent_dim, min(self.batch_size, self.count - start), seed=self.seed, start=start)
            images = generate(self.gen, z, device=self.device, batch_size=self.batch_size)
            maps = self.source.segment(images.to(self.device))
            if maps.dim() == 3:
                maps = maps[:, None]
            chunk = (images.permute(0, 2, 3, 1).contiguous().numpy(), maps.to(torch.int32).cpu().numpy(), z.numpy())
            self._chunks[k] = chunk
            while len(self._chunks) > 2:
                self._chunks.popitem(last=False)
            return chunk

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range 0..{self.count - 1}")
        images, maps, z = self._chunk(index // self.batch_size)
        i = index % self.batch_size
        return Sample(image=images[i], label_maps=maps[i], latent=z[i])


# ---------------------------------------------------------------------------------------------
# Edits


def _units(units: Sequence[int] | torch.Tensor) -> torch.Tensor:
    idx = torch.as_tensor(list(units) if not isinstance(units, torch.Tensor) else units, dtype=torch.long)
    return idx.reshape(-1)


def _mask_factor(mask: torch.Tensor | np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """A [h, w] or [N, h, w] mask as [1 or N, 1, h, w] on the output's device (bool or float)."""
    m = torch.as_tensor(mask).to(out.device)
    if m.dim() == 2:
        m = m[None]
    if m.dim() != 3 or tuple(m.shape[-2:]) != tuple(out.shape[-2:]) or m.shape[0] not in (1, out.shape[0]):
        raise DissectError(
            f"an edit mask of shape {tuple(m.shape)} does not fit the layer output "
            f"{tuple(out.shape)} (give [h, w] or [B, h, w] at the layer's resolution)"
        )
    m = m[:, None]
    return m if m.dtype == torch.bool else m.to(out.dtype)


def remove_units_edit(units: Sequence[int] | torch.Tensor, mask: torch.Tensor | np.ndarray | None = None) -> Edit:
    """An edit callback that removes units (sets their channels to 0).

    Args:
        units: channel indices.
        mask: where to remove them: bool [h, w] (or [B, h, w], one per row) at the
            layer's resolution; a float mask m scales the units by ``1 - m``;
            None: everywhere (:func:`dissect_core.ablation.zero_units`).

    Returns:
        ``f(output [B, C, h, w]) -> edited copy``.
    """
    if mask is None:
        return zero_units(units)
    idx = _units(units)

    def edit(output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        i = idx.to(out.device)
        m = _mask_factor(mask, out)
        sel = out[:, i]
        out[:, i] = torch.where(m, torch.zeros_like(sel), sel) if m.dtype == torch.bool else sel * (1 - m)
        return out

    return edit


def insert_units_edit(
    units: Sequence[int] | torch.Tensor,
    values: Sequence[float] | np.ndarray | torch.Tensor,
    mask: torch.Tensor | np.ndarray | None = None,
) -> Edit:
    """An edit callback that forces units to given values.

    Args:
        units: k channel indices.
        values: k values (one per unit), e.g. :func:`unit_quantiles`.
        mask: where: bool [h, w] (or [B, h, w], one per row) at the layer's
            resolution; a float mask m in [0, 1] blends, ``a * (1 - m) + v * m``;
            None: every position.

    Returns:
        ``f(output [B, C, h, w]) -> edited copy``.
    """
    idx = _units(units)
    vals = (
        torch.as_tensor(np.asarray(values, dtype=np.float32) if not isinstance(values, torch.Tensor) else values)
        .to(torch.float32)
        .reshape(-1)
    )
    if vals.numel() != idx.numel():
        raise DissectError(f"{vals.numel()} values for {idx.numel()} units")

    def edit(output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        i = idx.to(out.device)
        v = vals.to(out.device, out.dtype)[None, :, None, None]
        if mask is None:
            out[:, i] = v.expand(out.shape[0], -1, *out.shape[2:])
            return out
        m = _mask_factor(mask, out)
        sel = out[:, i]
        out[:, i] = torch.where(m, v, sel) if m.dtype == torch.bool else sel * (1 - m) + v * m
        return out

    return edit


# ---------------------------------------------------------------------------------------------
# Running the generator from a layer


@dataclass
class _Split:
    """How to run a generator from one layer: ``"chain"`` (suffix modules) or ``"hook"``."""

    mode: str
    suffix: Callable[[torch.Tensor], Any] | None
    shape: tuple[int, int, int]


_SPLITS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], _Split]] = weakref.WeakKeyDictionary()


def _split(gen: LoadedModel, layer: str, device: torch.device) -> _Split:
    module = gen.module
    if isinstance(module, torch.jit.ScriptModule):
        raise DissectError(
            "interventions edit layer outputs with hooks, which TorchScript generators do not run; "
            "register the generator as a builtin architecture with weights instead"
        )
    get_module(module, layer)
    cache = _SPLITS.setdefault(module, {})
    key = (layer, str(device))
    if key in cache:
        return cache[key]
    z_dim = _check_generator(gen)
    x = gen.latent_input(sample_latents(z_dim, 2, seed=987654321).to(device))

    def check(a: Any, full: Any) -> None:
        _check_image(full)
        if not isinstance(a, torch.Tensor) or a.dim() != 4:
            shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise LayerError(f"layer {layer!r} outputs {shape}, not a [B, C, h, w] feature map", layer=layer, valid=[])

    found = split_module(module, layer, x, ways=("chain",), check=check)
    shape = (int(found.activation.shape[1]), int(found.activation.shape[2]), int(found.activation.shape[3]))
    split = _Split("chain", found.suffix, shape) if found.kind == "chain" else _Split("hook", None, shape)
    cache[key] = split
    return split


class ExperimentOptions(TypedDict, total=False):
    """How :func:`removal_curve` and :func:`insertion_map` run; every key is optional.

    Attributes:
        batch_size: rows per forward pass (default 64): samples for the removal
            curve, (position, sample) pairs through the rest of the generator
            for the insertion map.
        sample_images: samples kept as before/after pictures (default 8).
        device: where to run (default: CUDA when available).
        progress: ``progress(phase, done, total)`` after every batch; each
            experiment names its phase and what it counts.
        should_stop: checked before every forward pass; True raises :class:`Cancelled`.
    """

    batch_size: int
    sample_images: int
    device: torch.device | str | None
    progress: ProgressFn | None
    should_stop: StopFn | None


class _Runner:
    """Runs a generator with one layer's output edited, reusing the part before the layer.

    It also holds how the experiment runs (:class:`ExperimentOptions`, defaults applied).
    """

    def __init__(self, gen: LoadedModel, layer: str, options: ExperimentOptions) -> None:
        check_keywords(options, ExperimentOptions.__optional_keys__)
        self.gen = gen
        self.layer = layer
        self.device = resolve_device(options.get("device"))
        self.batch_size = max(1, int(options.get("batch_size", 64)))
        self.sample_images = int(options.get("sample_images", 8))
        self.progress = options.get("progress")
        self.should_stop = options.get("should_stop")
        self.module = gen.module.to(self.device)
        self.split = _split(gen, layer, self.device)

    def prefix(self, z: torch.Tensor) -> torch.Tensor | None:
        """The layer's output [B, C, h, w] on latents [B, Z] (None in hook mode)."""
        if self.split.mode != "chain":
            return None
        return prefix(self.module, self.layer, self.gen.latent_input(z))

    def images(self, z: torch.Tensor, acts: torch.Tensor | None, edit: Edit | None, repeat: int = 1) -> torch.Tensor:
        """uint8 [repeat * B, 3, H, W]; row ``r * B + b`` is latent b with the edit applied
        (the edit sees all rows at once)."""
        if self.split.mode == "chain":
            assert acts is not None and self.split.suffix is not None
            a = acts.repeat(repeat, 1, 1, 1) if repeat > 1 else acts
            # A fresh tensor: the first module after the layer may work in place (ReLU(inplace=True)).
            out = self.split.suffix(edit(a) if edit is not None else a if repeat > 1 else a.clone())
        else:
            x = self.gen.latent_input(z.repeat(repeat, 1) if repeat > 1 else z)
            with trace(self.module, [], edit={self.layer: edit} if edit is not None else None) as tr:
                out = tr(x)
        return to_uint8(_check_image(out), self.gen.output_range)


_Runs = TypeVar("_Runs", "RemovalResult", "InsertionResult")


def _merge_runs(a: _Runs, b: _Runs, experiment: str, same: Sequence[str], **summed: Any) -> _Runs:
    """Two runs of one experiment over disjoint latents as one result.

    Args:
        a, b: the runs.
        experiment: its name, for the error.
        same: the fields both runs must share (arrays compare element-wise).
        summed: the fields that combine the two runs' counts.

    Returns:
        ``count`` summed, ``start`` the smaller, the ``summed`` fields, and every
        other field (the sample images) from the run with the smaller start.
    """
    for name in same:
        x, y = getattr(a, name), getattr(b, name)
        if not (np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y):
            raise DissectError(f"{experiment} results of different experiments cannot be merged")
    first = a if a.start <= b.start else b
    return replace(first, count=a.count + b.count, start=min(a.start, b.start), **summed)


def _check_units(units: Sequence[int], channels: int, what: str) -> list[int]:
    out = [int(u) for u in units]
    bad = [u for u in out if not 0 <= u < channels]
    if bad:
        raise DissectError(f"{what}: units {bad[:5]} out of range 0..{channels - 1}")
    return out


def _batches(count: int, batch_size: int) -> Iterator[tuple[int, int]]:
    for s in range(0, count, batch_size):
        yield s, min(batch_size, count - s)


# ---------------------------------------------------------------------------------------------
# Quantiles


_QUANTILES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], np.ndarray]] = weakref.WeakKeyDictionary()


def unit_quantiles(
    gen: LoadedModel,
    layer: str,
    *,
    q: float = 0.995,
    count: int = 256,
    seed: int = 0,
    units: Sequence[int] | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Each unit's q-quantile of its activations over generated samples.

    The exact hazen quantile (``numpy.quantile(method="hazen")``, the engine's
    definition) of the layer's native-resolution activations over ``count``
    samples (latents ``(seed, 0..count-1)``). The reference implementation inserts
    units at their 0.995 quantile. Results are memoised per module and arguments.

    Args:
        gen: the generator.
        layer: dotted layer name.
        q: the quantile, in [0, 1].
        count: samples.
        seed: latent seed.
        units: which units (default: all).
        batch_size: samples per forward pass.
        device: where to run.

    Returns:
        float64 array [U] (or [len(units)]).
    """
    z_dim = _check_generator(gen)
    if not 0.0 <= q <= 1.0 or count < 1:
        raise DissectError(f"need 0 <= q <= 1 and count >= 1, got q={q}, count={count}")
    dev = resolve_device(device)
    module = gen.module.to(dev)
    get_module(module, layer)
    key = (layer, float(q), int(count), int(seed))
    cache = _QUANTILES.setdefault(module, {})
    if key not in cache:
        chunks = []
        with torch.no_grad(), evaluating(module):
            for start, n in _batches(count, max(1, batch_size)):
                z = sample_latents(z_dim, n, seed=seed, start=start).to(dev)
                with trace(module, [layer], stop_after_last=True) as tr:
                    tr(gen.latent_input(z))
                a = tr[layer]
                if not isinstance(a, torch.Tensor) or a.dim() != 4:
                    raise LayerError(
                        f"layer {layer!r} does not output a [B, C, h, w] feature map", layer=layer, valid=[]
                    )
                chunks.append(a.to(torch.float32).transpose(0, 1).reshape(a.shape[1], -1).cpu().numpy())
        values = np.concatenate(chunks, axis=1)
        cache[key] = np.quantile(values, q, axis=1, method="hazen").astype(np.float64)
    out = cache[key]
    if units is not None:
        out = out[_check_units(units, out.shape[0], "unit_quantiles")]
    return out.copy()


# ---------------------------------------------------------------------------------------------
# Removal


@dataclass
class RemovalResult:
    """The concept's pixels as the best units are removed (paper, Figure 4a).

    Attributes:
        layer: the layer.
        concept_number: the concept counted.
        units: the ranked units (the first ``max(ks)`` of those given).
        ks: numbers of removed units, ascending.
        count: samples (latents ``(seed, start .. start+count-1)``).
        seed: latent seed.
        start: first latent index.
        pixels: label pixels counted in all (count x label resolution).
        baseline_pixels: concept pixels without an edit.
        after_pixels: concept pixels with the first k units removed, one per k.
        before_images: uint8 [S, 3, H, W], the first S samples unedited.
        after_images: uint8 [S, 3, H, W], the same with the first ``max(ks)`` units removed.
        after_images_by_k: uint8 [len(ks), S, 3, H, W], with the first k units
            removed, one row per k.
    """

    layer: str
    concept_number: int
    units: list[int]
    ks: list[int]
    count: int
    seed: int
    start: int
    pixels: int
    baseline_pixels: int
    after_pixels: list[int]
    before_images: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 0, 0), np.uint8), repr=False)
    after_images_by_k: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 3, 0, 0), np.uint8), repr=False)

    @property
    def after_images(self) -> np.ndarray:
        """uint8 [S, 3, H, W]: the sample images with the most units removed."""
        if not len(self.after_images_by_k):
            return np.zeros((0, *self.before_images.shape[1:]), np.uint8)
        return self.after_images_by_k[-1]

    @property
    def baseline(self) -> float:
        """Share of the pixels that show the concept without an edit."""
        return self.baseline_pixels / self.pixels if self.pixels else 0.0

    @property
    def fractions(self) -> list[float]:
        """Share of the pixels that show the concept, per k."""
        return [p / self.pixels if self.pixels else 0.0 for p in self.after_pixels]

    @property
    def relative_change(self) -> list[float | None]:
        """(after - baseline) / baseline per k (-0.533: 53.3% of the concept's pixels
        removed); None when the concept never appears."""
        if not self.baseline_pixels:
            return [None for _ in self.after_pixels]
        return [(p - self.baseline_pixels) / self.baseline_pixels for p in self.after_pixels]

    def merge(self, other: RemovalResult) -> RemovalResult:
        """Combine two runs over disjoint latents (same layer, concept, units and ks).

        Returns:
            the combined result (``count`` summed, ``start`` the smaller, sample
            images of the run with the smaller start).
        """
        return _merge_runs(
            self,
            other,
            "removal",
            ("layer", "concept_number", "units", "ks", "seed"),
            units=list(self.units),
            ks=list(self.ks),
            pixels=self.pixels + other.pixels,
            baseline_pixels=self.baseline_pixels + other.baseline_pixels,
            after_pixels=[a + b for a, b in zip(self.after_pixels, other.after_pixels)],
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able numbers (no images)."""
        return {
            "layer": self.layer,
            "concept_number": self.concept_number,
            "units": list(self.units),
            "ks": list(self.ks),
            "count": self.count,
            "seed": self.seed,
            "start": self.start,
            "pixels": self.pixels,
            "baseline_pixels": self.baseline_pixels,
            "after_pixels": list(self.after_pixels),
            "baseline": self.baseline,
            "fractions": self.fractions,
            "relative_change": self.relative_change,
        }


def removal_curve(
    gen: LoadedModel,
    source: Any,
    layer: str,
    ranked_units: Sequence[int],
    concept_number: int,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    count: int = 1000,
    seed: int = 0,
    start: int = 0,
    **options: Unpack[ExperimentOptions],
) -> RemovalResult:
    """Remove the k best units of a concept and count its pixels (paper, Figure 4a/4b).

    Args:
        gen: the generator.
        source: what labels the images (Segmenter, ColorSegmenter or ``"colors"``).
        layer: dotted layer name.
        ranked_units: units, best first (e.g. by IoU with the concept).
        concept_number: the concept counted (1-based, as in ``source.concepts``).
        ks: numbers of units to remove; values above ``len(ranked_units)`` are cut
            to it, duplicates dropped.
        count: samples.
        seed: latent seed.
        start: first latent index (shards: disjoint ranges, then :meth:`RemovalResult.merge`).
        **options: the :class:`ExperimentOptions`; the sample images are the first
            samples; ``progress("removal", done, count)`` counts samples.

    Returns:
        the :class:`RemovalResult`.
    """
    z_dim = _check_generator(gen)
    src = _source(source)
    c = _check_concept(src, concept_number)
    if not ranked_units:
        raise DissectError("no units to remove")
    if count < 1:
        raise DissectError(f"count must be positive, got {count}")
    kk = sorted({min(int(k), len(ranked_units)) for k in ks if int(k) >= 1})
    if not kk:
        raise DissectError("no positive k to remove")
    runner = _Runner(gen, layer, options)
    dev, progress = runner.device, runner.progress
    units = _check_units(list(ranked_units)[: kk[-1]], runner.split.shape[0], "removal_curve")
    edits = [remove_units_edit(units[:k]) for k in kk]
    baseline, after, pixels = 0, [0] * len(kk), 0
    before_imgs: list[torch.Tensor] = []
    after_imgs: list[list[torch.Tensor]] = [[] for _ in kk]
    if progress:
        progress("removal", 0, count)
    with torch.no_grad(), evaluating(runner.module):
        for offset, n in _batches(count, runner.batch_size):
            check_stop(runner.should_stop)
            z = sample_latents(z_dim, n, seed=seed, start=start + offset).to(dev)
            acts = runner.prefix(z)
            imgs = runner.images(z, acts, None)
            m0 = _concept_mask(imgs, src, c)
            baseline += int(m0.sum())
            pixels += int(m0.numel())
            keep = max(0, min(n, runner.sample_images - offset))
            if keep:
                before_imgs.append(imgs[:keep].cpu())
            for j, edit in enumerate(edits):
                out = runner.images(z, acts, edit)
                after[j] += int(_concept_mask(out, src, c).sum())
                if keep:
                    after_imgs[j].append(out[:keep].cpu())
            if progress:
                progress("removal", offset + n, count)
    h, w = gen.input_size
    before = torch.cat(before_imgs).numpy() if before_imgs else np.zeros((0, 3, h, w), np.uint8)
    after_arr = (
        np.stack([torch.cat(a).numpy() for a in after_imgs])
        if before_imgs
        else np.zeros((len(kk), 0, 3, h, w), np.uint8)
    )
    return RemovalResult(
        layer, c, units, kk, int(count), int(seed), int(start), pixels, baseline, after, before, after_arr
    )


# ---------------------------------------------------------------------------------------------
# Insertion


@dataclass
class InsertionResult:
    """Where forcing units on adds a concept (paper, Figure 4c/4d).

    Attributes:
        layer: the layer.
        concept_number: the concept counted.
        units: the units forced on.
        values: the value each unit was set to.
        count: samples (latents ``(seed, start .. start+count-1)``).
        seed: latent seed.
        start: first latent index.
        size: side of the square of feature-map positions set (centred on the
            position, cut at the borders).
        near: new pixels were counted only within this many feature cells of the
            square (None: anywhere in the image).
        grid: (h, w) of the layer.
        mask_pixels: label pixels per image.
        tested: bool [h, w], the positions tried.
        new_pixels: int64 [h, w], new concept pixels summed over the samples:
            pixels showing the concept after the edit and not before.
        before_images: uint8 [S, 3, H, W], the first S samples unedited.
        after_images: uint8 [S, 3, H, W], the same with the units set at
            :attr:`best_position`.
    """

    layer: str
    concept_number: int
    units: list[int]
    values: list[float]
    count: int
    seed: int
    start: int
    size: int
    near: int | None
    grid: tuple[int, int]
    mask_pixels: int
    tested: np.ndarray
    new_pixels: np.ndarray
    before_images: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 0, 0), np.uint8), repr=False)
    after_images: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 0, 0), np.uint8), repr=False)

    @property
    def map(self) -> np.ndarray:
        """float64 [h, w]: mean share of an image's pixels newly showing the concept per
        position (NaN where not tested) — Figure 4d."""
        out = np.full(self.grid, np.nan)
        denom = float(self.count * self.mask_pixels)
        out[self.tested] = self.new_pixels[self.tested] / denom if denom else 0.0
        return out

    @property
    def mean_new_pixels(self) -> np.ndarray:
        """float64 [h, w]: mean number of new concept pixels per sample (NaN where not tested)."""
        out = np.full(self.grid, np.nan)
        out[self.tested] = self.new_pixels[self.tested] / float(self.count) if self.count else 0.0
        return out

    @property
    def best_position(self) -> tuple[int, int] | None:
        """(y, x) of the tested position with the most new pixels (None if none tested)."""
        if not self.tested.any():
            return None
        score = np.where(self.tested, self.new_pixels, -1)
        y, x = np.unravel_index(int(np.argmax(score)), self.grid)
        return int(y), int(x)

    @property
    def total_new_pixels(self) -> int:
        """New concept pixels over all tested positions and samples."""
        return int(self.new_pixels[self.tested].sum())

    @property
    def mean_fraction(self) -> float:
        """The map's mean over the tested positions."""
        n = int(self.tested.sum())
        return float(self.total_new_pixels / (n * self.count * self.mask_pixels)) if n and self.count else 0.0

    def merge(self, other: InsertionResult) -> InsertionResult:
        """Combine two runs over disjoint latents of the same experiment.

        Returns:
            the combined result (counts summed; images of the run with the smaller start).
        """
        return _merge_runs(
            self,
            other,
            "insertion",
            ("layer", "concept_number", "units", "values", "seed", "size", "near", "grid", "mask_pixels", "tested"),
            units=list(self.units),
            values=list(self.values),
            tested=self.tested.copy(),
            new_pixels=self.new_pixels + other.new_pixels,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able numbers (no images; untested map cells are None)."""
        m = self.map
        return {
            "layer": self.layer,
            "concept_number": self.concept_number,
            "units": list(self.units),
            "values": [float(v) for v in self.values],
            "count": self.count,
            "seed": self.seed,
            "start": self.start,
            "size": self.size,
            "near": self.near,
            "grid": list(self.grid),
            "mask_pixels": self.mask_pixels,
            "map": [[None if math.isnan(v) else float(v) for v in row] for row in m.tolist()],
            "new_pixels": [[int(v) for v in row] for row in self.new_pixels.tolist()],
            "tested": [[bool(v) for v in row] for row in self.tested.tolist()],
            "total_new_pixels": self.total_new_pixels,
            "mean_fraction": self.mean_fraction,
            "best_position": list(self.best_position) if self.best_position is not None else None,
        }


def _square(y: int, x: int, size: int, grid: tuple[int, int]) -> tuple[slice, slice]:
    lo_y, lo_x = y - (size - 1) // 2, x - (size - 1) // 2
    return (slice(max(lo_y, 0), min(lo_y + size, grid[0])), slice(max(lo_x, 0), min(lo_x + size, grid[1])))


def _positions(positions: Any, grid: tuple[int, int]) -> list[tuple[int, int]]:
    h, w = grid
    if positions is None:
        return [(y, x) for y in range(h) for x in range(w)]
    if isinstance(positions, int):
        if positions < 1:
            raise DissectError(f"a position stride must be positive, got {positions}")
        off_y, off_x = (h - 1) % positions // 2, (w - 1) % positions // 2
        return [(y, x) for y in range(off_y, h, positions) for x in range(off_x, w, positions)]
    out = [(int(p[0]), int(p[1])) for p in positions]
    bad = [p for p in out if not (0 <= p[0] < h and 0 <= p[1] < w)]
    if bad or not out:
        raise DissectError(f"positions {bad[:5]} outside the layer's {h}x{w} grid" if bad else "no positions")
    return list(dict.fromkeys(out))


def insertion_map(
    gen: LoadedModel,
    source: Any,
    layer: str,
    units: Sequence[int],
    concept_number: int,
    *,
    values: Sequence[float] | np.ndarray | None = None,
    count: int = 200,
    seed: int = 0,
    start: int = 0,
    positions: int | Sequence[tuple[int, int]] | None = None,
    stride: int | None = None,
    size: int = 1,
    near: int | None = None,
    **options: Unpack[ExperimentOptions],
) -> InsertionResult:
    """Force units on at each feature-map position and count new concept pixels (Figure 4d).

    For every position the units are set to ``values`` on the ``size x size``
    square centred there, in every sample; a new pixel shows the concept after
    the edit and did not before. The part of the generator before the layer runs
    once per batch of samples; rows of (position, sample) pairs then run through
    the rest, ``batch_size`` rows at a time (see the module docstring).

    Args:
        gen: the generator.
        source: Segmenter, ColorSegmenter or ``"colors"``.
        layer: dotted layer name.
        units: the units to force on (e.g. the 20 best for the concept).
        concept_number: the concept counted.
        values: one value per unit (default: :func:`unit_quantiles` at q=0.995,
            256 samples of seed 0).
        count: samples.
        seed: latent seed.
        start: first latent index (shards: disjoint ranges, then :meth:`InsertionResult.merge`).
        positions: None: every position; an int s: every s-th row and column
            (centred); or a list of (y, x).
        stride: same as an int ``positions`` (when ``positions`` is None).
        size: side of the square set (>= 1).
        near: count new pixels only within this many feature cells of the square
            (None: anywhere).
        **options: the :class:`ExperimentOptions`; the sample images show the
            best position; ``progress("insertion", done, total)`` counts
            (position, sample) pairs.

    Returns:
        the :class:`InsertionResult`.
    """
    z_dim = _check_generator(gen)
    src = _source(source)
    c = _check_concept(src, concept_number)
    if count < 1 or size < 1:
        raise DissectError(f"need count >= 1 and size >= 1, got count={count}, size={size}")
    if not units:
        raise DissectError("no units to insert")
    runner = _Runner(gen, layer, options)
    dev, progress, bs = runner.device, runner.progress, runner.batch_size
    channels, h, w = runner.split.shape
    unit_list = _check_units(units, channels, "insertion_map")
    if values is None:
        vals = unit_quantiles(gen, layer, q=0.995, units=unit_list, device=dev)
    else:
        vals = np.asarray(values, dtype=np.float64).reshape(-1)
        if vals.shape[0] != len(unit_list):
            raise DissectError(f"{vals.shape[0]} values for {len(unit_list)} units")
    pos = _positions(positions if positions is not None or stride is None else int(stride), (h, w))
    masks = torch.zeros((len(pos), h, w), dtype=torch.bool)
    for i, (y, x) in enumerate(pos):
        masks[i][_square(y, x, size, (h, w))] = True
    masks = masks.to(dev)
    new_pixels = np.zeros((h, w), np.int64)
    per_batch = min(count, bs)
    mask_hw: tuple[int, int] | None = None
    windows: torch.Tensor | None = None
    total, done = count * len(pos), 0
    if progress:
        progress("insertion", 0, total)
    with torch.no_grad(), evaluating(runner.module):
        for offset, n in _batches(count, per_batch):
            z = sample_latents(z_dim, n, seed=seed, start=start + offset).to(dev)
            acts = runner.prefix(z)
            m0 = _concept_mask(runner.images(z, acts, None), src, c)
            if mask_hw is None:
                mask_hw = (int(m0.shape[1]), int(m0.shape[2]))
                if near is not None:
                    windows = _windows(pos, size, int(near), (h, w), mask_hw).to(m0.device)
            p_per = max(1, bs // n)
            for p0 in range(0, len(pos), p_per):
                check_stop(runner.should_stop)
                p1 = min(p0 + p_per, len(pos))
                rows = masks[p0:p1].repeat_interleave(n, dim=0)
                out = runner.images(z, acts, insert_units_edit(unit_list, vals, rows), repeat=p1 - p0)
                m1 = _concept_mask(out, src, c).view(p1 - p0, n, *mask_hw)
                new = m1 & ~m0[None]
                if windows is not None:
                    new &= windows[p0:p1, None]
                per_pos = new.flatten(1).sum(1).cpu().numpy()
                for i, v in enumerate(per_pos):
                    y, x = pos[p0 + i]
                    new_pixels[y, x] += int(v)
                done += (p1 - p0) * n
                if progress:
                    progress("insertion", done, total)
    tested = np.zeros((h, w), bool)
    for y, x in pos:
        tested[y, x] = True
    assert mask_hw is not None
    result = InsertionResult(
        layer,
        c,
        unit_list,
        [float(v) for v in vals],
        int(count),
        int(seed),
        int(start),
        int(size),
        None if near is None else int(near),
        (h, w),
        mask_hw[0] * mask_hw[1],
        tested,
        new_pixels,
    )
    best = result.best_position
    s = min(runner.sample_images, count)
    if best is not None and s > 0:
        with torch.no_grad(), evaluating(runner.module):
            z = sample_latents(z_dim, s, seed=seed, start=start).to(dev)
            acts = runner.prefix(z)
            square = masks[pos.index(best)]
            result.before_images = runner.images(z, acts, None).cpu().numpy()
            result.after_images = runner.images(z, acts, insert_units_edit(unit_list, vals, square)).cpu().numpy()
    return result


def _windows(
    pos: list[tuple[int, int]], size: int, near: int, grid: tuple[int, int], mask_hw: tuple[int, int]
) -> torch.Tensor:
    """bool [P, mh, mw]: the label pixels within ``near`` feature cells of each square."""
    out = torch.zeros((len(pos), *mask_hw), dtype=torch.bool)
    sy, sx = mask_hw[0] / grid[0], mask_hw[1] / grid[1]
    for i, (y, x) in enumerate(pos):
        ry, rx = _square(y, x, size, grid)
        y0, y1 = max(ry.start - near, 0), min(ry.stop + near, grid[0])
        x0, x1 = max(rx.start - near, 0), min(rx.stop + near, grid[1])
        out[i, math.floor(y0 * sy) : math.ceil(y1 * sy), math.floor(x0 * sx) : math.ceil(x1 * sx)] = True
    return out


# ---------------------------------------------------------------------------------------------
# Painting


def resize_mask(mask: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A painted mask at the layer's resolution.

    A mask already at ``size`` is kept as is (bool). Otherwise each feature cell
    gets the share of its image pixels that are painted (area averaging,
    ``F.interpolate(mode="area")``), a float in [0, 1] by which the edit blends
    (the soft masks of the reference painting tool): a fully painted cell is set
    exactly, a half painted one half way.

    Args:
        mask: bool [H, W] (image resolution) or [h, w] (layer resolution).
        size: the layer's (h, w).

    Returns:
        bool [h, w] or float32 [h, w].
    """
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if m.dim() != 2:
        raise DissectError(f"a paint mask is [H, W], got shape {tuple(m.shape)}")
    if tuple(m.shape) == tuple(size):
        return m.to(torch.bool) if m.dtype == torch.bool else m.to(torch.float32)
    return F.interpolate(m.to(torch.float32)[None, None], size=tuple(size), mode="area")[0, 0]


def paint_pair(
    gen: LoadedModel,
    layer: str,
    units: Sequence[int],
    *,
    seed: int,
    index: int = 0,
    mask: np.ndarray | torch.Tensor,
    mode: str = "add",
    values: Sequence[float] | np.ndarray | None = None,
    device: torch.device | str | None = None,
    num_threads: int | None = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """One sample before and after painting units under a mask (paper, Figure 6).

    Args:
        gen: the generator (keep it loaded: the first call per layer also finds
            the default values, see :func:`unit_quantiles`).
        layer: dotted layer name.
        units: the concept's units.
        seed: latent seed.
        index: latent index (the sample is latent ``(seed, index)``, as in
            :class:`GeneratedDataset` and the other experiments).
        mask: bool [H, W] at the image or the layer resolution (see :func:`resize_mask`).
        mode: ``"add"`` sets the units to ``values`` under the mask; ``"erase"``
            sets them to 0 there.
        values: one per unit (default: :func:`unit_quantiles` at q=0.995).
        device: where to run (default: CUDA when available).
        num_threads: CPU threads for this call (torch's setting is process-wide;
            it is restored afterwards). One image is too little work to share:
            one thread is as fast on an idle machine and keeps the call fast on
            a busy one (where two threads took 100-400 ms instead of 10 ms for a
            64x64 DCGAN). None leaves the setting alone.

    Returns:
        (before, after), uint8 [H, W, 3] each.
    """
    z_dim = _check_generator(gen)
    if mode not in ("add", "erase"):
        raise DissectError(f"paint mode must be 'add' or 'erase', got {mode!r}")
    runner = _Runner(gen, layer, {"device": device})
    dev = runner.device
    channels, h, w = runner.split.shape
    unit_list = _check_units(units, channels, "paint")
    m = resize_mask(mask, (h, w)).to(dev)
    if mode == "add":
        vals = (
            unit_quantiles(gen, layer, q=0.995, units=unit_list, device=dev)
            if values is None
            else np.asarray(values, dtype=np.float64).reshape(-1)
        )
        edit = insert_units_edit(unit_list, vals, m)
    else:
        edit = remove_units_edit(unit_list, m)
    with torch.no_grad(), evaluating(runner.module), _cpu_threads(num_threads if dev.type == "cpu" else None):
        z = sample_latents(z_dim, 1, seed=seed, start=index).to(dev)
        acts = runner.prefix(z)
        before = runner.images(z, acts, None)
        after = runner.images(z, acts, edit)
    return (before[0].permute(1, 2, 0).cpu().numpy(), after[0].permute(1, 2, 0).cpu().numpy())


class PaintEdit(TypedDict, total=False):
    """The keyword arguments of :func:`paint_pair` (documented there), which :func:`paint` passes on.

    ``seed`` and ``mask`` are required.
    """

    seed: Required[int]
    index: int
    mask: Required[np.ndarray | torch.Tensor]
    mode: str
    values: Sequence[float] | np.ndarray | None
    device: torch.device | str | None
    num_threads: int | None


def paint(
    gen: LoadedModel,
    layer: str,
    units: Sequence[int],
    *,
    return_before: bool = False,
    **edit: Unpack[PaintEdit],
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One sample after painting units under a mask.

    Args:
        gen, layer, units: as for :func:`paint_pair`.
        return_before: also return the unedited image, as :func:`paint_pair` does.
        **edit: the :class:`PaintEdit` keywords of :func:`paint_pair` (``seed``,
            ``mask``, ``index``, ``mode``, ``values``, ``device``, ``num_threads``).

    Returns:
        uint8 [H, W, 3]; with ``return_before``, (before, after).
    """
    pair = paint_pair(gen, layer, units, **edit)
    return pair if return_before else pair[1]
