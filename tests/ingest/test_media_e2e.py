"""Real speech (espeak-ng) uploaded through the API, transcribed by the worker, searchable with timestamps."""
from __future__ import annotations

from ingest.cues import Cue
from tests.conftest import Factory, upload, wait_job
from tests.ingest.test_media import _check, lecture  # noqa: F401  (module fixture: synthesized speech)


def test_uploaded_speech_is_transcribed_by_the_worker(client, make: Factory, worker, lecture):  # noqa: F811
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Biology"}, headers=inst.h).json()["id"]
    r = upload(client, cid, inst.h, "lecture.wav", lecture["path"].read_bytes(), "Cells")
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"], inst.h, timeout=300)
    assert job["state"] == "done", job
    vid = r.json()["video_id"]
    video = client.get(f"/api/v1/courses/{cid}/videos/{vid}", headers=inst.h).json()
    assert video["source"] == "media" and video["status"] == "ready"
    duration = len(lecture["samples"]) / lecture["rate"]
    assert abs(video["duration_s"] - duration) < 0.5
    segs = client.get(f"/api/v1/courses/{cid}/videos/{vid}/transcript", headers=inst.h).json()
    _check([Cue(s["start"], s["end"], s["text"]) for s in segs], lecture)
    hits = client.get(f"/api/v1/courses/{cid}/search", params={"q": "where does photosynthesis happen"},
                      headers=inst.h).json()["hits"]
    assert hits and hits[0]["start"] <= lecture["second_at"] + 1.0 <= hits[0]["end"] + 1.0


def test_audio_with_no_speech_fails_saying_so(client, make: Factory, worker, tmp_path):
    """(Tester) two seconds of silence failed as "the transcript has no speech or text": it was audio."""
    import numpy as np

    from tests.ingest.test_media import write_wav

    quiet = write_wav(tmp_path / "quiet.wav", np.zeros(32000, dtype=np.float32), 16000)
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Quiet"}, headers=inst.h).json()["id"]
    r = upload(client, cid, inst.h, "quiet.wav", quiet.read_bytes())
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"], inst.h, timeout=300)
    assert job["state"] == "failed" and "no speech was heard in the audio" in job["error"], job
