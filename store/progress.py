"""Learner progress: per video (resume position, watched ranges, completion, time spent), per course,
bookmarks, and the XP that progress earns (lesson, first lesson, course, daily streak).

A video counts complete once the watched ranges cover STUDYHALL_VIDEO_COMPLETE_SHARE of its duration.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import asyncpg
from redis.asyncio import Redis

from store import replies, streaks, xp
from store.courses import LEARNER_SEES_SQL
from store.events import MessageHelpful, MessageHelpfulRemoved, publish, room_topic
from store.keys import rate_bookmark, rate_progress
from store.ratelimit import SendLimiter

logger = logging.getLogger(__name__)

# Columns by name, never `*`: a statement asyncpg cached before a migration added a column would change its row
# type, which inside a transaction fails (InvalidCachedStatementError) on every process still running old code.
_PROGRESS_COLS = ("user_id, video_id, course_id, position_s, watched, watched_s, time_spent_s, completed_at, "
                  "created_at, updated_at, position_player, position_seq")
_BOOKMARK_COLS = "id, user_id, video_id, at_s, note, created_at"
_HELPFUL_COLS = "message_id, room_id, author_id, marked_by, marked_at, by_tutor"

MAX_RANGES = 200  # per report
MAX_STORED_RANGES = 1000  # separate watched ranges kept per learner and video (a player reports a handful; past it
# the smallest gaps are joined: `coarsen`)
TOLERANCE_S = 0.5  # players report positions a hair past the end, and leave gaps this small between ranges
# Time spent by one report is at most what could have been played since the video's previous report (at up
# to MAX_PLAYBACK_RATE, plus SLACK_S): a retried report (its response lost) or a script repeating one does not
# add a whole video each time. A first report is bounded by the video's duration.
MAX_PLAYBACK_RATE = 3.0
SLACK_S = 3.0
# Newly watched seconds over all of a learner's videos come from a budget (watch_budget) that holds at most
# WATCH_BUDGET_S and refills at MAX_PLAYBACK_RATE: a player reporting as it plays, or one long video reported at
# its end, never meets it; a script reporting whole videos back to back waits (429) as if it had played them, and
# so does an app syncing more than an hour watched offline at once (it sends the rest again later).
WATCH_BUDGET_S = 3600.0
# Time spent over all of a user's videos comes from an allowance the same size, refilling at the same rate (what
# the per-video bound above leaves could otherwise be taken on many videos at once); what a report adds beyond
# it is not counted (its ranges are); a report bigger than a full allowance counts whole, the allowance in debt by
# the rest.
TIME_BUDGET_S = 3600.0


class OverBudget(Exception):
    """The report covers more new seconds than the learner's watch budget holds; nothing is stored."""

    def __init__(self, new_seconds: float, wait_s: float) -> None:
        super().__init__(f"{new_seconds:.0f} s newly watched is more than could have been played by now; "
                         f"report as you watch, or retry in {wait_s:.0f} s")
        self.wait_s = wait_s


class Gone(LookupError):
    """The video (or its course) was deleted while the report waited: 404."""


