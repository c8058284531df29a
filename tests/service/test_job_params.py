"""Job parameters come from one definition per job type (api/job_params): the API checks with
it, the schema documents it, the dashboard form is built from it, the worker reads it typed."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def rows(user):
    """A classifier with two layers, a dataset with classes, and a generator (rows made directly)."""
    from api.models import Dataset, NetworkModel

    layers = [
        {"name": "conv4", "type": "Conv2d", "units": 8, "height": 8, "width": 8},
        {"name": "conv5", "type": "Conv2d", "units": 8, "height": 4, "width": 4},
    ]
    model = NetworkModel.objects.create(owner=user, name="m", arch="builtin:scenecnn", weights_path="/x", layers=layers)
    dataset = Dataset.objects.create(owner=user, name="d", format="broden", path="/y", classes=["a", "b"])
    generator = NetworkModel.objects.create(
        owner=user, name="g", arch="builtin:dcgan", kind="generator", weights_path="/x", latent_dim=16, layers=layers
    )
    return model, dataset, generator


def _post(api, model, dataset, type_, params):
    payload = {"type": type_, "model": model.pk, "params": params}
    if dataset is not None:
        payload["dataset"] = dataset.pk
    return api.post("/api/jobs/", payload, format="json")


# ----------------------------------------------------------------------------- one definition


def test_the_schema_lists_every_job_types_parameters(api):
    from api.job_params import PARAMS
    from api.job_params.definitions import default_of
    from api.models import Job

    schema = api.get("/api/schema/?format=json").json()
    components = schema["components"]["schemas"]

    def resolve(node):
        if "allOf" in node and len(node["allOf"]) == 1:
            return resolve(node["allOf"][0])
        return components[node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else node

    request = components["JobCreateRequest"]
    assert set(request["discriminator"]["mapping"]) == set(Job.Type.values)
    for job_type, ref in request["discriminator"]["mapping"].items():
        variant = components[ref.rsplit("/", 1)[-1]]
        params = resolve(variant["properties"]["params"])
        documented = [resolve(option) for option in params.get("oneOf", [params])]
        definitions = [cls for cls in PARAMS if cls.type == job_type]
        assert len(documented) == len(definitions), job_type
        for cls, doc in zip(definitions, documented, strict=True):
            assert list(doc["properties"]) == [f.name for f in dataclasses.fields(cls)], cls.__name__
            for f in dataclasses.fields(cls):
                meta, prop = f.metadata["param"], doc["properties"][f.name]
                assert prop["description"].startswith(meta.help), (cls.__name__, f.name)
                default = default_of(f)
                if default is dataclasses.MISSING:
                    assert f.name in doc["required"], (cls.__name__, f.name)
                elif default is not None:
                    assert prop["default"] == default, (cls.__name__, f.name)
                if meta.low is not None and "type" in prop and prop["type"] in ("integer", "number"):
                    assert prop["minimum"] == meta.low, (cls.__name__, f.name)
    assert components["DissectParamsRequest"]["properties"]["quantile"]["default"] == 0.99
    assert components["AblateParamsRequest"]["properties"]["batch_size"]["maximum"] == 1024


def test_the_form_fields_come_from_the_same_definition(user):
    from api.dashboard.forms import JobForm, job_form_layout
    from api.job_params import PARAMS

    form = JobForm(user=user)
    layout = job_form_layout()
    for cls in PARAMS:
        shown = [f for f in dataclasses.fields(cls) if f.metadata["param"].form]
        names = [f.metadata["param"].form_name or f.name for f in shown]
        assert layout[cls.type][cls.kind] == names, cls.__name__
        for f, name in zip(shown, names, strict=True):
            meta = f.metadata["param"]
            field = form.fields[name]
            assert meta.help in str(field.help_text), (cls.__name__, f.name)
            if meta.low is not None and hasattr(field, "min_value"):
                assert field.min_value == meta.low, (cls.__name__, f.name)
    hidden = {f.name for cls in PARAMS for f in dataclasses.fields(cls) if not f.metadata["param"].form}
    assert "batch_size" in hidden and "batch_size" not in form.fields
    assert form.fields["insert_quantile"].help_text.startswith("Each unit is set to this quantile")


def test_the_worker_reads_what_the_api_stored_typed(api, rows, settings):
    from api.job_params import AblateParams, DissectParams, params_of
    from api.models import Job

    model, dataset, _ = rows
    response = _post(api, model, dataset, "dissect", {"layers": ["conv5"], "top_k_images": 0})
    assert response.status_code == 202, response.json()
    job = Job.objects.get(pk=response.json()["id"])
    assert job.params == {
        "layers": ["conv5"],
        "quantile": 0.99,
        "batch_size": settings.DISSECT_BATCH_SIZE,
        "top_k_images": 0,
        "evidence_blocks": 16,
        "resamples": 1000,
        "evidence_seed": 0,
    }
    params = params_of(job, DissectParams)
    assert (params.layers, params.quantile, params.top_k_images) == (["conv5"], 0.99, 0)
    settings.JOB_SHARD_SIZE = 123
    assert params_of(job).shard_size == 123  # a knob that was not given: the worker's setting
    with pytest.raises(TypeError, match="not AblateParams"):
        params_of(job, AblateParams)


# ----------------------------------------------------------------------------- disagreements that are gone


@pytest.mark.parametrize(
    ("type_", "params", "field"),
    [
        ("dissect", {"batch_size": True}, "batch_size"),
        ("dissect", {"max_images": True}, "max_images"),
        ("dissect", {"top_k_images": False}, "top_k_images"),
        ("dissect", {"quantile": True}, "quantile"),
        ("dissect", {"batch_size": "8"}, "batch_size"),
        ("dissect", {"batch_size": 8.0}, "batch_size"),
        ("ablate", {"layer": "conv5", "batch_size": True}, "batch_size"),
        ("ablate", {"layer": "conv5", "ks": [True]}, "ks"),
        ("attack", {"layer": "conv5", "iterations": True}, "iterations"),
        ("unit_classifier", {"layer": "conv5", "unit": True, "concept": "x"}, "unit"),
        ("unit_classifier", {"layer": 5, "unit": 1, "concept": "x"}, "layer"),
    ],
)
def test_a_json_boolean_or_string_is_never_a_number(api, rows, type_, params, field):
    from api.models import Job

    model, dataset, _ = rows
    response = _post(api, model, dataset, type_, params)
    assert response.status_code == 400, response.json()
    assert f"params.{field}" in response.json()["message"], response.json()
    assert Job.objects.count() == 0


def test_generator_dissections_default_their_batch_size_from_the_setting(api, rows, settings):
    from api.job_params import params_of
    from api.models import Job

    _, _, generator = rows
    settings.DISSECT_BATCH_SIZE = 7
    response = _post(api, generator, None, "dissect", {"layers": ["conv5"]})
    assert response.status_code == 202, response.json()
    job = Job.objects.get(pk=response.json()["id"])
    assert job.params["batch_size"] == 7 and params_of(job).batch_size == 7
    old = Job.objects.create(
        owner=job.owner, type="dissect", model=generator, params={"layers": ["conv5"], "samples": 10}
    )
    assert params_of(old).batch_size == 7  # a row stored without it: the same default, not 32


def test_every_default_is_defined_once(api, rows):
    """The service stores the definition's defaults; the form shows them; the worker reads them."""
    from api.dashboard.forms import JobForm
    from api.job_params import AttackParams, DissectParams
    from api.models import Job

    model, dataset, _ = rows
    quantile = next(f for f in dataclasses.fields(DissectParams) if f.name == "quantile").default
    response = _post(api, model, dataset, "dissect", {})
    assert Job.objects.get(pk=response.json()["id"]).params["quantile"] == quantile
    assert JobForm(user=model.owner).fields["quantile"].help_text.endswith(f"Default: {quantile:g}.")
    eps = next(f for f in dataclasses.fields(AttackParams) if f.name == "eps").default
    assert eps == pytest.approx(8 / 255)


def test_workers_read_no_raw_params_and_api_never_imports_workers():
    for path in sorted((ROOT / "workers").glob("*.py")):
        text = path.read_text()
        assert "params.get(" not in text and "job.params" not in text, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                receiver = ast.unparse(node.func.value)
                assert "params" not in receiver, (path.name, ast.unparse(node))
    for path in sorted((ROOT / "api").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "workers" or n.startswith("workers.") for n in names), path


@pytest.mark.parametrize(
    ("on", "type_", "params", "field"),
    [
        ("classifier", "attack", {"layer": "conv5", "ablation_job": 2**70}, "ablation_job"),
        ("generator", "dissect", {"layers": ["conv5"], "concepts": 2**70}, "concepts"),
        ("generator", "generator_remove", {"layer": "conv5", "concept": "red-c", "dissection": 2**70}, "dissection"),
    ],
)
def test_ids_beyond_a_bigint_are_bad_input(api, rows, on, type_, params, field):
    model, dataset, generator = rows
    if on == "generator":
        model, dataset = generator, None
    response = _post(api, model, dataset, type_, params)
    assert response.status_code == 400, response.json()
    assert f"params.{field}" in response.json()["message"], response.json()
