"""The options every pass over a dataset's images takes, typed and documented once.

Dissection (:func:`~dissect_core.dissect.dissect` and its shard passes),
:func:`~dissect_core.unit_classifier.image_peaks`, ablation
(:mod:`dissect_core.ablation`) and the attack analysis
(:func:`~dissect_core.attack.attack_unit_changes`) all take the same keyword
arguments for which images to run, in what batches, where, and who watches the
run: :class:`RunOptions`, as ``**options``::

    run: RunOptions = {"device": "cuda", "batch_size": 128, "progress": report}
    importance = unit_importance(model, train, "conv5", **run)
    sets = ablate_sets(model, val, "conv5", importance, **run)

A pass reads them through :meth:`Run.of`, which applies the pass's own batch
size (32 images for dissection and the attack, 64 for ablation) and resolves the
device. A keyword that is no option raises ``TypeError``, as it would for a
plain signature.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch

from .errors import DissectError
from .progress import ProgressFn, StopFn

__all__ = ["Run", "RunOptions", "check_keywords", "resolve_device"]


class RunOptions(TypedDict, total=False):
    """The keyword arguments of a pass over a dataset's images; every one is optional.

    Attributes:
        indices: the dataset indices to run on (default: all), in output row
            order; shards of images (disjoint index lists) merge afterwards.
        batch_size: images per forward pass (default: the pass's own).
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
        num_workers: DataLoader worker processes (default 0: load in the
            calling process).
        progress: ``progress(phase, done, total)``, called as work completes;
            each pass names its phases and what it counts.
        should_stop: polled between batches; True raises
            :class:`~dissect_core.errors.Cancelled`.
    """

    indices: Sequence[int] | None
    batch_size: int
    device: torch.device | str | None
    num_workers: int
    progress: ProgressFn | None
    should_stop: StopFn | None


_RUN_KEYS = RunOptions.__optional_keys__


def check_keywords(options: Iterable[str], accepted: Collection[str]) -> None:
    """Refuse a keyword that an options ``TypedDict`` does not declare.

    ``**options: Unpack[...]`` lets mypy check every call, but at run time any
    keyword gets in; this restores the ``TypeError`` of a plain signature.

    Args:
        options: the keywords given.
        accepted: the keywords the function takes (e.g. ``RunOptions.__optional_keys__``).

    Raises:
        TypeError: naming the first other keyword and the accepted ones.
    """
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r} (accepted: {', '.join(sorted(accepted))})")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The device a pass runs on.

    Args:
        device: a device or its name; None for CUDA when available, else the CPU.

    Returns:
        the device.

    Raises:
        DissectError: CUDA asked for but not available.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DissectError("device cuda requested but CUDA is not available")
    return dev


@dataclass(frozen=True)
class Run:
    """A pass's :class:`RunOptions` with its defaults applied (see there).

    Attributes:
        indices: as given (None: all); each pass checks them against its dataset.
        batch_size: as given, else the pass's default.
        device: the resolved device.
        num_workers: DataLoader worker processes.
        progress: the progress callback, or None.
        should_stop: the cancellation callback, or None.
    """

    indices: Sequence[int] | None
    batch_size: int
    device: torch.device
    num_workers: int
    progress: ProgressFn | None
    should_stop: StopFn | None

    @classmethod
    def of(cls, options: RunOptions, *, batch_size: int, also: Collection[str] = ()) -> Run:
        """Apply a pass's defaults to the options it was called with.

        Args:
            options: the caller's keyword arguments.
            batch_size: the pass's default batch size.
            also: keywords the pass takes besides the run options (it reads them itself).

        Returns:
            the :class:`Run`.

        Raises:
            TypeError: a keyword that is neither a run option nor in ``also``.
            DissectError: CUDA asked for but not available.
        """
        check_keywords(options, _RUN_KEYS | set(also))
        return cls(
            indices=options.get("indices"),
            batch_size=options.get("batch_size", batch_size),
            device=resolve_device(options.get("device")),
            num_workers=options.get("num_workers", 0),
            progress=options.get("progress"),
            should_stop=options.get("should_stop"),
        )