class ProgressError(ValueError):
    """Bad input: `field` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def merge(ranges: list[list[float]]) -> list[list[float]]:
    """Sorted, disjoint ranges covering the same seconds. Touching ranges join, and so do ranges less than
    TOLERANCE_S apart (a player's ticks leave such gaps: kept apart, they would pile up one range per report)."""
    out: list[list[float]] = []
    for a, b in sorted((float(a), float(b)) for a, b in ranges):
        if out and a < out[-1][1] + TOLERANCE_S:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def coarsen(ranges: list[list[float]], most: int) -> list[list[float]]:
    """(Merged) ranges cut down to `most` by joining the smallest gaps between them: a learner past the limit
    (a long lecture scrubbed through in many small jumps) goes on adding coverage, the skipped gaps joined
    counting as watched. Refusing instead locked the video for good: every later report of an unwatched part
    added a range."""
    if len(ranges) <= most:
        return ranges
    gaps = sorted(range(1, len(ranges)), key=lambda i: (ranges[i][0] - ranges[i - 1][1], i))
    join = set(gaps[:len(ranges) - most])  # the range at i joins the one before it
    out: list[list[float]] = []
    for i, (a, b) in enumerate(ranges):
        if i in join:
            out[-1][1] = b
        else:
            out.append([a, b])
    return out


def covered(ranges: list[list[float]]) -> float:
    return sum(b - a for a, b in ranges)


def overlap(ranges: list[list[float]], start: float, end: float) -> float:
    """Seconds of [start, end) the (merged) ranges cover."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in ranges)


def clip(ranges: list[list[float]], duration: float) -> list[list[float]]:
    """The parts of (merged) ranges inside [0, duration]: a re-ingest can make a video shorter than what was
    watched of it before."""
    return [[a, min(b, duration)] for a, b in ranges if a < duration]


# A re-ingest that made the video shorter: positions and watched ranges of its learners cut to the new length
# (in the ingest's transaction), so nothing past the end counts towards completion or shows as watched.
# (`strict`: in lax mode the path unwraps each [a, b] before the filter, and `@[1]` matched nothing.) Locked: a
# report committing meanwhile is read, not written over.
_PAST_END = """SELECT user_id, position_s, watched FROM video_progress
               WHERE video_id = $1 AND (position_s > $2 OR jsonb_path_exists(watched, 'strict $[*] ? (@[1] > $d)',
                                                                            jsonb_build_object('d', $2::float8)))
               ORDER BY user_id FOR UPDATE"""


def completes_at(share: float, duration: float) -> float:
    """The watched seconds that complete a video: its share of the duration, give or take a hair (a player whose
    media ends a fraction of a second before the stored duration could never finish a video at a share of 1)."""
    return share * duration - min(TOLERANCE_S, duration / 100)


async def fit_to_duration(tx: xp.XpTransaction, video_id: int, duration: float, complete_share: float) -> int:
    """Cut the video's stored progress to `duration` (in the re-ingest's transaction `tx`); returns the learners
    whose progress changed. Completion (and the XP it earned) stays: it was earned on the video as it was. A
    shorter video can also be complete now for learners who had not finished it (the same seconds are a larger share
    of less time): they complete it here, with the lesson's (and perhaps the course's) XP, as a report would."""
    conn = tx.conn
    rows = await conn.fetch(_PAST_END, video_id, float(duration))
    fitted = [(video_id, r["user_id"], min(r["position_s"], duration), w, covered(w))
              for r in rows for w in [clip(r["watched"], duration)]]
    await conn.executemany("UPDATE video_progress SET position_s = $3, watched = $4, watched_s = $5 "
                           "WHERE video_id = $1 AND user_id = $2", fitted)
    # bookmarks past the new end mark its end (their notes stay)
    await conn.execute("UPDATE bookmarks SET at_s = $2 WHERE video_id = $1 AND at_s > $2", video_id, float(duration))
    if duration > 0:
        done = await conn.fetch(_COMPLETE_NOW, video_id, completes_at(complete_share, duration))
        for r in done:
            if r["earns"]:
                await _award_completion(tx, r["user_id"], video_id, r["course_id"], True, r["completed_at"])
    return len(fitted)


# Progress on video $1 that now covers the share (as $2 seconds) without having been completed: completed now
# (locking the rows in learner order), except a learner's who may not see the course now: their next report, once
# back, completes it with its XP.
_COMPLETE_NOW = f"""
WITH due AS (SELECT user_id FROM video_progress WHERE video_id = $1 AND completed_at IS NULL AND watched_s >= $2
             ORDER BY user_id FOR UPDATE)
UPDATE video_progress p SET completed_at = now() FROM due, users u
WHERE p.video_id = $1 AND p.user_id = due.user_id AND u.id = p.user_id
  AND (u.role <> 'learner' OR {LEARNER_SEES_SQL.format(course="p.course_id", user="p.user_id")})
