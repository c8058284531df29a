"""The command line contract: python -m dissect_core {dissect,layers,make-synthetic,make-demo}."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dissect_core.__main__ import main
from dissect_core.archs import ARCHS
from dissect_core.models import list_layers, load_model
from dissect_core.synthetic import generate

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    generate(root / "data", n_images=12, seed=3, image_size=(32, 32))
    torch.manual_seed(0)
    net = ARCHS["scenecnn"](4)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "classifier.safetensors"))
    (root / "classifier.json").write_text(
        json.dumps(
            {
                "arch": "builtin:scenecnn",
                "num_classes": 4,
                "input_size": [32, 32],
                "mean": [0.5, 0.5, 0.5],
                "std": [0.25, 0.25, 0.25],
            }
        )
    )
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_dissect_writes_units_and_iou_csvs(workdir: Path) -> None:
    out = workdir / "out"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dissect_core",
            "dissect",
            "--model",
            "builtin:scenecnn",
            "--weights",
            str(workdir / "classifier.safetensors"),
            "--dataset",
            f"broden:{workdir / 'data'}",
            "--layer",
            "conv5",
            "--layer",
            "conv3",
            "--quantile",
            "0.99",
            "--batch-size",
            "5",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "forward" in proc.stderr and "count" in proc.stderr and "12/12" in proc.stderr
    from dissect_core.broden import BrodenDataset

    concepts = BrodenDataset(workdir / "data").concepts
    widths = {info.name: info.units for info in list_layers(load_model("builtin:scenecnn", num_classes=4))}
    for layer, units in (("conv5", widths["conv5"]), ("conv3", widths["conv3"])):
        rows = read_csv(out / layer / "units.csv")
        # the original columns keep their names and order; the label evidence follows them
        assert list(rows[0]) == [
            *("unit", "label", "category", "iou", "threshold", "iou_low", "iou_high", "stability"),
            *("runner_up", "runner_up_iou", "margin", "chance_iou", "p_value"),
        ]
        assert [int(r["unit"]) for r in rows] == list(range(units))
        assert all(0.0 <= float(r["iou"]) <= 1.0 and float(r["threshold"]) >= 0.0 for r in rows)
        for r in rows:
            if float(r["iou"]) > 0:
                assert float(r["iou_low"]) <= float(r["iou_high"]) and 0.0 <= float(r["stability"]) <= 1.0
                assert 0.0 <= float(r["p_value"]) <= 1.0 and r["runner_up"] != ""
            else:
                assert r["stability"] == r["p_value"] == ""
        pairs = read_csv(out / layer / "iou.csv")
        assert list(pairs[0]) == ["unit", "concept", "category", "iou", "iou_low", "iou_high"]
        assert len(pairs) == units * len(concepts)
        assert {(p["concept"], p["category"]) for p in pairs} == {(c.name, c.category) for c in concepts}
        best = {}
        for p in pairs:
            u = int(p["unit"])
            if float(p["iou"]) > best.get(u, ("", -1.0))[1]:
                best[u] = (p["concept"], float(p["iou"]))
        for r in rows:
            if float(r["iou"]) > 0:
                assert (r["label"], float(r["iou"])) == best[int(r["unit"])]
        assert json.loads((out / layer / "summary.json").read_text())["units"] == units


def test_layers_table(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "--model", "builtin:scenecnn", "--weights", str(workdir / "classifier.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "type", "units", "height", "width", "layout"]
    conv5 = next(line.split() for line in lines if line.startswith("conv5 "))
    assert conv5 == ["conv5", "Sequential", "128", "4", "4", "feature", "map", "4", "x", "4"]
    fc = next(line.split() for line in lines if line.startswith("fc "))
    assert fc[:5] == ["fc", "Linear", "4", "1", "1"] and "vector" in fc
    assert main(["layers", "--model", "torchvision:resnet18", "--num-classes", "3", "--input-size", "64"]) == 0
    assert any(
        line.split()[:5] == ["layer4", "Sequential", "512", "2", "2"] for line in capsys.readouterr().out.splitlines()
    )


def test_errors_are_one_line_and_exit_2(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = workdir / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(4, 128), "bogus.weight": torch.zeros(2)}, str(wrong))
    base = [
        "dissect",
        "--model",
        "builtin:scenecnn",
        "--dataset",
        f"broden:{workdir / 'data'}",
        "--out",
        str(workdir / "err"),
    ]
    assert main([*base, "--weights", str(wrong), "--layer", "conv5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "unexpected keys: bogus.weight" in err[0] and "missing keys: conv1.0.weight" in err[0]
    assert main([*base, "--weights", str(workdir / "classifier.safetensors"), "--layer", "conv9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown layer 'conv9'" in err[0] and "conv5" in err[0]
    assert (
        main(
            [
                "dissect",
                "--model",
                "builtin:scenecnn",
                "--weights",
                str(workdir / "classifier.safetensors"),
                "--dataset",
                f"broden:{workdir / 'absent'}",
                "--layer",
                "conv5",
                "--out",
                str(workdir / "e"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("error: ")
    assert not (workdir / "err").exists()


def test_make_synthetic_and_make_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["make-synthetic", "--out", str(tmp_path / "syn"), "--n", "6", "--seed", "2", "--image-size", "32"]) == 0
    )
    assert (tmp_path / "syn" / "index.csv").is_file()
    assert (
        main(["make-demo", "--out", str(tmp_path / "demo"), "--n-images", "40", "--epochs", "1", "--no-generator"]) == 0
    )
    config = json.loads((tmp_path / "demo" / "classifier.json").read_text())
    assert config["arch"] == "builtin:scenecnn" and (tmp_path / "demo" / "classifier.safetensors").is_file()
    assert "demo ready" in capsys.readouterr().out
    assert main(["make-demo", "--out", str(tmp_path / "demo0"), "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err and not (tmp_path / "demo0").exists()


def test_dissect_says_when_images_are_resized(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model loaded at another input size than the dataset's images: one line says they are resized
    (the reference code would feed them as they are); at the same size nothing is said."""
    base = [
        "dissect",
        "--model",
        "builtin:scenecnn",
        "--weights",
        str(workdir / "classifier.safetensors"),
        "--dataset",
        f"broden:{workdir / 'data'}",
        "--layer",
        "conv5",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main([*base, "--input-size", "48", "--out", str(workdir / "resized")]) == 0
    err = capsys.readouterr().err
    assert "note: images are 32 x 32 px; they are resized to the model's input size 48 x 48" in err
    assert main([*base, "--out", str(workdir / "same")]) == 0
    assert "resized" not in capsys.readouterr().err
