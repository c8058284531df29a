"""Where uploaded files go, and the checks that keep hostile archives and paths out."""

from __future__ import annotations

import shutil
import tarfile
import uuid
import zipfile
import zlib
from pathlib import Path

from django.conf import settings

from api.errors import ApplicationError

MAX_ARCHIVE_MEMBERS = 200_000
MAX_ARCHIVE_BYTES = 20 * 1024**3
MAX_COMPRESSION_RATIO = 200
DATASET_SUBFOLDERS = {"images", "masks"}
# What a corrupt or truncated archive raises while it is read (its headers may look fine).
BROKEN_ARCHIVE = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError)


def path_in_data_roots(raw: str) -> Path:
    """Resolve a server-side path and require it to lie inside one of DATA_ROOTS."""
    if not raw or "\x00" in raw:
        raise ApplicationError("path is empty or malformed")
    path = Path(raw).resolve()
    for root in settings.DATA_ROOTS:
        if path == root or root in path.parents:
            if not path.exists():
                raise ApplicationError(f"path does not exist: {raw}")
            return path
    roots = ":".join(str(r) for r in settings.DATA_ROOTS)
    raise ApplicationError(f"path {raw} is outside the configured data roots ({roots})", extra={"data_roots": roots})


def new_upload_dir(kind: str) -> Path:
    folder = Path(settings.MEDIA_ROOT) / "uploads" / kind / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def save_upload(upload, folder: Path, filename: str) -> Path:
    target = folder / filename
    written = 0
    with open(target, "wb") as out:
        for chunk in upload.chunks():
            written += len(chunk)
            if written > settings.FILE_UPLOAD_MAX_BYTES:
                raise ApplicationError(f"upload is larger than {settings.FILE_UPLOAD_MAX_BYTES} bytes", status=413)
            out.write(chunk)
    return target


def remove_tree(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _check_member(name: str) -> None:
    if name.startswith(("/", "\\")) or ":" in name.split("/")[0] or any(part == ".." for part in Path(name).parts):
        raise ApplicationError(f"archive member {name!r} points outside the archive")


def extract_archive(archive: Path, target: Path) -> Path:
    """Extract a .zip or .tar(.gz) safely: no absolute or ``..`` paths, no links, no bombs."""
    total = 0
    name = archive.name.lower()
    compressed = archive.stat().st_size
    if name.endswith(".zip"):
        try:
            zf = zipfile.ZipFile(archive)
        except zipfile.BadZipFile as exc:
            raise ApplicationError(f"{archive.name} is not a valid zip archive: {exc}") from exc
        with zf:
            infos = zf.infolist()
            if len(infos) > MAX_ARCHIVE_MEMBERS:
                raise ApplicationError(f"archive holds more than {MAX_ARCHIVE_MEMBERS} members")
            for info in infos:
                _check_member(info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise ApplicationError(f"archive member {info.filename!r} is a symbolic link")
                total += info.file_size
            _check_total(total, compressed)
            try:
                zf.extractall(target)
            except BROKEN_ARCHIVE as exc:
                raise ApplicationError(f"{archive.name} is not a valid zip archive: {exc}") from exc
    elif name.endswith((".tar", ".tar.gz", ".tgz")):
        try:
            tf = tarfile.open(archive)
        except tarfile.TarError as exc:
            raise ApplicationError(f"{archive.name} is not a valid tar archive: {exc}") from exc
        with tf:
            try:
                members = tf.getmembers()
            except BROKEN_ARCHIVE as exc:
                raise ApplicationError(f"{archive.name} is not a valid tar archive: {exc}") from exc
            if len(members) > MAX_ARCHIVE_MEMBERS:
                raise ApplicationError(f"archive holds more than {MAX_ARCHIVE_MEMBERS} members")
            for member in members:
                _check_member(member.name)
                if not (member.isfile() or member.isdir()):
                    raise ApplicationError(f"archive member {member.name!r} is a link or special file")
                total += member.size
            _check_total(total, compressed)
            try:
                tf.extractall(target, filter="data")
            except BROKEN_ARCHIVE as exc:
                raise ApplicationError(f"{archive.name} is not a valid tar archive: {exc}") from exc
    else:
        raise ApplicationError(f"{archive.name}: archives must be .zip, .tar or .tar.gz")
    entries = list(target.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in DATASET_SUBFOLDERS:
        return entries[0]
    return target


def _check_total(total: int, compressed: int) -> None:
    if total > MAX_ARCHIVE_BYTES:
        raise ApplicationError(f"archive expands to {total} bytes, over the limit of {MAX_ARCHIVE_BYTES}")
    if compressed and total / compressed > MAX_COMPRESSION_RATIO and total > 100 * 1024**2:
        raise ApplicationError("archive expands more than 200-fold: refused as a decompression bomb")
