"""Pictures of units: top-activating images with the region above threshold highlighted.

As in the paper's Figure 1b-c: each of a unit's top images, with the activation
upsampled to the image (the same zero-padded bilinear rule the dissection uses),
the region where it exceeds t_u kept at full brightness and outlined, and the rest
dimmed; the images side by side in one strip.

A dissection keeps each unit's feature maps on its top images
(:attr:`~dissect_core.dissect.LayerResult.top_maps`); when a result has them, the
pictures only load those images. Otherwise the images go through the network once
more to get the maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .concepts import ConceptDataset
from .dissect import LayerResult, preprocess_images
from .errors import Cancelled
from .models import LoadedModel, layout_from_output
from .nethook import trace
from .upsample import upsample

__all__ = ["activation_mask", "highlight", "save_unit_strips", "top_images_strip", "unit_strip"]


def activation_mask(activation: torch.Tensor | np.ndarray, threshold: float, size: tuple[int, int]) -> np.ndarray:
    """Where an upsampled activation map exceeds the threshold.

    Args:
        activation: float [h, w], one unit's activation on one image.
        threshold: t_u.
        size: (H, W) of the image.

    Returns:
        bool [H, W].
    """
    a = torch.as_tensor(
        np.asarray(activation, dtype=np.float32)
        if isinstance(activation, np.ndarray)
        else activation.detach().to("cpu", torch.float32)
    )
    return (upsample(a, size) > float(threshold)).numpy()


def highlight(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    dim: float = 0.3,
    outline: tuple[int, int, int] = (255, 220, 0),
) -> np.ndarray:
    """Dim an image outside a mask and outline the mask.

    Args:
        image: uint8 [H, W, 3].
        mask: bool [H, W].
        dim: brightness factor outside the mask.
        outline: RGB colour of the mask's border.

    Returns:
        uint8 [H, W, 3].
    """
    out = image.astype(np.float32)
    out[~mask] *= dim
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    eroded = (-F.max_pool2d(-m, 3, stride=1, padding=1))[0, 0].numpy() > 0.5
    dilated = F.max_pool2d(m, 3, stride=1, padding=1)[0, 0].numpy() > 0.5
    out[dilated & ~eroded] = outline
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def unit_strip(
    images: Sequence[np.ndarray],
    activations: Sequence[torch.Tensor | np.ndarray],
    threshold: float,
    *,
    gap: int = 4,
    scale: int = 1,
) -> Image.Image:
    """Highlighted images side by side.

    Args:
        images: uint8 [H, W, 3] each (same size).
        activations: float [h, w] each, the unit's activation on each image.
        threshold: the unit's t_u.
        gap: white pixels between images.
        scale: integer magnification (nearest) of the final strip.

    Returns:
        an RGB PIL image.
    """
    if not images:
        raise ValueError("no images to draw")
    h, w = images[0].shape[:2]
    tiles = [highlight(img, activation_mask(act, threshold, (h, w))) for img, act in zip(images, activations)]
    strip = np.full((h, len(tiles) * w + (len(tiles) - 1) * gap, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        strip[:, i * (w + gap) : i * (w + gap) + w] = tile
    picture = Image.fromarray(strip)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    return picture


def _unit_activations(
    model: LoadedModel,
    dataset: ConceptDataset,
    layer: str,
    indices: Sequence[int],
    units: Sequence[int],
    device: torch.device | str,
    batch_size: int = 32,
) -> tuple[dict[int, np.ndarray], dict[int, torch.Tensor]]:
    """Images and the chosen units' activations ([len(units), h, w] each) by dataset index."""
    module = model.module.to(device)
    images: dict[int, np.ndarray] = {}
    acts: dict[int, torch.Tensor] = {}
    unit_index = torch.as_tensor(list(units), dtype=torch.int64)
    order = list(dict.fromkeys(int(i) for i in indices))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = [dataset[i].image for i in chunk]
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device)
        x = preprocess_images(x, model.input_size, model.mean, model.std)
        with torch.no_grad(), trace(module, [layer], stop_after_last=True) as tr:
            tr(x)
        maps = layout_from_output(model, layer, tr[layer], x.shape[0]).to_map(tr[layer])
        out = maps[:, unit_index.to(maps.device)].float().cpu()
        for j, i in enumerate(chunk):
            images[i] = batch[j]
            acts[i] = out[j]
    return images, acts


