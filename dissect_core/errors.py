"""Errors raised by dissect_core. Every one carries a message that names the problem."""

from __future__ import annotations

__all__ = ["Cancelled", "DatasetError", "DissectError", "LayerError", "ModelLoadError"]


class DissectError(Exception):
    """Base class: bad input or a failed precondition (never a transient fault)."""

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ModelLoadError(DissectError):
    """Weights do not load into the architecture, or the model spec is unknown.

    ``details`` may hold ``missing`` and ``unexpected`` key lists.
    """


class DatasetError(DissectError):
    """A dataset is malformed; ``details`` holds ``path`` (the offending file) when known."""


class LayerError(DissectError):
    """A layer name is not a module of the model; ``details['valid']`` lists the valid names."""


class Cancelled(DissectError):
    """The caller's ``should_stop`` callback asked the work to stop."""
