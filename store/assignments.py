"""Assignments of a course (instructor CRUD, drafts, publishing) and the hook run when a grade is final."""
from __future__ import annotations

import logging
from typing import Any

import asyncpg
from redis.asyncio import Redis

from store import xp
from store.events import GradeReady, publish, user_topic
from store.submissions import CHOICE_REWATCH
from store.submissions import COLUMNS as SUBMISSION_COLUMNS

logger = logging.getLogger(__name__)

PASS_SCORE = 60.0  # a final score at or above this passes the assignment (XP 'assignment_passed')
TYPES = ("multiple_choice", "short_answer", "essay")
DIFFICULTIES = ("easy", "medium", "hard")

_COLS = """a.id, a.course_id, a.video_id, a.chapter_id, a.concept, a.type, a.title, a.prompt, a.options, a.correct,
           a.reference_answer, a.rubric, a.difficulty, a.max_attempts, a.opens_at, a.closes_at, a.status, a.origin,
           a.citation, a.created_by, a.created_at, a.updated_at, a.published_at"""
EDITABLE = ("video_id", "chapter_id", "concept", "type", "title", "prompt", "options", "correct", "reference_answer",
            "rubric", "difficulty", "max_attempts", "opens_at", "closes_at", "citation")


async def create(conn: asyncpg.Connection, course_id: int, created_by: int, fields: dict[str, Any], *,
                 origin: str = "instructor") -> asyncpg.Record:
    cols = [k for k in EDITABLE if k in fields]
    names = ", ".join(["course_id", "created_by", "origin", *cols])
    params = ", ".join(f"${i + 1}" for i in range(3 + len(cols)))
    return await conn.fetchrow(
        f"INSERT INTO assignments AS a ({names}) VALUES ({params}) RETURNING {_COLS}",
        course_id, created_by, origin, *[fields[k] for k in cols])


async def get(conn: asyncpg.Connection, assignment_id: int, *, lock: str = "") -> asyncpg.Record | None:
    """`lock`: "share" (a submission graded against this version) or "update" (a change of it), inside the
    caller's transaction: a key corrected meanwhile cannot miss an answer graded with the old one."""
    suffix = {"": "", "share": " FOR SHARE", "update": " FOR UPDATE"}[lock]
    return await conn.fetchrow(f"SELECT {_COLS} FROM assignments a WHERE a.id = $1{suffix}", assignment_id)


async def get_for_tenant(conn: asyncpg.Connection, assignment_id: int, tenant_id: int) -> asyncpg.Record | None:
    """The assignment if its course belongs to the tenant (callers answer 404 otherwise)."""
    return await conn.fetchrow(
        f"""SELECT {_COLS}, c.tenant_id FROM assignments a JOIN courses c ON c.id = a.course_id
            WHERE a.id = $1 AND c.tenant_id = $2""", assignment_id, tenant_id)


