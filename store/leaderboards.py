"""Leaderboards: Redis sorted sets derived from the XP ledger (`xp_events`), which stays the truth.

Boards: scope `tenant` (global per tenant), `course`, `pod`; period `all`, `month`, `week`. Periods are
UTC: a month is the calendar month, a week the ISO week from Monday 00:00 UTC (one instant for everyone, so
a weekly league closes at the same moment for every learner; streaks use the learner's own timezone).
Period keys expire a day after their period ends, so nothing has to clean them up.

Writes: every award runs one script that bumps each of its boards (and records the display name), after the
ledger row has committed. Rebuilding the boards from the ledger is store/leaderboard_rebuild.py.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from redis.asyncio import Redis

from store import keys
from store.events import LeaderboardChanged, LeaderboardEntry, publish, room_topic

logger = logging.getLogger(__name__)

SCOPES = ("tenant", "course", "pod")
PERIODS = ("all", "month", "week")
NEIGHBOURS = 2  # entries shown on each side of the caller
# Seconds between two `leaderboard.changed` events of one board; the server and worker set it from settings.
EVENT_WINDOW_S = 5.0

# --- periods -------------------------------------------------------------------------------------------


def as_utc(at: datetime | None) -> datetime:
    """`at` (default now) as an aware UTC datetime."""
    at = at or datetime.now(timezone.utc)
    return at.astimezone(timezone.utc) if at.tzinfo else at.replace(tzinfo=timezone.utc)


def period_bounds(period: str, at: datetime | None = None) -> tuple[datetime, datetime] | None:
    """[start, end) of the UTC month or ISO week holding `at`; None for `all`."""
    at = as_utc(at)
    if period == "all":
        return None
    if period == "month":
        start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1)
        return start, end
    if period == "week":
        start = (at - timedelta(days=at.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=7)
    raise ValueError(f"unknown period {period!r}")


def period_tag(period: str, at: datetime | None = None) -> str:
    at = as_utc(at)
    if period == "all":
        return "all"
    if period == "month":
        return f"m:{at:%Y-%m}"
    if period == "week":
        year, week, _ = at.isocalendar()
        return f"w:{year}-W{week:02d}"
    raise ValueError(f"unknown period {period!r}")


def board_key(scope: str, scope_id: int, period: str, at: datetime | None = None) -> str:
    """The Redis key of a board (`at` picks the month/week; default now)."""
    return keys.leaderboard(scope, scope_id, period_tag(period, at))


def expire_at(period: str, at: datetime | None = None) -> int:
    """Unix time a period key expires (0 for `all`: never)."""
    bounds = period_bounds(period, at)
    return 0 if bounds is None else int(bounds[1].timestamp()) + keys.LEADERBOARD_PERIOD_GRACE_S


@functools.lru_cache(maxsize=64)
def _periods_of_day(day: date) -> tuple[tuple[str, int], ...]:
    """(period tag, expire-at) of every period holding this UTC day: the same for every award of the day."""
    at = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    return tuple((period_tag(p, at), expire_at(p, at)) for p in PERIODS)


def boards_of(tenant_id: int, course_id: int | None, pod_ids: list[int], at: datetime) -> list[tuple[str, int]]:
    """(key, expire-at) of every board one ledger event counts on; period boards already expired are left out."""
    scopes = [("tenant", tenant_id)] + ([("course", course_id)] if course_id is not None else [])
    scopes += [("pod", p) for p in pod_ids]
    now = time.time()
    periods = [(tag, exp) for tag, exp in _periods_of_day(as_utc(at).date()) if exp == 0 or exp > now]
    return [(keys.leaderboard(scope, sid, tag), exp) for scope, sid in scopes for tag, exp in periods]


async def drop_boards(redis: Redis, scopes: list[tuple[str, int]]) -> None:
    """After a course or pod was deleted: its boards (all-time ones never expire; nobody can read them any more).
    Period boards of earlier weeks and months still in their grace go too. Failures are logged (memory only)."""
    now = as_utc(None)
    tags = {period_tag(p, at) for p in PERIODS for at in (now, now - timedelta(days=8), now - timedelta(days=32))}
    try:
        if scopes:
            await redis.delete(*(keys.leaderboard(scope, sid, tag) for scope, sid in scopes for tag in sorted(tags)))
    except Exception:  # noqa: BLE001
        logger.warning("could not delete the boards of %s", scopes[:5], exc_info=True)


# --- writes --------------------------------------------------------------------------------------------

# One round trip per award: bump its boards (unless the last rebuild's snapshot already counted the award),
# record the name, log it for a running rebuild, take the `leaderboard.changed` window of each board that has a
# room (a board whose window another change holds goes on the due list), and publish the award's notices (the
# learner's `xp.awarded`, the achievements it unlocked).
# The snapshot is `<ms taken>;<month tag>,<week tag>;<xmin>:<xmax>:<xip,...>` (leaderboard_rebuild; the tags of the
# period boards it built; an older rebuild's has none); a transaction that began after it
# was taken cannot be in it, whatever its id (a Postgres restored from a backup hands out the same ids again).
# KEYS: building flag, backlog, names hash, rebuild snapshot, due list, high-water mark (the highest ledger id on
#       the boards), then the boards, then the throttle keys.
# ARGV: points, user id, name, ledger id, number of boards, window ms, number of notices, transaction id
#       (0: unknown), when the transaction began (ms, Postgres clock), then expire-at per board (0: none), then
#       channel and payload of each notice, then the due-list member of each throttle key.
# -> per throttle key: 0 when this call took the window (announce now), else ms until it frees.
# Lua shared by the scripts that take a board's `leaderboard.changed` window: Redis's clock in ms, and taking the
# window or, when another change holds it, putting the board on the due list for the window's end (an entry
# already there is kept). -> 0: window taken (tell now), else ms until it frees.
_WINDOW_LUA = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function take_window(throttle, due, window_ms, member)
  if redis.call('SET', throttle, '1', 'PX', window_ms, 'NX') then return 0 end
  local wait = math.max(1, redis.call('PTTL', throttle))
  redis.call('ZADD', due, 'NX', now_ms() + wait, member)
  return wait
end
"""

