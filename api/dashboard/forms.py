"""The dashboard's forms. The job form's parameter fields are built from the job parameter
definitions (``api.job_params``): a parameter added there appears here."""

from __future__ import annotations

import re
import typing
from dataclasses import MISSING
from typing import Any

from django import forms

from api import selectors
from api.job_params import PARAMS, JobParams, ParamMeta, form_params
from api.job_params.definitions import default_of
from api.job_params.schema import parts
from api.models import Dataset, Job, NetworkModel, arch_spec_problem

JOB_TYPES = [
    (Job.Type.DISSECT, "dissect: label every unit with the concept it detects (Figure 1)"),
    (Job.Type.ABLATE, "ablate: the units each class depends on (classifiers, Figure 2)"),
    (Job.Type.ATTACK, "attack: unit changes under adversarial attack (classifiers, Figure 5)"),
    (Job.Type.UNIT_CLASSIFIER, "unit classifier: one unit as a concept detector (classifiers, Figure 1f)"),
    (Job.Type.GENERATOR_REMOVE, "remove: switch off a concept's units (generators, Figure 4a-b)"),
    (Job.Type.GENERATOR_INSERT, "insert: where units can add a concept (generators, Figure 4d)"),
]
# Text fields that suggest names from a datalist the page fills (layers, concepts of a dissection).
DATALISTS = {"layer": "layer-names", "concept": "concept-names"}


def _numbers(text: str) -> list[int] | None:
    items = [item for item in re.split(r"[,\s]+", text or "") if item]
    if not items:
        return None
    try:
        return [int(item) for item in items]
    except ValueError:
        raise forms.ValidationError("Whole numbers separated by commas or spaces.") from None


def _form_name(name: str, meta: ParamMeta) -> str:
    return meta.form_name or name


def _defaults_text(rows: list[tuple[type[JobParams], Any]]) -> str:
    """' Default: 20.' or, when job types differ, ' Default: 0 (dissect, attack), 1 (generator_remove).'"""
    shown: dict[str, list[str]] = {}  # each default, as text, with the job types that have it
    for cls, value in rows:
        if value is not None and value != [] and value is not MISSING:
            shown.setdefault(_plain(value), []).append(cls.type)
    if not shown:
        return ""
    if len(shown) == 1 and len(next(iter(shown.values()))) == len(rows):
        return f" Default: {next(iter(shown))}."
    return " Default: " + ", ".join(f"{value} ({', '.join(types)})" for value, types in shown.items()) + "."


def _plain(value: Any) -> str:
    return (
        ", ".join(map(str, value))
        if isinstance(value, list)
        else f"{value:g}"
        if isinstance(value, float)
        else str(value)
    )


def _form_field(name: str, hint: Any, meta: ParamMeta, help_text: str) -> forms.Field:
    """A form field for one parameter (lists are typed as text: names or numbers separated by commas)."""
    base, _ = parts(hint)
    common = {"required": False, "help_text": help_text, "label": meta.label}
    bounds = {"min_value": meta.low, "max_value": meta.high}
    if typing.get_origin(base) is list:
        return forms.CharField(max_length=5000 if name == "layers" else 1000, **common)
    if base is int:
        return forms.IntegerField(**bounds, **common)
    if base is float:
        return forms.FloatField(**bounds, **common)
    if base is str:
        attrs = {"list": DATALISTS[name], "autocomplete": "off"} if name in DATALISTS else {}
        return forms.CharField(max_length=200, widget=forms.TextInput(attrs=attrs), **common)
    return forms.ChoiceField(**common)  # a concept source: choices set per user


def job_param_fields() -> dict[str, forms.Field]:
    """Form fields of every job type's shown parameters, by form name (shared across types that take them)."""
    seen: dict[str, list] = {}
    for cls, rows in form_params():
        for f, meta, hint in rows:
            seen.setdefault(_form_name(f.name, meta), []).append((cls, f, meta, hint))
    fields = {}
    for form_name, uses in seen.items():
        _, f, meta, hint = uses[0]
        helps: dict[str, str] = {}  # each distinct help text, with the first job type that says it
        for cls, _, m, _ in uses:
            helps.setdefault(m.help, cls.type)
        text = next(iter(helps)) if len(helps) == 1 else " ".join(f"{t}: {h}" for h, t in helps.items())
        defaults = _defaults_text([(cls, default_of(fld)) for cls, fld, _, _ in uses])
        fields[form_name] = _form_field(f.name, hint, meta, text + defaults)
    return fields


def job_form_layout() -> dict[str, dict[str, list[str]]]:
    """The form fields of each job type, per model kind ("classifier" or "generator"), in order."""
    layout: dict[str, dict[str, list[str]]] = {}
    for cls, rows in form_params():
        layout.setdefault(cls.type, {})[cls.kind] = [_form_name(f.name, meta) for f, meta, _ in rows]
    return layout


