"""Built-in architectures, addressed as ``builtin:NAME``.

``scenecnn``: a small VGG-style scene classifier for 64x64 images. Its layers,
by dotted name (each ``convN`` block outputs Conv -> BatchNorm -> ReLU, so a
hook on ``convN`` sees rectified activations, like VGG's ``conv5_3``)::

    conv1  3 -> 16    at H x W          pool1 -> H/2
    conv2  16 -> 32   at H/2            pool2 -> H/4
    conv3  32 -> 64   at H/4            pool3 -> H/8
    conv4  64 -> 128  at H/8
    conv5  128 -> 128 at H/8            (the layer to dissect: 128 units, 8x8)
    avgpool, flatten, fc (128 -> num_classes)

``segnet``: a small fully convolutional segmenter: per-pixel class scores
[B, num_classes, H/4, W/4] (layers conv1..conv4, head).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

from torch import nn

from .errors import ModelLoadError

__all__ = ["ARCHS", "SCENECNN_WIDTHS", "build_arch", "scenecnn", "segnet"]

SCENECNN_WIDTHS: tuple[int, ...] = (16, 32, 64, 128, 128)


def _block(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def scenecnn(num_classes: int, widths: tuple[int, ...] = SCENECNN_WIDTHS) -> nn.Module:
    """A small VGG-style scene classifier.

    Args:
        num_classes: number of output classes.
        widths: channels of conv1..conv5.

    Returns:
        An ``nn.Sequential`` mapping float [B, 3, H, W] (normalised images,
        H and W multiples of 8) to logits [B, num_classes].
    """
    c1, c2, c3, c4, c5 = widths
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=_block(3, c1),
        pool1=nn.MaxPool2d(2),
        conv2=_block(c1, c2),
        pool2=nn.MaxPool2d(2),
        conv3=_block(c2, c3),
        pool3=nn.MaxPool2d(2),
        conv4=_block(c3, c4),
        conv5=_block(c4, c5),
        avgpool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(c5, num_classes),
    )
    return nn.Sequential(layers)


def segnet(num_classes: int) -> nn.Module:
    """A small fully convolutional segmenter.

    Args:
        num_classes: number of per-pixel classes (class 0 may mean "none").

    Returns:
        An ``nn.Sequential`` mapping float [B, 3, H, W] (H and W multiples of
        4) to scores [B, num_classes, H/4, W/4].
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=_block(3, 32),
        pool1=nn.MaxPool2d(2),
        conv2=_block(32, 64),
        pool2=nn.MaxPool2d(2),
        conv3=_block(64, 64, dilation=2),
        conv4=_block(64, 64, dilation=4),
        head=nn.Conv2d(64, num_classes, 1),
    )
    return nn.Sequential(layers)


ARCHS: dict[str, Callable[..., nn.Module]] = {"scenecnn": scenecnn, "segnet": segnet}


def _builtin_key(name: str, registry: Mapping[str, Callable[..., nn.Module]], what: str) -> str:
    """The registry key of ``name`` (``builtin:`` prefix optional); unknown raises, listing the known ones."""
    key = name.removeprefix("builtin:")
    if key not in registry:
        raise ModelLoadError(
            f"unknown built-in {what} {name!r}; known: " + ", ".join(f"builtin:{k}" for k in sorted(registry))
        )
    return key


def build_arch(name: str, num_classes: int) -> nn.Module:
    """Build a built-in architecture.

    Args:
        name: a key of :data:`ARCHS`, with or without the ``builtin:`` prefix.
        num_classes: number of output classes.

    Returns:
        The freshly initialised module.

    Raises:
        ModelLoadError: an unknown name (the message lists the known ones).
    """
    return ARCHS[_builtin_key(name, ARCHS, "architecture")](num_classes)