_AWARD = _WINDOW_LUA + """
local nb, nn, xid, began = tonumber(ARGV[5]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local counted = false
local built = nil
if xid > 0 then
  local snap = redis.call('GET', KEYS[4])
  local taken, xmin, xmax, xip
  if snap then
    taken, built, xmin, xmax, xip = string.match(snap, '^(%d+);([^;]*);(%d+):(%d+):(.*)$')
    if not taken then taken, xmin, xmax, xip = string.match(snap, '^(%d+);(%d+):(%d+):(.*)$') end
  end
  if taken and began <= tonumber(taken) then
    if xid < tonumber(xmin) then
      counted = true
    elseif xid < tonumber(xmax) then
      counted = true
      for x in string.gmatch(xip, '%d+') do
        if tonumber(x) == xid then counted = false end
      end
    end
  end
end
-- the rebuild counted the award only on the boards it built: all-time, and its own month and week (an award at
-- the start of the next week, committed before its snapshot, still counts on that week's board)
local function rebuilt(key)
  if built == nil or string.sub(key, -4) == ':all' then return true end
  for tag in string.gmatch(built, '[^,]+') do
    if string.sub(key, -(#tag + 1)) == ':' .. tag then return true end
  end
  return false
end
for i = 1, nb do
  local key = KEYS[6 + i]
  if not (counted and rebuilt(key)) then redis.call('ZINCRBY', key, ARGV[1], ARGV[2]) end
  local exp = tonumber(ARGV[9 + i])
  if exp > 0 then redis.call('EXPIREAT', key, exp) end
end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
if tonumber(ARGV[4]) > tonumber(redis.call('GET', KEYS[6]) or '0') then redis.call('SET', KEYS[6], ARGV[4]) end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[2], 3600)
end
local out = {}
local first = 7 + nb
for i = first, #KEYS do
  out[#out + 1] = take_window(KEYS[i], KEYS[5], ARGV[6], ARGV[10 + nb + 2 * nn + i - first])
end
for i = 10 + nb, 9 + nb + 2 * nn, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end
return out
"""


