"""Laying a layer's output out as unit maps [B, C, H, W], whatever its shape.

The method compares each unit's map with concept masks; the paper's layers are already
[B, C, H, W] maps. Other layers are laid out as maps first (DESIGN.md, "Layers that are not
[B, C, H, W] maps"), then thresholded and compared exactly like convolutional maps:

- ``map``: [B, C, H, W], as it is;
- ``channels_last``: [B, H, W, C] (Swin, ConvNeXt blocks in timm) -> [B, C, H, W];
- ``tokens``: [B, N, C] from a transformer: the first ``p`` tokens (class, distillation,
  register) are left out, and token ``p + r * W + c`` is position (r, c) of the model's patch
  grid (row-major) -> [B, C, gh, gw];
- ``vector``: [B, C] (a fully connected or pooled layer) -> [B, C, 1, 1]: a unit is on or off
  for the whole image, so it gets an image-level label.

A layer that outputs a tuple (an attention module's ``(output, weights)``) is laid out from its
first tensor. Edits of a unit (ablation, insertion) act on the same view: :meth:`LayerLayout.edit`
applies a map-space edit to the raw output and gives back the raw layout, so zeroing unit u
of a token layer zeroes channel u on every patch token and leaves the prefix tokens as they are.

Which layout a 4-D output has is read from two probes when the model takes a non-square
input (the dimensions that follow the input's width are spatial); otherwise from its shape
([B, C, H, H] is a map, [B, H, H, C] with C != H is channels-last).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import LayerError

__all__ = ["LAYOUT_KINDS", "LayerLayout", "TokenGrid", "infer_layout", "model_token_grid"]

LAYOUT_KINDS = ("map", "channels_last", "tokens", "vector")
_MAX_GUESSED_PREFIX = 8


@dataclass(frozen=True)
class TokenGrid:
    """How a transformer lays its patches out, as the model says it.

    Attributes:
        grid: (gh, gw) patch rows and columns for the probed input size.
        prefix: names of the tokens before the patches, in order (``"class"``,
            ``"distillation"``, ``"register"``).
        guessed: True when read from the token count, not from the model.
    """

    grid: tuple[int, int]
    prefix: tuple[str, ...] = ()
    guessed: bool = False


@dataclass(frozen=True)
class LayerLayout:
    """How one layer's output becomes unit maps.

    Attributes:
        kind: one of :data:`LAYOUT_KINDS`.
        units: channels C (the units).
        height: map height H (1 for a vector; gh for tokens).
        width: map width W.
        prefix: tokens only: names of the leading tokens left out of the map.
        element: for a tuple output, the index of the tensor laid out; None for a tensor.
    """

    kind: str
    units: int
    height: int
    width: int
    prefix: tuple[str, ...] = ()
    element: int | None = None

    def tensor(self, output: Any) -> torch.Tensor:
        """The laid-out tensor of a raw output (the tuple element, or the output itself)."""
        if self.element is None:
            return output
        return output[self.element]

    def to_map(self, output: Any) -> torch.Tensor:
        """Raw output -> float maps [B, C, H, W] (a view where the layout allows one)."""
        t = self.tensor(output)
        if self.kind == "map":
            return t
        if self.kind == "channels_last":
            return t.permute(0, 3, 1, 2)
        if self.kind == "vector":
            return t[:, :, None, None]
        p = len(self.prefix)
        return t[:, p:, :].transpose(1, 2).reshape(t.shape[0], self.units, self.height, self.width)

    def from_map(self, maps: torch.Tensor, output: Any) -> Any:
        """Maps [B, C, H, W] written back into ``output``'s layout (prefix tokens and the other
        tuple elements kept from ``output``)."""
        if self.kind == "map":
            t = maps
        elif self.kind == "channels_last":
            t = maps.permute(0, 2, 3, 1)
        elif self.kind == "vector":
            t = maps[:, :, 0, 0]
        else:
            raw = self.tensor(output)
            patches = maps.reshape(maps.shape[0], self.units, self.height * self.width).transpose(1, 2)
            p = len(self.prefix)
            t = torch.cat([raw[:, :p, :].to(patches.dtype), patches], dim=1) if p else patches
        if self.element is None:
            return t
        items = list(output)
        items[self.element] = t
        return type(output)(items) if isinstance(output, tuple) else items

    def edit(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Any], Any]:
        """A raw-output edit from a map edit: ``fn(maps [B, C, H, W]) -> maps``.

        For a ``map`` layer this is ``fn`` itself (no copies)."""
        if self.kind == "map" and self.element is None:
            return fn

        def edit(output: Any) -> Any:
            return self.from_map(fn(self.to_map(output)), output)

        return edit

    @property
    def unit_dim(self) -> int:
        """The dimension of the raw tensor that holds the units."""
        return {"map": 1, "vector": 1, "channels_last": 3, "tokens": 2}[self.kind]

    def keep_mask(self, keep: torch.Tensor, raw_shape: Sequence[int]) -> torch.Tensor:
        """Where ablations leave the raw output alone, for block-wise zeroing.

        Args:
            keep: bool [G, U]: ablation g keeps unit u.
            raw_shape: the raw tensor's shape [B, ...].

        Returns:
            bool, broadcastable to [G, B, *raw_shape[1:]]: True where block g keeps the value
            (every value of a prefix token, in a token layer).
        """
        g, u = keep.shape
        shape = [g, 1] + [1] * (len(raw_shape) - 1)
        shape[1 + self.unit_dim] = u
        mask = keep.view(shape)
        if self.kind == "tokens" and self.prefix:
            tokens = torch.zeros(int(raw_shape[1]), dtype=torch.bool, device=keep.device)
            tokens[: len(self.prefix)] = True
            mask = mask | tokens.view(1, 1, -1, 1)
        return mask

    def describe(self) -> str:
        """One line for people: ``tokens on a 14 x 14 grid (class token excluded)``."""
        tail = f" (element {self.element} of a tuple)" if self.element is not None else ""
        if self.kind == "map":
            return f"feature map {self.height} x {self.width}{tail}"
        if self.kind == "channels_last":
            return f"channels-last feature map {self.height} x {self.width}{tail}"
        if self.kind == "vector":
            return f"vector (one value per image){tail}"
        grid = f"tokens on a {self.height} x {self.width} patch grid"
        if not self.prefix:
            return f"{grid}{tail}"
        names = list(dict.fromkeys(self.prefix))
        counted = [f"{self.prefix.count(n)} {n} tokens" if self.prefix.count(n) > 1 else f"{n} token" for n in names]
        return f"{grid} ({', '.join(counted)} excluded){tail}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields: kind, prefix, element."""
        return {"kind": self.kind, "prefix": list(self.prefix), "element": self.element}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> LayerLayout:
        """The layout of a layer row (``units``, ``height``, ``width`` and :meth:`as_dict`'s fields, as
        registration stores them); a row without ``kind`` is a feature map."""
        return cls(
            row.get("kind", "map"),
            int(row["units"]),
            int(row["height"]),
            int(row["width"]),
            tuple(row.get("prefix") or ()),
            row.get("element"),
        )


