"""The adaptive next step: per concept (chapter) performance, the difficulty to try next, what to rewatch."""
from __future__ import annotations

from datetime import datetime, timezone
from statistics import mean

import asyncpg

from server.api.assignment_schemas import ConceptState, Moment, NextAssignment, NextStep
from store.assignments import PASS_SCORE

MASTERED = 85.0
LEVELS = ("easy", "medium", "hard")
RECENT = 5  # the last final grades that decide the next difficulty


def _moment(video_id: int | None, start: float | None, end: float | None, title: str | None,
            youtube_id: str | None) -> Moment | None:
    if video_id is None or start is None:
        return None
    url = f"https://www.youtube.com/watch?v={youtube_id}&t={int(start)}" if youtube_id else None
    return Moment(video_id=video_id, start=round(float(start), 1), end=None if end is None else round(float(end), 1),
                  title=title, url=url)


def _concept_key(r: asyncpg.Record) -> tuple[str, int | None]:
    """What an item practises: its chapter, else its video (chapter and video ids are separate counters)."""
    return ("chapter", r["chapter_id"]) if r["chapter_id"] else ("video", r["video_id"])


def _concept_name(r: asyncpg.Record) -> str:
    return r["concept"] or r["chapter_title"] or r["video_title"] or "General"


def next_step(rows: list[asyncpg.Record], *, cannot_submit: str | None = None) -> NextStep:
    """Build the learner's next step from `store.submissions.learner_results` rows; no `next` when the caller
    cannot submit answers (`cannot_submit` says why: they see the course without being enrolled in it)."""
    concepts: dict[object, dict] = {}
    recent: list[tuple[datetime, float, str]] = []
    for r in rows:
        c = concepts.setdefault(_concept_key(r), {"concept": _concept_name(r),
                                      "chapter_id": r["chapter_id"], "video_id": r["video_id"], "rows": []})
        c["rows"].append(r)
        if r["scores"]:
            recent.append((r["last_at"], float(r["scores"][0]), r["difficulty"]))
    states: list[ConceptState] = []
    for c in concepts.values():
        latest = [float(r["scores"][0]) for r in c["rows"] if r["scores"]]
        avg = round(mean(latest), 1) if latest else None
        status = ("new" if avg is None else "struggling" if avg < PASS_SCORE else
                  "progressing" if avg < MASTERED else "mastered")
        rewatch: list[Moment] = []
        if status == "struggling":
            first = c["rows"][0]
            m = _moment(first["video_id"], first["chapter_start"], first["chapter_end"], first["chapter_title"],
                        first["youtube_id"])
            rewatch += [m] if m and first["chapter_id"] else []
            for r in c["rows"]:  # the moments the failed items were based on
                cite = r["citation"]
                if cite and r["scores"] and float(r["scores"][0]) < PASS_SCORE:
                    m = _moment(cite.get("video_id"), cite.get("start"), cite.get("end"), r["video_title"],
                                r["youtube_id"])
                    if m and all(abs(x.start - m.start) > 1 or x.video_id != m.video_id for x in rewatch):
                        rewatch.append(m)
        states.append(ConceptState(concept=c["concept"], chapter_id=c["chapter_id"], video_id=c["video_id"],
                                   assignments=len(c["rows"]), attempted=len(latest), mean_score=avg, status=status,
                                   rewatch=rewatch[:4]))
    recent.sort(key=lambda x: x[0], reverse=True)
    last = recent[:RECENT]
    if not last:
        difficulty, reason = "easy", "no graded work yet: start easy"
    else:
        avg = mean(s for _, s, _ in last)
        level = LEVELS.index(last[0][2])
        if avg >= MASTERED:
            difficulty, reason = LEVELS[min(2, level + 1)], f"recent average {avg:.0f}: step up"
        elif avg < PASS_SCORE:
            difficulty, reason = LEVELS[max(0, level - 1)], f"recent average {avg:.0f}: step down and rewatch"
        else:
            difficulty, reason = LEVELS[level], f"recent average {avg:.0f}: keep practising at this level"
    struggling = [s for s in states if s.status == "struggling"]
    weak = {("chapter", s.chapter_id) if s.chapter_id else ("video", s.video_id) for s in struggling}
    now = datetime.now(timezone.utc)
    # what the learner can take now: untried, opened, not closed
    open_rows = [r for r in rows if r["attempts"] == 0 and (r["opens_at"] is None or r["opens_at"] <= now)
                 and (r["closes_at"] is None or r["closes_at"] > now)] if cannot_submit is None else []

    def rank(r: asyncpg.Record) -> tuple:
        return (_concept_key(r) not in weak, r["difficulty"] != difficulty,
                abs(LEVELS.index(r["difficulty"]) - LEVELS.index(difficulty)), r["assignment_id"])

    pick = min(open_rows, key=rank, default=None)
    nxt = NextAssignment(id=pick["assignment_id"], title=pick["title"], type=pick["type"],
                         difficulty=pick["difficulty"], concept=_concept_name(pick)) if pick else None
    if cannot_submit is not None:
        reason = f"{cannot_submit}; {reason}"
    return NextStep(difficulty=difficulty, reason=reason, next=nxt, struggling=struggling, concepts=states)