class JobForm(forms.Form):
    type = forms.ChoiceField(choices=JOB_TYPES, initial=Job.Type.DISSECT, required=False, label="Job type")
    model = forms.ModelChoiceField(queryset=NetworkModel.objects.none())
    dataset = forms.ModelChoiceField(
        queryset=Dataset.objects.none(),
        required=False,
        help_text="Classifier jobs run on a dataset; generator jobs generate their own images.",
    )

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields.update(job_param_fields())
        models = selectors.model_list(user=user)
        self.fields["model"].queryset = models
        self.fields["dataset"].queryset = selectors.dataset_list(user=user)
        segmenters = models.filter(kind=NetworkModel.Kind.SEGMENTER).values_list("pk", "name")
        self.fields["concepts"].choices = [("colors", "colours (computed from the pixels)")] + [
            (str(pk), f"segmenter {name}") for pk, name in segmenters
        ]

    def clean_type(self):
        return self.cleaned_data["type"] or Job.Type.DISSECT

    def clean_ks(self):
        return _numbers(self.cleaned_data["ks"])

    def params(self) -> dict:
        """The params of the chosen type, from its shown fields only (empty fields: the defaults)."""
        data = self.cleaned_data
        kind = "generator" if data["model"].kind == NetworkModel.Kind.GENERATOR else "classifier"
        chosen = [cls for cls in PARAMS if cls.type == data["type"]]
        cls = next((c for c in chosen if c.kind == kind), chosen[0])
        rows = dict(form_params())[cls]
        params: dict = {}
        for f, meta, hint in rows:
            value = data.get(_form_name(f.name, meta))
            if value is None or value == "" or value == []:
                continue
            base, _ = parts(hint)
            if f.name == "layers":
                value = [item for item in re.split(r"[,\s]+", value) if item]
            elif base is not str and not isinstance(value, (int, float, list)):
                value = "colors" if value == "colors" else int(value)
            elif isinstance(value, str):
                value = value.strip()
            params[f.name] = value
        return params


class ModelForm(forms.Form):
    name = forms.CharField(max_length=200)
    arch = forms.CharField(
        max_length=200,
        label="Architecture",
        help_text="torchvision:NAME (e.g. torchvision:resnet18), timm:NAME (e.g. timm:vit_small_patch16_224), "
        "builtin:NAME (e.g. builtin:scenecnn), torchscript, or exported (a torch.export .pt2).",
    )
    kind = forms.ChoiceField(choices=NetworkModel.Kind.choices, initial=NetworkModel.Kind.CLASSIFIER)
    num_classes = forms.IntegerField(
        required=False, min_value=1, max_value=100_000, label="Classes", help_text="Output classes of a classifier."
    )
    input_size = forms.IntegerField(
        required=False, min_value=8, max_value=4096, label="Input size", help_text="Image side in pixels; default 224."
    )
    weights = forms.FileField(
        required=False,
        help_text="Upload .safetensors, or a .pt/.pth state dict (TorchScript: .pt, .ts, .zip; exported: .pt2).",
    )
    weights_path = forms.CharField(
        required=False, max_length=1000, help_text="Or a file on the server, inside the configured data roots."
    )
    public = forms.BooleanField(required=False, help_text="Everyone logged in may see it and its units.")

    def clean_arch(self):
        arch = self.cleaned_data["arch"].strip()
        problem = arch_spec_problem(arch)
        if problem:
            raise forms.ValidationError(problem)
        return arch

    def clean(self):
        data = super().clean()
        if bool(data.get("weights")) == bool((data.get("weights_path") or "").strip()):
            raise forms.ValidationError("Give exactly one of a weights file or a weights path.")
        return data


class DatasetForm(forms.Form):
    name = forms.CharField(max_length=200)
    format = forms.ChoiceField(
        choices=Dataset.Format.choices,
        help_text="broden: a Broden directory (index.csv, label.csv, images/); imagefolder: class folders "
        "of images; synthetic: the demo scenes.",
    )
    path = forms.CharField(
        required=False, max_length=1000, help_text="A directory on the server, inside the data roots."
    )
    archive = forms.FileField(required=False, help_text="Or upload a .zip or .tar(.gz) of the directory.")
    concepts = forms.ChoiceField(
        choices=[("masks", "masks (from the dataset's annotations)"), ("colors", "colors (computed from pixels)")],
        initial="masks",
    )
    public = forms.BooleanField(required=False, help_text="Everyone logged in may use it.")

    def clean(self):
        data = super().clean()
        if bool(data.get("archive")) == bool((data.get("path") or "").strip()):
            raise forms.ValidationError("Give exactly one of a path or an archive.")
        return data