RETURNING p.user_id, p.course_id, p.completed_at, u.role = 'learner' AS earns"""


# A video made from captions (YouTube, an uploaded transcript) is as long as its last caption, while the player
# knows the real length (an outro without words, credits): this much past the end is taken (as the end) too.
CAPTIONS_SLACK_SHARE, CAPTIONS_SLACK_MAX_S = 0.1, 300.0


def past_end_slack(duration: float, source: str) -> float:
    """How far past `duration` a reported moment may lie (and is taken as the end)."""
    if source == "media":  # measured from the audio itself
        return TOLERANCE_S
    return max(TOLERANCE_S, min(CAPTIONS_SLACK_MAX_S, CAPTIONS_SLACK_SHARE * duration))


def check_report(duration: float, position: float, watched: list[list[float]],
                 slack: float = TOLERANCE_S) -> tuple[float, list[list[float]]]:
    """Validate a report against the video's duration (give or take `slack` past its end, see past_end_slack);
    returns the position and ranges clamped to it."""
    limit = duration + slack
    past = f", or up to {limit:g} s, taken as the end" if slack >= 1 else ""  # (what is taken, not only the length)
    if not 0 <= position <= limit:
        raise ProgressError("position", f"position must be between 0 and the video's duration ({duration:g} s{past})")
    if len(watched) > MAX_RANGES:
        raise ProgressError("watched", f"at most {MAX_RANGES} ranges per report")
    clean = []
    for i, r in enumerate(watched):
        if len(r) != 2:
            raise ProgressError(f"watched[{i}]", "a range is [start, end] in seconds")
        a, b = float(r[0]), float(r[1])
        if not (0 <= a <= limit and 0 <= b <= limit):
            raise ProgressError(f"watched[{i}]", f"range {r} is outside the video (0 to {duration:g} s{past})")
        if b <= a:
            raise ProgressError(f"watched[{i}]", f"range {r} " + ("is empty: it must end after it starts" if b == a
                                                                  else "ends before it starts"))
        a, b = min(a, duration) + 0.0, min(b, duration)  # (-0.0 as 0.0)
        if b > a:  # a range wholly in the tolerance past the end adds nothing
            clean.append([a, b])
    return min(position, duration) + 0.0, clean  # (+ 0.0: a -0.0 sent is stored and echoed as 0.0)


_LEARNER_LOCK = "SELECT pg_advisory_xact_lock(5148, hashint8($1))"
# Taken by progress reports; a video's deletion takes it FOR NO KEY UPDATE (store.videos.delete_video) and the
# course's FOR UPDATE (store.courses.delete_course), so either waits for the reports under way and the reports
# after it for it, instead of the two overlapping.
_COURSE_LOCK = "SELECT 1 FROM courses WHERE id = $1 FOR SHARE"


@dataclass(frozen=True, slots=True)
class Reported:
    row: asyncpg.Record
    duration: float
    completed_now: bool
    course_completed_now: bool
    awards: list[xp.Award]


_UPSERT = """
INSERT INTO video_progress AS p (user_id, video_id, course_id, position_s, watched, watched_s, time_spent_s,
                                 completed_at, updated_at, position_player, position_seq)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (user_id, video_id) DO UPDATE SET position_s = EXCLUDED.position_s, watched = EXCLUDED.watched,
    position_player = EXCLUDED.position_player, position_seq = EXCLUDED.position_seq,
    watched_s = EXCLUDED.watched_s, time_spent_s = p.time_spent_s + EXCLUDED.time_spent_s,
    completed_at = coalesce(p.completed_at, EXCLUDED.completed_at), updated_at = EXCLUDED.updated_at
