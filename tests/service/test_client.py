"""The Python client (client/netdissect_client) against the live service: a real HTTP server
(pytest-django's live_server) on the test database and a real worker; and the README's example."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.service]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def client(live_server, user):
    from netdissect_client import Client
    from rest_framework.authtoken.models import Token

    return Client(live_server.url, Token.objects.get_or_create(user=user)[0].key, timeout=30)


def test_register_submit_wait_and_read(client, celery_worker_process, scenes, demo_weights, capsys):
    from netdissect_client import ApiError, JobFailed

    weights, num_classes = demo_weights

    def register(**key):
        return client.register_model(
            name="c-scenecnn", arch="builtin:scenecnn", weights=weights, num_classes=num_classes, input_size=64, **key
        )

    model = register()
    again = register(idempotency_key="same-model")
    assert again["id"] != model["id"]  # a new key: a new model
    assert register(idempotency_key="same-model")["id"] == again["id"]  # the same key: the first answer
    dataset = client.register_dataset(name="c-scenes", format="synthetic", path=str(scenes))
    job = client.submit("dissect", model=model["id"], dataset=dataset["id"], params={"layers": ["conv5"]})
    done = client.wait(job["id"], poll=0.5, timeout=240)
    assert done["status"] == "succeeded"
    assert f"job {job['id']}" in capsys.readouterr().err  # the progress bar

    units = list(client.units(job=job["id"], page_size=7))  # several pages
    assert len(units) == 128 and len({u["id"] for u in units}) == 128
    assert [u["iou"] for u in units] == sorted((u["iou"] for u in units), reverse=True)
    concepts = list(client.concepts(limit=3, min_iou=0))
    assert sum(c["units"] for c in concepts) == sum(1 for u in units if u["label"])
    matrix = client.matrix(job["id"], "conv5")
    assert matrix.iou.shape == (128, dataset["concept_count"]) and matrix.iou_low is not None
    best = np.sort(matrix.iou.max(axis=1))[::-1]
    assert np.allclose(best, [u["iou"] for u in units], atol=1e-6)

    with pytest.raises(ApiError) as error:
        client.submit("dissect", model=model["id"], dataset=dataset["id"], params={"layers": ["nope"]})
    assert error.value.status == 400 and "nope" in error.value.message
    cancelled = client.submit("dissect", model=model["id"], dataset=dataset["id"])
    client.cancel(cancelled["id"])
    with pytest.raises(JobFailed):
        client.wait(cancelled["id"], poll=0.2, timeout=60, progress=False)


def test_verify_signature_matches_the_service(client):
    import time

    from netdissect_client import verify_signature

    from api.services.webhooks import sign

    secret = client.webhook_secret()
    body = b'{"id": 1, "status": "succeeded"}'
    header = sign(secret, int(time.time()), body)
    assert verify_signature(secret, header, body)
    assert not verify_signature(secret, header, body + b" ")
    assert not verify_signature(secret, sign(secret, int(time.time()) - 3600, body), body)
    assert not verify_signature(secret, "garbage", body)


def test_the_readme_example_runs(client, celery_worker_process, scenes, demo_weights, live_server, monkeypatch, capsys):
    weights, num_classes = demo_weights
    model = client.register_model(
        name="readme", arch="builtin:scenecnn", weights=weights, num_classes=num_classes, input_size=64
    )
    dataset = client.register_dataset(name="readme-scenes", format="synthetic", path=str(scenes))
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(import os\nfrom netdissect_client import Client\n.*?)```", readme, re.S).group(1)
    code = code.replace('"http://127.0.0.1:8000"', repr(live_server.url))
    code = code.replace("model=1, dataset=1", f"model={model['id']}, dataset={dataset['id']}")
    monkeypatch.setenv("NETDISSECT_TOKEN", client.token)
    space: dict = {}
    exec(compile(code, "README.md", "exec"), space)
    assert space["job"]["status"] == "succeeded"
    assert space["matrix"].iou.shape[0] == 128
