"""Hostile input over HTTP: schemathesis on our own schema, pickles with code, weights that do not
fit, hostile archives and bombs, images over the pixel limit, paths outside DATA_ROOTS, huge
JSON and numbers, and another user's ids.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

from bench.campaign.harness import Harness
from bench.campaign.stack import BIN

PIXEL_BOMB = (9000, 9000)  # 81 M pixels, over dissect_core.broden.MAX_IMAGE_PIXELS (2**26)


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def _error_shape(response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and set(body) == {"message", "extra"}


def _brief(response) -> str:
    if response is None:
        return "no answer"
    try:
        message = response.json().get("message", "")
    except (ValueError, AttributeError):
        message = response.text[:60]
    return f"{response.status_code} {message[:60]!r}" if message else str(response.status_code)


def run(h: Harness) -> None:
    _schemathesis(h)
    _pickles(h)
    _weights(h)
    _archives(h)
    _bombs(h)
    _pixels(h)
    _paths(h)
    _huge(h)
    _other_users(h)


# ---------------------------------------------------------------------- schemathesis


def _schemathesis(h: Harness) -> None:
    o = h.options
    report = h.top / "schemathesis"
    shutil.rmtree(report, ignore_errors=True)
    checks = "not_a_server_error,response_schema_conformance,content_type_conformance"
    command = [
        str(BIN / "st"),
        "run",
        f"{h.service.base}/api/schema/?format=json",
        "-H",
        f"Authorization: Token {h.tokens['alice']}",
        "--checks",
        checks,
        "--max-examples",
        str(o.schemathesis_examples),
        "--seed",
        str(o.seed),
        "--workers",
        "2",
        "--request-timeout",
        "60",
        "--phases",
        "examples,coverage,fuzzing",
        "--report",
        "junit",
        "--report-dir",
        str(report),
        "--no-color",
    ]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=h.top)
    took = time.monotonic() - started
    (h.logs / "schemathesis.log").write_text(done.stdout + done.stderr)
    summary = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    tail = next(
        (line for line in reversed(summary) if "passed" in line or "failed" in line or "error" in line),
        summary[-1] if summary else done.stderr.strip()[-200:],
    )
    cases = _junit_counts(report)
    h.add(
        "schemathesis on our OpenAPI schema",
        f"st run on /api/schema/ as alice, checks {checks}, {o.schemathesis_examples} examples per operation, "
        f"seed {o.seed} ({took:.0f} s; log var/campaign/logs/schemathesis.log)",
        "no 5xx; every answer matches its documented status, body schema and content type",
        f"{cases}; {tail[:160]}",
        done.returncode == 0,
    )


def _junit_counts(report: Path) -> str:
    import xml.etree.ElementTree as ET

    files = list(report.rglob("*.xml"))
    if not files:
        return "no report"
    tests = failures = errors = 0
    for path in files:
        root = ET.parse(path).getroot()
        for suite in root.iter("testsuite"):
            tests += int(suite.get("tests", 0))
            failures += int(suite.get("failures", 0))
            errors += int(suite.get("errors", 0))
    return f"{tests} operations tested, {failures} failed, {errors} errors"


# ---------------------------------------------------------------------- model files


class _OpenFile:
    """Unpickling this calls open(path, "w"), which creates the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _System:
    """Unpickling this runs a shell command that creates the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _register(
    h: Harness,
    user: str,
    *,
    name: str,
    data: bytes | None = None,
    filename: str = "w.safetensors",
    path: str | None = None,
    **fields,
):
    api = h.client(user)
    body = {"name": name, "arch": "builtin:scenecnn", "num_classes": 6, "input_size": 64, **fields}
    if path is not None:
        return api.post("POST /api/models/", "/api/models/", json={**body, "weights_path": path})
    return api.post(
        "POST /api/models/",
        "/api/models/",
        data={k: str(v) for k, v in body.items()},
        files={"weights": (filename, data)},
    )


def _in_parallel(h: Harness, name: str, cases: list[tuple[str, dict]]) -> list[tuple[str, object]]:
    """Register every case's weights, three at a time (each is checked in a subprocess)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        futures = [(what, pool.submit(_register, h, "alice", name=name, **kw)) for what, kw in cases]
        return [(what, future.result()) for what, future in futures]