async def list_for_course(conn: asyncpg.Connection, course_id: int, *, published_only: bool,
                          limit: int, offset: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""SELECT {_COLS} FROM assignments a WHERE a.course_id = $1 AND ($2 = false OR a.status = 'published')
            ORDER BY a.id LIMIT $3 OFFSET $4""", course_id, published_only, limit, offset)


async def update(conn: asyncpg.Connection, assignment_id: int, changes: dict[str, Any]) -> asyncpg.Record | None:
    cols = [k for k in EDITABLE if k in changes]
    sets = ", ".join([f"{k} = ${i + 2}" for i, k in enumerate(cols)] + ["updated_at = now()"])
    return await conn.fetchrow(f"UPDATE assignments a SET {sets} WHERE a.id = $1 RETURNING {_COLS}",
                               assignment_id, *[changes[k] for k in cols])


async def publish_assignment(conn: asyncpg.Connection, assignment_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"""UPDATE assignments a SET status = 'published', published_at = coalesce(published_at, now()),
                   updated_at = now() WHERE a.id = $1 RETURNING {_COLS}""", assignment_id)


async def unpublish_assignment(conn: asyncpg.Connection, assignment_id: int) -> asyncpg.Record | None:
    """Back to a draft (`published_at` keeps when it was first published)."""
    return await conn.fetchrow(
        f"UPDATE assignments a SET status = 'draft', updated_at = now() WHERE a.id = $1 RETURNING {_COLS}",
        assignment_id)


async def delete(conn: asyncpg.Connection, assignment_id: int) -> bool:
    return await conn.fetchval("DELETE FROM assignments WHERE id = $1 RETURNING id", assignment_id) is not None


def grade_choice(a: asyncpg.Record, chosen: list[int]) -> tuple[float, list[dict[str, Any]], dict[str, Any]]:
    """Multiple choice: all of the correct options and none other is 100; with several correct options,
    each right pick earns its share and each wrong pick takes one away (never below 0). (score, criteria,
    feedback)."""
    correct = set(a["correct"])
    picked = set(chosen)
    if picked == correct:
        score = 100.0
    elif len(correct) == 1:
        score = 0.0
    else:
        score = max(0.0, 100.0 * (len(picked & correct) - len(picked - correct)) / len(correct))
    feedback: dict[str, Any] = {"right": "Correct." if score == 100 else
                                ("Partly correct." if score > 0 else "Not correct.")}
    if score < 100:
        feedback["missing"] = (f"{len(correct - picked)} correct option(s) not chosen" if correct - picked else "") + \
            ("; " if correct - picked and picked - correct else "") + \
            (f"{len(picked - correct)} chosen option(s) are wrong" if picked - correct else "")
    cite = a["citation"]
    if cite:
        feedback["rewatch"] = {"video_id": cite["video_id"], "start": cite["start"], "end": cite.get("end")}
        if score < 100:  # (only with a moment: a hand-written question's answer was sent to one it does not have)
            feedback["improve"] = CHOICE_REWATCH
    score = round(score, 1)
    return score, [{"name": "correct options", "points": 100.0, "score": score, "justification": ""}], feedback


async def chapter_in_course(conn: asyncpg.Connection, course_id: int, chapter_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """SELECT ch.id, ch.video_id, ch.idx, ch.start_s, ch.end_s, ch.title FROM chapters ch
           JOIN videos v ON v.id = ch.video_id WHERE ch.id = $1 AND v.course_id = $2""", chapter_id, course_id)


# --- the hook ---------------------------------------------------------------------------------------------

async def on_grade_final(conn: asyncpg.Connection, redis: Redis, submission: asyncpg.Record | dict) -> None:
    """HOOK — a grade became final (multiple choice graded, a machine grade released, or an instructor's
    review). Call after the grade's transaction committed, with a connection outside a transaction.

    1. the learner's per-chapter strength (`chapter_scores`, read by the study-buddy matcher);
    2. XP (`sync_grade_xp`): 'assignment_passed' while the learner's best grade on the assignment is at least
       PASS_SCORE and 'perfect_score' while it is 100, once per learner and assignment whatever the attempts; a
       grade lowered below the mark takes the award back;
    3. a `grade.ready` event to the learner (topic `user:<id>`: every room they have open).
    Each step is tolerant: a failure is logged and the grade, already stored, stays the truth.
    """
    s = dict(submission)
    score = float(s["score"]) if s.get("score") is not None else 0.0
    try:
        await _update_chapter_score(conn, s["user_id"], s["assignment_id"])
    except Exception:  # noqa: BLE001
        logger.warning("could not update chapter_scores for submission %s", s["id"], exc_info=True)
    await _sync_xp(conn, redis, s)
    try:  # (the grade is stored: its caller's reply must not become a 500, inviting a second attempt)
        a = await conn.fetchrow("SELECT title, course_id FROM assignments WHERE id = $1", s["assignment_id"])
        if a is None:  # deleted meanwhile: no grade to open
            return
        await publish(redis, user_topic(s["user_id"]), GradeReady(
            submission_id=s["id"], assignment_id=s["assignment_id"], course_id=a["course_id"] if a else s["course_id"],
            title=a["title"] if a else "", score=round(score, 1), passed=score >= PASS_SCORE,
            reviewed=s.get("reviewed_by") is not None, attempt=s["attempt"], graded_at=s.get("final_at")))
    except Exception:  # noqa: BLE001 - only the nudge is lost; the learner reads the grade on the submission
        logger.warning("could not announce the grade of submission %s", s["id"], exc_info=True)


# A learner's XP for an assignment follows their best final grade on it (the grade they see: during a regrade the one
# they were given): 'assignment_passed' while it is at least PASS_SCORE, 'perfect_score' while it is 100. A grade
# lowered below the mark takes the award back (a `revoked` ledger row); raised again, it earns again under the next
# key of the chain `assignment:<id>`, `assignment:<id>#2`, … (`perfect:<id>` alike). Achievements stay unlocked.
GRADE_XP = (("assignment_passed", "assignment:", PASS_SCORE), ("perfect_score", "perfect:", 100.0))

# Per ledger key base: how many awards were given and how many taken back. $1 learner, $2 key bases.
_CHAIN = """
SELECT b.base, count(x.id) FILTER (WHERE x.kind <> 'revoked') AS given,
       count(x.id) FILTER (WHERE x.kind = 'revoked') AS taken
FROM unnest($2::text[]) AS b(base)
LEFT JOIN xp_events x ON x.user_id = $1
     AND (x.idempotency_key IN (b.base, 'revoke:' || b.base)
          OR x.idempotency_key LIKE b.base || '#%' OR x.idempotency_key LIKE 'revoke:' || b.base || '#%')
GROUP BY b.base"""

# The grade the learner stands on per assignment: the best of their attempts as they see them.
_BEST = """
SELECT max(CASE WHEN status = 'graded' THEN score ELSE (released ->> 'score')::float8 END) AS best,
       max(course_id) AS course_id, count(*) AS answers
FROM submissions WHERE user_id = $1 AND assignment_id = $2"""


async def _chains(conn: asyncpg.Connection, user_id: int, bases: list[str]) -> dict[str, tuple[int, int]]:
    """(awards given, taken back) per key base: by index probes of the first key and its take-back, and only for a
    chain taken back before by reading the learner's keys (a LIKE scan of their ledger: no index serves it)."""
    found = {r["idempotency_key"] for r in await conn.fetch(
        "SELECT idempotency_key FROM xp_events WHERE user_id = $1 AND idempotency_key = ANY($2::text[])",
        user_id, [k for b in bases for k in (b, f"revoke:{b}")])}
    out = {b: (int(b in found), 0) for b in bases if f"revoke:{b}" not in found}
    if len(out) < len(bases):
        out.update({r["base"]: (r["given"], r["taken"]) for r in await conn.fetch(
            _CHAIN, user_id, [b for b in bases if b not in out])})
    return out


def _chain_key(base: str, n: int) -> str:
    return base if n <= 1 else f"{base}#{n}"


async def sync_grade_xp(conn: asyncpg.Connection, redis: Redis, user_id: int, assignment_id: int) -> int:
    """Bring the learner's XP for the assignment in line with their best grade on it (see GRADE_XP): award or take
    back, both in one transaction, one learner and assignment at a time. Returns how many ledger rows it wrote.
    `conn` must be outside a transaction."""
    async with xp.transaction(conn, redis) as tx:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('grade_xp'), hashtext($1::text))",
                           f"{user_id}:{assignment_id}")
        row = await conn.fetchrow(_BEST, user_id, assignment_id)
        if not row["answers"]:  # the assignment was deleted (its answers with it) as this grade became final: the
            return 0  # XP it earned stays, as a deletion keeps it (else a review committed beside it took it back)
        best = float(row["best"]) if row and row["best"] is not None else None
        chains = await _chains(conn, user_id, [f"{prefix}{assignment_id}" for _, prefix, _ in GRADE_XP])
        wrote = 0
        for kind, prefix, mark in GRADE_XP:
            base = f"{prefix}{assignment_id}"
            given, taken = chains.get(base, (0, 0))
            want = best is not None and best >= mark
            if want and given <= taken:
                wrote += await tx.award(user_id, kind, _chain_key(base, given + 1), course_id=row["course_id"],
                                        meta={"assignment_id": assignment_id}) is not None
            elif not want and given > taken:
                wrote += await tx.revoke(user_id, _chain_key(base, given), meta={
                    "assignment_id": assignment_id, "reason": "grade_lowered", "best": best}) is not None
        return wrote