# Which course and pod boards a learner stands on now (a rebuild counts the same): a course board while enrolled
# in the course; a pod board while a member of the pod and enrolled in its course. Format with SQL expressions
# for the learner, the course, the pods.
# (Aliases of their own: an outer query's `p` or `e` must not be shadowed inside.)
ON_COURSE_SQL = ("EXISTS (SELECT 1 FROM enrollments on_e WHERE on_e.course_id = {course} "
                 "AND on_e.user_id = {user})")
ON_PODS_SQL = ("ARRAY(SELECT on_m.pod_id FROM pod_members on_m JOIN pods on_p ON on_p.id = on_m.pod_id "
               "JOIN enrollments on_e ON on_e.course_id = on_p.course_id AND on_e.user_id = on_m.user_id "
               "WHERE on_m.user_id = {user} AND on_m.pod_id = ANY({pods}) ORDER BY on_m.pod_id)")


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger event as the boards see it."""

    id: int
    tenant_id: int
    user_id: int
    name: str
    points: int
    course_id: int | None
    pod_ids: list[int]
    at: datetime
    xid: int = 0  # the ledger transaction's id (pg_current_xact_id); 0: unknown, always counted
    began_ms: int = 0  # when that transaction began (Postgres clock, ms since the epoch)

    def rooms(self) -> list[tuple[str, int]]:
        """The boards with a room to tell about changes (all-time course and pod boards)."""
        return ([("course", self.course_id)] if self.course_id is not None else []) + [("pod", p) for p in self.pod_ids]


class _Scripts:
    """Scripts registered per Redis client (a client belongs to one event loop)."""

    def __init__(self, redis: Redis) -> None:
        self.award = redis.register_script(_AWARD)
        self.read = redis.register_script(_READ)
        self.defer = redis.register_script(_DEFER)
        self.take_due = redis.register_script(_TAKE_DUE)
        self.hold = redis.register_script(_HOLD)


_scripts: dict[int, _Scripts] = {}


def scripts(redis: Redis) -> _Scripts:
    s = _scripts.get(id(redis))
    if s is None:
        s = _scripts[id(redis)] = _Scripts(redis)
    return s


async def apply(redis: Redis, entries: list[Entry], notices: list[list[tuple[str, bytes]]] | None = None) -> None:
    """After commit: bump the boards of these ledger events and publish each one's notices (channel, payload),
    in one round trip for all of them; then announce changed boards (see `announce`)."""
    if not entries:
        return
    notices = notices or [[] for _ in entries]
    award = scripts(redis).award
    window_ms = max(1, int(EVENT_WINDOW_S * 1000))
    # each room's window is taken (or its board put on the due list) by the first award of the batch that names
    # it: the announcement reads the boards after the whole batch is applied
    named: set[tuple[str, int]] = set()
    rooms = []
    for e in entries:
        rooms.append([r for r in e.rooms() if r not in named])
        named.update(rooms[-1])
    calls = []
    for e, notes, rs in zip(entries, notices, rooms):
        boards = boards_of(e.tenant_id, e.course_id, e.pod_ids, e.at)
        calls.append(([keys.LEADERBOARD_BUILDING, keys.LEADERBOARD_BACKLOG, keys.leaderboard_names(e.tenant_id),
                       keys.LEADERBOARD_SNAPSHOT, keys.LEADERBOARD_DUE, keys.LEADERBOARD_HIGH]
                      + [k for k, _ in boards] + [keys.leaderboard_throttle(sc, sid) for sc, sid in rs],
                      [e.points, e.user_id, e.name, e.id, len(boards), window_ms, len(notes), e.xid, e.began_ms]
                      + [x for _, x in boards] + [x for note in notes for x in note]
                      + [_due_member(sc, sid, e.tenant_id) for sc, sid in rs]))
    if len(calls) == 1:  # a pipeline would first ask SCRIPT EXISTS: one more round trip
        results = [await award(keys=calls[0][0], args=calls[0][1])]
    else:
        async with redis.pipeline(transaction=False) as pipe:
            for k, a in calls:
                await award(keys=k, args=a, client=pipe)
            results = await pipe.execute()
    for e, rs, waits in zip(entries, rooms, results):
        for (scope, sid), wait in zip(rs, waits):
            _announce(redis, scope, sid, e.tenant_id, int(wait))


# --- reads ---------------------------------------------------------------------------------------------

# KEYS: board, names hash, built marker. ARGV: limit, user id, neighbours each side.
# -> {top (id, score, ...), my position (-1: not on the board, or at 0 XP: all of it taken back), my score, my rank,
#     neighbour start position,
#     neighbours (id, score, ...), rank of the first neighbour, names of top, names of neighbours, count, built}
_READ = """
local limit, me, n = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local top = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(0', 'WITHSCORES', 'LIMIT', 0, limit)
local pos = redis.call('ZREVRANK', KEYS[1], me)
local score, rank, nstart, neigh, nrank = '', 0, 0, {}, 0
if pos then score = redis.call('ZSCORE', KEYS[1], me) end
if pos and tonumber(score) > 0 then
  rank = redis.call('ZCOUNT', KEYS[1], '(' .. score, '+inf') + 1
  nstart = math.max(0, pos - n)
  local around = redis.call('ZREVRANGE', KEYS[1], nstart, pos + n, 'WITHSCORES')
  for i = 1, #around, 2 do
    if tonumber(around[i + 1]) > 0 then neigh[#neigh + 1] = around[i]; neigh[#neigh + 1] = around[i + 1] end
  end
  nrank = redis.call('ZCOUNT', KEYS[1], '(' .. neigh[2], '+inf') + 1
else
  pos = -1
end
local function names(list)
  if #list == 0 then return {} end
  local ids = {}
  for i = 1, #list, 2 do ids[#ids + 1] = list[i] end
  local got = redis.call('HMGET', KEYS[2], unpack(ids))
  for i = 1, #got do if not got[i] then got[i] = '' end end
  return got
end
return {top, pos, score, rank, nstart, neigh, nrank, names(top), names(neigh), redis.call('ZCOUNT', KEYS[1], '(0', '+inf'),
        redis.call('EXISTS', KEYS[3])}
"""


@dataclass(frozen=True, slots=True)
class Board:
    entries: list[LeaderboardEntry]
    me: LeaderboardEntry | None  # None: the caller has no XP on this board
    neighbours: list[LeaderboardEntry]
    count: int  # learners on the board
    built: bool  # False: Redis lost the boards and a rebuild is due


def _ranked(flat: list, names: list, first_pos: int, first_rank: int) -> list[LeaderboardEntry]:
    """Entries with competition ranks (equal XP, equal rank: 1, 2, 2, 4)."""
    out: list[LeaderboardEntry] = []
    prev = None
    for i in range(0, len(flat), 2):
        xp = int(float(flat[i + 1]))
        j = i // 2
        rank = first_rank if j == 0 else (out[-1].rank if xp == prev else first_pos + j + 1)
        name = names[j].decode() if isinstance(names[j], bytes) else str(names[j])
        out.append(LeaderboardEntry(user_id=int(flat[i]), name=name, xp=xp, rank=rank))
        prev = xp
    return out


async def read(redis: Redis, scope: str, scope_id: int, tenant_id: int, period: str, user_id: int, *,
               limit: int = 10, at: datetime | None = None) -> Board:
    """The top `limit`, the caller's rank and XP, and their neighbours: one Redis round trip."""
    (top, pos, score, rank, nstart, neigh, nrank, top_names, neigh_names, count, built) = await scripts(redis).read(
        keys=[board_key(scope, scope_id, period, at), keys.leaderboard_names(tenant_id), keys.LEADERBOARD_BUILT],
        args=[limit, user_id, NEIGHBOURS])
    entries = _ranked(top, top_names, 0, 1)
    me = None
    neighbours: list[LeaderboardEntry] = []
    if int(pos) >= 0:
        neighbours = _ranked(neigh, neigh_names, int(nstart), int(nrank))
        me = next(e for e in neighbours if e.user_id == user_id)
        assert me.rank == int(rank)
    return Board(entries=entries, me=me, neighbours=neighbours, count=int(count), built=bool(built))


# --- live `leaderboard.changed` events (throttled across processes) ------------------------------------

_Target = tuple[Redis, str, int, int]  # what announcing a board takes: client, scope, scope id, tenant id
_trailing: dict[str, tuple[asyncio.Task, _Target]] = {}  # throttle key -> the timer announcing the end of a burst
_telling: dict[str, asyncio.Task] = {}  # room -> the announcement under way (one per board, so none overtakes)
_again: set[str] = set()  # rooms whose board changed again while being announced

# A change inside another change's window is held back: the board goes on the due list (keys.LEADERBOARD_DUE)
# until the window ends. The process that held it back has a timer for then; whoever removes the entry first (that
# timer, or any server's `take_due` when that process died) tells the room.

# `take_window` on its own. KEYS: throttle key, due list. ARGV: window ms, due-list member.
_DEFER = _WINDOW_LUA + "return take_window(KEYS[1], KEYS[2], ARGV[1], ARGV[2])"

# Remove and return the boards whose window has ended (Redis clock), at most ARGV[1] of them. KEYS: due list.
_TAKE_DUE = _WINDOW_LUA + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""
TAKE_DUE_MAX = 200  # boards one `take_due` call tells about; the rest wait for the next call


def _due_member(scope: str, scope_id: int, tenant_id: int) -> str:
    return f"{scope}:{scope_id}:{tenant_id}"


def _announce(redis: Redis, scope: str, scope_id: int, tenant_id: int, wait_ms: int) -> None:
    """`wait_ms` 0: this process holds the board's window, so tell the room now. Otherwise the board is on the due
    list: tell the room once the window frees (one timer per board and process), so the last change of a burst is
    always announced. Either way off the award's path: the award returns once the boards are bumped."""
    board = (redis, scope, scope_id, tenant_id)
    if wait_ms == 0:
        room = f"{scope}:{scope_id}"
        if _live(_telling.get(room)):
            _again.add(room)  # the announcement under way reads the boards once more
        else:
            _telling[room] = asyncio.create_task(_tell_room(room, board))
        return
    thr = keys.leaderboard_throttle(scope, scope_id)
    if not _live(_trailing.get(thr, (None,))[0]):
        _trailing[thr] = (asyncio.create_task(_later(thr, board, wait_ms)), board)


def _live(task: asyncio.Task | None) -> bool:
    """A task still running on this event loop (one left behind by a closed loop counts as gone)."""
    return task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop()


async def _tell_room(room: str, board: _Target) -> None:
    try:
        while True:
            _again.discard(room)
            await _tell(*board)
            if room not in _again:
                return
    finally:
        _telling.pop(room, None)


# A board whose change came while Redis had no boards built (flushed, restarted empty) waits on the due list with
# this score until the rebuild is done (its `_MARK_BUILT` makes it due at once): until then the board holds only
# the XP earned since, and a room told about it would show a wrong top ten with nothing to correct it.
HELD_SCORE = 9_000_000_000_000_000

# KEYS: built marker, due list. ARGV: score, due-list member. -> 1: held; 0: the boards are built (tell now).
_HOLD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


async def held(redis: Redis) -> bool:
    """Some board's change is held back until the boards are rebuilt."""
    return bool(await redis.zrangebyscore(keys.LEADERBOARD_DUE, HELD_SCORE, "+inf", start=0, num=1))


async def _tell(redis: Redis, scope: str, scope_id: int, tenant_id: int) -> None:
    """One `leaderboard.changed` per period: all-time, this month, this week. While the boards are not built, the
    board is held back until they are."""
    try:
        for period in PERIODS:
            board = await read(redis, scope, scope_id, tenant_id, period, 0, limit=10)
            if not board.built:
                if await scripts(redis).hold(keys=[keys.LEADERBOARD_BUILT, keys.LEADERBOARD_DUE],
                                             args=[HELD_SCORE, _due_member(scope, scope_id, tenant_id)]):
                    return
                board = await read(redis, scope, scope_id, tenant_id, period, 0, limit=10)  # built meanwhile
            await publish(redis, room_topic(f"{scope}:{scope_id}"), LeaderboardChanged(
                room=f"{scope}:{scope_id}", scope=scope, scope_id=scope_id, top=board.entries, period=period))
    except Exception:  # noqa: BLE001 - the boards are right; only the nudge is lost
        logger.warning("could not announce a leaderboard change", exc_info=True)


async def drain(timeout: float = 5.0) -> None:
    """At shutdown: finish the announcements under way and tell now what the end-of-burst timers would have
    told later (the window is moot once this process stops; the boards come off the due list), before the
    Redis client closes."""
    late = [(task, board) for task, board in _trailing.values() if _live(task)]
    for task, _ in late:
        task.cancel()
    tasks = [t for t in _telling.values() if _live(t)] + [asyncio.create_task(_tell_due(*board)) for _, board in late]
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
    _trailing.clear()


async def _tell_due(redis: Redis, scope: str, scope_id: int, tenant_id: int) -> None:
    """Tell a board held back by this process now, unless another process already took it off the due list."""
    try:
        if not await redis.zrem(keys.LEADERBOARD_DUE, _due_member(scope, scope_id, tenant_id)):
            return
    except Exception:  # noqa: BLE001 - tell anyway: at worst a room hears the same board twice
        logger.warning("could not take a board off the due list", exc_info=True)
    await _tell(redis, scope, scope_id, tenant_id)


async def nudge(redis: Redis, scope: str, scope_id: int, tenant_id: int) -> None:
    """Announce a changed board to its room: now when this process takes the board's window, else once it frees."""
    wait = await scripts(redis).defer(
        keys=[keys.leaderboard_throttle(scope, scope_id), keys.LEADERBOARD_DUE],
        args=[max(1, int(EVENT_WINDOW_S * 1000)), _due_member(scope, scope_id, tenant_id)])
    _announce(redis, scope, scope_id, tenant_id, int(wait))


async def take_due(redis: Redis) -> int:
    """Tell the rooms of boards whose window has ended with a change held back, when the process that held it
    back has not (it died); how many boards were due. Every server's hub calls this each tick."""
    due = await scripts(redis).take_due(keys=[keys.LEADERBOARD_DUE], args=[TAKE_DUE_MAX])
    untold = [m.decode() if isinstance(m, bytes) else m for m in due]
    try:
        while untold:
            scope, scope_id, tenant_id = untold[0].split(":")
            await nudge(redis, scope, int(scope_id), int(tenant_id))
            untold.pop(0)
    finally:
        if untold:  # Redis failed or the duty ran out of time: back on the list, due now, for the next look
            await redis.zadd(keys.LEADERBOARD_DUE, {m: 0 for m in untold}, nx=True)
    return len(due)


async def _later(thr: str, board: _Target, wait_ms: int) -> None:
    redis, scope, scope_id, tenant_id = board
    try:
        await asyncio.sleep(wait_ms / 1000)
        _trailing.pop(thr, None)
        # whoever takes the board off the due list tells (a hub's take_due may have been first)
        if await redis.zrem(keys.LEADERBOARD_DUE, _due_member(scope, scope_id, tenant_id)):
            await nudge(redis, scope, scope_id, tenant_id)
    except Exception:  # noqa: BLE001
        logger.warning("could not announce a leaderboard change", exc_info=True)
    finally:
        if _trailing.get(thr, (None,))[0] is asyncio.current_task():
            _trailing.pop(thr, None)