def model_token_grid(module: nn.Module, input_size: tuple[int, int]) -> TokenGrid | None:
    """The patch grid and prefix tokens a vision transformer declares, or None.

    Reads timm's ``VisionTransformer`` (``patch_embed.patch_size``, ``cls_token``,
    ``dist_token``, ``reg_token``, ``num_prefix_tokens``) and torchvision's
    (``patch_size``, ``class_token``).

    Args:
        module: the network.
        input_size: (H, W) of the images it is run on.
    """
    h, w = input_size
    embed = getattr(module, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is not None and hasattr(module, "num_prefix_tokens"):
        ph, pw = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
        names: list[str] = []
        if getattr(module, "cls_token", None) is not None:
            names.append("class")
        if getattr(module, "dist_token", None) is not None:
            names.append("distillation")
        names += ["register"] * int(getattr(module, "num_reg_tokens", 0) or 0)
        declared = int(getattr(module, "num_prefix_tokens", 0) or 0)
        if len(names) != declared:
            names = ["prefix"] * declared
        return TokenGrid((h // ph, w // pw), tuple(names))
    patch = getattr(module, "patch_size", None)
    if isinstance(patch, int) and hasattr(module, "class_token"):
        return TokenGrid((h // patch, w // patch), ("class",))
    return None


def _guess_grid(n_tokens: int, input_size: tuple[int, int]) -> TokenGrid | None:
    """The fewest prefix tokens p (0..8) for which N - p patches fill a grid of the input's aspect."""
    h, w = input_size
    for p in range(min(_MAX_GUESSED_PREFIX, n_tokens - 1) + 1):
        n = n_tokens - p
        gh = round(math.sqrt(n * h / w))
        for rows in (gh - 1, gh, gh + 1):
            if rows > 0 and n % rows == 0 and abs(rows / (n // rows) - h / w) < 0.05 * h / w + 1e-9:
                return TokenGrid((rows, n // rows), ("prefix",) * p, guessed=True)
    return None


def _pick_tensor(output: Any) -> tuple[torch.Tensor, int | None]:
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, (tuple, list)):
        for i, item in enumerate(output):
            if isinstance(item, torch.Tensor):
                return item, i
        raise ValueError(f"outputs a {type(output).__name__} with no tensor")
    raise ValueError(f"outputs a {type(output).__name__}, not a tensor")


def infer_layout(
    name: str,
    output: Any,
    *,
    batch: int,
    input_size: tuple[int, int],
    grid: TokenGrid | None = None,
    wider: Sequence[int] | None = None,
) -> LayerLayout:
    """How a layer's output (from a probe of ``batch`` images) is laid out as unit maps.

    Args:
        name: the layer (for messages).
        output: what the layer returned on the probe.
        batch: the probe's batch size (the first dimension must be it).
        input_size: (H, W) of the probe images.
        grid: the model's token grid (:func:`model_token_grid`); None: guessed from N.
        wider: the same tensor's shape on a probe with a wider input, when the model took one
            (its changed dimension is the width).

    Returns:
        the :class:`LayerLayout`.

    Raises:
        LayerError: the output cannot be laid out as maps (no tensor, batch not first, a
            scalar per image or more than 4 dimensions, tokens that fill no grid).
    """
    try:
        t, element = _pick_tensor(output)
    except ValueError as exc:
        raise LayerError(f"layer {name!r} {exc}: it cannot be laid out as unit maps", layer=name) from None
    shape = tuple(int(v) for v in t.shape)
    if not shape or shape[0] != batch:
        raise LayerError(
            f"layer {name!r} outputs {shape}: the batch is not its first dimension, so it cannot be laid out as "
            "unit maps",
            layer=name,
        )
    if len(shape) == 2:
        return LayerLayout("vector", shape[1], 1, 1, element=element)
    if len(shape) == 3:
        return _token_layout(name, shape, input_size, grid, element)
    if len(shape) == 4:
        _, a, b, c = shape
        if grid is not None and len(grid.prefix) + grid.grid[0] * grid.grid[1] in (a, b, c):
            raise LayerError(
                f"layer {name!r} outputs {shape}, which holds a transformer's {len(grid.prefix)} + "
                f"{grid.grid[0]} x {grid.grid[1]} tokens along one axis (per-head attention values): it cannot "
                "be laid out as unit maps; dissect the attention module's output or the block",
                layer=name,
            )
        if wider is not None and len(wider) == 4 and tuple(wider) != shape:
            if wider[3] != c and wider[2] == b:
                return LayerLayout("map", a, b, c, element=element)
            if wider[2] != b and wider[3] == c:
                return LayerLayout("channels_last", c, a, b, element=element)
        if a == b and c != a:
            return LayerLayout("channels_last", c, a, b, element=element)
        return LayerLayout("map", a, b, c, element=element)
    raise LayerError(
        f"layer {name!r} outputs {shape}: only [B, C], [B, N, C], [B, C, H, W] and [B, H, W, C] can be laid out as "
        "unit maps",
        layer=name,
    )


def _token_layout(
    name: str, shape: tuple[int, ...], input_size: tuple[int, int], grid: TokenGrid | None, element: int | None
) -> LayerLayout:
    _, n, c = shape
    if grid is not None:
        gh, gw = grid.grid
        if n == len(grid.prefix) + gh * gw:
            return LayerLayout("tokens", c, gh, gw, grid.prefix, element)
        if n == gh * gw:
            return LayerLayout("tokens", c, gh, gw, (), element)
        raise LayerError(
            f"layer {name!r} outputs {n} tokens, which match no layout of the model's {gh} x {gw} patch grid "
            f"({len(grid.prefix)} prefix tokens): it cannot be laid out as unit maps",
            layer=name,
        )
    guess = _guess_grid(n, input_size)
    if guess is None:
        raise LayerError(
            f"layer {name!r} outputs {n} tokens, which fill no patch grid of a {input_size[0]} x {input_size[1]} "
            f"image after 0 to {_MAX_GUESSED_PREFIX} prefix tokens: it cannot be laid out as unit maps",
            layer=name,
        )
    return LayerLayout("tokens", c, guess.grid[0], guess.grid[1], guess.prefix, element)
