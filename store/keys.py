"""Every Redis key and channel name studyhall uses, with what it holds and its TTL.

Redis holds only what can be rebuilt from Postgres (fan-out, presence, counters, the job queue).
"""
from __future__ import annotations

import hashlib

# Pub/sub channel carrying encoded events for one topic ("room:<room_id>", "user:<user_id>"). No storage.
EVENTS_CHANNEL = "sh:ev:{topic}"

# arq's own queue keys use the "arq:" prefix; job heartbeats refresh arq's in-progress key (TTL below).
ARQ_IN_PROGRESS = "arq:in-progress:{job_id}"
ARQ_RESULT = "arq:result:{job_id}"
# Two arq queues, so a grade never waits behind hours of transcription: ingest jobs on arq's default queue (its
# health-check key tells `studyhall ingest` a worker is alive), grading, matching and checks on the quick one.
INGEST_QUEUE = "arq:queue"
QUICK_QUEUE = "arq:queue:quick"
QUEUES = (INGEST_QUEUE, QUICK_QUEUE)
INGEST_HEARTBEAT_TTL_MS = 30_000


def events_channel(topic: str) -> str:
    return EVENTS_CHANNEL.format(topic=topic)

# --- realtime rooms (store/presence.py, store/ratelimit.py, server/realtime) ---------------------------

# ZSET of the users online in a room: member "<user_id>|<role>|<name>", score = expiry (ms since epoch) of
# that user's freshest server process. Key TTL: 2 x STUDYHALL_PRESENCE_TTL, refreshed by every heartbeat.
PRESENCE_ROOM = "sh:pres:{room}"
# ZSET of the server processes holding a user's connections in a room: member proc id, score = expiry (ms).
# Key TTL as PRESENCE_ROOM. A user is online while any process's entry is unexpired.
PRESENCE_USER = "sh:pres:{room}:u:{user_id}"
# ZSET of live server processes: member proc id, score = expiry (ms) of its last heartbeat. No TTL; dead
# entries are removed by the survivor that closes their live-session attendance rows.
PROCS = "sh:procs"
# HASH token bucket {t: tokens, ts: last refill ms} limiting one user's sends (messages, edits, deletes,
# votes). TTL: time to refill the bucket completely, plus a second.
RATE_SEND = "sh:rl:send:{user_id}"
# ZSET of one user's tutor answers under way, over all server processes: member a random slot id, score the
# Unix ms the slot lapses (a slot a crashed process held frees itself). TTL: the slot lifetime.
TUTOR_SLOTS = "sh:tutor:slots:{user_id}"


def presence_room(room: str) -> str:
    return PRESENCE_ROOM.format(room=room)


def presence_user(room: str, user_id: int) -> str:
    return PRESENCE_USER.format(room=room, user_id=user_id)


def rate_send(user_id: int) -> str:
    return RATE_SEND.format(user_id=user_id)


def tutor_slots(user_id: int) -> str:
    return TUTOR_SLOTS.format(user_id=user_id)


# STRING set while a `tutor.ask` with a client_msg_id is being taken (room, user, the id hashed): a twin of it sent
# at once (another server, another tab) that finds no tutor slot waits for the question to be posted instead of
# answering `tutor_busy`. TTL: 10 s.
ASKING = "sh:tutor:asking:{user_id}:{key_sha}"


def asking(room: str, user_id: int, client_msg_id: str) -> str:
    return ASKING.format(user_id=user_id, key_sha=hashlib.sha256(f"{room}\n{client_msg_id}".encode()).hexdigest()[:24])

# --- progress, XP and leaderboards (store/leaderboards.py, store/progress.py) -------------------------
# Leaderboards are rebuilt from the Postgres XP ledger (`xp_events`); nothing here is the truth.

# ZSET of one board: member user id, score = XP. scope: tenant | course | pod; period: "all" (no TTL),
# "m:<YYYY-MM>" (UTC calendar month) or "w:<YYYY-Www>" (UTC ISO week). Period keys expire
# LEADERBOARD_PERIOD_GRACE_S after their period ends (EXPIREAT set by every write).
LEADERBOARD = "sh:lb:{scope}:{scope_id}:{period}"
LEADERBOARD_PERIOD_GRACE_S = 24 * 3600
# HASH user id -> display name of the tenant's users on its boards (so a board read is Redis only). No TTL.
LEADERBOARD_NAMES = "sh:lb:names:{tenant_id}"
# STRING: the boards were built from the ledger (set by a rebuild). Missing (Redis flushed) -> rebuild. No TTL.
LEADERBOARD_BUILT = "sh:lb:built"
# STRING lock held by the one process rebuilding the boards (its token). TTL 30 s, renewed while it runs.
LEADERBOARD_LOCK = "sh:lb:lock"
# STRING set while a rebuild runs: award updates also push their ledger id to LEADERBOARD_BACKLOG so the
# rebuild can re-apply the ones its snapshot missed. TTL 60 s, renewed with the lock. LIST backlog: an hour.
LEADERBOARD_BUILDING = "sh:lb:building"
LEADERBOARD_BACKLOG = "sh:lb:backlog"
# STRING the ledger snapshot the last rebuild read (`<ms taken>;<month>,<week>;<xmin>:<xmax>:<xip,...>`: when, the
# period boards it built, what Postgres had committed), for an hour
# after its swap: an award whose transaction that snapshot already saw, but whose board update comes only after the
# swap (its process stalled between commit and Redis), is not counted twice.
LEADERBOARD_SNAPSHOT = "sh:lb:snapshot"
# STRING the highest ledger (xp_events) id the boards hold: raised by every award, set by a rebuild. Above the
# ledger's highest id at startup, the ledger lost events the boards still count (Postgres restored from a
# backup): the startup check rebuilds. No TTL.
LEADERBOARD_HIGH = "sh:lb:high"
# A rebuild writes each board as "sh:lb:tmp:<token>:<board key>" (TTL 3600 s) and renames it into place.
LEADERBOARD_TEMP = "sh:lb:tmp:{token}:"
# STRING throttle: one `leaderboard.changed` per board per STUDYHALL_LEADERBOARD_EVENT_S. TTL that window.
LEADERBOARD_THROTTLE = "sh:lb:thr:{scope}:{scope_id}"
# ZSET "<scope>:<scope id>:<tenant id>" -> when its window ends (ms, Redis clock): boards that changed inside their
# window and still owe the room a `leaderboard.changed` once it ends. The process that held the change back
# announces it then; if that process died, any server's hub does (whoever removes the entry tells). No TTL: every
# entry is taken within a tick of coming due while a server runs. A board changed while no boards were built waits
# with the score leaderboards.HELD_SCORE until the rebuild is done.
LEADERBOARD_DUE = "sh:lb:due"
# HASH token bucket (as RATE_SEND) limiting one user's progress reports. TTL: full refill time + 1 s.
RATE_PROGRESS = "sh:rl:progress:{user_id}"


