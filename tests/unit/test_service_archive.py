"""Bundle archives: layouts accepted, and limits that stop zip/tar bombs before they are read."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from repadapter.errors import PayloadTooLarge
from service.archive import read_bundle_archive
from service.errors import MalformedRequest
from tests.servicekit import archive

FILES = {"manifest.json": b'{"name": "x"}', "adapter.safetensors": b"\x01" * 100}


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_reads_the_two_files_at_any_depth(kind):
    blob = archive({**FILES, "README.md": b"ignored"}, kind, prefix="fashion/v000003/")
    assert read_bundle_archive(blob, limit=1000) == (FILES["manifest.json"], FILES["adapter.safetensors"])


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_member_over_the_limit_is_413(kind):
    with pytest.raises(PayloadTooLarge, match=r"adapter.safetensors in the archive is 100 bytes, the limit is 50"):
        read_bundle_archive(archive(FILES, kind), limit=50)


def test_highly_compressed_padding_is_cut_off():
    bomb = archive({**FILES, "padding.bin": b"\x00" * 5_000_000}, "tar.gz")
    assert len(bomb) < 20_000
    with pytest.raises(PayloadTooLarge, match="the archive's content"):
        read_bundle_archive(bomb, limit=10_000)


def test_zip_whose_declared_size_lies_is_still_bounded():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", FILES["manifest.json"])
        zf.writestr("adapter.safetensors", b"\x00" * 10_000)
    with pytest.raises(PayloadTooLarge):
        read_bundle_archive(buf.getvalue(), limit=1_000)


@pytest.mark.parametrize(("files", "says"), [
    ({"manifest.json": b"{}"}, "exactly one adapter.safetensors, found 0"),
    ({**FILES, "other/manifest.json": b"{}"}, "exactly one manifest.json, found 2"),
])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_wrong_layouts_are_422(files, says, kind):
    with pytest.raises(MalformedRequest, match=says):
        read_bundle_archive(archive(files, kind), limit=1000)


def test_not_an_archive_is_422():
    with pytest.raises(MalformedRequest, match="neither a zip nor a tar"):
        read_bundle_archive(b"\x00garbage" * 100, limit=1000)


@pytest.mark.parametrize("prefix", ["../", "a/../../", "/etc/", "C:/", "..\\\\"])
@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_members_escaping_the_folder_are_422(prefix, kind):
    with pytest.raises(MalformedRequest, match="escapes the archive's folder"):
        read_bundle_archive(archive(FILES, kind, prefix=prefix), limit=1000)


def test_a_link_pointing_outside_is_422():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("notes.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        tf.addfile(link)
    with pytest.raises(MalformedRequest, match=r"'\.\./\.\./etc/passwd' escapes"):
        read_bundle_archive(buf.getvalue(), limit=1000)
