"""The definitions: one frozen dataclass of typed, defaulted, described fields per job type.

A new parameter is one field here (:func:`param` gives its default, range, help and form use);
the API's checks, the OpenAPI schema, the dashboard form and the worker all read it from here.
``resolve`` does what needs the model, the dataset or the owner.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, Self

from django.conf import settings

from api.errors import ApplicationError
from api.job_params.checks import (
    JobContext,
    concept_source_check,
    dissection_concept,
    dissection_job,
    in_range,
    layer_entry,
    layer_names,
    layer_problem,
)
from api.models import Job, NetworkModel

DEFAULT_REMOVE_KS = (1, 2, 4, 8, 12, 16, 20)
MAX_SAMPLES = 100_000
MAX_SEED = 2**31 - 1
MAX_ID = 2**63 - 1  # a Postgres bigint: a larger id is bad input, not a database error
CLASSIFIER, GENERATOR = "classifier", "generator"


@dataclass(frozen=True)
class ParamMeta:
    """What a field says of itself beyond its type: help, range, default source, form use."""

    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    message: str | None = None
    setting: str | None = None
    form: bool = True
    form_name: str | None = None
    label: str | None = None
    stored: bool = True


def param(default: Any = MISSING, *, help: str, setting: str | None = None, **meta: Any) -> Any:
    """A dataclass field of a job's parameters.

    Args:
        default: the value when the request leaves it out; omitted: the parameter is required.
        help: what it means, shown in the schema and on the form.
        setting: the Django setting that holds the default (a deployment sets it).
        meta: ``low``/``high`` (a range, of the elements for lists), ``open_low``/``open_high``
            (strict bounds), ``message`` (the error), ``form`` (False: not on the dashboard form),
            ``form_name`` and ``label`` (the form field), ``stored`` (False: a tuning knob whose
            default is not written into the job, so the worker applies its own).
    """
    info = {"param": ParamMeta(help=help, setting=setting, **meta)}
    if setting is not None:
        return field(default_factory=lambda: getattr(settings, setting), metadata=info)
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=info)
    return field(default=default, metadata=info)


def _layers() -> Any:
    return param(
        [],
        help="Layer names to dissect. Empty: the model's last convolution.",
        message="params.layers must be a list of layer names",
    )


def _quantile() -> Any:
    return param(
        0.99,
        low=0.0,
        high=1.0,
        open_low=True,
        open_high=True,
        help="A unit is on where its activation exceeds this quantile of its activations (paper: 0.99).",
    )


def _batch_size(default: int | None = None) -> Any:
    kwargs = {"setting": "DISSECT_BATCH_SIZE"} if default is None else {"default": default}
    return param(low=1, high=1024, form=False, help="Images per forward pass.", **kwargs)


def _max_images(default: int | None = None) -> Any:
    return param(default, low=1, help="Use only the first N images.")


def _seed(default: int) -> Any:
    return param(
        default, low=0, high=MAX_SEED, help="Seed of the random draws: a generator's latents, an attack's targets."
    )


def _samples(default: int, high: int = MAX_SAMPLES) -> Any:
    return param(default, low=1, high=high, help="Images to generate.")


def _layer() -> Any:
    return param(help="One layer of the model.", message="params.layer must be a layer name")


CONCEPT_HELP = "A concept name: of the dataset, or for removal and insertion of the layer's dissection (e.g. a colour)."


def _concept() -> Any:
    return param(
        help=CONCEPT_HELP,
        message="params.concept must be a concept name",
    )


def _dissection() -> Any:
    return param(
        None,
        low=1,
        high=MAX_ID,
        label="Dissection job",
        message="params.dissection must be a job id",
        help="The dissection job that ranks the units by IoU (default: the layer's latest).",
    )


def _concepts(form: bool = True) -> Any:
    return param(
        "colors",
        form=form,
        label="Concepts from",
        help='What labels the generated pixels: "colors" (computed from the pixels) or the id of a '
        "registered segmenter model. Removal and insertion take the dissection's.",
    )


@dataclass(frozen=True, kw_only=True)
class JobParams:
    """Parameters of one job type; subclasses are the definitions."""

    type: ClassVar[str]
    kind: ClassVar[str] = CLASSIFIER
    refused: ClassVar[dict[str, str]] = {}

    def resolve(self, ctx: JobContext) -> Self:
        """Checks and defaults that need the model, the dataset or the owner."""
        return self

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class DissectBase(JobParams):
    type: ClassVar[str] = Job.Type.DISSECT
    layers: list[str] = _layers()
    quantile: float = _quantile()
    batch_size: int = _batch_size()
    top_k_images: int = param(
        5, low=0, high=50, form=False, stored=False, help="Top-activating images drawn per unit (0: none)."
    )
    evidence_blocks: int = param(
        16,
        low=1,
        high=64,
        form=False,
        message="params.evidence_blocks must be an integer from 1 to 64",
        help=(
            "Blocks of images (fixed by image index) whose tallies give each label its evidence: "
            "interval, stability, chance level and p-value. 1: no evidence."
        ),
    )
    resamples: int = param(
        1000,
        low=100,
        high=10000,
        form=False,
        message="params.resamples must be an integer from 100 to 10000",
        help="Bootstrap resamples of the blocks for the label IoU's interval and its stability.",
    )
    evidence_seed: int = param(
        0,
        low=0,
        high=2**31 - 1,
        form=False,
        message="params.evidence_seed must be a non-negative integer",
        help="Seed of the bootstrap resamples (the same seed gives the same evidence).",
    )
    shard_size: int = param(
        setting="JOB_SHARD_SIZE",
        low=1,
        form=False,
        stored=False,
        message="params.shard_size must be a positive integer (images per shard)",
        help="Images per shard: a job over more images is split over the workers.",
    )

    def _checked_layers(self, model: NetworkModel) -> list[str]:
        names = layer_names(model)
        missing = [x for x in self.layers if x not in names]
        for name in missing:
            layer_problem(model, name)
        if missing:
            raise ApplicationError(
                f"unknown layer(s) {', '.join(missing)} for model {model.name}", extra={"valid": names}
            )
        return self.layers


@dataclass(frozen=True, kw_only=True)
class DissectParams(DissectBase):
    """``dissect`` on a classifier or segmenter: label every unit of ``layers`` on the dataset."""

    max_images: int | None = _max_images()

    def resolve(self, ctx: JobContext) -> Self:
        layers = self.layers
        if not layers:
            convs = [entry["name"] for entry in ctx.model.layers if entry.get("type") == "Conv2d"]
            layers = [convs[-1] if convs else layer_names(ctx.model)[-1]]
        resolved = dataclasses.replace(self, layers=layers)
        resolved._checked_layers(ctx.model)
        return resolved


@dataclass(frozen=True, kw_only=True)
class GeneratorDissectParams(DissectBase):
    """``dissect`` on a generator: generate ``samples`` images from ``seed``, label them with ``concepts``."""

    kind: ClassVar[str] = GENERATOR
    refused: ClassVar[dict[str, str]] = {
        "max_images": "generator dissections take params.samples (how many images to generate), not max_images",
    }
    samples: int = _samples(1000)
    seed: int = _seed(0)
    concepts: str | int = _concepts()

    def resolve(self, ctx: JobContext) -> Self:
        if not self.layers:
            raise ApplicationError(
                'params.layers is required for a generator (e.g. ["layer3"])', extra={"valid": layer_names(ctx.model)}
            )
        self._checked_layers(ctx.model)
        return dataclasses.replace(self, concepts=concept_source_check(owner=ctx.owner, value=self.concepts))


@dataclass(frozen=True, kw_only=True)
class AblateParams(JobParams):
    """``ablate`` (Figure 2): rank the layer's units per class by removing each alone, then remove sets."""

    type: ClassVar[str] = Job.Type.ABLATE
    layer: str = _layer()
    ks: list[int] | None = param(
        None,
        low=1,
        label="k values",
        message="params.ks must be a list of positive integers (set sizes)",
        help="Sizes of the unit sets removed (default 1, 2, 3, 4, 5, 20, 64, 128, 256).",
    )
    max_images: int | None = _max_images()
    classes: list[int] | None = param(None, low=0, form=False, help="Class indices to rank (default: all).")
    train_split: str = param(
        "train",
        form=False,
        message="params.train_split must be a split name",
        help="Split whose images rank the units (a value of the dataset's split column).",
    )
    val_split: str = param(
        "val",
        form=False,
        message="params.val_split must be a split name",
        help="Split on which the unit sets are evaluated.",
    )
    batch_size: int = _batch_size(64)

    def resolve(self, ctx: JobContext) -> Self:
        model, dataset = ctx.model, ctx.dataset
        if model.kind != NetworkModel.Kind.CLASSIFIER:
            raise ApplicationError(f"ablate needs a classifier; model {model.name} is a {model.kind}")
        if not dataset.classes:
            raise ApplicationError(f"ablate needs a dataset with class labels; dataset {dataset.name} has none")
        layer_entry(model, self.layer)
        classes = self.classes
        if classes is not None:
            n = len(dataset.classes)
            if not all(0 <= c < n for c in classes):
                raise ApplicationError(f"params.classes must be a list of class indices in 0..{n - 1}")
            classes = sorted(set(classes))
        ks = sorted(set(self.ks)) if self.ks is not None else None
        return dataclasses.replace(self, ks=ks, classes=classes)