def _pickles(h: Harness) -> None:
    import torch

    markers = []
    cases = []
    for i, (container, payload_cls) in enumerate(
        [("pickle", _OpenFile), ("pickle", _System), ("torch.save", _OpenFile), ("torch.save", _System)]
    ):
        marker = h.outside / f"pwned-{i}"
        markers.append(marker)
        payload = {"conv1.0.weight": payload_cls(marker)}
        if container == "pickle":
            data = pickle.dumps(payload, protocol=2)
        else:
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            data = buffer.getvalue()
        cases.append(
            (f"{container} {payload_cls.__name__.strip('_')} upload .pt", {"data": data, "filename": "evil.pt"})
        )
        if i == 2:
            on_disk = h.data / "evil.pth"
            on_disk.write_bytes(data)
            cases.append(("torch.save OpenFile by weights_path", {"path": str(on_disk)}))
            cases.append(
                (
                    "torch.save OpenFile as a TorchScript archive",
                    {"data": data, "filename": "evil.pt", "arch": "torchscript"},
                )
            )
    answers = _in_parallel(h, "evil", cases)
    made = [m.name for m in markers if m.exists()]
    bad = [f"{w}: {_brief(r)}" for w, r in answers if r is None or r.status_code != 400 or not _error_shape(r)]
    h.add(
        "hostile: pickles with code",
        f"{len(cases)} model registrations whose weights are pickles that would create a file when unpickled "
        "(builtins.open, os.system; plain pickle and torch.save; upload, weights_path, as TorchScript)",
        "400 with the error shape for each; no file created",
        f"{len(cases) - len(bad)} of {len(cases)} refused with 400 (e.g. {_brief(answers[0][1])}); "
        f"files created: {made or 'none'}" + (f"; {bad[:2]}" if bad else ""),
        not bad and not made,
    )