def leaderboard(scope: str, scope_id: int, period: str) -> str:
    return LEADERBOARD.format(scope=scope, scope_id=scope_id, period=period)


def leaderboard_names(tenant_id: int) -> str:
    return LEADERBOARD_NAMES.format(tenant_id=tenant_id)


def leaderboard_temp(token: str) -> str:
    return LEADERBOARD_TEMP.format(token=token)


def leaderboard_throttle(scope: str, scope_id: int) -> str:
    return LEADERBOARD_THROTTLE.format(scope=scope, scope_id=scope_id)


def rate_progress(user_id: int) -> str:
    return RATE_PROGRESS.format(user_id=user_id)


# HASH token bucket (as RATE_SEND) limiting one user's searches (each embeds the query). TTL: full refill + 1 s.
RATE_BOOKMARK = "sh:rl:bookmark:{user_id}"
RATE_SEARCH = "sh:rl:search:{user_id}"


def rate_bookmark(user_id: int) -> str:
    return RATE_BOOKMARK.format(user_id=user_id)


def rate_search(user_id: int) -> str:
    return RATE_SEARCH.format(user_id=user_id)


# HASH token bucket (as RATE_SEND) limiting one user's assignment generations (each may call the model once per
# chapter). TTL: full refill time + 1 s.
RATE_GENERATE = "sh:rl:generate:{user_id}"


def rate_generate(user_id: int) -> str:
    return RATE_GENERATE.format(user_id=user_id)


# STRING set while a generation with an Idempotency-Key runs (the key hashed): a twin of it refused by the budget
# waits for its drafts instead. TTL: the generation's deadline and a minute.
GENERATING = "sh:gen:busy:{user_id}:{key_sha}"


def generating(user_id: int, key: str) -> str:
    return GENERATING.format(user_id=user_id, key_sha=hashlib.sha256(key.encode()).hexdigest()[:24])


# HASH token bucket (as RATE_SEND) limiting how often one user opens room sockets. TTL: full refill time + 1 s.
RATE_CONNECT = "sh:rl:connect:{user_id}"


def rate_connect(user_id: int) -> str:
    return RATE_CONNECT.format(user_id=user_id)


# HASH token bucket (as RATE_CONNECT) of one token's socket opens, taken before the database is asked whether the
# token still holds (a revoked or signed-out token's reconnect loop stops here), so a dead token spends its own
# budget, not its user's (whoever held a cancelled token locked its owner out of every room). TTL as RATE_CONNECT.
RATE_CONNECT_TOKEN = "sh:rl:connect:token:{token}"


def rate_connect_token(token_id: int | str) -> str:
    return RATE_CONNECT_TOKEN.format(token=token_id)


# HASH token bucket (as RATE_SEND) limiting one learner's written answers (each is graded, by a model when one
# is configured). TTL: full refill time + 1 s.
RATE_WRITTEN = "sh:rl:written:{user_id}"


def rate_written(user_id: int) -> str:
    return RATE_WRITTEN.format(user_id=user_id)


# HASH token bucket (as RATE_SEND) limiting one learner's multiple-choice answers (each stores an attempt and its
# grade). TTL: full refill time + 1 s.
RATE_CHOICE = "sh:rl:choice:{user_id}"


def rate_choice(user_id: int) -> str:
    return RATE_CHOICE.format(user_id=user_id)


# redis-py lock: one pod's study-buddy rounds are computed one at a time (declines queue instead of each
# re-matching the pod again and again; two workers' weekly runs do not both compute the pod). Its lease ends
# on its own if the holder dies.
POD_MATCHING = "sh:pod:{pod_id}:matching"


def pod_matching(pod_id: int) -> str:
    return POD_MATCHING.format(pod_id=pod_id)


# STRING window: one `typing` start per user and room per 2 s, whatever number of sockets (and processes) they
# type from. TTL that window.
TYPING = "sh:typing:{room}:{user_id}"


def typing_window(room: str, user_id: int) -> str:
    return TYPING.format(room=room, user_id=user_id)


# One `poll.results` per poll per window over every server process (each coalesces its own votes; N processes
# published N times as often)
POLL_RESULTS_WINDOW = "sh:poll:results:{poll_id}"


def poll_results_window(poll_id: int) -> str:
    return POLL_RESULTS_WINDOW.format(poll_id=poll_id)