def _kept_maps(result: LayerResult, unit: int, n: int) -> list[np.ndarray] | None:
    """The unit's maps on its first n top images, when the result kept them."""
    maps = result.top_maps
    if maps is None or maps.ndim != 4 or maps.shape[0] != result.units or maps.shape[1] < n:
        return None
    return [maps[unit, j] for j in range(n)]


def top_images_strip(
    model: LoadedModel,
    dataset: ConceptDataset,
    result: LayerResult,
    unit: int,
    *,
    k: int | None = None,
    device: torch.device | str = "cpu",
    scale: int = 1,
) -> Image.Image:
    """A unit's top-activating images from a dissection, highlighted.

    Args:
        model: the dissected network (run only when ``result`` keeps no top maps).
        dataset: the dissected dataset.
        result: the layer's :class:`LayerResult`.
        unit: the unit.
        k: how many of its top images (default: all kept).
        device: where to run the network.
        scale: integer magnification.

    Returns:
        an RGB PIL image.
    """
    indices = [int(i) for i in result.top_images[unit][: k or result.top_images.shape[1]]]
    if not indices:
        raise ValueError(f"the result keeps no top images for unit {unit}")
    kept = _kept_maps(result, unit, len(indices))
    if kept is not None:
        return unit_strip([dataset[i].image for i in indices], kept, float(result.thresholds[unit]), scale=scale)
    images, acts = _unit_activations(model, dataset, result.layer, indices, [unit], device)
    return unit_strip(
        [images[i] for i in indices], [acts[i][0] for i in indices], float(result.thresholds[unit]), scale=scale
    )


def save_unit_strips(
    model: LoadedModel,
    dataset: ConceptDataset,
    result: LayerResult,
    out_dir: str | Path,
    *,
    units: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    scale: int = 1,
    units_per_pass: int = 64,
    progress: Callable[[str, int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[Path]:
    """Write one PNG strip per unit, ``out_dir/unit_NNNN.png``.

    With the result's top maps, only the top images are loaded (each once per
    group of ``units_per_pass`` units); without them the group's top images go
    through the network together, once each.

    Args:
        model, dataset, result, device, scale: as for :func:`top_images_strip`.
        out_dir: directory (created if needed).
        units: which units (default: all).
        units_per_pass: units rendered per group (per batch of forward passes).
        progress: ``progress("images", units_done, units_total)`` after each group.
        should_stop: checked before each group; True raises :class:`Cancelled`.

    Returns:
        the written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [int(u) for u in (range(result.units) if units is None else units)]
    paths = []
    for start in range(0, len(chosen), units_per_pass):
        if should_stop is not None and should_stop():
            raise Cancelled("stopped while drawing unit images")
        group = chosen[start : start + units_per_pass]
        wanted = [int(i) for u in group for i in result.top_images[u]]
        kept = {u: _kept_maps(result, u, len(result.top_images[u])) for u in group}
        if all(maps is not None for maps in kept.values()):
            images = {i: dataset[i].image for i in dict.fromkeys(wanted)}
            acts: dict[int, Any] = {}
        else:
            kept = {}
            images, acts = _unit_activations(model, dataset, result.layer, wanted, group, device)
        for g, u in enumerate(group):
            indices = [int(i) for i in result.top_images[u]]
            if not indices:
                continue
            maps = kept.get(u)
            activations = maps if maps is not None else [acts[i][g] for i in indices]
            path = out / f"unit_{u:04d}.png"
            unit_strip([images[i] for i in indices], activations, float(result.thresholds[u]), scale=scale).save(path)
            paths.append(path)
        if progress is not None:
            progress("images", start + len(group), len(chosen))
    return paths
