"""Task bundle archives (``.zip``, ``.tar``, ``.tar.gz``) read in memory, safely.

Only the two bundle files are read (``manifest.json``, ``adapter.safetensors``, at any depth, exactly
one of each); nothing is ever extracted to disk, links and other members are ignored, members (and link
targets) that would escape the archive's folder are refused, and declared and actual sizes are bounded
(zip and gzip bombs).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import PurePosixPath

from repadapter.bundle import MANIFEST_FILE, TENSORS_FILE
from repadapter.errors import PayloadTooLarge

from .errors import MalformedRequest

WANTED = (MANIFEST_FILE, TENSORS_FILE)


def _check_member(name: str) -> None:
    """Refuse a member whose path would leave the archive's folder if it were extracted (absolute, ``..``,
    a drive or backslash path): nothing is extracted here, but such an archive is hostile or broken and
    would be dangerous to anyone who unpacks it, so it is not stored as a task."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise MalformedRequest(f"archive member {name!r} escapes the archive's folder (absolute path or '..')")


def _pick(names: list[str]) -> dict[str, str]:
    """Map each wanted base name to its single member path."""
    found: dict[str, list[str]] = {w: [] for w in WANTED}
    for name in names:
        base = PurePosixPath(name).name
        if base in found:
            found[base].append(name)
    for base, paths in found.items():
        if len(paths) != 1:
            raise MalformedRequest(f"a bundle archive must hold exactly one {base}, found {len(paths)}")
    return {base: paths[0] for base, paths in found.items()}


def _check_size(name: str, size: int, limit: int) -> None:
    if size > limit:
        raise PayloadTooLarge(f"{name} in the archive is {size} bytes, the limit is {limit}")


def _read_zip(data: bytes, limit: int) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            _check_member(info.filename)
        infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
        out = {}
        for base, path in _pick(list(infos)).items():
            _check_size(base, infos[path].file_size, limit)
            with zf.open(infos[path]) as f:
                blob = f.read(limit + 1)  # the declared size can lie
            _check_size(base, len(blob), limit)
            out[base] = blob
        return out


def _read_tar(data: bytes, limit: int) -> dict[str, bytes]:
    # Stream mode: one pass, members read as they come, so a compressed bomb is cut off at `limit` total.
    found: dict[str, list[bytes]] = {w: [] for w in WANTED}
    total = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tf:
        for member in tf:
            _check_member(member.name)
            if member.issym() or member.islnk():
                _check_member(member.linkname)
            base = PurePosixPath(member.name).name
            wanted = member.isfile() and base in found
            if wanted:
                _check_size(base, member.size, limit)
            total += member.size
            if total > 2 * limit:
                raise PayloadTooLarge(f"the archive's content exceeds {2 * limit} bytes")
            if not wanted:
                continue
            f = tf.extractfile(member)
            if f is not None:
                found[base].append(f.read(limit + 1))
    for base, blobs in found.items():
        if len(blobs) != 1:
            raise MalformedRequest(f"a bundle archive must hold exactly one {base}, found {len(blobs)}")
        _check_size(base, len(blobs[0]), limit)
    return {base: blobs[0] for base, blobs in found.items()}


def read_bundle_archive(data: bytes, *, limit: int) -> tuple[bytes, bytes]:
    """``(manifest_bytes, tensor_bytes)`` from a zip or (compressed) tar archive.

    Raises MalformedRequest (422) for anything else or a wrong layout, PayloadTooLarge (413) over ``limit``.
    """
    try:
        files = _read_zip(data, limit) if zipfile.is_zipfile(io.BytesIO(data)) else _read_tar(data, limit)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise MalformedRequest(f"the bundle is neither a zip nor a tar archive: {e}") from e
    return files[MANIFEST_FILE], files[TENSORS_FILE]
