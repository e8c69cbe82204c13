"""Study-buddy matcher for a pod, as a LangGraph graph:

    gather (profiles, pace, chapter strengths) -> weigh (pair weights) -> match (max-weight matching)
    -> reasons (LLM when configured, template otherwise) -> post (store the round, post to the pod room)

Pair weight = sum of WEIGHTS x factor, each factor in [0, 1]:
  complement    mean over the course's chapters of |strength_a - strength_b| (one is strong where the other
                is weak; strength = graded chapter score, else share of the chapter watched)
  pace          1 - |course completion_a - completion_b|
  availability  shared weekly free time in UTC, capped at 3 h (0.5 when either gave none)
  timezone      1 - |UTC offset difference| / 12 h (circular; 0.5 when either never gave one)
  goals         Jaccard similarity of the stated goals
The matching is networkx's exact maximum-weight matching over every pair, with maximum cardinality (so
everyone is paired when the pod is even); with an odd pod the one left over joins the pair it adds the most
weight to, as a trio.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, TypedDict

import asyncpg
import networkx as nx
from langgraph.graph import END, START, StateGraph
from redis.asyncio import Redis
from redis.exceptions import LockError

from store import keys, matching, messages, profiles, progress
from store.frames import as_read, text_problem
from store.leaderboards import period_bounds
from store.settings import Settings

logger = logging.getLogger(__name__)

WEIGHTS = {"complement": 0.35, "pace": 0.15, "availability": 0.25, "timezone": 0.10, "goals": 0.15}
AVAILABILITY_FULL_MIN = 180  # this much shared time a week counts as a perfect overlap
SCALE = 10_000  # weights become integers for the matching (exact arithmetic, zero-weight pairs stay usable)
AUTHOR_NAME = "Study buddies"
AUTHOR_ROLE = "system"
# A reason's call as a whole; a slow model configured with more than the default request timeout
# (STUDYHALL_LLM_TIMEOUT_S, 60 s) gets that, up to REASON_MAX_S (well inside the pod's 120 s matching lease)
LLM_TIMEOUT_S = 30.0
DEFAULT_MODEL_TIMEOUT_S = Settings.llm_timeout_s
REASON_MAX_S = 90.0

REASON_SYSTEM = (
    "You introduce study buddies in an online course. Given facts about a pairing, write ONE friendly sentence "
    "(at most 40 words) telling them why they were matched. Use only the facts given; no greetings, no emojis.")
REASON_USER = "Members: {names}\nFacts:\n{facts}\nWrite the sentence."


@dataclass
class Learner:
    user_id: int
    name: str
    timezone: str = "UTC"
    slots: list[tuple[int, int]] = field(default_factory=list)  # [start, end) minutes of the UTC week
    goals: list[str] = field(default_factory=list)
    pace: float = 0.0  # share of the course's videos completed
    strengths: dict[int, float] = field(default_factory=dict)  # chapter id -> 0..1
    offset_h: float | None = 0.0  # None: the learner never gave their timezone


# --- pure parts (tested against brute force) ------------------------------------------------------------

def shared_minutes(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    return sum(max(0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


def common_slots(*members: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The times of the week every one of them is free."""
    common = members[0]
    for other in members[1:]:
        common = [(max(s1, s2), min(e1, e2)) for s1, e1 in common for s2, e2 in other if min(e1, e2) > max(s1, s2)]
    return common


def factors(a: Learner, b: Learner, chapters: list[int]) -> dict[str, float]:
    comp = (sum(abs(a.strengths.get(c, 0.0) - b.strengths.get(c, 0.0)) for c in chapters) / len(chapters)
            if chapters else 0.0)
    if a.slots and b.slots:
        avail = min(1.0, shared_minutes(a.slots, b.slots) / AVAILABILITY_FULL_MIN)
    else:
        avail = 0.5
    if a.offset_h is None or b.offset_h is None:  # not given: neither near nor far (as availability)
        tz = 0.5
    else:
        diff = abs(a.offset_h - b.offset_h) % 24
        tz = 1.0 - min(diff, 24 - diff) / 12
    # as the profile tells duplicates apart ("ＥＸＡＭ" is "exam"; "café" composed or not): not `lower()`
    ga, gb = {as_read(g) for g in a.goals}, {as_read(g) for g in b.goals}
    goals = len(ga & gb) / len(ga | gb) if ga | gb else 0.0
    return {"complement": comp, "pace": 1.0 - min(1.0, abs(a.pace - b.pace)), "availability": avail,
            "timezone": tz, "goals": goals}


def weight_of(f: dict[str, float]) -> float:
    return sum(WEIGHTS[k] * f[k] for k in WEIGHTS)


def int_weight(w: float) -> int:
    return int(round(w * SCALE)) + 1