@dataclass(frozen=True, kw_only=True)
class AttackParams(JobParams):
    """``attack`` (Figure 5c): which units change under a targeted PGD attack, against their importance."""

    type: ClassVar[str] = Job.Type.ATTACK
    layer: str = _layer()
    eps: float = param(
        8 / 255,
        low=0.0,
        high=1.0,
        open_low=True,
        message="params.eps must be in (0, 1] (pixel scale)",
        help="L-inf budget in pixel scale (8/255 by default).",
    )
    iterations: int = param(20, low=1, high=1000, help="PGD steps.")
    max_images: int = _max_images(200)
    seed: int = _seed(0)
    split: str = param(
        "val",
        form=False,
        message="params.split must be a split name",
        help="Split whose correctly classified images are attacked.",
    )
    top_k: int = param(4, low=1, form=False, help="Most important units per class compared.")
    batch_size: int = _batch_size(32)
    ablation_job: int | None = param(
        None,
        low=1,
        high=MAX_ID,
        form=False,
        message="params.ablation_job must be a job id",
        help="The ablate job whose unit importance is compared (default: the latest succeeded one on the same layer).",
    )

    def resolve(self, ctx: JobContext) -> Self:
        if not ctx.dataset.classes:
            raise ApplicationError(f"attack needs a dataset with class labels; dataset {ctx.dataset.name} has none")
        jobs = Job.objects.filter(
            owner=ctx.owner,
            model=ctx.model,
            type=Job.Type.ABLATE,
            status=Job.Status.SUCCEEDED,
            params__layer=self.layer,
        )
        if self.ablation_job is not None:
            jobs = jobs.filter(pk=self.ablation_job)
        ablation = jobs.order_by("-finished", "-id").first()
        if ablation is None:
            raise ApplicationError(
                f"params.layer must be a layer of model {ctx.model.name} with a succeeded ablate job "
                f"(the attack compares unit changes with unit importance); got {self.layer!r}"
            )
        return dataclasses.replace(self, ablation_job=ablation.pk)


