"""Assignments: instructor CRUD, publishing and generation from a chapter's transcript.

    POST   /api/v1/courses/{id}/assignments            GET /api/v1/courses/{id}/assignments
    POST   /api/v1/courses/{id}/assignments/generate
    GET/PATCH/DELETE /api/v1/assignments/{id}          POST /api/v1/assignments/{id}/publish, /unpublish
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from datetime import datetime, timezone
from typing import Any

import asyncpg
import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post

from server.api.assignment_schemas import (Assignment, AssignmentIn, AssignmentList, AssignmentPatch, Citation,
                                           Criterion, GenerateIn, Generated)
from server.api.courses import course_or_404
from server.api.paging import Offset, PageLimit
from server.auth import AuthUser, staff_only
from server.decode import callers_key, idempotency_key, read_json
from server.errors import CONFLICT, ApiError
from store import assignments as repo
from store import submissions as submissions_repo
from store.frames import as_read, blank
from store import keys
from store.keys import rate_generate
from store.ratelimit import SendLimiter

logger = logging.getLogger(__name__)

GENERATE_PER_HOUR = 30  # generations per user, refilling evenly, with bursts of GENERATE_BURST
GENERATE_BURST = 10
GENERATE_MODEL_CALLS = 4  # chapters written by the model at once in one generation
DEFAULT_RUBRIC = [{"name": "correctness", "points": 100.0, "description": "The answer is correct and complete."}]


def to_assignment(r: asyncpg.Record | dict, user: AuthUser, attempts_used: int | None = None) -> Assignment:
    staff = user.is_staff
    # before it opens, learners see that it exists and when it opens, not the questions
    locked = not staff and r["opens_at"] is not None and r["opens_at"] > datetime.now(timezone.utc)
    cite = None if locked else r["citation"]
    return Assignment(
        id=r["id"], course_id=r["course_id"], type=r["type"], title=r["title"], prompt="" if locked else r["prompt"],
        difficulty=r["difficulty"], status=r["status"], origin=r["origin"],
        rubric=[] if locked else [Criterion(c["name"], float(c["points"]), c.get("description", ""))
                                  for c in r["rubric"] or []],
        max_attempts=r["max_attempts"], opens_at=r["opens_at"], closes_at=r["closes_at"], video_id=r["video_id"],
        chapter_id=r["chapter_id"], concept=r["concept"], created_at=r["created_at"], updated_at=r["updated_at"],
        options=[] if locked else list(r["options"] or []),
        # the cited sentence is staff's: for a generated item it is the filled-in blank or the reference answer
        citation=Citation(video_id=cite["video_id"], start=cite["start"], end=cite.get("end"),
                          text=cite.get("text") if staff else None, url=cite.get("url")) if cite else None,
        reference_answer=r["reference_answer"] if staff and r["type"] != "multiple_choice" else None,
        correct=list(r["correct"] or []) if staff and r["type"] == "multiple_choice" else None,
        published_at=r["published_at"], attempts_used=attempts_used,
        multiple=len(r["correct"] or []) > 1 if r["type"] == "multiple_choice" and not locked else None)


def _moved(old: list[str], new: list[str]) -> bool:
    """Whether an option now stands at another position (reordered), rather than reworded in its place."""
    def norm(option: str) -> str:
        return " ".join(option.lower().split())

    olds = [norm(o) for o in old]
    return any(norm(o) != olds[i] and norm(o) in olds for i, o in enumerate(new) if i < len(olds))


async def assignment_or_404(conn: asyncpg.Connection, assignment_id: int, user: AuthUser) -> asyncpg.Record:
    """The assignment if `user` may see it: staff of its tenant; learners who see the course, once published."""
    row = await repo.get_for_tenant(conn, assignment_id, user.tenant_id)
    if row is None or (not user.is_staff and row["status"] != "published"):
        raise ApiError(404, f"assignment {assignment_id} not found")
    await course_or_404(conn, row["course_id"], user, missing=f"assignment {assignment_id} not found")
    return row


async def _lock_parents(conn: asyncpg.Connection, row: Any,
                        changes: dict[str, Any] | None = None) -> tuple[set, set]:
    """Before the assignment's own lock: the keys of its course, videos and chapters (as it is and as changed), as
    a deletion of the course or a video takes them before the assignment (its cascade sets `chapter_id` null); taken
    after, a PATCH moving the assignment to another chapter (or a forced deletion rescoring one) deadlocked with a
    video's deletion (audit)."""
    changes = changes or {}
    videos = {row["video_id"], changes.get("video_id")}
    chapters = {row["chapter_id"], changes.get("chapter_id")}
    if isinstance(changes.get("chapter_id"), int):  # (review) its video too, which the update sets from it
        videos.add(await conn.fetchval("SELECT video_id FROM chapters WHERE id = $1", changes["chapter_id"]))
    await conn.execute("SELECT 1 FROM courses WHERE id = $1 FOR KEY SHARE", row["course_id"])
    for table, ids in (("videos", videos), ("chapters", chapters)):
        if ids := sorted(i for i in ids if isinstance(i, int)):
            await conn.execute(f"SELECT 1 FROM {table} WHERE id = ANY($1::bigint[]) ORDER BY id FOR KEY SHARE", ids)
    return videos, chapters


