"""The reliability campaign (bench/campaign): its hostile inputs are what they claim to be, its
table renders, and (with CAMPAIGN=1, as root, a few minutes) a quick run holds on every row."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_table_is_markdown_with_one_row_per_check():
    from bench.campaign.table import Row, rows_table

    text = rows_table([Row("a", "did | this", "x", "y", True), Row("b", "that", "x", "z", False)])
    lines = text.splitlines()
    assert lines[0] == "| check | what was done | expected | observed | result |"
    assert lines[2] == "| a | did \\| this | x | y | HELD |" and lines[3].endswith("| FAILED |")


def test_the_lying_zip_lies_and_does_not_extract(tmp_path):
    from bench.campaign.hostile import _lying_zip

    with zipfile.ZipFile(io.BytesIO(_lying_zip())) as zf:
        assert zf.getinfo("images/big.bin").file_size == 100
        assert zf.getinfo("images/big.bin").compress_size > 10_000
        with pytest.raises(zipfile.BadZipFile):
            zf.extractall(tmp_path)


def test_hostile_archive_members_are_what_their_names_say():
    from bench.campaign.hostile import _tar, _tar_member, _zip

    with tarfile.open(
        fileobj=io.BytesIO(_tar(_tar_member("images/b.png", kind=tarfile.SYMTYPE, link="/etc/passwd")))
    ) as tf:
        assert tf.getmember("images/b.png").issym()
    with zipfile.ZipFile(io.BytesIO(_zip([("../escape.txt", b"x")], symlinks={"l": "/etc"}))) as zf:
        assert zf.namelist() == ["../escape.txt", "l"]
        assert (zf.getinfo("l").external_attr >> 16) & 0o170000 == 0o120000


def test_pixel_bomb_is_small_and_over_the_limit():
    from PIL import Image

    from bench.campaign.hostile import PIXEL_BOMB, _png_bytes
    from dissect_core.broden import MAX_IMAGE_PIXELS

    data = _png_bytes(*PIXEL_BOMB)
    assert len(data) < 100_000
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == PIXEL_BOMB and image.size[0] * image.size[1] > MAX_IMAGE_PIXELS


@pytest.mark.skipif(
    os.environ.get("CAMPAIGN") != "1" or os.geteuid() != 0,
    reason="a few minutes and root: CAMPAIGN=1 (as root) runs the quick campaign",
)
def test_quick_campaign_holds_on_every_row():
    done = subprocess.run(
        [sys.executable, "-m", "bench.campaign", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    lines = done.stdout.strip().splitlines()
    table = list(lines[lines.index("| check | what was done | expected | observed | result |") :])
    assert table and all(
        line.endswith(("| HELD |", "|---|---|---|---|---|")) or line.startswith("| check") for line in table
    ), "\n".join(table)
    assert done.returncode == 0, done.stdout[-3000:]
