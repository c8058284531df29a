"""Progress reports and cancellation, shared by every long-running pass.

Long passes take two optional callbacks: ``progress(stage, done, total)``, called
as work completes, and ``should_stop()``, polled between batches; when it returns
True the pass raises :class:`~dissect_core.errors.Cancelled` through
:func:`check_stop`.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import Cancelled

__all__ = ["ProgressFn", "StopFn", "check_stop"]

ProgressFn = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: ``done`` of ``total`` items of the named stage are finished."""

StopFn = Callable[[], bool]
"""``should_stop()``: True asks the running pass to stop."""


def check_stop(should_stop: StopFn | None, what: str = "") -> None:
    """Stop the pass if the caller asks for it.

    Args:
        should_stop: the caller's callback, or None (never stop).
        what: the work being stopped, for the message (``"ablation"`` ->
            ``"ablation cancelled"``; empty: ``"cancelled"``).

    Raises:
        Cancelled: ``should_stop()`` returned True.
    """
    if should_stop is not None and should_stop():
        raise Cancelled(f"{what} cancelled" if what else "cancelled")