def _same_parents(row: Any, locked: tuple[set, set]) -> None:
    """409 `conflict` when the assignment, locked now, was moved since its parents were locked (by a change that
    committed in between): its new video or chapter is not among them (review)."""
    if row is not None and (row["video_id"] not in locked[0] or row["chapter_id"] not in locked[1]):
        raise ApiError(409, CONFLICT, code="conflict", retry_after=1)


async def _links(conn: asyncpg.Connection, course_id: int, fields: dict[str, Any]) -> None:
    """Check video_id / chapter_id belong to the course; a chapter also sets the video and the concept."""
    if fields.get("chapter_id") is not None:
        ch = await repo.chapter_in_course(conn, course_id, fields["chapter_id"])
        if ch is None:
            raise ApiError(404, f"chapter {fields['chapter_id']} not found in this course", field="chapter_id")
        if fields.get("video_id") not in (None, ch["video_id"]):
            raise ApiError(400, "chapter_id belongs to another video", field="chapter_id")
        fields["video_id"] = ch["video_id"]
        fields["concept"] = ch["title"]
    if fields.get("video_id") is not None:
        vid = await conn.fetchrow("SELECT id, title FROM videos WHERE id = $1 AND course_id = $2",
                                  fields["video_id"], course_id)
        if vid is None:
            raise ApiError(404, f"video {fields['video_id']} not found in this course", field="video_id")
        if not fields.get("concept"):
            fields["concept"] = vid["title"]


def check_points(rubric: list[dict[str, Any]] | None) -> None:
    """A rubric sent in a request: scores go to 0.01 of a point, so full marks must be one of them. (A rubric
    stored before this rule stays editable: only what is sent is checked.)"""
    for i, c in enumerate(rubric or []):
        if abs(c["points"] * 100 - round(c["points"] * 100)) > 1e-6:
            raise ApiError(400, "rubric points take at most two decimals", field=f"rubric[{i}].points")


def _is_default(rubric: list[dict[str, Any]]) -> bool:
    return [(c["name"], float(c["points"]), c.get("description") or "") for c in rubric] == \
        [(c["name"], float(c["points"]), c["description"]) for c in DEFAULT_RUBRIC]


