"""Video requests racing other changes: deletions, retries, and forms cut off on the way."""
from __future__ import annotations

import asyncio

import asyncpg

from tests.conftest import Factory, fetch, upload, wait_job

SRT = b"".join(f"{i}\n00:00:{i:02d},000 --> 00:00:{i:02d},900\ncue number {i} says something\n\n".encode()
               for i in range(1, 40))


def _course(client, make: Factory):  # type: ignore[no-untyped-def]
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Races"}, headers=inst.h).json()["id"]
    return inst, cid


def test_a_form_cut_off_mid_file_is_refused_and_nothing_stored(client, make: Factory, settings):
    """A multipart body that ends before its closing boundary (a client cut off) is a 400: half a transcript
    would be ingested as if it were the whole."""
    inst, cid = _course(client, make)
    boundary = "studyhallboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.srt\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + SRT + f"\r\n--{boundary}--\r\n".encode()
    for cut in (body[: len(body) // 2], body[: -len(f"--{boundary}--\r\n")]):
        r = client.post(f"/api/v1/courses/{cid}/videos", content=cut,
                        headers={**inst.h, "Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 400 and "closing boundary" in r.json()["message"], r.text
    assert fetch(settings, "SELECT count(*) AS n FROM videos WHERE course_id = $1", cid)[0]["n"] == 0
    r = client.post(f"/api/v1/courses/{cid}/videos", content=body,  # whole, it is taken
                    headers={**inst.h, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 202, r.text
    # a NUL in the file name is dropped from the name shown, like the other control characters
    r = client.post(f"/api/v1/courses/{cid}/videos", content=body.replace(b'filename="a.srt"', b'filename="b\x00.srt"'),
                    headers={**inst.h, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 202, r.text
    video = client.get(f"/api/v1/courses/{cid}/videos/{r.json()['video_id']}", headers=inst.h).json()
    assert video["title"] == "b"


async def _racing_a_delete(settings, table: str, row_id: int, call):  # type: ignore[no-untyped-def]
    """`call()` (a blocking request) made while a transaction holds `table`'s row `row_id`, as the row's deletion
    begins; the request must wait for it, then the transaction deletes the row and commits: the response."""
    db = await asyncpg.connect(settings.database_url)
    try:
        tx = db.transaction()
        await tx.start()
        await db.execute(f"SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE", row_id)
        request = asyncio.create_task(asyncio.to_thread(call))
        await asyncio.sleep(0.5)
        assert not request.done()  # it waits for the row
        await db.execute(f"DELETE FROM {table} WHERE id = $1", row_id)
        await tx.commit()
        return await request
    finally:
        await db.close()


async def test_deleting_a_video_while_its_course_is_deleted_is_not_found(client, make: Factory, settings, worker):
    """The course's deletion has the course row and needs the video's; the video's deletion takes the course row
    first, so it waits and then finds the course gone (404) instead of deadlocking (one of them a 500)."""
    inst, cid = _course(client, make)
    vids = []
    for name in ("a.srt", "b.srt"):  # another video with chunks left: the BM25 statistics are recounted
        r = upload(client, cid, inst.h, name, SRT)
        assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
        vids.append(r.json()["video_id"])
    r = await _racing_a_delete(settings, "courses", cid,  # as delete_course begins
                               lambda: client.delete(f"/api/v1/courses/{cid}/videos/{vids[0]}", headers=inst.h))
    assert r.status_code == 404 and r.json()["message"] == f"course {cid} not found", r.text


async def test_retrying_a_job_while_its_video_is_deleted_is_not_found(client, make: Factory, settings):
    """Deleting a video takes its row, then its jobs'; a retry takes them in the same order, so it waits and
    then finds the job gone (404) instead of deadlocking."""
    inst, cid = _course(client, make)
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status) VALUES ($1, 'v', 'transcript', "
                          "'failed') RETURNING id", cid)[0]["id"]
    job = fetch(settings, "INSERT INTO jobs (kind, course_id, video_id, state, error) VALUES ('ingest', $1, $2, "
                          "'failed', 'boom') RETURNING id", cid, vid)[0]["id"]
    r = await _racing_a_delete(settings, "videos", vid,  # as the video's deletion begins
                               lambda: client.post(f"/api/v1/jobs/{job}/retry", headers=inst.h))
    assert r.status_code == 404 and r.json()["message"] == f"job {job} not found", r.text