RETURNING """ + _PROGRESS_COLS


async def report(tx: xp.XpTransaction, user_id: int, role: str, video: asyncpg.Record, position: float,
                 watched: list[list[float]], complete_share: float, at: datetime | None = None, *,
                 player: str | None = None, seq: int | None = None) -> Reported:
    """Store a progress report (validated by `check_report`) in `tx` and award what it earned. `player` and
    `seq`: the report's player and its number there; an older report of the player that set the position leaves
    the position where it is (its ranges still count)."""
    conn = tx.conn
    duration = float(video["duration_s"])
    # One report per learner at a time: two concurrent first reports of a video would each merge only their
    # own ranges (no row to lock yet), and a completing report (XP, then streak) would deadlock against a
    # first-of-the-day one (streak, then its XP).
    await conn.execute(_LEARNER_LOCK, user_id)
    # the report's time once it is the learner's turn: two reports straddling their midnight count both days in
    # the order they are stored (the later one's time taken first, the earlier day looked missed)
    at = at or datetime.now(timezone.utc)
    # The course row before the video's, as deleting the course or a video takes it (the other way round, a
    # first report, whose new row's key check needs the course row, deadlocked with a course deletion), and so
    # that a report racing a video's deletion sees the course as it is after it (the one video left to finish
    # gone: the course is complete).
    if await conn.fetchval(_COURSE_LOCK, video["course_id"]) is None:
        raise Gone(f"video {video['id']} not found")
    # the video's length now (a re-ingest that shortened it commits first: its cut to the new length then stands,
    # and this report is cut to it too)
    now_s = await conn.fetchval("SELECT duration_s FROM videos WHERE id = $1 FOR SHARE", video["id"])
    if now_s is None:
        raise Gone(f"video {video['id']} not found")
    if float(now_s) < duration:
        position = min(position, float(now_s))
        watched = clip(watched, float(now_s))
    duration = float(now_s)  # (also when a re-ingest made it longer: completion is a share of the new length)
    old = await conn.fetchrow(
        "SELECT watched, completed_at, updated_at, position_s, position_player, position_seq FROM video_progress "
        "WHERE user_id = $1 AND video_id = $2 FOR UPDATE",
        user_id, video["id"])
    same_player = (old is not None and player is not None and old["position_player"] == player and seq is not None
                   and old["position_seq"] is not None)
    repeat = same_player and old["position_seq"] == seq  # the stored report sent again (its response lost)
    if same_player and old["position_seq"] > seq:
        position, seq = min(old["position_s"], duration), old["position_seq"]  # sent before the one stored
    had = clip(old["watched"], duration) if old else []  # as of this video's length (see fit_to_duration)
    merged = coarsen(merge(had + watched), MAX_STORED_RANGES)
    watched_s = covered(merged)
    if role == "learner":
        await _spend_budget(conn, user_id, watched_s - covered(had), at)
    # re-watching (in a later report) counts as time spent, not as more coverage; within one report a second
    # itself counts once (a range repeated a hundred times is not a hundred times the time)
    spent = min(covered(merge(watched)), duration)
    if repeat:
        spent = 0.0  # its time is counted already
    elif old is not None:
        elapsed = max(0.0, (at - old["updated_at"]).total_seconds())
        spent = min(spent, (elapsed + SLACK_S) * MAX_PLAYBACK_RATE)
    spent = await _take_time(conn, user_id, spent, at)
    was_complete = old is not None and old["completed_at"] is not None
    complete = was_complete or (duration > 0 and watched_s >= completes_at(complete_share, duration))
    row = await conn.fetchrow(_UPSERT, user_id, video["id"], video["course_id"], position, merged, watched_s, spent,
                              # (a report sent again keeps the clock the next one's time is capped by: moved, it
                              # cut the next report's real seconds to what fit in the half second since the retry)
                              at if complete else None, old["updated_at"] if repeat else at, player, seq)
    completed_now = complete and not was_complete
    course_done = False
    before = len(tx.awards)
    if role == "learner":
        if complete:  # also on a video finished before: the course may have lost the one video left
            course_done = await _award_completion(tx, user_id, video["id"], video["course_id"], completed_now, at)
        if watched:
            await streaks.record_activity(tx, user_id, at)
    return Reported(row, duration, completed_now, course_done, tx.awards[before:])


async def _award_completion(tx: xp.XpTransaction, user_id: int, video_id: int, course_id: int, completed_now: bool,
                            at: datetime) -> bool:
    """The XP of a learner's completed video: the lesson's when `completed_now`, and the course's when every
    ready video of it is complete; True when the course's was awarded."""
    if completed_now:
        await tx.award(user_id, "lesson_completed", f"lesson:{video_id}", course_id=course_id, at=at)
        await tx.award(user_id, "first_lesson", "first_lesson", course_id=course_id, at=at)
    if await tx.conn.fetch(_FINISHED_UNAWARDED, course_id, user_id):
        return await tx.award(user_id, "course_completed", f"course:{course_id}", course_id=course_id,
                              at=at) is not None
    return False