@dataclass(frozen=True, kw_only=True)
class UnitClassifierParams(JobParams):
    """``unit_classifier`` (Figure 1f): one unit's peak activation as a detector of one concept."""

    type: ClassVar[str] = Job.Type.UNIT_CLASSIFIER
    layer: str = _layer()
    unit: int = param(low=0, help="The unit number.")
    concept: str = param(message="params.concept must be a concept name of the dataset", help=CONCEPT_HELP)
    max_images: int | None = _max_images()
    split: str | None = param(
        None,
        form=False,
        message="params.split must be a split name",
        help="Only the images of this split (default: all).",
    )
    batch_size: int = _batch_size()

    def resolve(self, ctx: JobContext) -> Self:
        entry = layer_entry(ctx.model, self.layer, verb="be a layer")
        in_range(
            self.unit, 0, entry["units"] - 1, f"params.unit must be a unit of {self.layer}: 0..{entry['units'] - 1}"
        )
        return self


@dataclass(frozen=True, kw_only=True)
class _GeneratorEdit(JobParams):
    kind: ClassVar[str] = GENERATOR
    layer: str = _layer()
    concept: str = _concept()

    def _resolve_edit(self, ctx: JobContext) -> tuple[dict, Job]:
        entry = layer_entry(ctx.model, self.layer)
        job = dissection_job(owner=ctx.owner, model=ctx.model, layer=self.layer, value=self.dissection)
        dissection_concept(job=job, layer=self.layer, value=self.concept)
        return entry, job