def pair(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


def max_matching(ids: list[int], weights: dict[tuple[int, int], int]) -> list[list[int]]:
    """The pairs of a maximum-weight matching among those of maximum cardinality (everyone paired when even).
    `weights[(a, b)]` (a < b) for every pair of `ids` (pairs of others are ignored)."""
    g = nx.Graph()
    g.add_nodes_from(ids)
    g.add_weighted_edges_from((a, b, weights[pair(a, b)]) for a, b in itertools.combinations(sorted(ids), 2))
    return sorted(sorted(p) for p in nx.max_weight_matching(g, maxcardinality=True))


# Up to this many members an odd pod tries every possible trio (exact: C(13, 3) = 286 small matchings); above it,
# every member as the one left over, joining the pair it adds most to (n matchings).
EXACT_TRIO_MAX = 13


def best_groups(ids: list[int], weights: dict[tuple[int, int], int]) -> list[list[int]]:
    """Pairs of a maximum-weight perfect matching; with an odd count, one trio and pairs of the greatest total
    weight (a trio weighs its three pairs): exact up to EXACT_TRIO_MAX members, else the best over which member
    is left over by the matching of the others and joins the pair it adds the most to."""
    ids = sorted(ids)
    if len(ids) < 2:
        return [ids] if ids else []
    if len(ids) % 2 == 0:
        return max_matching(ids, weights)
    def groupings():  # type: ignore[no-untyped-def]
        if len(ids) <= EXACT_TRIO_MAX:
            for trio in itertools.combinations(ids, 3):
                yield max_matching([i for i in ids if i not in trio], weights) + [list(trio)]
            return
        for x in ids:
            groups = max_matching([i for i in ids if i != x], weights)
            k = max(range(len(groups)), key=lambda k: (weights[pair(x, groups[k][0])] + weights[pair(x, groups[k][1])], -k))
            groups[k] = sorted(groups[k] + [x])
            yield groups

    # the first of the heaviest groupings
    return sorted(max(groupings(), key=lambda groups: sum(group_weight(g, weights) for g in groups)))


def group_weight(group: list[int], weights: dict[tuple[int, int], int]) -> int:
    return sum(weights[pair(a, b)] for a, b in itertools.combinations(sorted(group), 2))


def mended_groups(kept: list[list[int]], ids: list[int], weights: dict[tuple[int, int], int]) -> list[list[int]]:
    """A round after someone dropped out of it (a decline, a leaving): the groups of `kept` whose members are all
    still here (`ids`) stay as they were; the learners left without a group (the one who dropped out's partners,
    newcomers) are grouped among themselves, or one left alone joins a pair as a third, or takes a trio's member
    as a partner, or a trio's member joins them. As in a fresh round there is a trio only for an odd count (a lone
    one joins a pair only when no trio can give up a member; repeated declines do not pile up trios); among
    those, the heaviest. Only the groups the drop-out touched change (and a trio that gives up a member), not
    everyone's buddy."""
    present = set(ids)
    stay = sorted(sorted(g) for g in kept if len(g) >= 2 and set(g) <= present)
    loose = sorted(present - {m for g in stay for m in g})
    options = []
    if len(loose) != 1:
        options.append(stay + [g for g in best_groups(loose, weights) if len(g) >= 2])
    for k, g in enumerate(stay):
        rest = stay[:k] + stay[k + 1:]
        if len(loose) == 1 and len(g) == 2:
            options.append(rest + [sorted(g + loose)])
        elif len(g) == 3 and len(loose) % 2 == 1:  # a trio's member makes the loose ones even: pairs
            options += [rest + [sorted(set(g) - {m})] + best_groups(loose + [m], weights) for m in g]
    if not options:
        return stay
    return sorted(max(options, key=lambda groups: (-sum(len(g) == 3 for g in groups),
                                                   sum(group_weight(g, weights) for g in groups))))


# --- reasons ------------------------------------------------------------------------------------------------

def _fmt_minutes(m: int) -> str:
    h, mm = divmod(m, 60)
    return f"{h} h" if not mm else (f"{h} h {mm} min" if h else f"{mm} min")


def facts_for(group: list[Learner], chapter_titles: dict[int, str]) -> list[str]:
    """Plain facts about a group, strongest first (the template and the LLM prompt both use them)."""
    scored: list[tuple[float, str]] = []
    pairs = list(itertools.combinations(group, 2))
    chapters = list(chapter_titles)
    fs = [factors(a, b, chapters) for a, b in pairs]
    mean = {k: sum(f[k] for f in fs) / len(fs) for k in WEIGHTS}
    # complement: who is ahead where
    if chapters and mean["complement"] > 0.05:
        ahead = []
        for m in group:
            others = [o for o in group if o is not m]
            best = max(chapters, key=lambda c: m.strengths.get(c, 0) - max(o.strengths.get(c, 0) for o in others))
            if m.strengths.get(best, 0) - max(o.strengths.get(best, 0) for o in others) > 0.2:
                ahead.append(f"{m.name} is ahead on “{chapter_titles[best]}”")
        if ahead:  # (one ahead alone teaches; "each other" is for two or more)
            scored.append((WEIGHTS["complement"] * mean["complement"],
                           "; ".join(ahead) + (" — you can teach each other" if len(ahead) > 1 else " and can help")))
    # time they are all free at once (for a trio, not just each pair now and then)
    shared = sum(e - s for s, e in common_slots(*(m.slots for m in group))) if all(m.slots for m in group) else 0
    if shared >= 30:
        scored.append((WEIGHTS["availability"] * mean["availability"], f"{_fmt_minutes(shared)} of shared free time a week"))
    common = set.intersection(*({as_read(g) for g in m.goals} for m in group))
    if common:
        goals = [g for g in group[0].goals if as_read(g) in common]
        scored.append((WEIGHTS["goals"] * mean["goals"], "shared goals: " + ", ".join(goals)))
    if mean["pace"] >= 0.8 and any(m.pace > 0 for m in group):  # ("0% and 0%" is no shared fact: nobody began)
        pcts = " and ".join(f"{round(m.pace * 100)}%" for m in group)
        scored.append((WEIGHTS["pace"] * mean["pace"], f"a similar pace ({pcts} through the course)"))
    if mean["timezone"] >= 0.9:
        scored.append((WEIGHTS["timezone"] * mean["timezone"], "close timezones"))
    scored.sort(key=lambda x: -x[0])
    return [s for _, s in scored]


def template_reason(group: list[Learner], chapter_titles: dict[int, str]) -> str:
    facts = facts_for(group, chapter_titles)[:3]
    if not facts:
        return "Matched to balance this week's pod: a fresh partner to study with."
    text = "; ".join(facts)
    # a name stays as its owner writes it ("alice" is not "Alice"); only the strengths fact starts with one (a
    # learner named "a" must not keep "a similar pace" lower-case)
    if any(text.startswith(f"{m.name} is ahead on ") for m in group):
        return text + "."
    return text[0].upper() + text[1:] + "."


REASON_MAX_CHARS = 400
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone one: not UTF-8


async def llm_reason(llm: Any, group: list[Learner], chapter_titles: dict[int, str]) -> str | None:
    facts = facts_for(group, chapter_titles) or ["they have not studied much yet; a fresh start together"]
    prompt = REASON_USER.format(names=", ".join(m.name for m in group), facts="\n".join(f"- {f}" for f in facts))
    try:
        # (a slow self-hosted model given a longer timeout never wrote a reason: the call was cut at 30 s)
        configured = float(getattr(llm, "_timeout", 0) or 0)
        limit = min(configured, REASON_MAX_S) if configured > DEFAULT_MODEL_TIMEOUT_S else LLM_TIMEOUT_S
        async with asyncio.timeout(limit):
            done = await llm.complete([{"role": "user", "content": prompt}], system=REASON_SYSTEM, max_tokens=120)
    except Exception as exc:  # noqa: BLE001 - a failed reason falls back to the template
        logger.warning("matcher: LLM reason failed (%s); using the template", str(exc) or type(exc).__name__)
        return None
    text = " ".join(done.text.split())
    if len(text) > REASON_MAX_CHARS:  # at a word, and marked as cut
        text = text[: REASON_MAX_CHARS - 1].rsplit(" ", 1)[0] + "…"
    # posted to the pod's room: the bar a member's message meets (and text Postgres can store), else the template
    problem = text_problem(text, REASON_MAX_CHARS, "the reason")
    why = ("was cut off at its length limit" if done.truncated else problem[1] if problem
           else "holds a lone surrogate" if _SURROGATE.search(text) else None)
    if why:
        logger.warning("matcher: the LLM's reason %s; using the template", why)
        return None
    return text


def _get_llm(settings: Settings) -> Any:
    try:
        from agents.llm import get_llm
    except ImportError:  # no model providers in this build: templates only
        return None
    try:
        return get_llm(settings)
    except Exception as exc:  # noqa: BLE001 - a misconfigured provider must not stop matching
        logger.warning("matcher: no LLM (%s); using templates", exc)
        return None


# --- the graph ------------------------------------------------------------------------------------------------

class MatchState(TypedDict, total=False):
    pod_id: int
    trigger: str  # manual | cron | decline
    round_key: str | None
    created_by: int | None
    declined: list[int]
    course_id: int
    learners: dict[int, Learner]
    chapter_titles: dict[int, str]
    weights: dict[tuple[int, int], int]
    groups: list[list[int]]
    reasons: list[str]
    reason_source: str
    match: dict[str, Any] | None
    skipped: bool
    based_on: int | None  # a decline's re-match: the round it was computed from
    week_since: datetime | None  # the weekly round: skip the pod if a round was made since (not by a decline)
    kept: list[dict[str, Any]] | None  # a re-match: the groups of `based_on` to keep ({members, reason})


@dataclass(frozen=True)
class Group:
    members: list[int]
    reason: str


@dataclass(frozen=True)
class MatchResult:
    match_id: int
    pod_id: int
    groups: list[Group]
    declined: list[int]
    created_at: datetime
    message_id: int | None
    superseded_at: datetime | None = None  # when a newer round became the pod's (None: it is the pod's round)


def result_of(row: Any) -> MatchResult:
    return MatchResult(match_id=row["id"], pod_id=row["pod_id"],
                       groups=[Group(members=list(g["members"]), reason=g["reason"]) for g in row["groups"]],
                       declined=list(row["declined"]), created_at=row["created_at"], message_id=row["message_id"],
                       superseded_at=row["superseded_at"])


def build_graph(pool: asyncpg.Pool, redis: Redis, settings: Settings, llm: Any = None):  # type: ignore[no-untyped-def]
    """The compiled matcher graph for these clients (`llm`: an agents.llm LLM, or None for templates)."""

    async def gather(state: MatchState) -> MatchState:
        async with pool.acquire() as conn:
            if state.get("round_key") and await matching.round_exists(conn, state["pod_id"], state["round_key"]):
                return {"skipped": True}
            course_id = await conn.fetchval("SELECT course_id FROM pods WHERE id = $1", state["pod_id"])
            members = [r for r in await matching.eligible_members(conn, state["pod_id"])
                       if r["user_id"] not in set(state.get("declined", []))]
            ids = [r["user_id"] for r in members]
            profs = await profiles.profiles_of(conn, ids)
            pace = await progress.course_completion(conn, ids, course_id) if ids else {}
            titles, strengths = await progress.chapter_strengths(conn, ids, course_id) if ids else ({}, {})
        now = datetime.now(timezone.utc)
        learners = {r["user_id"]: Learner(
            user_id=r["user_id"], name=r["name"], timezone=profs[r["user_id"]].timezone,
            slots=profiles.utc_week_minutes(profs[r["user_id"]], now), goals=profs[r["user_id"]].goals,
            pace=pace.get(r["user_id"], 0.0), strengths=strengths.get(r["user_id"], {}),
            offset_h=profiles.utc_offset_hours(profs[r["user_id"]].timezone, now) if profs[r["user_id"]].timezone_set
            else None) for r in members}
        return {"course_id": course_id, "learners": learners, "chapter_titles": titles, "skipped": False}

    # CPU work (every pair, then a maximum-weight matching) runs in a thread: the server and the worker keep
    # serving meanwhile
    async def weigh(state: MatchState) -> MatchState:
        chapters = list(state["chapter_titles"])
        ls = state["learners"]
        return {"weights": await asyncio.to_thread(
            lambda: {pair(a, b): int_weight(weight_of(factors(ls[a], ls[b], chapters)))
                     for a, b in itertools.combinations(sorted(ls), 2)})}

    async def match(state: MatchState) -> MatchState:
        kept = state.get("kept")
        if kept is None:
            groups = await asyncio.to_thread(best_groups, list(state["learners"]), state["weights"])
        else:
            groups = await asyncio.to_thread(mended_groups, [list(g["members"]) for g in kept],
                                             list(state["learners"]), state["weights"])
        return {"groups": [g for g in groups if len(g) >= 2]}

    async def reasons(state: MatchState) -> MatchState:
        ls, titles = state["learners"], state["chapter_titles"]
        # a group kept from the round re-matched keeps its reason (no model call for it)
        old = {tuple(sorted(g["members"])): g["reason"] for g in state.get("kept") or []}
        fresh = [g for g in state["groups"] if tuple(g) not in old]
        groups = [[ls[i] for i in g] for g in fresh]
        if llm is not None and groups:
            got = await asyncio.gather(*(llm_reason(llm, g, titles) for g in groups))
            sources = {"llm" if r else "template" for r in got}
            made = [r or template_reason(g, titles) for r, g in zip(got, groups)]
        else:
            sources, made = ({"template"} if groups else set()), [template_reason(g, titles) for g in groups]
        if len(fresh) < len(state["groups"]):  # some groups kept, with the reasons they had
            sources.add("kept")
        new = dict(zip(map(tuple, fresh), made))
        return {"reasons": [new.get(tuple(g)) or old[tuple(g)] for g in state["groups"]],
                "reason_source": sources.pop() if len(sources) == 1 else "mixed" if sources else "template"}

    async def post(state: MatchState) -> MatchState:
        groups = [{"members": g, "reason": r} for g, r in zip(state["groups"], state["reasons"])]
        if not groups and state.get("round_key"):
            # learners left between the listing of pods and this run: no empty round under the week's key
            # (it would keep the pod out of that week's round if they came back)
            return {"skipped": True}
        async with pool.acquire() as conn:
            row = await matching.save_round(conn, state["pod_id"], state["trigger"], groups,
                                            round_key=state.get("round_key"), created_by=state.get("created_by"),
                                            declined=state.get("declined", []), based_on=state.get("based_on"),
                                            unless_since=state.get("week_since"))
        if row is None:
            return {"skipped": True}
        # Someone who left the pod or course after `gather` listed them is in this round: their leaving looked for
        # rounds pairing them before this one was saved. Looked at after the commit, one of the two always sees
        # the other (a leaving committed before this look is seen here; one after it finds this round).
        async with pool.acquire() as conn:
            still = {r["user_id"] for r in await matching.eligible_members(conn, state["pod_id"])}
        for uid in sorted({m for g in groups for m in g["members"]} - still):
            after_leaving_soon(pool, redis, settings, uid, pod_id=state["pod_id"])
        names = {uid: learner.name for uid, learner in state["learners"].items()}
        message_id = await announce(pool, redis, row, names, state["reason_source"], settings.ws_max_text)
        return {"match": dict(row, message_id=message_id)}

    g = StateGraph(MatchState)
    g.add_node("gather", gather)
    g.add_node("weigh", weigh)
    g.add_node("match", match)
    g.add_node("reasons", reasons)
    g.add_node("post", post)
    g.add_edge(START, "gather")
    g.add_conditional_edges("gather", lambda s: END if s.get("skipped") else "weigh")
    g.add_edge("weigh", "match")
    g.add_edge("match", "reasons")
    g.add_edge("reasons", "post")
    g.add_edge("post", END)
    return g.compile()


ANNOUNCE_HEAD = "This week's study buddies:\n"


MIN_REASON_CHARS = 16  # a reason shortened to less is left out of the post (names only)


def announcement(groups: list[dict[str, Any]], names: dict[int, str], max_chars: int) -> str:
    """The round as the pod room reads it: a line per group, its members and its reason. At most `max_chars` (a
    member's message limit: a pod of 50 with a model's 400-character reasons made 10,000): then every reason is
    shortened alike in the text, cut at a word and marked (`meta.groups` and the REST round keep them whole); when
    that leaves each reason under MIN_REASON_CHARS, or even the names are too long, whole groups without reasons as
    many as fit, and how many more there are."""
    heads = [f"• {' + '.join(names.get(m, f'learner {m}') for m in g['members'])}: " for g in groups]
    reasons = [str(g["reason"]) for g in groups]
    text = ANNOUNCE_HEAD + "\n".join(h + r for h, r in zip(heads, reasons))
    if len(text) <= max_chars:
        return text
    fixed = len(ANNOUNCE_HEAD) + sum(map(len, heads)) + len(heads) - 1
    budget = (max_chars - fixed) // len(groups)

    def cut(r: str) -> str:
        return r if len(r) <= budget else (r[: budget - 1].rsplit(" ", 1)[0].rstrip(" ,;:—") + "…")

    # (a reason cut to a few characters says nothing: "• A + B: …" read as a broken post)
    text = ANNOUNCE_HEAD + "\n".join(h + cut(r) for h, r in zip(heads, reasons))
    if budget >= MIN_REASON_CHARS and len(text) <= max_chars:
        return text
    # the names alone are too long (long names, a low limit): whole groups, no reasons, as many as fit, then a count
    lines = [h.removesuffix(": ") for h in heads]
    for shown in range(len(lines), -1, -1):
        more = len(lines) - shown
        rest = f"\n… and {more} more group{'s' if more > 1 else ''}" if more else ""
        text = ANNOUNCE_HEAD + "\n".join(lines[:shown]) + rest
        if len(text) <= max_chars:
            return text
    return text[:max_chars]


async def announce(pool: asyncpg.Pool, redis: Redis, row: Any, names: dict[int, str],
                   reason_source: str, max_chars: int = 4000) -> int | None:
    """Post a stored round to its pod room and record the message; its id, or None when the post failed (the
    round stands; the weekly run posts it later). Posting twice gives the one message (its client_msg_id).
    `max_chars`: the text's limit (STUDYHALL_WS_MAX_TEXT)."""
    groups = row["groups"]
    text = announcement(groups, names, max_chars) if groups else "Not enough learners left to pair up this round."
    meta = {"kind": "study_buddies", "match_id": row["id"], "groups": groups, "reason_source": reason_source,
            "declined": list(row["declined"] or [])}
    try:
        posted = await messages.post_message(pool, redis, f"pod:{row['pod_id']}", None, text, meta,
                                             f"match:{row['id']}", author_name=AUTHOR_NAME, author_role=AUTHOR_ROLE)
        async with pool.acquire() as conn:
            await matching.set_message(conn, row["id"], posted.event.id)
        return posted.event.id
    except Exception:  # noqa: BLE001 - the round stands; only its announcement failed
        logger.warning("matcher: could not post round %s to pod %s", row["id"], row["pod_id"], exc_info=True)
        return None


async def run_match(pool: asyncpg.Pool, redis: Redis, settings: Settings, pod_id: int, *, trigger: str = "manual",
                    created_by: int | None = None, round_key: str | None = None, declined: list[int] | None = None,
                    llm: Any = "settings", based_on: int | None = None,
                    week_since: datetime | None = None, kept: list[dict[str, Any]] | None = None) -> MatchResult | None:
    """Match the pod's learners and post the result to its room; None when `round_key` already ran (or, with
    `week_since`, when the pod got a round other than by a decline since then). Raises matching.StaleRound when
    `based_on` is no longer the current round. `kept`: mend that round's groups ({members, reason}) rather than
    matching everyone anew (`mended_groups`)."""
    model = _get_llm(settings) if llm == "settings" else llm
    graph = build_graph(pool, redis, settings, model)
    out = await graph.ainvoke({"pod_id": pod_id, "trigger": trigger, "round_key": round_key,
                               "created_by": created_by, "declined": list(declined or []), "based_on": based_on,
                               "week_since": week_since, "kept": kept})
    if out.get("skipped") or not out.get("match"):
        return None
    return result_of(out["match"])


class DeclineError(Exception):
    """The decline could not be made now (the round kept changing): trying again can work."""


class NotMatched(DeclineError):
    """The learner is not in the pod's current round."""


class UnknownRound(DeclineError):
    """The round the decliner says they saw was never one of the pod's."""


class StaleDecline(DeclineError):
    """The round the learner declined was replaced by a newer one (not a re-match of it after declines)."""


class PodBusy(Exception):
    """Another round of the pod was being computed for longer than we waited."""


MATCH_LEASE_S = 120.0  # a pod's matching lock ends on its own after this (a holder that died)
MATCH_WAIT_S = 60.0  # how long a decline or a manual round waits for the pod's turn
DECLINE_TRIES = 5  # re-matches attempted when a round not made under the lock lands meanwhile


@asynccontextmanager
async def pod_turn(redis: Redis, pod_id: int, *, wait_s: float = MATCH_WAIT_S) -> AsyncIterator[None]:
    """This process's turn to compute a round of the pod (see keys.POD_MATCHING); PodBusy when it did not come
    within `wait_s` (0: do not wait). Correctness does not rest on it: a round is saved only on the round it
    was computed from (`based_on`, a round key), so a lease that ran out costs a retry, not a lost decline."""
    lock = redis.lock(keys.pod_matching(pod_id), timeout=MATCH_LEASE_S)
    if not await lock.acquire(blocking=wait_s > 0, blocking_timeout=wait_s or None):
        raise PodBusy(f"pod {pod_id}'s study-buddy round is being computed; try again shortly")
    try:
        yield
    finally:
        try:
            await lock.release()
        except LockError:  # the lease ran out meanwhile (and someone else may hold it now): nothing to free
            logger.warning("matcher: pod %s's matching lock expired before it was released", pod_id)


async def decline(pool: asyncpg.Pool, redis: Redis, settings: Settings, pod_id: int, user_id: int,
                  llm: Any = "settings", *, seen: int | None = None) -> MatchResult:
    """The learner sits this round out: the rest of the pod is matched again without them (and without earlier
    decliners of this round). `seen`: the round they saw; StaleDecline when a newer round (a manual or weekly
    one, not a re-match of it after declines) replaced it, so a decline never lands on a round never seen.
    Declines arriving together take turns (pod_turn), each building on the round the one before it made."""
    result = await _rematch(pool, redis, settings, pod_id, user_id, declining=True, llm=llm, seen=seen)
    if result is None:
        raise NotMatched("you are not in this pod's current study-buddy round")
    return result


async def after_leaving(pool: asyncpg.Pool, redis: Redis, settings: Settings, user_id: int, *,
                        pod_id: int | None = None, course_id: int | None = None, llm: Any = "settings") -> int:
    """A learner left a pod (or the course of its pods): each of those pods whose current round still pairs
    them is matched again without them, as after a decline, so their partners are not left without a buddy
    until next week. Failures are logged (the weekly round makes up for them); returns the rounds made."""
    async with pool.acquire() as conn:  # only pods whose current round pairs them (no lock taken for the rest)
        pods = [r["pod_id"] for r in await conn.fetch(
            """SELECT m.pod_id FROM pod_matches m JOIN pods p ON p.id = m.pod_id
               WHERE m.superseded_at IS NULL AND ($2::bigint IS NULL OR m.pod_id = $2)
                 AND ($3::bigint IS NULL OR p.course_id = $3)
                 AND EXISTS (SELECT 1 FROM jsonb_array_elements(m.groups) g
                             WHERE g -> 'members' @> to_jsonb($1::bigint))
               ORDER BY m.pod_id""", user_id, pod_id, course_id)]
    made = 0
    for p in pods:
        try:
            made += await _rematch(pool, redis, settings, p, user_id, declining=False, llm=llm) is not None
        except matching.PodGone:  # the pod was deleted meanwhile
            pass
        except Exception:  # noqa: BLE001 - the leaving stands; the weekly round re-pairs the rest
            logger.warning("matcher: could not re-match pod %s after user %s left", p, user_id, exc_info=True)
    return made


JOIN_WITHIN = "7 days"  # a learner who joins is taken into a round this recent; an older one waits for the next
JOIN_SETTLE_S = 2.0  # a join waits this long, so several learners added at once are taken in by one round


async def after_joining(pool: asyncpg.Pool, redis: Redis, settings: Settings, user_id: int, *,
                        pod_id: int | None = None, course_id: int | None = None, llm: Any = "settings") -> int:
    """A learner joined a pod (or came back to the course of their pods) after its current round was made: they
    join that round as a newcomer joins after a decline (with another learner left without a group, as a pair's
    third, or taking a trio's member), instead of waiting for next week's round alone. Only the groups that
    touches change. Failures are logged (the worker's quarter-hourly run tries again); returns the rounds made."""
    if pod_id is not None:  # whoever of its joiners is still there (the first may have left again) is taken in
        pods = [pod_id]
    else:
        async with pool.acquire() as conn:
            pods = [r["pod_id"] for r in await conn.fetch(
                """SELECT m.pod_id FROM pod_members m JOIN pods p ON p.id = m.pod_id
                   WHERE m.user_id = $1 AND ($2::bigint IS NULL OR p.course_id = $2) ORDER BY m.pod_id""",
                user_id, course_id)]
    made = 0
    for p in pods:
        try:
            made += await _take_in(pool, redis, settings, p, llm=llm) is not None
        except matching.PodGone:
            pass
        except Exception:  # noqa: BLE001 - the joining stands; the next run (or round) pairs them
            logger.warning("matcher: could not add the newcomers of pod %s to its round", p, exc_info=True)
    return made


async def _take_in(pool: asyncpg.Pool, redis: Redis, settings: Settings, pod_id: int, *,
                   llm: Any) -> MatchResult | None:
    """Mend the pod's current round so its learners in none of its groups (not its decliners) get one; None when
    there is no round, nobody is left out, or one is left out with no group to join."""
    for _ in range(DECLINE_TRIES):
        async with pod_turn(redis, pod_id):
            async with pool.acquire() as conn:
                cur = await matching.current(conn, pod_id)
                if cur is None or not await conn.fetchval(
                        f"SELECT $1::timestamptz > now() - interval '{JOIN_WITHIN}'", cur["created_at"]):
                    return None  # no round of late (an old one is not reposted as "this week's"): the next round
                here = {r["user_id"] for r in await matching.eligible_members(conn, pod_id)}
            grouped = {m for g in cur["groups"] for m in g["members"]}
            out = here - grouped - set(cur["declined"])
            if not out or (len(out) == 1 and not any(set(g["members"]) <= here for g in cur["groups"])):
                return None
            try:
                return await run_match(pool, redis, settings, pod_id, trigger="decline", declined=list(cur["declined"]),
                                       llm=llm, based_on=cur["id"], kept=list(cur["groups"]))
            except matching.StaleRound:
                continue
    raise DeclineError("the pod's round kept changing while adding its newcomers")


_leaving: set[asyncio.Task] = set()  # re-matches after someone left or joined, under way in this process


def after_leaving_soon(pool: asyncpg.Pool, redis: Redis, settings: Settings, user_id: int, *,
                       pod_id: int | None = None, course_id: int | None = None) -> None:
    """`after_leaving` in the background: the unenrolment or the leaving answers at once (re-matching waits for
    each pod's turn and may ask the model for reasons). A process stopping first loses it; the weekly round
    re-pairs the rest."""
    task = asyncio.create_task(after_leaving(pool, redis, settings, user_id, pod_id=pod_id, course_id=course_id))
    _leaving.add(task)
    task.add_done_callback(_leaving.discard)


_settling: dict[tuple[Any, ...], asyncio.Task] = {}  # joins waiting JOIN_SETTLE_S, by pod (or learner and course)


def after_joining_soon(pool: asyncpg.Pool, redis: Redis, settings: Settings, user_id: int, *,
                       pod_id: int | None = None, course_id: int | None = None) -> None:
    """`after_joining` in the background (the joining answers at once), after JOIN_SETTLE_S: learners added to a
    pod one after another meanwhile are taken in by the one round (one post, not one per learner)."""
    key = ("pod", pod_id) if pod_id is not None else ("course", course_id, user_id)
    if (t := _settling.get(key)) is not None and not t.done() and t.get_loop() is asyncio.get_running_loop():
        return  # (it takes in everyone left out when it runs)

    async def run() -> None:
        await asyncio.sleep(JOIN_SETTLE_S)
        _settling.pop(key, None)
        await after_joining(pool, redis, settings, user_id, pod_id=pod_id, course_id=course_id)

    task = _settling[key] = asyncio.create_task(run())
    _leaving.add(task)
    task.add_done_callback(_leaving.discard)


async def drain_leaving(timeout: float = 10.0) -> None:
    """At shutdown: let the re-matches under way finish (the worker's runs make up for any cut short)."""
    if _leaving:
        await asyncio.wait(list(_leaving), timeout=timeout)


# (pod, a member of its current round who is no longer in the pod or the course), one per pod
_DEPARTED = """
SELECT DISTINCT ON (m.pod_id) m.pod_id, mem::bigint AS user_id FROM pod_matches m
JOIN pods p ON p.id = m.pod_id
CROSS JOIN LATERAL jsonb_array_elements(m.groups) g CROSS JOIN LATERAL jsonb_array_elements_text(g -> 'members') mem
WHERE m.superseded_at IS NULL AND NOT EXISTS (
    SELECT 1 FROM pod_members pm JOIN enrollments e ON e.course_id = p.course_id AND e.user_id = pm.user_id
    WHERE pm.pod_id = m.pod_id AND pm.user_id = mem::bigint)
ORDER BY m.pod_id"""


# (pod, a learner of the pod in none of its current round's groups and not declined), one per pod
_LEFT_OUT = f"""
SELECT DISTINCT ON (m.pod_id) m.pod_id, pm.user_id FROM pod_matches m
JOIN pods p ON p.id = m.pod_id JOIN pod_members pm ON pm.pod_id = m.pod_id
JOIN users u ON u.id = pm.user_id AND u.role = 'learner'
JOIN enrollments e ON e.course_id = p.course_id AND e.user_id = pm.user_id
WHERE m.superseded_at IS NULL AND m.created_at > now() - interval '{JOIN_WITHIN}'
  AND NOT pm.user_id = ANY(m.declined)
  AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(m.groups) g WHERE g -> 'members' @> to_jsonb(pm.user_id))
ORDER BY m.pod_id, pm.user_id"""


async def rematch_departed(pool: asyncpg.Pool, redis: Redis, settings: Settings, llm: Any = "settings") -> int:
    """Re-match the pods whose current round still pairs someone who left, or leaves out a learner who joined
    (the re-match after their leaving or joining was cut short by a restart); returns the rounds made. The worker
    runs it every quarter hour."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(_DEPARTED)
        left_out = await conn.fetch(_LEFT_OUT)
    made = 0
    for r in rows:
        made += await after_leaving(pool, redis, settings, r["user_id"], pod_id=r["pod_id"], llm=llm)
    for r in left_out:
        made += await after_joining(pool, redis, settings, r["user_id"], pod_id=r["pod_id"], llm=llm)
    return made


async def _rematch(pool: asyncpg.Pool, redis: Redis, settings: Settings, pod_id: int, user_id: int, *,
                   declining: bool, llm: Any, seen: int | None = None) -> MatchResult | None:
    """Match the pod again on its current round, without `user_id` (a decliner; or a leaver, whom the graph
    leaves out as no longer eligible); None when the current round does not pair them. A decliner the current
    round already lists as declined gets that round (their decline's)."""
    for _ in range(DECLINE_TRIES):
        async with pod_turn(redis, pod_id):
            async with pool.acquire() as conn:
                cur = await matching.current(conn, pod_id)
                if seen is not None:
                    since = await matching.declines_only_since(conn, pod_id, seen)
                    if since is None:
                        raise UnknownRound(f"match {seen} is not a round of this pod")
                    if not since:
                        raise StaleDecline(f"round {seen} is no longer this pod's round; read the current one "
                                           f"(GET /pods/{pod_id}/match) before declining")
            if declining and cur is not None and user_id in cur["declined"]:
                return result_of(cur)  # declined already (a retry whose answer was lost): the round that made
            if cur is None or not any(user_id in g["members"] for g in cur["groups"]):
                return None
            declined = set(cur["declined"]) | ({user_id} if declining else set())
            try:  # saved only if `cur` is still current
                return await run_match(pool, redis, settings, pod_id, trigger="decline",
                                       created_by=user_id if declining else None, declined=sorted(declined),
                                       llm=llm, based_on=cur["id"],
                                       kept=[g for g in cur["groups"] if user_id not in g["members"]])
            except matching.StaleRound:
                continue
    raise DeclineError("the pod's round kept changing while re-matching; please try again")


async def announce_unposted(pool: asyncpg.Pool, redis: Redis, max_chars: int = 4000) -> int:
    """Post the current rounds whose post failed or was cut off (any kind of round, of the last week: a manual
    one's request got its round back without a message); returns how many were posted."""
    async with pool.acquire() as conn:
        unposted = await matching.unannounced(conn)
        names = {r["id"]: r["name"] for r in await conn.fetch(
            "SELECT id, name FROM users WHERE id = ANY($1::bigint[])",
            sorted({m for r in unposted for g in r["groups"] for m in g["members"]}))}
    return sum([await announce(pool, redis, row, names, "unknown", max_chars) is not None for row in unposted])


def week_due(at: datetime, weekday: int, hour: int) -> datetime:
    """The moment of the weekly round in the ISO week (UTC) holding `at`: `weekday` (0 = Monday) at `hour`."""
    start, _ = period_bounds("week", at)  # type: ignore[misc]
    return start + timedelta(days=weekday, hours=hour)


async def match_all_pods(pool: asyncpg.Pool, redis: Redis, settings: Settings, at: datetime | None = None,
                         llm: Any = "settings") -> int:
    """The weekly round for every pod with two or more learners that has none yet this ISO week (once per pod
    and week however often it runs; a round made since the week's moment, by an instructor or a decline, is the
    pod's round for the week)."""
    key = matching.week_key(at)
    await announce_unposted(pool, redis, settings.ws_max_text)
    since = week_due(at or datetime.now(timezone.utc), settings.match_weekday, settings.match_hour)
    async with pool.acquire() as conn:
        pods = await matching.pods_to_match(conn, key, since)
    n = 0
    for pod_id in pods:
        try:
            async with pod_turn(redis, pod_id, wait_s=0):  # taken: another run (or a decline) has the pod now
                # (the pod may have got a round of an instructor's since it was listed: that one stands)
                if await run_match(pool, redis, settings, pod_id, trigger="cron", round_key=key, llm=llm,
                                   week_since=since) is not None:
                    n += 1
        except PodBusy:
            logger.info("matcher: pod %s is being matched elsewhere; the next run looks at it again", pod_id)
        except Exception:  # noqa: BLE001 - one pod's failure must not stop the others
            logger.exception("matcher: weekly round failed for pod %s", pod_id)
    return n