async def _spend_budget(conn: asyncpg.Connection, user_id: int, new_seconds: float, at: datetime) -> None:
    """Take `new_seconds` from the learner's watch budget (in the report's transaction, under its learner lock);
    OverBudget when it does not hold them. A report bigger than a full budget passes on a full one and empties
    it (no debt: the player's next reports, as it plays, fit again at once)."""
    if new_seconds <= 0:
        return
    row = await conn.fetchrow("SELECT seconds, at FROM watch_budget WHERE user_id = $1", user_id)
    have = WATCH_BUDGET_S if row is None else min(
        WATCH_BUDGET_S, row["seconds"] + max(0.0, (at - row["at"]).total_seconds()) * MAX_PLAYBACK_RATE)
    need = min(new_seconds, WATCH_BUDGET_S)
    if have + 1e-6 < need:
        raise OverBudget(new_seconds, (need - have) / MAX_PLAYBACK_RATE)
    await conn.execute("""INSERT INTO watch_budget (user_id, seconds, at) VALUES ($1, $2, $3)
                          ON CONFLICT (user_id) DO UPDATE SET seconds = EXCLUDED.seconds, at = EXCLUDED.at""",
                       user_id, max(0.0, have - new_seconds), at)


async def _take_time(conn: asyncpg.Connection, user_id: int, spent: float, at: datetime) -> float:
    """Take up to `spent` seconds from the user's time-spent allowance (under the learner lock); returns what it
    held of them."""
    if spent <= 0:
        return 0.0
    row = await conn.fetchrow("SELECT time_s, time_at FROM watch_budget WHERE user_id = $1", user_id)
    have = TIME_BUDGET_S if row is None or row["time_at"] is None else min(
        TIME_BUDGET_S, row["time_s"] + max(0.0, (at - row["time_at"]).total_seconds()) * MAX_PLAYBACK_RATE)
    # a report bigger than a full allowance (one long video reported at its end) takes it whole: its time counts,
    # and the allowance goes into debt by the rest, so later reports count nothing until it has refilled past 0 (in
    # the long run time spent still grows at most at MAX_PLAYBACK_RATE)
    take = spent if have >= TIME_BUDGET_S - 1e-6 else max(0.0, min(spent, have))
    await conn.execute("""INSERT INTO watch_budget (user_id, seconds, at, time_s, time_at) VALUES ($1, $2, $4, $3, $4)
                          ON CONFLICT (user_id) DO UPDATE SET time_s = EXCLUDED.time_s, time_at = EXCLUDED.time_at""",
                       user_id, WATCH_BUDGET_S, have - take, at)
    return take


# Learners of course $1 (only learner $2 when given) who may see it now (enrolled, or it is published and free), have
# completed every ready video of it and have not earned `course_completed` for it yet.
_FINISHED_UNAWARDED = f"""
SELECT DISTINCT p.user_id FROM video_progress p JOIN users u ON u.id = p.user_id AND u.role = 'learner'
WHERE p.course_id = $1 AND p.completed_at IS NOT NULL AND ($2::bigint IS NULL OR p.user_id = $2)
  AND {LEARNER_SEES_SQL.format(course="$1", user="p.user_id")}
  AND EXISTS (SELECT 1 FROM videos v WHERE v.course_id = $1 AND v.status = 'ready')
  AND NOT EXISTS (SELECT 1 FROM videos v WHERE v.course_id = $1 AND v.status = 'ready'
                  AND NOT EXISTS (SELECT 1 FROM video_progress q WHERE q.video_id = v.id
                                  AND q.user_id = p.user_id AND q.completed_at IS NOT NULL))
  AND NOT EXISTS (SELECT 1 FROM xp_events x WHERE x.user_id = p.user_id AND x.idempotency_key = 'course:' || $1)"""


async def award_finished_courses(tx: xp.XpTransaction, course_id: int) -> int:
    """`course_completed` (in `tx`) for the learners who have now completed every ready video of the course
    without having earned it: after a video they had not finished was removed (no report of theirs would complete
    the course any more). Idempotent; returns the awards made."""
    rows = await tx.conn.fetch(_FINISHED_UNAWARDED, course_id, None)
    for r in rows:
        await tx.award(r["user_id"], "course_completed", f"course:{course_id}", course_id=course_id)
    return len(rows)


async def video_progress(conn: asyncpg.Connection, user_id: int, video_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_PROGRESS_COLS} FROM video_progress WHERE user_id = $1 AND video_id = $2",
                               user_id, video_id)


