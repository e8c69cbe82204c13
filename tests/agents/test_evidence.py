"""Citable windows: sentences around the best match, never past 60 s, never ending on the speaker's question."""
from __future__ import annotations

from types import SimpleNamespace

from agents.evidence import MAX_CITATION_S, rank_windows, windows


def _hit(sentences: list[tuple[float, float, str]], video_id: int = 1) -> SimpleNamespace:
    return SimpleNamespace(video_id=video_id, video_title="Lecture", youtube_id=None, start=sentences[0][0],
                           end=sentences[-1][1], text=" ".join(s[2] for s in sentences),
                           sentences=[list(s) for s in sentences])


def test_a_window_runs_on_to_the_answer_after_a_question():
    hit = _hit([(0, 5, "Anyone can add a line to the ledger."), (5, 10, "So what stops Bob from lying?"),
                (10, 15, "How can we trust it?"), (15, 20, "Digital signatures are the answer."),
                (20, 25, "They are hard to forge.")])
    by_core = {w.core: w for w in windows([hit])}
    first = by_core["Anyone can add a line to the ledger."]
    assert (first.start, first.end) == (0, 20)  # through both questions to the answer
    plain = by_core["Digital signatures are the answer."]
    assert (plain.start, plain.end) == (10, 25)  # one sentence each side


def test_windows_stay_within_60_seconds():
    hit = _hit([(0, 20, "Why?"), (20, 40, "Why not?"), (40, 58, "Because."), (58, 80, "Indeed?"), (80, 90, "Yes.")])
    assert all(w.end - w.start <= MAX_CITATION_S for w in windows([hit]))


def test_equal_evidence_prefers_the_later_moment():
    hit = _hit([(0, 5, "Matrix times vector."), (5, 10, "Filler here."), (10, 15, "Other filler."),
                (15, 20, "Matrix times vector again."), (20, 25, "Closing words.")])
    ranked = rank_windows("matrix vector", windows([hit]), [1.0])
    assert ranked[0].core == "Matrix times vector again."
