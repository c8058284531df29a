from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from netdissect_client import ApiError, Client

from api import services
from api.launch import ServiceProcesses


class Command(BaseCommand):
    help = (
        "The demo: make synthetic scenes, train the demo classifier (once), serve the API and a worker, "
        "register both, run a dissection job through the queue, print a summary, keep serving until Ctrl-C."
    )

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
        parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", 1)))
        parser.add_argument("--no-serve", action="store_true", help="exit after the summary")
        parser.add_argument(
            "--no-generator",
            action="store_true",
            help="skip the generator half (GAN and segmenter training, removal and insertion jobs)",
        )

    def handle(self, *args, port: int, workers: int, no_serve: bool, no_generator: bool = False, **options):
        call_command("migrate", interactive=False, verbosity=0)
        token = self._demo_user()
        demo_dir = settings.DATA_ROOTS[0] / "demo"
        self._make_demo(demo_dir, generator=not no_generator)
        procs = ServiceProcesses(port=port, workers=workers, log_dir=settings.VAR_DIR / "logs")
        with procs.running(self.stdout.write):
            base = f"http://127.0.0.1:{port}"
            client = _Client(base, token)
            job = self._run_job(client, demo_dir)
            self._summary(client, job)
            self._ablation_demo(client, job, base)
            if not no_generator:
                self._generator_demo(client, demo_dir)
            self.stdout.write(f"dashboard: {base}/  (user demo, password demo)")
            self.stdout.write(f"API token: {token}")
            if no_serve:
                return
            self.stdout.write(
                f"serving at {base}/ with {workers} worker(s); logs in {settings.VAR_DIR / 'logs'}. Ctrl-C stops."
            )
            procs.wait()

    def _demo_user(self) -> str:
        users = get_user_model()
        user, created = users.objects.get_or_create(username="demo", defaults={"email": "demo@example.com"})
        if created:
            user.set_password("demo")
            user.save()
        token = services.token_get_or_create(user=user)
        self.stdout.write(f"demo user: demo / demo, API token {token}")
        return token

    def _make_demo(self, demo_dir: Path, *, generator: bool) -> None:
        what = "classifier, GAN and segmenter" if generator else "classifier"
        self.stdout.write(f"demo data, {what} in {demo_dir} (made once, then reused)")
        args = [sys.executable, "-m", "dissect_core", "make-demo", "--out", str(demo_dir)]
        if not generator:
            args.append("--no-generator")
        done = subprocess.run(args)
        if done.returncode != 0:
            raise CommandError("making the demo data or training the demo classifier failed (see above)")

    def _run_job(self, client: _Client, demo_dir: Path) -> dict:
        meta = json.loads((demo_dir / "classifier.json").read_text())
        model = client.find("models", "demo-scenecnn") or client.post(
            "/api/models/",
            {
                "name": "demo-scenecnn",
                "arch": meta["arch"],
                "num_classes": meta["num_classes"],
                "input_size": meta["input_size"][0] if isinstance(meta["input_size"], list) else meta["input_size"],
                "mean": meta["mean"],
                "std": meta["std"],
                "classes": meta.get("classes", []),
                "weights_path": str(demo_dir / "classifier.safetensors"),
                "public": True,
            },
        )
        dataset = client.find("datasets", "demo-scenes") or client.post(
            "/api/datasets/",
            {"name": "demo-scenes", "format": "synthetic", "path": str(demo_dir / "data"), "public": True},
        )
        # The blocks' outputs (Conv -> BatchNorm -> ReLU), rectified like VGG's conv5_3: conv4 and conv5.
        layer = meta.get("layer", "conv5")
        names = [entry["name"] for entry in model["layers"]]
        layers = [name for name in ("conv4", layer) if name in names]
        job = client.post(
            "/api/jobs/",
            {"type": "dissect", "model": model["id"], "dataset": dataset["id"], "params": {"layers": layers}},
        )
        self.stdout.write(
            f"job {job['id']} submitted: dissect {', '.join(layers)} of {model['name']} on {dataset['name']} ({dataset['image_count']} images)"
        )
        return self._wait(client, job)

    def _wait(self, client: _Client, job: dict) -> dict:
        while job["status"] in ("queued", "running"):
            time.sleep(1.0)
            job = client.get(f"/api/jobs/{job['id']}/")
            bar = "#" * int(30 * job["progress"])
            eta = f"{job['eta_seconds']:.0f} s left" if job.get("eta_seconds") is not None else ""
            self.stdout.write(
                f"\r[{bar:<30}] {job['progress'] * 100:5.1f}% {job['status']:<9} {job['phase']:<10} {eta:<14}",
                ending="",
            )
            self.stdout.flush()
        self.stdout.write("")
        if job["status"] != "succeeded":
            raise CommandError(f"job {job['id']} ended {job['status']}: {job['error']}")
        return job

    def _ablation_demo(self, client: _Client, dissection: dict, base: str) -> None:
        """Figure 2d on the demo classifier: remove each class's most important units, or all but those."""
        layer = dissection["params"]["layers"][-1]
        job = client.post(
            "/api/jobs/",
            {
                "type": "ablate",
                "model": dissection["model"],
                "dataset": dissection["dataset"],
                "params": {"layer": layer},
            },
        )
        self.stdout.write(f"job {job['id']} submitted: ablate {layer} (each unit alone on train, sets on val)")
        job = self._wait(client, job)
        s = job["summary"]["sets_k20"]
        self.stdout.write(
            f"job {job['id']} succeeded in {job_seconds(job):.1f} s: mean balanced accuracy over {s['classes']} "
            f"classes {s['baseline']:.3f}; {s['k']} most important units removed {s['removed_top']:.3f}; all but "
            f"those {s['k']} removed {s['kept_top']:.3f} (chance 0.5); curves at {base}/jobs/{job['id']}/"
        )

    def _generator_demo(self, client: _Client, demo_dir: Path) -> None:
        """Figures 3-4 on the demo GAN: dissect a layer, remove and insert a concept's units."""
        gen_meta = json.loads((demo_dir / "generator.json").read_text())
        seg_meta = json.loads((demo_dir / "segmenter.json").read_text())
        segmenter = client.find("models", "demo-segnet") or client.post(
            "/api/models/",
            {
                "name": "demo-segnet",
                "arch": seg_meta["arch"],
                "kind": "segmenter",
                "classes": seg_meta["labels"],
                "categories": seg_meta["categories"],
                "input_size": seg_meta["input_size"][0],
                "mean": seg_meta["mean"],
                "std": seg_meta["std"],
                "public": True,
                "weights_path": str(demo_dir / "segmenter.safetensors"),
            },
        )
        generator = client.find("models", "demo-dcgan") or client.post(
            "/api/models/",
            {
                "name": "demo-dcgan",
                "arch": gen_meta["arch"],
                "kind": "generator",
                "latent_dim": gen_meta["latent_dim"],
                "output_range": gen_meta["output_range"],
                "public": True,
                "weights_path": str(demo_dir / "generator.safetensors"),
            },
        )
        layer = gen_meta.get("layer", "layer3")
        job = client.post(
            "/api/jobs/",
            {
                "type": "dissect",
                "model": generator["id"],
                "params": {"layers": [layer], "samples": 1000, "concepts": segmenter["id"]},
            },
        )
        self.stdout.write(
            f"job {job['id']} submitted: dissect {layer} of {generator['name']} on 1000 generated "
            f"images labelled by {segmenter['name']}"
        )
        job = self._wait(client, job)
        units = client.get(f"/api/units/?job={job['id']}&page_size=1000")["results"]
        counts = Counter(u["label"] for u in units if u["iou"] >= 0.04 and u["label"])
        self.stdout.write(
            f"job {job['id']} succeeded in {job_seconds(job):.1f} s: "
            + (", ".join(f"{c} x{n}" for c, n in counts.most_common(8)) or "no detectors")
        )
        concept = "tree" if "tree" in counts else (counts.most_common(1)[0][0] if counts else None)
        if concept is None:
            return
        remove = self._wait(
            client,
            client.post(
                "/api/jobs/",
                {"type": "generator_remove", "model": generator["id"], "params": {"layer": layer, "concept": concept}},
            ),
        )
        summary = remove["summary"]
        self.stdout.write(
            f"removal (job {remove['id']}): {concept} covers {100 * summary['baseline']:.1f}% of the "
            f"pixels of {summary['samples']} samples"
        )
        for row in summary["curve"]:
            self.stdout.write(
                f"  remove top {row['k']:>3} {concept} units: {100 * row['share']:5.1f}% ({100 * row['change']:+.1f}%)"
            )
        insert = self._wait(
            client,
            client.post(
                "/api/jobs/",
                {"type": "generator_insert", "model": generator["id"], "params": {"layer": layer, "concept": concept}},
            ),
        )
        best = insert["summary"]["best"]
        self.stdout.write(
            f"insertion (job {insert['id']}): setting the top {len(insert['summary']['units'])} "
            f"{concept} units high adds {100 * insert['summary']['mean_added']:.2f}% {concept} "
            f"pixels on average; best position ({best['y']}, {best['x']}): "
            f"{100 * best['added']:.2f}%"
        )

    def _summary(self, client: _Client, job: dict) -> None:
        units = client.get(f"/api/units/?job={job['id']}&page_size=1000")["results"]
        seconds = job_seconds(job)
        self.stdout.write(f"job {job['id']} succeeded in {seconds:.1f} s: {len(units)} units dissected")
        for layer in job["params"]["layers"]:
            in_layer = [u for u in units if u["layer"] == layer]
            detectors = [u for u in in_layer if u["iou"] >= 0.04]
            per_cat = Counter(u["category"] for u in detectors)
            cats = ", ".join(f"{c}: {n}" for c, n in per_cat.most_common()) or "none"
            self.stdout.write(f"  {layer}: {len(detectors)}/{len(in_layer)} units labelled (IoU >= 0.04); {cats}")
            for u in in_layer[:5]:
                self.stdout.write(
                    f"    unit {u['unit']:>4}  {u['label'] or '-':<18} {u['category'] or '':<9} IoU {u['iou']:.3f}"
                )


def job_seconds(job: dict) -> float:
    from datetime import datetime

    if not job.get("started") or not job.get("finished"):
        return 0.0
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(job["finished"]) - parse(job["started"])).total_seconds()


class _Client(Client):
    """The demo's calls, through the Python client (client/netdissect_client); an error answer
    stops the demo with it."""

    def __init__(self, base: str, token: str) -> None:
        super().__init__(base, token, timeout=600)

    def _request(self, method: str, path: str, **kwargs):
        try:
            return super()._request(method, path, **kwargs)
        except ApiError as exc:
            raise CommandError(f"{method} {path} answered {exc.status}: {exc.message}") from exc

    def find(self, resource: str, name: str) -> dict | None:
        rows = self.get(f"/api/{resource}/?limit=500")["results"]
        return next((row for row in rows if row["name"] == name), None)