async def _sync_xp(conn: asyncpg.Connection, redis: Redis, s: dict) -> None:
    try:
        await sync_grade_xp(conn, redis, s["user_id"], s["assignment_id"])
    except Exception:  # noqa: BLE001 - the grade stands; reconcile_grade_xp brings the XP in line later
        logger.warning("could not update the XP of submission %s", s["id"], exc_info=True)


GRADE_XP_LOOKBACK = "30 days"  # far longer than any outage the every-minute check must cover


def _out_of_line(base: str, want: str) -> str:
    """SQL: the learner's awards with key base `base` do not match `want` (a boolean). The common cases are one index
    probe or two (never taken back); only a chain taken back before is counted."""
    held = (f"(SELECT count(*) FILTER (WHERE x.kind <> 'revoked') > count(*) FILTER (WHERE x.kind = 'revoked') "
            f"FROM xp_events x WHERE x.user_id = p.user_id AND (x.idempotency_key IN ({base}, 'revoke:' || {base}) "
            f"OR x.idempotency_key LIKE {base} || '#%' OR x.idempotency_key LIKE 'revoke:' || {base} || '#%'))")
    given = f"EXISTS (SELECT 1 FROM xp_events x WHERE x.user_id = p.user_id AND x.idempotency_key = {base})"
    taken = f"EXISTS (SELECT 1 FROM xp_events x WHERE x.user_id = p.user_id AND x.idempotency_key = 'revoke:' || {base})"
    return (f"CASE WHEN NOT {taken} THEN {given} IS DISTINCT FROM {want} "
            f"ELSE {held} IS DISTINCT FROM {want} END")