async def course_progress(conn: asyncpg.Connection, user_id: int, course_id: int) -> list[asyncpg.Record]:
    """Every ready video of the course with the learner's progress on it (NULLs where none)."""
    return await conn.fetch(
        """SELECT v.id AS video_id, v.title, v.duration_s, p.position_s, p.watched_s, p.time_spent_s,
                  p.completed_at, p.updated_at
           FROM videos v LEFT JOIN video_progress p ON p.video_id = v.id AND p.user_id = $2
           WHERE v.course_id = $1 AND v.status = 'ready' ORDER BY v.id""", course_id, user_id)


async def course_completion(conn: asyncpg.Connection, user_ids: list[int], course_id: int) -> dict[int, float]:
    """Share of the course's ready videos each learner completed (the matcher's pace)."""
    rows = await conn.fetch(
        """SELECT u.id, (SELECT count(*) FROM videos v WHERE v.course_id = $2 AND v.status = 'ready') AS total,
                  (SELECT count(*) FROM video_progress p JOIN videos v ON v.id = p.video_id
                   WHERE p.user_id = u.id AND p.course_id = $2 AND v.status = 'ready'
                   AND p.completed_at IS NOT NULL) AS done
           FROM unnest($1::bigint[]) AS u(id)""", user_ids, course_id)
    return {r["id"]: (r["done"] / r["total"] if r["total"] else 0.0) for r in rows}


async def chapter_strengths(conn: asyncpg.Connection, user_ids: list[int],
                            course_id: int) -> tuple[dict[int, str], dict[int, dict[int, float]]]:
    """({chapter id: title}, {user: {chapter id: strength 0..1}}) for the course's chapters. Strength is the
    graded score when the grader recorded one (`record_chapter_score`), else the share of the chapter watched."""
    chapters = await conn.fetch(
        """SELECT c.id, c.video_id, c.start_s, c.end_s, c.title FROM chapters c JOIN videos v ON v.id = c.video_id
           WHERE v.course_id = $1 AND v.status = 'ready' ORDER BY c.video_id, c.idx""", course_id)
    watched = await conn.fetch(
        "SELECT user_id, video_id, watched FROM video_progress WHERE course_id = $1 AND user_id = ANY($2::bigint[])",
        course_id, user_ids)
    graded = await conn.fetch(
        """SELECT s.user_id, s.chapter_id, s.score FROM chapter_scores s JOIN chapters c ON c.id = s.chapter_id
           JOIN videos v ON v.id = c.video_id WHERE v.course_id = $1 AND s.user_id = ANY($2::bigint[])""",
        course_id, user_ids)
    by_video: dict[tuple[int, int], list[list[float]]] = {(r["user_id"], r["video_id"]): r["watched"] for r in watched}
    scores = {(r["user_id"], r["chapter_id"]): float(r["score"]) for r in graded}
    out: dict[int, dict[int, float]] = {u: {} for u in user_ids}
    for u in user_ids:
        for ch in chapters:
            if (u, ch["id"]) in scores:
                out[u][ch["id"]] = scores[(u, ch["id"])]
            else:
                span = max(ch["end_s"] - ch["start_s"], 1e-6)
                out[u][ch["id"]] = min(1.0, overlap(by_video.get((u, ch["video_id"]), []), ch["start_s"], ch["end_s"]) / span)
    return {ch["id"]: ch["title"] for ch in chapters}, out


async def record_chapter_score(conn: asyncpg.Connection, user_id: int, chapter_id: int, score: float) -> None:
    """Hook for the grader: the learner's graded strength (0..1) on a chapter; the matcher prefers it to watch
    coverage."""
    await conn.execute(
        """INSERT INTO chapter_scores (user_id, chapter_id, score) VALUES ($1, $2, $3)
           ON CONFLICT (user_id, chapter_id) DO UPDATE SET score = EXCLUDED.score, updated_at = now()""",
        user_id, chapter_id, max(0.0, min(1.0, score)))


# --- bookmarks -----------------------------------------------------------------------------------------

MAX_BOOKMARKS = 500  # per learner and video


async def add_bookmark(conn: asyncpg.Connection, user_id: int, video_id: int, at_s: float,
                       note: str) -> asyncpg.Record | None:
    """Store a bookmark; None when the learner has MAX_BOOKMARKS on the video already (counted under the
    learner's lock, so concurrent adds cannot pass it)."""
    async with conn.transaction():
        await conn.execute(_LEARNER_LOCK, user_id)
        return await conn.fetchrow(
            f"""INSERT INTO bookmarks (user_id, video_id, at_s, note) SELECT $1, $2, $3, $4
               WHERE (SELECT count(*) FROM bookmarks WHERE user_id = $1 AND video_id = $2) < $5
               RETURNING {_BOOKMARK_COLS}""",
            user_id, video_id, at_s, note, MAX_BOOKMARKS)


