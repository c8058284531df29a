"""Broden mask PNGs: the direct 8-bit RGB path decodes exactly what PIL decodes, and
everything else (other modes, damaged files) goes through PIL and its errors."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dissect_core import broden
from dissect_core.broden import read_label_png, write_label_png
from dissect_core.errors import DatasetError


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        out.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d)) for k, d in chunks)
    return broden._PNG_SIGNATURE + body


def _labels(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Blocky maps (so PNG's filters differ row by row) with some labels above 255."""
    coarse = rng.integers(0, 700, size=(max(1, shape[0] // 4), max(1, shape[1] // 4)))
    big = np.kron(coarse, np.ones((4, 4), int))
    pad = np.zeros(shape, int)
    pad[: min(shape[0], big.shape[0]), : min(shape[1], big.shape[1])] = big[: shape[0], : shape[1]]
    noise = rng.random(shape) < 0.1
    return np.where(noise, rng.integers(0, 65536, size=shape), pad)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (32, 32), (112, 112), (300, 257)])
@pytest.mark.parametrize("level", [1, 6, 9])
def test_direct_path_matches_pil(tmp_path: Path, shape: tuple[int, int], level: int) -> None:
    labels = _labels(np.random.default_rng(shape[0] * 10 + level), shape)
    rgb = np.zeros((*shape, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = labels % 256, labels // 256
    path = tmp_path / "m.png"
    Image.fromarray(rgb, "RGB").save(path, compress_level=level)
    direct = broden._read_rgb8_png(path)
    assert direct is not None
    np.testing.assert_array_equal(direct, np.asarray(Image.open(path).convert("RGB")))
    np.testing.assert_array_equal(read_label_png(path), labels)


def test_split_image_data_and_extra_chunks(tmp_path: Path) -> None:
    labels = _labels(np.random.default_rng(1), (40, 24))
    write_label_png(tmp_path / "m.png", labels)
    chunks = _chunks((tmp_path / "m.png").read_bytes())
    idat = b"".join(d for k, d in chunks if k == b"IDAT")
    pieces = [(b"IDAT", idat[i : i + 7]) for i in range(0, len(idat), 7)]
    ihdr = [c for c in chunks if c[0] == b"IHDR"]
    split = _png([*ihdr, (b"tEXt", b"comment\x00hi"), *pieces, (b"IEND", b"")])
    (tmp_path / "split.png").write_bytes(split)
    assert broden._read_rgb8_png(tmp_path / "split.png") is not None
    np.testing.assert_array_equal(read_label_png(tmp_path / "split.png"), labels)


@pytest.mark.parametrize("mode", ["L", "I;16", "RGBA", "P"])
def test_other_modes_go_through_pil(tmp_path: Path, mode: str) -> None:
    labels = np.array([[0, 1, 2], [3, 4, 200]])
    path = tmp_path / "m.png"
    if mode == "RGBA":
        rgba = np.zeros((2, 3, 4), np.uint8)
        rgba[..., 0], rgba[..., 3] = labels, 255
        Image.fromarray(rgba, "RGBA").save(path)
    elif mode == "P":
        im = Image.fromarray(labels.astype(np.uint8), "L").convert("P")
        im.putpalette([v for i in range(256) for v in (i, 0, 0)])
        im.save(path)
    else:
        Image.fromarray(labels.astype(np.uint16 if mode == "I;16" else np.uint8)).save(path)
    assert broden._read_rgb8_png(path) is None
    np.testing.assert_array_equal(read_label_png(path), labels)


def test_damaged_files_give_errors_naming_them(tmp_path: Path) -> None:
    write_label_png(tmp_path / "m.png", _labels(np.random.default_rng(2), (16, 16)))
    good = (tmp_path / "m.png").read_bytes()
    chunks = _chunks(good)
    idat = next(d for k, d in chunks if k == b"IDAT")
    flipped = bytearray(good)
    flipped[good.index(idat) + len(idat) // 2] ^= 0xFF
    bad_zlib = [(k, d if k != b"IDAT" else d[:2] + bytes(len(d) - 2)) for k, d in chunks]
    short = [(k, d if k != b"IDAT" else zlib.compress(zlib.decompress(d)[:-20])) for k, d in chunks]
    cases = {
        "crc.png": bytes(flipped),
        "truncated.png": good[: len(good) // 2],
        "zlib.png": _png(bad_zlib),
        "short.png": _png(short),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert broden._read_rgb8_png(tmp_path / name) is None, name
        with pytest.raises(DatasetError) as info:
            read_label_png(tmp_path / name)
        assert name in info.value.message, name
    # Without its IEND chunk a file is still whole to PIL: read there, not on the direct path.
    (tmp_path / "noiend.png").write_bytes(_png([c for c in chunks if c[0] != b"IEND"]))
    assert broden._read_rgb8_png(tmp_path / "noiend.png") is None
    np.testing.assert_array_equal(read_label_png(tmp_path / "noiend.png"), read_label_png(tmp_path / "m.png"))
    with pytest.raises(DatasetError, match="does not exist"):
        read_label_png(tmp_path / "missing.png")