GRADE_XP_SWEEP_KEY = "sh:grade_xp:swept"  # {to: checked up to (epoch s), full: last full sweep (epoch s)}
GRADE_XP_FULL_EVERY_S = 3600  # a sweep of the whole GRADE_XP_LOOKBACK this often; the runs between look back
GRADE_XP_OVERLAP_S = 600  # this far before where the last run got to (a grade's commit lags its final_at)


async def reconcile_grade_xp(conn: asyncpg.Connection, redis: Redis, limit: int = 500) -> int:
    """Bring in line the XP of learners with a final grade of the last GRADE_XP_LOOKBACK whose ledger does not match
    their best grade (the process died between the grade's commit and `on_grade_final`). Safe to run at any time;
    the worker runs it every minute. A run looks only at grades made final since the last run got (less
    GRADE_XP_OVERLAP_S), and once in GRADE_XP_FULL_EVERY_S at the whole lookback (a run over 600,000 grades of 30
    days took 3-4 s: too much every minute); without Redis's note (flushed, first run) it sweeps it all."""
    started = await conn.fetchval("SELECT extract(epoch FROM now())::float8")
    note = await redis.hgetall(GRADE_XP_SWEEP_KEY)
    to, full = (float(note.get(b"to", 0)), float(note.get(b"full", 0))) if note else (0.0, 0.0)
    # (a note from the future, after the database's clock went back, would hold every run off: swept again)
    sweep = not to or started - full >= GRADE_XP_FULL_EVERY_S or to > started or full > started
    since = None if sweep else to - GRADE_XP_OVERLAP_S
    rows = await conn.fetch(
        f"""WITH recent AS (
                SELECT DISTINCT s.user_id, s.assignment_id FROM submissions s
                WHERE s.status = 'graded' AND s.final_at > now() - interval '{GRADE_XP_LOOKBACK}'
                  AND ($3::float8 IS NULL OR s.final_at > to_timestamp($3))
            ), p AS (
                SELECT r.user_id, r.assignment_id, coalesce(b.best, 0) AS best FROM recent r
                JOIN users u ON u.id = r.user_id AND u.role = 'learner'
                CROSS JOIN LATERAL ({_BEST.replace("$1", "r.user_id").replace("$2", "r.assignment_id")}) b
            )
            SELECT p.user_id, p.assignment_id FROM p
            WHERE {_out_of_line("'assignment:' || p.assignment_id", "p.best >= $1")}
               OR {_out_of_line("'perfect:' || p.assignment_id", "p.best >= 100")}
            LIMIT $2""",
        PASS_SCORE, limit, since)
    failed = 0
    for r in rows:
        try:
            await sync_grade_xp(conn, redis, r["user_id"], r["assignment_id"])
        except Exception:  # noqa: BLE001 - the next run tries again (the note stays where it was)
            failed += 1
            logger.warning("could not bring in line the XP of learner %s on assignment %s", r["user_id"],
                           r["assignment_id"], exc_info=True)
    if len(rows) < limit and not failed:  # all of it looked at and done: the next run starts from here
        await redis.hset(GRADE_XP_SWEEP_KEY, mapping={"to": started, "full": started if sweep else full})
    if rows:
        logger.info("brought in line the XP of %d learners' final grades", len(rows))
    return len(rows)


