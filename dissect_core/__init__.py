"""Network dissection as a plain torch library (Bau et al., PNAS 2020).

What the individual units of a trained CNN detect: each unit's activation is
upsampled to the concept-mask resolution, thresholded at its 0.99 quantile and
scored against every concept by dataset-level IoU.

Example::

    from dissect_core import dissect, load_model, open_dataset

    model = load_model("builtin:scenecnn", "demo/classifier.safetensors", input_size=64)
    results = dissect(model, open_dataset("broden:demo/data"), ["conv5"])
    rows = results["conv5"].unit_rows()   # unit, label, category, iou, threshold

Names are imported lazily, so ``import dissect_core`` stays cheap; this package
never imports Django, DRF or Celery. Command line: ``python -m dissect_core``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS: dict[str, str] = {
    "Concept": "concepts",
    "Sample": "concepts",
    "Batch": "concepts",
    "ConceptDataset": "concepts",
    "collate_samples": "concepts",
    "DissectError": "errors",
    "ModelLoadError": "errors",
    "DatasetError": "errors",
    "LayerError": "errors",
    "Cancelled": "errors",
    "LoadedModel": "models",
    "LayerInfo": "models",
    "load_model": "models",
    "list_layers": "models",
    "load_state_dict_file": "models",
    "infer_num_classes_from_state_dict": "models",
    "trace": "nethook",
    "Trace": "nethook",
    "upsample": "upsample",
    "QuantileSketch": "quantile",
    "QuantileBracket": "quantile",
    "QuantileRefiner": "quantile",
    "ConceptCounts": "counts",
    "TopActivations": "counts",
    "UnitLabel": "dissect",
    "LayerResult": "dissect",
    "dissect": "dissect",
    "quantile_pass": "dissect",
    "refine_pass": "dissect",
    "resolve_thresholds": "dissect",
    "count_pass": "dissect",
    "finalize": "dissect",
    "RunOptions": "options",
    "UnitClassifierResult": "unit_classifier",
    "unit_classifier": "unit_classifier",
    "image_peaks": "unit_classifier",
    "concept_presence": "unit_classifier",
    "Segmenter": "segmenter",
    "SegmentedDataset": "segmenter",
    "unit_strip": "visualize",
    "top_images_strip": "visualize",
    "save_unit_strips": "visualize",
    "open_dataset": "datasets",
    "BrodenDataset": "broden",
    "SyntheticScenes": "synthetic",
    "ARCHS": "archs",
    "make_demo": "demo",
    "load_generator": "generators",
    "wrap_generator": "generators",
    "sample_latents": "generators",
    "generate": "generators",
    "to_uint8": "generators",
    "GeneratedDataset": "generators",
    "ColorSegmenter": "generators",
    "remove_units_edit": "generators",
    "insert_units_edit": "generators",
    "unit_quantiles": "generators",
    "concept_pixels": "generators",
    "removal_curve": "generators",
    "insertion_map": "generators",
    "paint": "generators",
    "paint_pair": "generators",
    "RemovalResult": "generators",
    "InsertionResult": "generators",
}

__all__ = [
    "ARCHS",
    "Batch",
    "BrodenDataset",
    "Cancelled",
    "ColorSegmenter",
    "Concept",
    "ConceptCounts",
    "ConceptDataset",
    "DatasetError",
    "DissectError",
    "GeneratedDataset",
    "InsertionResult",
    "LayerError",
    "LayerInfo",
    "LayerResult",
    "LoadedModel",
    "ModelLoadError",
    "QuantileBracket",
    "QuantileRefiner",
    "QuantileSketch",
    "RemovalResult",
    "RunOptions",
    "Sample",
    "SegmentedDataset",
    "Segmenter",
    "SyntheticScenes",
    "TopActivations",
    "Trace",
    "UnitClassifierResult",
    "UnitLabel",
    "collate_samples",
    "concept_pixels",
    "concept_presence",
    "count_pass",
    "dissect",
    "finalize",
    "generate",
    "image_peaks",
    "infer_num_classes_from_state_dict",
    "insert_units_edit",
    "insertion_map",
    "list_layers",
    "load_generator",
    "load_model",
    "load_state_dict_file",
    "make_demo",
    "open_dataset",
    "paint",
    "paint_pair",
    "quantile_pass",
    "refine_pass",
    "removal_curve",
    "remove_units_edit",
    "resolve_thresholds",
    "sample_latents",
    "save_unit_strips",
    "to_uint8",
    "top_images_strip",
    "trace",
    "unit_classifier",
    "unit_quantiles",
    "unit_strip",
    "upsample",
    "wrap_generator",
]


class _Package(types.ModuleType):
    """Keeps a public name (``dissect``, ``upsample``, ``unit_classifier``) bound to the
    function when the submodule of the same name is imported; the submodules stay
    importable as ``from dissect_core.dissect import ...``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dissect_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