@dataclass(frozen=True, kw_only=True)
class GeneratorRemoveParams(_GeneratorEdit):
    """``generator_remove`` (Figure 4a-b): zero the concept's top ``ks`` units, measure its pixel share."""

    type: ClassVar[str] = Job.Type.GENERATOR_REMOVE
    ks: list[int] | None = param(
        None,
        low=1,
        label="k values",
        message="params.ks must be a list of unit counts (positive integers)",
        help="Numbers of units to remove (default 1, 2, 4, 8, 12, 16, 20, up to the layer's units).",
    )
    samples: int = _samples(200)
    seed: int = _seed(1)
    sample_images: int = param(8, low=0, high=64, label="Sample images", help="How many before/after samples to draw.")
    dissection: int | None = _dissection()
    batch_size: int = _batch_size(32)
    concepts: str | int = _concepts(form=False)

    def resolve(self, ctx: JobContext) -> Self:
        entry, job = self._resolve_edit(ctx)
        units = entry["units"]
        ks = self.ks if self.ks is not None else [k for k in DEFAULT_REMOVE_KS if k <= units]
        if not ks or not all(1 <= k <= units for k in ks):
            raise ApplicationError(f"params.ks must be a list of unit counts in 1..{units}")
        return dataclasses.replace(
            self, ks=sorted(set(ks)), dissection=job.pk, concepts=job.params.get("concepts", "colors")
        )


@dataclass(frozen=True, kw_only=True)
class GeneratorInsertParams(_GeneratorEdit):
    """``generator_insert`` (Figure 4d): set the concept's top ``k`` units at each position, count new pixels."""

    type: ClassVar[str] = Job.Type.GENERATOR_INSERT
    k: int | None = param(
        None,
        low=1,
        label="k (units)",
        help="How many of the concept's best units to set (default 20, or the layer's units).",
    )
    quantile: float = param(
        0.995,
        low=0.0,
        high=1.0,
        open_low=True,
        open_high=True,
        form_name="insert_quantile",
        label="Insertion quantile",
        message="params.quantile must be a number strictly between 0 and 1 (insertion value)",
        help="Each unit is set to this quantile of its activations (the reference code: 0.995).",
    )
    samples: int = _samples(32, high=10_000)
    seed: int = _seed(1)
    stride: int = param(1, low=1, help="Test every stride-th feature-map position.")
    size: int = param(1, low=1, help="Side of the square of positions set.")
    dissection: int | None = _dissection()
    batch_size: int = _batch_size(32)
    concepts: str | int = _concepts(form=False)

    def resolve(self, ctx: JobContext) -> Self:
        entry, job = self._resolve_edit(ctx)
        units, side = entry["units"], max(entry["height"], entry["width"])
        k = (
            min(20, units)
            if self.k is None
            else in_range(self.k, 1, units, f"params.k must be an integer in 1..{units}")
        )
        in_range(self.stride, 1, side, f"params.stride must be an integer in 1..{side}")
        in_range(self.size, 1, side, f"params.size must be an integer in 1..{side}")
        return dataclasses.replace(self, k=k, dissection=job.pk, concepts=job.params.get("concepts", "colors"))


PARAMS: tuple[type[JobParams], ...] = (
    DissectParams,
    GeneratorDissectParams,
    AblateParams,
    AttackParams,
    UnitClassifierParams,
    GeneratorRemoveParams,
    GeneratorInsertParams,
)


def params_class(*, type: str, kind: str) -> type[JobParams]:
    """The definition of a job type's params on a model kind (segmenters take the classifier's)."""
    wanted = GENERATOR if kind == NetworkModel.Kind.GENERATOR else CLASSIFIER
    matches = [cls for cls in PARAMS if cls.type == type]
    for cls in matches:
        if cls.kind == wanted:
            return cls
    if matches:
        return matches[0]
    raise ApplicationError(f"job type {type!r} is not available; available: {', '.join(Job.Type.values)}")


def param_fields(cls: type[JobParams]) -> list[tuple[dataclasses.Field, ParamMeta, Any]]:
    """(field, meta, type hint) of every parameter of a definition, in order."""
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata["param"], hints[f.name]) for f in dataclasses.fields(cls)]


def default_of(f: dataclasses.Field) -> Any:
    """A field's default now (settings read at call time); MISSING for a required one."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default