async def reconcile_chapter_scores(conn: asyncpg.Connection, limit: int = 500) -> int:
    """Recompute the chapter strengths that a final grade of the last 7 days never reached (the process died
    between the grade's commit and `on_grade_final`); a strength updated after the grade already counts it.
    Safe to run at any time; the worker runs it every minute."""
    rows = await conn.fetch(
        """SELECT DISTINCT ON (s.user_id, a.chapter_id) s.user_id, s.assignment_id FROM submissions s
           JOIN assignments a ON a.id = s.assignment_id AND a.chapter_id IS NOT NULL
           WHERE s.status = 'graded' AND s.final_at > now() - interval '7 days'
             AND NOT EXISTS (SELECT 1 FROM chapter_scores c WHERE c.user_id = s.user_id
                                 AND c.chapter_id = a.chapter_id AND c.updated_at >= s.final_at)
           LIMIT $1""", limit)
    for r in rows:
        await _update_chapter_score(conn, r["user_id"], r["assignment_id"])
    if rows:
        logger.info("updated %d chapter strengths that missed a final grade", len(rows))
    return len(rows)


async def rescore_chapters(conn: asyncpg.Connection, chapter_ids: list[int | None]) -> None:
    """Every learner's strength on these chapters again, from the assignments on them now (after one was deleted,
    or moved to another chapter): a learner with no graded assignment left there loses the row (their strength
    falls back to what they watched)."""
    ids = sorted({c for c in chapter_ids if c is not None})
    if not ids:
        return
    await conn.execute(
        """WITH best AS (SELECT s.user_id, a.chapter_id, s.assignment_id, max(s.score) AS score FROM submissions s
                         JOIN assignments a ON a.id = s.assignment_id
                         WHERE s.status = 'graded' AND a.chapter_id = ANY($1::bigint[]) GROUP BY 1, 2, 3),
                strength AS (SELECT user_id, chapter_id, least(1, greatest(0, avg(score) / 100)) AS score FROM best
                             GROUP BY 1, 2),
                gone AS (DELETE FROM chapter_scores c WHERE c.chapter_id = ANY($1::bigint[]) AND NOT EXISTS (
                             SELECT 1 FROM strength x WHERE x.user_id = c.user_id AND x.chapter_id = c.chapter_id))
           INSERT INTO chapter_scores (user_id, chapter_id, score, updated_at)
           SELECT user_id, chapter_id, score, now() FROM strength
           ON CONFLICT (user_id, chapter_id) DO UPDATE SET score = EXCLUDED.score, updated_at = now()""", ids)


async def _update_chapter_score(conn: asyncpg.Connection, user_id: int, assignment_id: int) -> None:
    """Mean of the learner's best final score per assignment of the chapter, 0..1. One recompute per learner at a
    time, reading after the one before it committed: two grades finishing together each computed from a snapshot
    without the other's, and the later write could keep only one (stamped newer than both, so no repair)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('chapter_score'), $1::int)", user_id % 2**31)
        await _write_chapter_score(conn, user_id, assignment_id)


async def _write_chapter_score(conn: asyncpg.Connection, user_id: int, assignment_id: int) -> None:
    await conn.execute(
        """WITH ch AS (SELECT chapter_id FROM assignments WHERE id = $2 AND chapter_id IS NOT NULL),
                best AS (SELECT s.assignment_id, max(s.score) AS score FROM submissions s
                         JOIN assignments a ON a.id = s.assignment_id
                         WHERE s.user_id = $1 AND s.status = 'graded' AND a.chapter_id = (SELECT chapter_id FROM ch)
                         GROUP BY s.assignment_id)
           INSERT INTO chapter_scores (user_id, chapter_id, score, updated_at)
           SELECT $1, (SELECT chapter_id FROM ch), least(1, greatest(0, avg(score) / 100)), clock_timestamp() FROM best
           HAVING count(*) > 0 AND (SELECT chapter_id FROM ch) IS NOT NULL
           ON CONFLICT (user_id, chapter_id) DO UPDATE SET score = EXCLUDED.score, updated_at = clock_timestamp()""",
        user_id, assignment_id)


async def video_sentences(conn: asyncpg.Connection, video_id: int) -> list[tuple[float, float, str]]:
    """Every transcript sentence of a video with its times, once each (chunks overlap by a sentence)."""
    rows = await conn.fetch("SELECT sentences FROM chunks WHERE video_id = $1 ORDER BY position", video_id)
    seen: dict[tuple[float, str], tuple[float, float, str]] = {}
    for r in rows:
        for start, end, text in r["sentences"] or []:
            seen.setdefault((round(float(start), 3), text), (float(start), float(end), text))
    return sorted(seen.values())