async def list_bookmarks(conn: asyncpg.Connection, user_id: int, video_id: int, *,
                         limit: int | None = None, offset: int = 0) -> list[asyncpg.Record]:
    return await conn.fetch(f"SELECT {_BOOKMARK_COLS} FROM bookmarks WHERE user_id = $1 AND video_id = $2 "
                            "ORDER BY at_s, id "
                            "LIMIT $3 OFFSET $4", user_id, video_id, limit, offset)


async def bookmark_video(conn: asyncpg.Connection, user_id: int, bookmark_id: int) -> int | None:
    """The video of the user's bookmark (None: not theirs, or no such bookmark)."""
    return await conn.fetchval("SELECT video_id FROM bookmarks WHERE id = $1 AND user_id = $2", bookmark_id, user_id)


async def update_bookmark(conn: asyncpg.Connection, user_id: int, bookmark_id: int, at_s: float | None,
                          note: str | None) -> asyncpg.Record | None:
    """Change a bookmark's time and/or note (None: kept); None when it is gone."""
    return await conn.fetchrow(
        f"""UPDATE bookmarks SET at_s = coalesce($3, at_s), note = coalesce($4, note) WHERE id = $1 AND user_id = $2
            RETURNING {_BOOKMARK_COLS}""", bookmark_id, user_id, at_s, note)


async def delete_bookmark(conn: asyncpg.Connection, user_id: int, bookmark_id: int) -> bool:
    return await conn.fetchval("DELETE FROM bookmarks WHERE id = $1 AND user_id = $2 RETURNING id",
                               bookmark_id, user_id) is not None


BOOKMARK_RATE = 1.0  # bookmark writes (add, change, delete) per user and second, after a burst of
BOOKMARK_BURST = 30


def bookmark_limiter(redis: Redis) -> SendLimiter:
    return SendLimiter(redis, BOOKMARK_RATE, BOOKMARK_BURST, key=rate_bookmark)


# --- helpful answers -----------------------------------------------------------------------------------

class HelpfulError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def mark_helpful(db: asyncpg.Pool | asyncpg.Connection, redis: Redis, room_id: str, message_id: int,
                       marked_by: int | None, *, reason: str | None = None,
                       first: Callable[[asyncpg.Connection], Awaitable[Any]] | None = None
                       ) -> tuple[asyncpg.Record, bool]:
    """An instructor (or the tutor: `marked_by=None`, with its `reason`) marks a learner's room message helpful:
    its author earns `helpful_answer` XP once, and the room hears `message.helpful`. Returns (the mark, created).
    HelpfulError: not_found, not_a_learner. `first(conn)` runs in the mark's transaction before anything is written
    (the tutor's last checks, under its locks; what it raises rolls the mark back)."""
    async with xp.transaction(db, redis) as tx:
        if first is not None:
            await first(tx.conn)
        msg = await tx.conn.fetchrow(
            """SELECT m.id, m.author_id, u.role, r.course_id FROM messages m JOIN rooms r ON r.id = m.room_id
               LEFT JOIN users u ON u.id = m.author_id WHERE m.id = $1 AND m.room_id = $2 AND m.deleted_at IS NULL""",
            message_id, room_id)
        if msg is None:
            # a mark of a reply its author deleted since stays (and its XP): marking it again finds it (tester: 404)
            there = await tx.conn.fetchrow(
                f"SELECT {_HELPFUL_COLS} FROM helpful_marks WHERE message_id = $1 AND room_id = $2", message_id,
                room_id)
            if there is not None:
                return there, False
            raise HelpfulError("not_found", f"message {message_id} not found in this room")
        if msg["author_id"] is None or msg["role"] != "learner":
            raise HelpfulError("not_a_learner", "only a learner's message can be marked helpful")
        for _ in range(3):  # (a mark found there may be removed before it is read: then this one is new)
            row = await tx.conn.fetchrow(
                f"""INSERT INTO helpful_marks (message_id, room_id, author_id, marked_by, by_tutor)
                   VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (message_id) DO NOTHING RETURNING {_HELPFUL_COLS}""",
                message_id, room_id, msg["author_id"], marked_by, marked_by is None)
            if row is not None:
                break
            there = await tx.conn.fetchrow(f"SELECT {_HELPFUL_COLS} FROM helpful_marks WHERE message_id = $1",
                                           message_id)
            if there is not None:
                return there, False
        else:
            raise HelpfulError("conflict", "the message's mark kept changing; try again")
        # a mark given again after staff removed one earns again, under a key of its own (read after the insert: a
        # removal it waited for has committed)
        key = await tx.conn.fetchval(_HELPFUL_KEY, msg["author_id"], message_id)
        if key != f"helpful:{message_id}":
            await tx.conn.execute("UPDATE helpful_marks SET xp_key = $2 WHERE message_id = $1", message_id, key)
        await tx.award(msg["author_id"], "helpful_answer", key, course_id=msg["course_id"],
                       meta={"room": room_id, "message_id": message_id})
    # (stored: history's `helpful` shows it; only this nudge can be lost)
    await publish(redis, room_topic(room_id), MessageHelpful(
        room=room_id, message_id=message_id, author_id=msg["author_id"], by="tutor" if marked_by is None else "staff",
        reason=reason))
    return row, True


