"""The multipart receiver on its own: an accepted upload is on disk for good before the request is answered."""
from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from server import uploads
from server.errors import ApiError

BOUNDARY = "b0undary"


class _Request:
    """What receive_upload reads of a request: its headers and its body stream."""

    def __init__(self, body: bytes, pause_s: float = 0.0) -> None:
        self.headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}",
                        "content-length": str(len(body))}
        self._body = body
        self.pause_s = pause_s  # between chunks: a slow client
        self.app = SimpleNamespace(state=SimpleNamespace(upload_stops=set(), upload_stop_at=None))

    async def stream(self):  # type: ignore[no-untyped-def]
        for i in range(0, len(self._body), 1000):
            if self.pause_s:
                await asyncio.sleep(self.pause_s)
            yield self._body[i:i + 1000]


def _form(data: bytes, name: str = 'filename="talk.srt"') -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nA talk\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; {name}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


async def test_a_file_name_in_rfc_5987_form_is_read(tmp_path: Path) -> None:
    """(Tester) `filename*=UTF-8''Vorlesung%20%C3%9Cbung%202.vtt` (urllib3 1.x, older `requests`, for a name that is
    not ASCII) was dropped: the video was titled "untitled". Where both forms are given the extended one counts."""
    for name, want in (("filename*=UTF-8''Vorlesung%20%C3%9Cbung%202.vtt", "Vorlesung Übung 2.vtt"),
                       ('filename="Ubung.vtt"; filename*=utf-8\'de\'%C3%9Cbung.vtt', "Übung.vtt"),
                       ("filename*=iso-8859-1''%FCbung.vtt", "übung.vtt"),
                       ('filename="talk.srt"', "talk.srt"),
                       # (review) one that cannot be read leaves the plain name, not a refused upload or mojibake
                       ('filename="plain.vtt"; filename*=idna\'\'%FF%FE.vtt', "plain.vtt"),
                       ('filename="plain.vtt"; filename*=undefined\'\'x%41.vtt', "plain.vtt"),
                       ('filename="plain.vtt"; filename*=UTF-8\'\'\u00dcbung.vtt', "plain.vtt")):
        up = await uploads.receive_upload(_Request(_form(b"WEBVTT\n", name)), tmp_path / "u", max_bytes=1 << 20)
        assert up.filename == want, (name, up.filename)


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


async def test_an_upload_under_way_when_the_server_stops_is_a_503_to_send_again(tmp_path: Path) -> None:
    """(Tester) an upload still arriving when the server stopped was cut off at the end of uvicorn's 10 s wait and
    answered with its plain-text 500 "Internal Server Error". It gets a grace to arrive, then a 503 `unavailable`
    to send again, and leaves nothing on disk; one that arrives within the grace is stored."""
    dest = tmp_path / "uploads" / "7"
    slow = _Request(_form(b"x" * 20_000), pause_s=0.1)  # about 2 s
    task = asyncio.create_task(uploads.receive_upload(slow, dest, max_bytes=1 << 20))
    await asyncio.sleep(0.3)
    uploads.stop_uploads(slow.app.state, grace_s=0.5)
    with pytest.raises(ApiError) as err:
        await task
    assert err.value.status_code == 503 and err.value.code == "unavailable" and err.value.retry_after == 5
    assert list(dest.iterdir()) == [] and not slow.app.state.upload_stops
    # (Review) one that reaches the upload after the stop began (a request still in its checks) has the same end
    late = _Request(_form(b"x" * 20_000), pause_s=0.1)
    late.app.state = slow.app.state
    with pytest.raises(ApiError) as err:
        await uploads.receive_upload(late, dest, max_bytes=1 << 20)
    assert err.value.status_code == 503 and list(dest.iterdir()) == []
    quick = _Request(_form(b"x" * 5_000), pause_s=0.05)
    task = asyncio.create_task(uploads.receive_upload(quick, dest, max_bytes=1 << 20))
    await asyncio.sleep(0.05)
    uploads.stop_uploads(quick.app.state, grace_s=5)
    up = await task
    assert up.path is not None and up.path.read_bytes() == b"x" * 5_000