def validate(fields: dict[str, Any], sent: dict[str, Any] | None = None) -> dict[str, Any]:
    """The rules across fields, on the full (merged) assignment; fills the default rubric. `sent`: the fields the
    request gave (default: all), which must all apply to the assignment's type (none is dropped unsaid)."""
    kind = fields["type"]
    sent = fields if sent is None else sent
    if blank(fields["title"]):
        raise ApiError(400, "title must not be blank", field="title")
    if blank(fields["prompt"]):
        raise ApiError(400, "prompt must not be blank", field="prompt")
    if kind == "multiple_choice":
        options = fields.get("options") or []
        correct = fields.get("correct") or []
        if len(options) < 2:
            raise ApiError(400, "multiple choice needs at least 2 options", field="options")
        if (i := next((i for i, o in enumerate(options) if blank(o)), None)) is not None:
            raise ApiError(400, "an option must not be blank", field=f"options[{i}]")
        if len({as_read(o) for o in options}) != len(options):  # as a learner reads them ("Ｙes" is "Yes")
            raise ApiError(400, "options must be distinct", field="options")
        if not correct:
            raise ApiError(400, "multiple choice needs at least one correct option index", field="correct")
        if len(set(correct)) != len(correct) or any(i >= len(options) for i in correct):
            raise ApiError(400, f"correct must hold distinct indexes 0..{len(options) - 1}", field="correct")
        if len(correct) == len(options) and ("correct" in sent or "options" in sent):
            # (picking every option would score 100: no question at all)
            raise ApiError(400, "not every option may be correct: choosing them all would always score 100",
                           field="correct")
        fields["correct"] = sorted(correct)
        if sent.get("rubric"):
            raise ApiError(400, "multiple choice takes no rubric (its key is `correct`)", field="rubric")
        if not blank(sent.get("reference_answer") or ""):
            raise ApiError(400, "multiple choice takes no reference_answer (its key is `correct`)",
                           field="reference_answer")
        fields["rubric"] = []
        fields["reference_answer"] = ""
    else:
        if fields.get("options"):
            raise ApiError(400, f"{kind} takes no options", field="options")
        if fields.get("correct"):
            raise ApiError(400, f"{kind} takes no correct indexes", field="correct")
        fields["options"], fields["correct"] = [], []
        given = fields.get("rubric") or []
        if (i := next((i for i, c in enumerate(given) if blank(c["name"])), None)) is not None:
            raise ApiError(400, "a criterion's name must not be blank", field=f"rubric[{i}].name")
        names = [as_read(c["name"]) for c in given]
        if len(set(names)) != len(names):
            raise ApiError(400, "rubric criterion names must be distinct", field="rubric")
        for c in given:  # a description of invisible characters is none
            if blank(c.get("description") or ""):
                c["description"] = ""
        fields["rubric"] = given or DEFAULT_RUBRIC
        reference = (fields.get("reference_answer") or "").strip()
        fields["reference_answer"] = "" if blank(reference) else reference  # invisible characters are nothing
        # (the default criterion's words describe nothing: a PATCH removing the reference answer of an assignment
        # with it left only them to grade against)
        if not fields["reference_answer"] and (_is_default(given) or all(not c.get("description") for c in given)):
            raise ApiError(400, "a written assignment needs a reference_answer or rubric descriptions",
                           field="reference_answer")
    if fields.get("opens_at") and fields.get("closes_at") and fields["closes_at"] <= fields["opens_at"]:
        raise ApiError(400, "closes_at must be after opens_at", field="closes_at")
    return fields


def _plain(data: msgspec.Struct) -> dict[str, Any]:
    out = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not msgspec.UNSET}
    if out.get("rubric") is not None:
        out["rubric"] = [msgspec.structs.asdict(c) for c in out["rubric"]]
    return out