# The ledger key of a message's helpful mark: `helpful:<id>`, then `helpful:<id>#2`, `#3`… for marks given again after
# staff removed the earlier ones (each removal took its mark's XP back under `revoke:<key>`). $1 author, $2 message.
_HELPFUL_KEY = """
SELECT 'helpful:' || $2::bigint || CASE WHEN n = 0 THEN '' ELSE '#' || (n + 1) END
FROM (SELECT count(*) AS n FROM xp_events WHERE user_id = $1 AND kind = 'revoked'
      AND (idempotency_key = 'revoke:helpful:' || $2::bigint
           OR idempotency_key LIKE 'revoke:helpful:' || $2::bigint || '#%')) r"""


async def unmark_helpful(db: asyncpg.Pool | asyncpg.Connection, redis: Redis, room_id: str, message_id: int,
                         removed_by: int) -> asyncpg.Record | None:
    """Staff remove a helpful mark (theirs, another's, or the tutor's): the XP it earned its author is taken back
    (`xp.revoked` to them), the room hears `message.helpful_removed`, and a tutor's verdict on the reply becomes
    `not_helpful`. The removed mark, or None when the message has none. Marked again later, it earns again."""
    async with xp.transaction(db, redis) as tx:
        # the tutor's check first, as the tutor's mark takes them (its check, then the mark): no deadlock between them
        check = await tx.conn.fetchval("SELECT status FROM reply_checks WHERE message_id = $1 FOR UPDATE", message_id)
        row = await tx.conn.fetchrow(
            f"DELETE FROM helpful_marks WHERE message_id = $1 AND room_id = $2 RETURNING {_HELPFUL_COLS}, xp_key",
            message_id, room_id)
        if row is None:
            return None
        await tx.revoke(row["author_id"], row["xp_key"] or f"helpful:{message_id}",
                        meta={"room": room_id, "message_id": message_id, "removed_by": removed_by})
        if check in ("helpful", "pending"):  # the tutor does not mark it again (its check under way gives up)
            # the tutor's verdict overruled; a check still to run is skipped (it did not run: it does not count
            # towards the learner's checks)
            await tx.conn.execute(
                "UPDATE reply_checks SET status = $3, reason = $2, checked_at = now() WHERE message_id = $1",
                message_id, *((replies.STAFF_REMOVED, "not_helpful") if check == "helpful" and row["by_tutor"]
                              else (replies.STAFF_REMOVED_OWN, "skipped")))
    await publish(redis, room_topic(room_id), MessageHelpfulRemoved(room=room_id, message_id=message_id,
                                                                    author_id=row["author_id"], by="staff"))
    return row


def progress_limiter(redis: Redis, rate: float, burst: int) -> SendLimiter:
    """Progress reports per user: `rate` per second, bursts of `burst` (its own bucket, not the sends')."""
    return SendLimiter(redis, rate, burst, key=rate_progress)
