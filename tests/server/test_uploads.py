"""The multipart receiver on its own: an accepted upload is on disk for good before the request is answered."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from server import uploads
from server.errors import ApiError

BOUNDARY = "b0undary"


class _Request:
    """What receive_upload reads of a request: its headers and its body stream."""

    def __init__(self, body: bytes) -> None:
        self.headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}",
                        "content-length": str(len(body))}
        self._body = body

    async def stream(self):  # type: ignore[no-untyped-def]
        for i in range(0, len(self._body), 1000):
            yield self._body[i:i + 1000]


def _form(data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nA talk\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"talk.srt\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


async def test_an_accepted_upload_is_fsynced_with_the_directories_naming_it(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(uploads.os, "fsync", fsync)
    dest = tmp_path / "uploads" / "7"
    data = b"1\n00:00:01,000 --> 00:00:02,000\nhello\n" * 500
    up = await uploads.receive_upload(_Request(_form(data)), dest, max_bytes=1 << 20)
    assert up.path is not None and up.path.read_bytes() == data and up.fields == {"title": "A talk"}
    # and the data folder, which names uploads/ (made by its first upload)
    assert synced == [str(up.path), str(dest), str(dest.parent), str(dest.parent.parent)]


async def test_a_disk_that_cannot_store_the_upload_is_a_503_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(uploads.os, "fsync", fsync)
    dest = tmp_path / "uploads" / "7"
    with pytest.raises(ApiError) as err:
        await uploads.receive_upload(_Request(_form(b"some text")), dest, max_bytes=1 << 20)
    assert err.value.status_code == 503 and err.value.retry_after == 5
    assert list(dest.iterdir()) == []