class AssignmentController(Controller):
    path = "/api/v1"
    tags = ["assignments"]

    @post("/courses/{course_id:int}/assignments", guards=[staff_only], status_code=201)
    async def create(self, request: Request, course_id: int) -> Assignment:
        data = _plain(await read_json(request, AssignmentIn))
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, user)
            await _links(conn, course_id, data)
            check_points(data.get("rubric"))
            row = await repo.create(conn, course_id, user.id, validate(data))
        return to_assignment(row, user)

    @get("/courses/{course_id:int}/assignments")
    async def list_assignments(self, request: Request, course_id: int, limit: int = PageLimit,
                               offset: int = Offset) -> AssignmentList:
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, user)
            rows = await repo.list_for_course(conn, course_id, published_only=not user.is_staff, limit=limit,
                                              offset=offset)
            used = {r["assignment_id"]: r["n"] for r in await conn.fetch(
                """SELECT assignment_id, count(*) AS n FROM submissions WHERE course_id = $1 AND user_id = $2
                   GROUP BY assignment_id""", course_id, user.id)}
        return AssignmentList(items=[to_assignment(r, user, used.get(r["id"], 0)) for r in rows], limit=limit,
                              offset=offset)

    @get("/assignments/{assignment_id:int}")
    async def read(self, request: Request, assignment_id: int) -> Assignment:
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            row = await assignment_or_404(conn, assignment_id, user)
            used = await conn.fetchval("SELECT count(*) FROM submissions WHERE assignment_id = $1 AND user_id = $2",
                                       assignment_id, user.id)
        return to_assignment(row, user, used)

    @patch("/assignments/{assignment_id:int}", guards=[staff_only])
    async def update(self, request: Request, assignment_id: int) -> Assignment:
        changes = _plain(await read_json(request, AssignmentPatch))
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn, conn.transaction():
            locked = await _lock_parents(conn, await assignment_or_404(conn, assignment_id, user), changes)
            # locked: a submission graded meanwhile waits for this change, so a corrected key misses none
            row = await repo.get(conn, assignment_id, lock="update")
            _same_parents(row, locked)
            if row is None:  # deleted meanwhile
                raise ApiError(404, f"assignment {assignment_id} not found")
            answered = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM submissions WHERE assignment_id = $1)",
                                           assignment_id)
            if answered and "type" in changes and changes["type"] != row["type"]:
                raise ApiError(409, "the type of an assignment with submissions cannot change", field="type")
            if answered and "options" in changes and len(changes["options"] or []) != len(row["options"] or []):
                # stored answers are option indexes: they would point at other options
                raise ApiError(409, "an assignment with submissions keeps its number of options (their wording "
                                    "may change)", field="options")
            if answered and "options" in changes and _moved(row["options"] or [], changes["options"] or []):
                raise ApiError(409, "an assignment with submissions keeps its options in their places (answers "
                                    "are stored by position; their wording may change)", field="options")
            check_points(changes.get("rubric"))
            merged = {k: row[k] for k in repo.EDITABLE} | changes
            if "type" in changes and changes["type"] != row["type"]:
                for k in ("options", "correct", "rubric", "reference_answer"):
                    if k not in changes:
                        merged[k] = None
            if "chapter_id" in changes or "video_id" in changes:
                merged["concept"] = ""
                if "video_id" in changes and "chapter_id" not in changes:
                    merged["chapter_id"] = None
                await _links(conn, row["course_id"], merged)
            merged = validate(merged, changes)
            key_changed = (answered and row["type"] == "multiple_choice" and merged.get("type") == "multiple_choice"
                           and sorted(merged.get("correct") or []) != sorted(row["correct"] or []))
            old_chapter = row["chapter_id"]
            row = await repo.update(conn, assignment_id, merged)
            regraded = await submissions_repo.regrade_choices(conn, row) if key_changed else []
            if answered and row["chapter_id"] != old_chapter:  # its grades count on the chapter it is on now
                await repo.rescore_chapters(conn, [old_chapter, row["chapter_id"]])
        async with request.app.state.pool.acquire() as conn:
            for sub in regraded:  # a corrected key: the new grades are final, announced, and earn what they earn
                await repo.on_grade_final(conn, request.app.state.redis, sub)
        return to_assignment(row, user)

    @delete("/assignments/{assignment_id:int}", guards=[staff_only], status_code=204)
    async def remove(self, request: Request, assignment_id: int, force: bool = False) -> None:
        """Delete a draft, or an assignment nobody answered; with submissions (their grades and grade
        history go with it) only with `?force=true`."""
        async with request.app.state.pool.acquire() as conn, conn.transaction():
            locked = await _lock_parents(conn, await assignment_or_404(conn, assignment_id, request.user))
            # locked: a submission arriving meanwhile waits, then 404s
            gone = await repo.get(conn, assignment_id, lock="update")
            _same_parents(gone, locked)
            n = await conn.fetchval("SELECT count(*) FROM submissions WHERE assignment_id = $1", assignment_id)
            if n and not force:
                raise ApiError(409, f"{n} submission(s) and their grades would be deleted with it; "
                                    "send ?force=true to delete anyway", code="has_submissions")
            await repo.delete(conn, assignment_id)
            if n and gone is not None:  # its grades no longer count towards its chapter's strengths
                await repo.rescore_chapters(conn, [gone["chapter_id"]])

    @post("/assignments/{assignment_id:int}/publish", guards=[staff_only], status_code=200)
    async def publish(self, request: Request, assignment_id: int) -> Assignment:
        async with request.app.state.pool.acquire() as conn:
            await assignment_or_404(conn, assignment_id, request.user)
            row = await repo.publish_assignment(conn, assignment_id)
        if row is None:  # deleted meanwhile
            raise ApiError(404, f"assignment {assignment_id} not found")
        return to_assignment(row, request.user)

    @post("/assignments/{assignment_id:int}/unpublish", guards=[staff_only], status_code=200)
    async def unpublish(self, request: Request, assignment_id: int) -> Assignment:
        """Back to a draft, hidden from learners, while nobody has answered it (their attempts and grades are
        read through the published assignment: 409 `has_submissions` then)."""
        async with request.app.state.pool.acquire() as conn, conn.transaction():
            await assignment_or_404(conn, assignment_id, request.user)
            # locked: a submission arriving meanwhile waits, then finds a draft (404)
            if await repo.get(conn, assignment_id, lock="update") is None:
                raise ApiError(404, f"assignment {assignment_id} not found")
            n = await conn.fetchval("SELECT count(*) FROM submissions WHERE assignment_id = $1", assignment_id)
            if n:
                raise ApiError(409, f"{n} submission(s) were made to it: learners read their grades through it",
                               code="has_submissions")
            row = await repo.unpublish_assignment(conn, assignment_id)
        return to_assignment(row, request.user)

    @post("/courses/{course_id:int}/assignments/generate", guards=[staff_only], status_code=201)
    async def generate(self, request: Request, course_id: int) -> Response[Generated]:
        """Draft items from a chapter (or every chapter of a video), each citing its moment. With an
        `Idempotency-Key` header, a repeat (a retry after the reply was lost) returns the drafts the key made (200)
        instead of making a second set."""
        from agents import generate as gen
        from agents.config import embedder_for
        from agents.llm import LLMError, get_llm
        from store import videos as videos_repo

        key = callers_key(request.user.id, idempotency_key(request))
        data = await read_json(request, GenerateIn)
        if (data.video_id is None) == (data.chapter_id is None):
            raise ApiError(400, "give exactly one of video_id or chapter_id", field="video_id")
        state, user = request.app.state, request.user
        # what this key is for (the types as a set: the same request re-sent with its list in another order)
        asked = hashlib.sha256(msgspec.json.encode(msgspec.structs.replace(data, types=sorted(set(data.types))))
                               ).digest()
        if key is not None:
            async with state.pool.acquire() as conn:
                await course_or_404(conn, course_id, user)
                done = await _generated_with(conn, course_id, key, user, asked)
            if done is not None:
                return Response(done, status_code=200)
        try:
            async with state.pool.acquire() as conn:
                await course_or_404(conn, course_id, user)
                if data.chapter_id is not None:
                    ch = await repo.chapter_in_course(conn, course_id, data.chapter_id)
                    if ch is None:
                        raise ApiError(404, f"chapter {data.chapter_id} not found in this course", field="chapter_id")
                    video_id = ch["video_id"]
                else:
                    video_id = data.video_id
                video = await conn.fetchrow(
                    "SELECT id, title, status, language FROM videos WHERE id = $1 AND course_id = $2",
                    video_id, course_id)
                if video is None:
                    raise ApiError(404, f"video {video_id} not found in this course", field="video_id")
                if video["status"] != "ready":
                    raise ApiError(409, f"video {video_id} is {video['status']}; generate once it is ready")
                chapters = [dict(c) for c in await videos_repo.list_chapters(conn, video_id)]
                sentences = [gen.Sentence(*s) for s in await repo.video_sentences(conn, video_id)]
                if not chapters:
                    chapters = [{"id": None, "start_s": 0.0, "end_s": float("inf"), "title": video["title"]}]
                targets = [c for c in chapters if data.chapter_id in (None, c["id"])]
                if not targets:  # the chapter went away meanwhile (a re-ingest rebuilt the chapters)
                    raise ApiError(409, f"chapter {data.chapter_id} is no longer part of video {video_id}; list it "
                                        "again", field="chapter_id")
                groups = {c["id"]: [s for s in sentences if c["start_s"] <= s.start < c["end_s"]] for c in chapters}
                # sentences items of this video already ask about: generating again asks about others (offline the
                # choice is deterministic: a second request stored the same items again)
                cited = {round(float(r["at"]), 2) for r in await conn.fetch(
                    "SELECT (citation ->> 'start')::float8 AS at FROM assignments WHERE course_id = $1 "
                    "AND video_id = $2 AND citation ? 'start'", course_id, video_id)}
                fresh = {cid: [x for x in g if round(x.start, 2) not in cited] for cid, g in groups.items()}
                per = [data.count // len(targets) + (1 if i < data.count % len(targets) else 0)
                       for i in range(len(targets))]
                if not any(groups[ch["id"]] for ch in targets):
                    raise ApiError(409, "the chapter has no sentences to build items from")
                work = [(ch, n) for ch, n in zip(targets, per) if n and fresh[ch["id"]]]
                if not work:  # (before the budget: nothing is generated)
                    raise ApiError(409, "every sentence of the chapter has an item already; edit or delete those, or "
                                        "generate from another chapter", code="nothing_new")
                # a generation to be: it takes from the budget, before the costly part (a request refused above
                # generated nothing: ten 404s for a mistyped chapter spent a third of the hour's)
                ok, wait = await SendLimiter(state.redis, GENERATE_PER_HOUR / 3600, GENERATE_BURST,
                                             key=rate_generate).take(user.id)
                if not ok:  # each generation may call the model once per chapter: a cost to bound
                    raise _BudgetSpent(wait)
                if key is not None:
                    await state.redis.set(keys.generating(user.id, key), b"1",
                                          px=int((state.settings.generate_deadline_s + 60) * 1000))
                # other chapters of the course (for distractors and for what makes this chapter distinctive)
                other_videos = [r["id"] for r in await conn.fetch(
                    "SELECT id FROM videos WHERE course_id = $1 AND status = 'ready' AND id <> $2 ORDER BY id LIMIT 20",
                    course_id, video_id)]
                other_groups: list[list[gen.Sentence]] = []
                for vid in other_videos:
                    vs = [gen.Sentence(*s) for s in await repo.video_sentences(conn, vid)]
                    for c in await videos_repo.list_chapters(conn, vid):
                        other_groups.append([s for s in vs if c["start_s"] <= s.start < c["end_s"]])
        except _BudgetSpent as spent:
            # a twin of a generation under way (the same key, sent at once) gets its drafts, not a 429
            twin = await _twin_drafts(state, course_id, key, user, asked) if key is not None else None
            if twin is not None:
                return Response(twin, status_code=200)
            raise ApiError(429, f"at most {GENERATE_PER_HOUR} generations an hour; retry in {spent.wait:g}s",
                           code="rate_limited", retry_after=spent.wait) from None

        try:
            embedder = await asyncio.to_thread(embedder_for, state.settings)
            try:
                llm = get_llm(state.settings)
            except LLMError:
                llm = None
            by_model: list[list] = [[] for _ in work]
            if llm is not None:  # a few chapters at a time, all within one deadline; the rest are written offline
                gate = asyncio.Semaphore(GENERATE_MODEL_CALLS)
                # all of a generation's model calls (STUDYHALL_GENERATE_DEADLINE_S): chapters the model has not written
                # by then are written offline
                limit_s = state.settings.generate_deadline_s
                deadline = asyncio.get_running_loop().time() + limit_s

                async def written(ch: dict, n: int) -> list:
                    async with gate:
                        left = deadline - asyncio.get_running_loop().time()
                        if left <= 0:
                            return []
                        try:
                            return await asyncio.wait_for(gen.llm_items(llm, ch["title"], video_id, fresh[ch["id"]], n,
                                                                        data.difficulty, list(data.types)), left)
                        except asyncio.TimeoutError:
                            logger.warning("generation: the model missed the request's %gs deadline; offline items for "
                                           "chapter %s", limit_s, ch["id"])
                            return []

                by_model = list(await asyncio.gather(*(written(ch, n) for ch, n in work)))
            generator = f"llm:{llm.name}" if llm is not None and any(by_model) else "offline"
            drafts: list[tuple[dict, Any]] = []
            for (ch, n), items in zip(work, by_model):
                if not items:
                    others = [g for cid, g in groups.items() if cid != ch["id"] and g] + [g for g in other_groups if g]
                    items = await asyncio.to_thread(gen.offline_items, ch["title"], video_id, fresh[ch["id"]], others,
                                                    n, data.difficulty, list(data.types), embedder,
                                                    language=video["language"] or "en")
                drafts += [(ch, it) for it in items]
            if not drafts:
                raise ApiError(409, "no item could be made from the chapter's sentences not asked about yet (too few "
                                    "distinct words for the types asked)", code="nothing_new")
            async with state.pool.acquire() as conn:
                try:
                    rows = await self._store_drafts(conn, course_id, user.id, video_id, drafts, key, generator, asked)
                except asyncpg.ForeignKeyViolationError as exc:  # the video or its chapters went meanwhile
                    raise ApiError(409, "the video's chapters were rebuilt (a re-ingest) or it was deleted while the "
                                        "items were written; generate again", code="conflict", retry_after=1) from exc
                if rows is None:  # its twin (the same key, at the same time) stored its drafts first: those stand
                    done = await _generated_with(conn, course_id, key, user, asked)  # type: ignore[arg-type]
                    return Response(done or Generated(items=[], generator=generator), status_code=200)
            logger.info("generated %d draft assignments", len(rows),
                        extra={"fields": {"course_id": course_id, "video_id": video_id, "generator": generator}})
            return Response(Generated(items=[to_assignment(r, user) for r in rows], generator=generator),
                            status_code=201)
        finally:  # (a twin waiting for these drafts stops waiting: they are stored, or there will be none)
            if key is not None:
                await state.redis.delete(keys.generating(user.id, key))


    @staticmethod
    async def _store_drafts(conn: asyncpg.Connection, course_id: int, user_id: int, video_id: int,
                            drafts: list, key: str | None, generator: str, asked: bytes) -> list | None:
        """The drafts stored, in one transaction; None when a generation with the same Idempotency-Key stored its
        own meanwhile (these are rolled back: that one's stand)."""
        from agents.generate import gives_away, masked, neutral_title

        # learners see every item's title and concept: none may give away the answer of any item of its chapter
        # (the items of a chapter share its title, which is often the very sentence an answer was blanked from, or
        # the one a short answer's reference is)
        # (the chapter's items made before count too: theirs and these titles are read side by side)
        before = await conn.fetch(
            """SELECT chapter_id, title, concept, options, correct, reference_answer, type, prompt FROM assignments
               WHERE course_id = $1 AND (chapter_id = ANY($2::bigint[]) OR chapter_id IS NULL AND video_id = $3)""",
            course_id, sorted({ch["id"] for ch, _ in drafts if ch["id"] is not None}), video_id)
        # the same question twice (a model writing what is there already; a sentence said twice in the lecture,
        # whose items came out alike): kept once
        seen = {(r["type"], " ".join(r["prompt"].lower().split())) for r in before}
        seen_refs = {" ".join(r["reference_answer"].lower().split()) for r in before if r["reference_answer"]}
        unique = []
        for ch, it in drafts:
            q = (it.type, " ".join(it.prompt.lower().split()))
            ref = " ".join((it.reference_answer or "").lower().split())
            if q in seen or (ref and ref in seen_refs):
                continue
            seen.add(q)
            if ref:
                seen_refs.add(ref)
            unique.append((ch, it))
        if not unique:
            if key is not None and await conn.fetchval(
                    "SELECT 1 FROM generation_requests WHERE course_id = $1 AND client_key = $2", course_id, key):
                return None  # its twin (the same key, sent at once) stored these very items: those stand
            raise ApiError(409, "every item written for the chapter asks what one of its items asks already; edit or "
                                "delete those, or generate from another chapter", code="nothing_new")
        drafts = unique
        by_chapter: dict[int, list[str]] = {}
        written: dict[int, list[str]] = {}
        shown: dict[int, list[str]] = {}  # the titles and concepts learners already see, per chapter
        for r in before:
            by_chapter.setdefault(r["chapter_id"], []).extend((r["options"] or [])[i] for i in r["correct"] or []
                                                              if i < len(r["options"] or []))
            if r["reference_answer"]:
                written.setdefault(r["chapter_id"], []).append(r["reference_answer"])
            shown.setdefault(r["chapter_id"], []).extend([r["title"], r["concept"] or ""])
        # an item whose answer an earlier item's title already shows is no question: left out
        drafts = [(ch, it) for ch, it in drafts
                  if not any(masked(t, [it.options[i] for i in it.correct or []]) != t
                             or (it.reference_answer and gives_away(t, it.reference_answer))
                             for t in shown.get(ch["id"], []))]
        if not drafts:
            raise ApiError(409, "every item written for the chapter would have its answer in the title of one of its "
                                "items already there; edit or delete those, or generate from another chapter",
                           code="nothing_new")
        for ch, it in drafts:
            by_chapter.setdefault(ch["id"], []).extend(it.options[i] for i in it.correct or [])
            if it.reference_answer:
                written.setdefault(ch["id"], []).append(it.reference_answer)
        try:
            async with conn.transaction():
                rows = []
                for ch, it in drafts:
                    answers, refs = by_chapter.get(ch["id"], []), written.get(ch["id"], [])
                    title, concept = masked(it.title, answers), masked(ch["title"], answers)
                    if any(gives_away(title, r) for r in refs):
                        title = masked(neutral_title(it.prompt, it.title, it.type), answers)
                    if any(gives_away(concept, r) for r in refs):
                        concept = masked(neutral_title(it.prompt, "", it.type), answers)
                    fields = {"type": it.type, "title": title, "prompt": it.prompt,
                              "difficulty": it.difficulty, "options": it.options, "correct": it.correct,
                              "reference_answer": it.reference_answer,
                              "rubric": [] if it.type == "multiple_choice" else DEFAULT_RUBRIC,
                              "video_id": video_id, "chapter_id": ch["id"],
                              "concept": concept, "citation": it.citation}
                    rows.append(await repo.create(conn, course_id, user_id, fields, origin="generated"))
                if key is not None and await conn.fetchval(
                        """INSERT INTO generation_requests (course_id, client_key, user_id, generator, assignment_ids,
                                                            request_sha)
                           VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING 1""",
                        course_id, key, user_id, generator, [r["id"] for r in rows], asked) is None:
                    raise _Twin()
        except _Twin:
            return None
        return rows