def _weights(h: Harness) -> None:
    import torch
    import torchvision
    from safetensors.torch import save

    from dissect_core.archs import ARCHS
    from dissect_core.gan import build_generator

    scenecnn = {k: v.contiguous() for k, v in ARCHS["scenecnn"](num_classes=6).state_dict().items()}
    good = save(scenecnn)
    buffer = io.BytesIO()
    torch.save(scenecnn, buffer)
    pt = buffer.getvalue()
    resnet = save({k: v.contiguous() for k, v in torchvision.models.resnet18(num_classes=6).state_dict().items()})
    gan = save({k: v.contiguous() for k, v in build_generator("dcgan", latent_dim=16).state_dict().items()})
    cases = [
        ("truncated safetensors", {"data": good[: len(good) // 2]}),
        ("safetensors cut in its header", {"data": good[:40]}),
        ("truncated torch .pt", {"data": pt[: len(pt) // 2], "filename": "w.pt"}),
        ("random bytes as .safetensors", {"data": os.urandom(4096)}),
        ("resnet18 weights as builtin:scenecnn", {"data": resnet}),
        ("scenecnn weights with num_classes 10", {"data": good, "num_classes": 10}),
        ("dcgan generator weights as a classifier", {"data": gan}),
        ("scenecnn weights as torchvision:resnet18", {"data": good, "arch": "torchvision:resnet18"}),
    ]
    answers = _in_parallel(h, "bad-weights", cases)
    bad = [f"{w}: {_brief(r)}" for w, r in answers if r is None or r.status_code != 400 or not _error_shape(r)]
    h.add(
        "hostile: truncated weights and weights of another architecture",
        "; ".join(w for w, _ in cases),
        "400 with a message naming the problem, for each",
        "; ".join(f"{w}: {_brief(r)}" for w, r in answers[:1] + answers[4:5])
        + f"; {len(cases) - len(bad)} of {len(cases)} refused with 400"
        + (f"; {bad[:2]}" if bad else ""),
        not bad,
    )


# ---------------------------------------------------------------------- archives


def _zip(members: list[tuple[str, bytes]], *, symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, target)
    return buffer.getvalue()


def _tar(add, mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        add(tf)
    return buffer.getvalue()


def _tar_member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = ""):
    def add(tf: tarfile.TarFile) -> None:
        tf.addfile(_info("images/a.png", len(_PNG)), io.BytesIO(_PNG))
        info = _info(name, len(data) if kind == tarfile.REGTYPE else 0)
        info.type = kind
        info.linkname = link
        tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    return add


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info


def _png_bytes(width: int, height: int) -> bytes:
    """A valid all-black 1-bit greyscale PNG: a few KB even at 9000 x 9000."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


_PNG = _png_bytes(16, 16)


def _post_archive(h: Harness, name: str, data: bytes, fmt: str = "imagefolder"):
    return h.client("alice").post(
        "POST /api/datasets/",
        "/api/datasets/",
        data={"name": "hostile", "format": fmt, "concepts": "colors"},
        files={"archive": (name, data)},
    )


def _archives(h: Harness) -> None:
    tag = f"escape-{h.options.seed}"
    absolute = Path("/tmp") / f"{tag}-abs.txt"
    absolute.unlink(missing_ok=True)
    ok = [("images/a.png", _PNG)]
    cases = [
        ("zip ../", "evil.zip", _zip([*ok, (f"../{tag}.txt", b"x")])),
        ("zip a/../../", "evil.zip", _zip([*ok, (f"images/../../{tag}.txt", b"x")])),
        ("zip absolute", "evil.zip", _zip([*ok, (str(absolute), b"x")])),
        ("zip symlink", "evil.zip", _zip(ok, symlinks={"images/b.png": "/etc/passwd"})),
        ("tar ../", "evil.tar.gz", _tar(_tar_member(f"../{tag}.txt"))),
        ("tar absolute", "evil.tar.gz", _tar(_tar_member(str(absolute)))),
        ("tar symlink", "evil.tar", _tar(_tar_member("images/b.png", kind=tarfile.SYMTYPE, link="/etc/passwd"), "w")),
        ("tar hard link", "evil.tar.gz", _tar(_tar_member("images/c.png", kind=tarfile.LNKTYPE, link="/etc/passwd"))),
        ("tar device node", "evil.tar.gz", _tar(_tar_member("images/dev", kind=tarfile.CHRTYPE))),
        ("tar fifo", "evil.tar.gz", _tar(_tar_member("images/fifo", kind=tarfile.FIFOTYPE))),
    ]
    media = Path(h.media.path)
    before = _files_under(media / "uploads")
    answers = [(what, _post_archive(h, name, data)) for what, name, data in cases]
    escaped = [str(p) for p in ([*list(h.top.rglob(f"{tag}*")), absolute]) if p.exists()]
    left = _files_under(media / "uploads") - before
    bad = [f"{w}: {_brief(r)}" for w, r in answers if r is None or r.status_code != 400 or not _error_shape(r)]
    h.add(
        "hostile: archives with .., absolute paths and links",
        "dataset uploads: " + ", ".join(w for w, _ in answers),
        "400 with the error shape for each; nothing written outside the upload, nothing left under media/uploads",
        f"{len(cases) - len(bad)} of {len(cases)} refused with 400 (e.g. {_brief(answers[0][1])}, "
        f"{_brief(answers[3][1])}); escaped files: {escaped or 'none'}; files left: {len(left)}"
        + (f"; {bad[:2]}" if bad else ""),
        not bad and not escaped and not left,
    )


def _zip_bomb(size: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("images/zeros.png", "w", force_zip64=True) as out:
            block = b"\0" * (1 << 22)
            for _ in range(size // len(block)):
                out.write(block)
        zf.writestr("images/a.png", _PNG)
    return buffer.getvalue()


def _tar_bomb(size: int) -> bytes:
    class Zeros(io.RawIOBase):
        def __init__(self, n: int) -> None:
            self.left = n

        def readinto(self, b) -> int:
            n = min(len(b), self.left)
            b[:n] = b"\0" * n
            self.left -= n
            return n

    def add(tf: tarfile.TarFile) -> None:
        tf.addfile(_info("images/a.png", len(_PNG)), io.BytesIO(_PNG))
        tf.addfile(_info("images/zeros.bin", size), Zeros(size))

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=9) as tf:
        add(tf)
    return buffer.getvalue()


def _lying_zip() -> bytes:
    """A member whose headers say 100 bytes while its data inflates to 50 MB."""
    data = _zip([("images/a.png", _PNG), ("images/big.bin", b"\0" * (50 << 20))])
    raw = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo("images/big.bin")
    fake = struct.pack("<I", 100)
    raw[info.header_offset + 22 : info.header_offset + 26] = fake  # local header: uncompressed size
    start = 0
    while (central := raw.find(b"PK\x01\x02", start)) >= 0:  # central directory entries
        name_len = struct.unpack("<H", raw[central + 28 : central + 30])[0]
        if raw[central + 46 : central + 46 + name_len] == b"images/big.bin":
            raw[central + 24 : central + 28] = fake
        start = central + 4
    return bytes(raw)


def _many_members(n: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(n):
            zf.writestr(f"images/{i}", b"")
    return buffer.getvalue()


def _bombs(h: Harness) -> None:
    from api.storage import MAX_ARCHIVE_MEMBERS

    truncated = _tar(_tar_member("images/b.png", _PNG * 50))
    cases = [
        ("zip bomb (300 MB of zeros)", "bomb.zip", _zip_bomb(300 << 20)),
        ("tar.gz bomb (300 MB of zeros)", "bomb.tar.gz", _tar_bomb(300 << 20)),
        ("zip whose headers lie about the size (100 B said, 50 MB inside)", "liar.zip", _lying_zip()),
        (f"zip of {MAX_ARCHIVE_MEMBERS + 1:,} empty members", "many.zip", _many_members(MAX_ARCHIVE_MEMBERS + 1)),
        ("truncated tar.gz", "cut.tar.gz", truncated[: len(truncated) * 2 // 3]),
        ("truncated zip", "cut.zip", _zip([("images/a.png", _PNG * 20)])[:-30]),
    ]
    media = Path(h.media.path)
    before = _files_under(media / "uploads")
    answers = []
    for what, name, data in cases:
        started = time.monotonic()
        response = _post_archive(h, name, data)
        answers.append((what, len(data), response, time.monotonic() - started))
    left = _files_under(media / "uploads") - before
    bad = [f"{w}: {_brief(r)}" for w, _, r, _ in answers if r is None or r.status_code != 400 or not _error_shape(r)]
    h.add(
        "hostile: archive bombs and broken archives",
        "dataset uploads: " + "; ".join(f"{w} ({n / 1024:.0f} KB)" for w, n, _, _ in answers),
        "400 with the error shape for each, before anything large is written; nothing left under media/uploads",
        "; ".join(f"{w.split(' (')[0]}: {_brief(r)} in {t:.1f} s" for w, _, r, t in answers[:3])
        + f"; {len(cases) - len(bad)} of {len(cases)} refused with 400; files left: {len(left)}"
        + (f"; {bad[:3]}" if bad else ""),
        not bad and not left,
    )


# ---------------------------------------------------------------------- pixels


def _pixels(h: Harness) -> None:
    api = h.client("alice")
    bomb = _png_bytes(*PIXEL_BOMB)
    upload = _post_archive(h, "pixels.zip", _zip([("images/a.png", _PNG), ("images/b.png", bomb)]))
    folder = h.data / "pixel-bomb"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "a.png").write_bytes(_PNG)
    (folder / "images" / "b.png").write_bytes(bomb)
    by_path = api.post(
        "POST /api/datasets/",
        "/api/datasets/",
        json={"name": "bomb", "format": "imagefolder", "path": str(folder), "concepts": "colors"},
    )
    # A dataset that was fine when registered, whose image is swapped for a bomb before a job reads it.
    swap = h.data / "swapped"
    shutil.copytree(h.data / "scenes-24", swap)
    registered = api.post(
        "POST /api/datasets/", "/api/datasets/", json={"name": "swapped", "format": "synthetic", "path": str(swap)}
    )
    job = {"status": "not submitted", "error": ""}
    if registered is not None and registered.status_code == 201:
        first = sorted((swap / "images").glob("*.jpg")) or sorted((swap / "images").glob("*.png"))
        first[0].write_bytes(bomb)
        response = api.post(
            "POST /api/jobs/",
            "/api/jobs/",
            json={
                "type": "dissect",
                "model": h.fixtures.model["alice"]["id"],
                "dataset": registered.json()["id"],
                "params": {"layers": ["conv5.0"], "top_k_images": 3},
            },
        )
        if response is not None and response.status_code == 202:
            job = h.wait_final(api, [response.json()["id"]], timeout=300)[0]
    refused = [
        r
        for r in (upload, by_path)
        if r is not None and r.status_code == 400 and "over the limit" in r.json().get("message", "")
    ]
    h.add(
        "hostile: images over the pixel limit",
        f"a {PIXEL_BOMB[0]}x{PIXEL_BOMB[1]} PNG ({len(bomb) / 1024:.0f} KB) in an uploaded archive, in a "
        "folder registered by path, and swapped into a registered dataset before a job reads it",
        "registration refused with 400 naming the image; the job fails with the reason (the worker survives)",
        f"upload {_brief(upload)}; by path {_brief(by_path)}; job {job['status']}: "
        f"{job['error'].strip().splitlines()[0][:90] if job['error'].strip() else ''}",
        len(refused) == 2 and job["status"] == "failed" and "over the limit" in job["error"],
    )


# ---------------------------------------------------------------------- paths


def _paths(h: Harness) -> None:
    api = h.client("alice")
    outside_data = h.outside / "scenes"
    if not outside_data.exists():
        shutil.copytree(h.data / "scenes-24", outside_data)
    shutil.copy(h.data / "scenecnn.safetensors", h.outside / "w.safetensors")
    link_dir = h.data / "link-out"
    link_file = h.data / "link-out.safetensors"
    for link, target in ((link_dir, outside_data), (link_file, h.outside / "w.safetensors")):
        if not link.is_symlink():
            link.symlink_to(target)
    datasets = [
        "/etc",
        "/",
        f"{h.data}/../outside/scenes",
        str(outside_data),
        str(link_dir),
        f"{h.data}/\x00x",
        "~root",
        "../../../../etc",
    ]
    models = [
        "/etc/passwd",
        str(h.outside / "w.safetensors"),
        str(link_file),
        f"{h.data}/../outside/w.safetensors",
        "/proc/self/environ",
    ]
    answers = []
    for path in datasets:
        answers.append(
            (
                f"dataset {path!r}",
                api.post(
                    "POST /api/datasets/", "/api/datasets/", json={"name": "out", "format": "synthetic", "path": path}
                ),
            )
        )
    for path in models:
        answers.append((f"weights {path!r}", _register(h, "alice", name="out", path=path)))
    bad = [f"{w}: {_brief(r)}" for w, r in answers if r is None or r.status_code != 400 or not _error_shape(r)]
    h.add(
        "hostile: paths outside DATA_ROOTS",
        f"{len(datasets)} dataset paths and {len(models)} weights paths outside DATA_ROOTS (absolute, .., "
        "symlinks inside DATA_ROOTS pointing out, NUL byte, ~, relative) whose targets are valid data",
        "400 with the error shape for each",
        f"{len(answers) - len(bad)} of {len(answers)} refused with 400 (e.g. {_brief(answers[4][1])})"
        + (f"; {bad[:3]}" if bad else ""),
        not bad,
    )


# ---------------------------------------------------------------------- huge input


def _huge(h: Harness) -> None:
    api = h.client("alice")
    model = h.fixtures.model["alice"]["id"]
    dataset = h.fixtures.datasets["alice"][0]["id"]
    headers = {"Content-Type": "application/json"}
    cases = [
        (
            "30 MB JSON body",
            "/api/jobs/",
            json.dumps(
                {
                    "type": "dissect",
                    "model": model,
                    "dataset": dataset,
                    "params": {"layers": ["conv5.0"], "pad": "x" * (30 << 20)},
                }
            ),
        ),
        (
            "9 MB of params keys",
            "/api/jobs/",
            json.dumps(
                {"type": "dissect", "model": model, "dataset": dataset, "params": {f"k{i}": i for i in range(600_000)}}
            ),
        ),
        ("JSON nested 100,000 deep", "/api/jobs/", '{"params": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        (
            "1 MB model name",
            "/api/models/",
            json.dumps({"name": "n" * (1 << 20), "arch": "builtin:scenecnn", "weights_path": "/x"}),
        ),
        (
            "layers list of 1 M names",
            "/api/jobs/",
            json.dumps(
                {"type": "dissect", "model": model, "dataset": dataset, "params": {"layers": ["conv5.0"] * 1_000_000}}
            ),
        ),
        ("model id 2**70", "/api/jobs/", json.dumps({"type": "dissect", "model": 2**70, "dataset": dataset})),
        (
            "top_k_images 2**70",
            "/api/jobs/",
            json.dumps({"type": "dissect", "model": model, "dataset": dataset, "params": {"top_k_images": 2**70}}),
        ),
        (
            "quantile 1e400",
            "/api/jobs/",
            f'{{"type": "dissect", "model": {model:d}, "dataset": {dataset:d}, "params": {{"quantile": 1e400}}}}',
        ),
        (
            "NUL in a stored param",
            "/api/jobs/",
            json.dumps(
                {
                    "type": "ablate",
                    "model": model,
                    "dataset": dataset,
                    "params": {"layer": "conv5.0", "train_split": "a\x00"},
                }
            ),
        ),
        ("NUL in a name", "/api/datasets/", json.dumps({"name": "d\x00", "format": "synthetic", "path": "/x"})),
        ("not JSON", "/api/jobs/", "{'type': dissect"),
        ("invalid UTF-8", "/api/jobs/", b'{"type": "\xff\xfe"}'),
    ]
    answers = []
    for what, path, body in cases:
        answers.append((what, api.post(f"POST {path}", path, data=body, headers=headers)))
    reads = [
        ("GET /api/jobs/2**70/", "/api/jobs/1180591620717411303424/"),
        ("GET /api/units/?model=2**70", "/api/units/?model=1180591620717411303424"),
        ("GET /api/units/?min_iou=1e999", "/api/units/?min_iou=1e999"),
        ("GET /api/units/?page_size=10**9", "/api/units/?page_size=1000000000"),
        ("GET /api/jobs/?limit=10**12&offset=-5", "/api/jobs/?limit=1000000000000&offset=-5"),
        ("GET /api/datasets/?limit=2**63", "/api/datasets/?limit=9223372036854775808"),
        ("GET /api/models/?offset=2**63", "/api/models/?offset=9223372036854775808"),
        ("GET /api/concepts/?min_iou=nan", "/api/concepts/?min_iou=nan"),
        ("GET /api/units/?cursor=garbage", "/api/units/?cursor=garbage"),
        ("GET /api/units/?layer=%00", "/api/units/?layer=%00"),
        ("GET matrix ?layer=%00", f"/api/jobs/{h.fixtures.generator_job['id']}/matrix/?layer=%00"),
        ("GET important-units ?layer=%00", f"/api/models/{model}/classes/street/important-units/?layer=%00"),
    ]
    read_answers = [(what, api.get(f"GET {path.split('?')[0]}", path)) for what, path in reads]
    five = [f"{w}: {_brief(r)}" for w, r in answers + read_answers if r is None or r.status_code >= 500]
    bad_posts = [
        f"{w}: {_brief(r)}" for w, r in answers if r is None or not 400 <= r.status_code < 500 or not _error_shape(r)
    ]
    jobs_after = h.sql(
        "SELECT count(*) FROM nd_job WHERE params::text LIKE '%%pad%%' OR params::text LIKE '%%k599999%%'"
    )
    h.add(
        "hostile: huge and malformed JSON, huge numbers",
        "; ".join(w for w, _, _ in cases) + "; reads: " + "; ".join(w for w, _ in reads),
        "4xx with the error shape for each write, no 5xx anywhere, nothing stored",
        "writes: "
        + "; ".join(f"{w}: {_brief(r)[:64]}" for w, r in answers[:3])
        + "; reads "
        + ", ".join(str(r.status_code if r is not None else "none") for _, r in read_answers)
        + f"; {len(five)} 5xx"
        + (f" ({five[:3]})" if five else "")
        + (f"; not 4xx: {bad_posts[:2]}" if bad_posts else ""),
        not five and not bad_posts and jobs_after[0][0] == 0,
    )


# ---------------------------------------------------------------------- other users' ids


def _other_users(h: Harness) -> None:
    alice, bob = h.client("alice"), h.client("bob")
    fx = h.fixtures
    job = h.sql(
        "SELECT id FROM nd_job WHERE owner_id = (SELECT id FROM auth_user WHERE username = 'alice') "
        "AND status = 'succeeded' AND type = 'dissect' AND dataset_id IS NOT NULL ORDER BY id DESC LIMIT 1"
    )
    job_id = job[0][0] if job else fx.generator_job["id"]
    layer = h.sql("SELECT layer FROM nd_layer_result WHERE job_id = %s LIMIT 1", (job_id,))
    layer = layer[0][0] if layer else "conv5.0"
    unit = h.sql("SELECT min(id) FROM nd_unit WHERE job_id = %s", (job_id,))[0][0]
    running = alice.post("POST /api/jobs/", "/api/jobs/", json=h.dissect_body("alice"))
    running_id = running.json()["id"] if running is not None and running.status_code == 202 else job_id
    model, dataset, gen = fx.model["alice"]["id"], fx.datasets["alice"][0]["id"], fx.generator["id"]
    missing = 10**9
    mask = [[1, 0], [0, 1]]

    def routes(ids: dict) -> list[tuple[str, str, dict | None]]:
        return [
            ("GET", f"/api/models/{ids['model']}/", None),
            ("GET", f"/api/models/{ids['model']}/layers/", None),
            ("GET", f"/api/models/{ids['model']}/classes/street/important-units/", None),
            ("POST", f"/api/models/{ids['gen']}/paint/", {"layer": "layer3", "concept": "red-c", "mask": mask}),
            ("GET", f"/api/datasets/{ids['dataset']}/", None),
            ("GET", f"/api/jobs/{ids['job']}/", None),
            ("GET", f"/api/jobs/{ids['job']}/matrix/?layer={layer}", None),
            ("GET", f"/api/jobs/{ids['job']}/ablation/", None),
            ("GET", f"/api/jobs/{ids['gen_job']}/images/removal-after/", None),
            ("POST", f"/api/jobs/{ids['running']}/cancel/", None),
            ("GET", f"/api/units/{ids['unit']}/", None),
            ("GET", f"/api/units/{ids['unit']}/image/", None),
            ("POST", "/api/jobs/", {"type": "dissect", "model": ids["model"], "dataset": dataset}),
            ("POST", "/api/jobs/", {"type": "dissect", "model": fx.model["bob"]["id"], "dataset": ids["dataset"]}),
        ]

    real = routes(
        {
            "model": model,
            "gen": gen,
            "dataset": dataset,
            "job": job_id,
            "gen_job": fx.generator_job["id"],
            "running": running_id,
            "unit": unit,
        }
    )
    fake = routes(dict.fromkeys(("model", "gen", "dataset", "job", "gen_job", "running", "unit"), missing))
    leaks = []
    for (method, path, body), (_, fake_path, fake_body) in zip(real, fake, strict=True):
        got = bob.request(method, f"{method} other", path, json=body)
        none = bob.request(method, f"{method} other", fake_path, json=fake_body)
        if (
            got is None
            or none is None
            or got.status_code != 404
            or (got.status_code, got.text) != (none.status_code, none.text)
        ):
            leaks.append(f"{method} {path}: {_brief(got)} vs missing {_brief(none)}")
    lists = {
        "jobs": bob.get("GET other", "/api/jobs/?limit=1000"),
        "models": bob.get("GET other", "/api/models/?limit=1000"),
        "datasets": bob.get("GET other", "/api/datasets/?limit=1000"),
        "units of alice's job": bob.get("GET other", f"/api/units/?job={job_id}"),
        "units of alice's model": bob.get("GET other", f"/api/units/?model={model}"),
    }
    alice_ids = {
        "jobs": {
            r[0]
            for r in h.sql("SELECT j.id FROM nd_job j JOIN auth_user u ON u.id = j.owner_id WHERE u.username = 'alice'")
        },
        "models": {model, gen},
        "datasets": {d["id"] for d in fx.datasets["alice"]},
    }
    for name, response in lists.items():
        rows = response.json().get("results", []) if response is not None and response.status_code == 200 else None
        if rows is None:
            leaks.append(f"list {name}: {_brief(response)}")
        elif name.startswith("units"):
            if rows:
                leaks.append(f"list {name}: {len(rows)} rows")
        elif {r["id"] for r in rows} & alice_ids[name]:
            leaks.append(f"list {name} shows alice's rows")
    still = alice.get("GET /api/jobs/{id}/", f"/api/jobs/{running_id}/")
    not_cancelled = still is not None and still.status_code == 200 and still.json()["status"] != "cancelled"
    h.add(
        "hostile: another user's ids",
        f"bob on {len(real)} routes with alice's private ids (model, generator, dataset, job, unit: read, "
        "matrix, images, layers, important units, paint, cancel, jobs on her model or dataset), compared with "
        "ids that do not exist; bob's lists and unit filters",
        "404 with a body identical to a missing id's, for each; none of alice's rows in bob's lists; her job not "
        "cancelled",
        f"{len(real) - sum(1 for x in leaks if not x.startswith('list'))} of {len(real)} routes identical 404s; "
        f"lists clean: {not any(x.startswith('list') for x in leaks)}; alice's job cancelled by bob: "
        f"{not not_cancelled}" + (f"; {leaks[:3]}" if leaks else ""),
        not leaks and not_cancelled,
    )