class _BudgetSpent(Exception):
    def __init__(self, wait: float) -> None:
        super().__init__(wait)
        self.wait = wait


async def _twin_drafts(state, course_id: int, key: str, user: AuthUser,  # type: ignore[no-untyped-def]
                       asked: bytes) -> Generated | None:
    """While a generation with this key runs (its mark in Redis), wait for its drafts (no connection held between
    looks); None when none runs."""
    deadline = time.monotonic() + state.settings.generate_deadline_s + 30
    while time.monotonic() < deadline:
        async with state.pool.acquire() as conn:
            done = await _generated_with(conn, course_id, key, user, asked)
        if done is not None:
            return done
        if not await state.redis.exists(keys.generating(user.id, key)):
            return None
        await asyncio.sleep(0.25)
    return None


class _Twin(Exception):
    """Another generation with the same Idempotency-Key stored its drafts first."""


async def _generated_with(conn: asyncpg.Connection, course_id: int, key: str, user: AuthUser,
                          asked: bytes) -> Generated | None:
    """The drafts a generation with this Idempotency-Key made (those still there), or None; 409 when the key was
    used for another request (`asked`: its digest)."""
    done = await conn.fetchrow("SELECT generator, assignment_ids, request_sha FROM generation_requests "
                               "WHERE course_id = $1 AND client_key = $2", course_id, key)
    if done is None:
        return None
    if done["request_sha"] is not None and bytes(done["request_sha"]) != asked:
        raise ApiError(409, "this Idempotency-Key was used for another generation; use a new key for a new one",
                       code="idempotency_key_reused", field="Idempotency-Key")
    rows = [r for r in [await repo.get(conn, i) for i in done["assignment_ids"]] if r is not None]
    return Generated(items=[to_assignment(r, user) for r in rows], generator=done["generator"])
