"""Streaks: local-midnight edges in the learner's timezone, and one freeze per week."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from store import streaks, xp
from store.streaks import Streak, advance, status
from tests.conftest import Factory
from tests.progress_helpers import xp_store  # noqa: F401 - fixture

MON = date(2025, 3, 3)  # a Monday


def run(days: list[date]) -> Streak:
    s = Streak()
    for d in days:
        s, _ = advance(s, d)
    return s


def test_consecutive_days_and_repeats():
    s = run([MON, MON, MON + timedelta(days=1), MON + timedelta(days=2)])
    assert (s.current, s.longest, s.last_day) == (3, 3, MON + timedelta(days=2))
    same, new = advance(s, MON + timedelta(days=2))
    assert same == s and not new
    late, new = advance(s, MON)  # a late report for an earlier day changes nothing
    assert late == s and not new


def test_one_missed_day_is_frozen_once_per_week():
    # Mon, Tue, (Wed missed: freeze), Thu -> 3
    s = run([MON, MON + timedelta(days=1), MON + timedelta(days=3)])
    assert s.current == 3 and s.freeze_weeks == {MON}
    # (Fri missed: the week's freeze is spent) Sat -> streak restarts
    s2, _ = advance(s, MON + timedelta(days=5))
    assert s2.current == 1 and s2.longest == 3
    # next week has its own freeze: Sat, (Sun missed... and Mon missed): two weeks, one each -> kept
    s3 = run([MON + timedelta(days=5), MON + timedelta(days=8)])
    assert s3.current == 2 and s3.freeze_weeks == {MON, MON + timedelta(days=7)}


def test_two_missed_days_in_one_week_break_the_streak():
    s = run([MON, MON + timedelta(days=1), MON + timedelta(days=4)])  # Wed and Thu missed
    assert s.current == 1 and s.longest == 2 and s.freeze_weeks == frozenset()


def test_status_as_seen_today():
    s = run([MON, MON + timedelta(days=1)])
    assert status(s, MON + timedelta(days=1)) == (2, True)
    assert status(s, MON + timedelta(days=2)) == (2, True)  # today not done yet
    # yesterday missed: this week's freeze will cover it, so it is no longer free for another miss
    assert status(s, MON + timedelta(days=3)) == (2, False)
    assert advance(s, MON + timedelta(days=4))[0].current == 1  # indeed: missing today too ends the streak
    assert status(s, MON + timedelta(days=4)) == (0, True)  # two missed in one week: gone (a new streak has it)
    weekend = run([MON + timedelta(days=5)])  # Sat; (Sun missed, last week) -> Mon: this week's freeze untouched
    assert status(weekend, MON + timedelta(days=7)) == (1, True)
    frozen = run([MON, MON + timedelta(days=2)])
    assert status(frozen, MON + timedelta(days=2)) == (2, False)  # this week's freeze is spent


async def _activity(pool, redis, user_id: int, at: datetime) -> Streak:  # type: ignore[no-untyped-def]
    async with xp.transaction(pool, redis) as tx:
        return await streaks.record_activity(tx, user_id, at)


@pytest.mark.parametrize("stored", ["Atlantis/Lost", "America", "Europe/" + "x" * 300, "", None])
def test_a_stored_zone_that_is_not_one_counts_in_utc(stored):
    """Profiles only take IANA names, but a stored value can stop being one (tzdata, a hand edit): UTC days."""
    at = datetime(2025, 3, 3, 23, 30, tzinfo=timezone.utc)
    assert streaks.local_day(at, stored) == date(2025, 3, 3)


async def test_local_midnight(make: Factory, xp_store):
    pool, redis = xp_store
    tokyo, utc = make.user("learner"), make.user("learner")
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO learner_profiles (user_id, timezone) VALUES ($1, 'Asia/Tokyo')", tokyo.id)
    before = datetime(2025, 3, 3, 14, 30, tzinfo=timezone.utc)  # 23:30 in Tokyo, Monday
    after = datetime(2025, 3, 3, 15, 30, tzinfo=timezone.utc)  # 00:30 in Tokyo, Tuesday; still Monday in UTC
    for u in (tokyo, utc):
        await _activity(pool, redis, u.id, before)
        await _activity(pool, redis, u.id, after)
    async with pool.acquire() as conn:
        st, tz = await streaks.get(conn, tokyo.id)
        assert (st.current, st.last_day, tz) == (2, date(2025, 3, 4), "Asia/Tokyo")
        st, tz = await streaks.get(conn, utc.id)
        assert (st.current, st.last_day, tz) == (1, date(2025, 3, 3), "UTC")
        keys = {r["idempotency_key"] for r in await conn.fetch(
            "SELECT idempotency_key FROM xp_events WHERE user_id = $1 AND kind = 'daily_streak'", tokyo.id)}
        assert keys == {"streak:2025-03-03", "streak:2025-03-04"}
        assert await conn.fetchval("SELECT count(*) FROM xp_events WHERE user_id = $1", utc.id) == 1


async def test_streak_achievement_and_freeze_in_db(make: Factory, xp_store):
    pool, redis = xp_store
    u = make.user("learner")
    t0 = datetime(2025, 3, 3, 12, tzinfo=timezone.utc)  # Monday noon UTC
    for d in (0, 1, 3):  # Wednesday missed: frozen
        await _activity(pool, redis, u.id, t0 + timedelta(days=d))
    async with pool.acquire() as conn:
        st, _ = await streaks.get(conn, u.id)
        assert st.current == 3 and st.freeze_weeks == {MON}
        assert await conn.fetchval(
            "SELECT count(*) FROM user_achievements WHERE user_id = $1 AND achievement_id = 'streak-3'", u.id) == 1


async def test_moving_east_skips_days_without_missing_them(make: Factory, xp_store):
    """Los Angeles, the week's freeze already spent on Tuesday; active Thursday evening, then the learner moves
    to Tokyo and is active Friday morning LA time, which is Saturday in Tokyo: Friday was not missed, so the
    streak goes on (it used to restart). Moving back west counts no day twice."""
    pool, redis = xp_store
    u = make.user("learner")
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO learner_profiles (user_id, timezone) VALUES ($1, 'America/Los_Angeles')", u.id)
    la = timedelta(hours=8)  # PST
    for day in (2, 4, 5):  # Mon 2, (Tue 3 missed: this week's freeze), Wed 4, Thu 5
        await _activity(pool, redis, u.id, datetime(2026, 3, day, 20, tzinfo=timezone.utc) + la)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE learner_profiles SET timezone = 'Asia/Tokyo' WHERE user_id = $1", u.id)
    st = await _activity(pool, redis, u.id, datetime(2026, 3, 6, 8, tzinfo=timezone.utc) + la)  # Sat 01:00 Tokyo
    assert (st.current, st.last_day) == (4, date(2026, 3, 7))
    async with pool.acquire() as conn:
        stored, _ = await streaks.get(conn, u.id)
        assert status(stored, date(2026, 3, 7)) == (4, False) and stored.day_tz == "Asia/Tokyo"
        await conn.execute("UPDATE learner_profiles SET timezone = 'America/Los_Angeles' WHERE user_id = $1", u.id)
    again = await _activity(pool, redis, u.id, datetime(2026, 3, 6, 20, tzinfo=timezone.utc) + la)  # Fri in LA
    assert (again.current, again.last_day) == (4, date(2026, 3, 7))  # Friday LA is before Saturday: nothing new


async def test_flipping_between_far_apart_timezones_gains_no_day(make: Factory, xp_store):
    """Away every Wednesday and Thursday for a month, switching between UTC-12 and UTC+14 every two active days:
    no more streak days (nor their XP) than a learner staying in UTC active at the same moments, since counted days
    never overlap in time. (A 26-hour move east can shorten the gap around it by up to a day, so the flipper's
    longest streak may pass the other's by at most that: here 6 against 5.)"""
    pool, redis = xp_store
    flipper, steady = make.user("learner"), make.user("learner")
    zones = ["Etc/GMT+12", "Pacific/Kiritimati"]
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO learner_profiles (user_id, timezone) VALUES ($1, $2)", flipper.id, zones[0])
    start = datetime(2026, 3, 2, 15, tzinfo=timezone.utc)  # a Monday
    days = [start + timedelta(days=d) for d in range(30) if (start + timedelta(days=d)).weekday() not in (2, 3)]
    for n, at in enumerate(days):
        async with pool.acquire() as conn:
            await conn.execute("UPDATE learner_profiles SET timezone = $2 WHERE user_id = $1", flipper.id,
                               zones[(n // 2) % 2])
        moved = await _activity(pool, redis, flipper.id, at)
        kept = await _activity(pool, redis, steady.id, at)
    async with pool.acquire() as conn:
        counted = {u: await conn.fetchval("SELECT count(*) FROM xp_events WHERE user_id = $1 AND kind = 'daily_streak'",
                                          u) for u in (flipper.id, steady.id)}
    assert counted[flipper.id] <= counted[steady.id] == len(days)
    assert kept.longest == 5 and moved.longest <= kept.longest + 1, (moved, kept)


async def test_moving_west_and_active_every_day_keeps_the_streak(make: Factory, xp_store):
    """Tokyo, this week's freeze spent, active Sunday to Wednesday evenings; moves to Los Angeles and is active
    Wednesday and Thursday evenings there (Thursday and Friday in Tokyo). The Los Angeles Wednesday overlaps the
    Tokyo Wednesday already counted, so it is not a new day; Thursday is, and nothing is charged as missed: the
    streak goes on."""
    pool, redis = xp_store
    u = make.user("learner")
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO learner_profiles (user_id, timezone) VALUES ($1, 'Asia/Tokyo')", u.id)
    tokyo = timedelta(hours=9)
    for day in (8, 10, 11):  # Sun 8, (Mon 9 missed: this week's freeze), Tue 10, Wed 11 March 2026, 20:00 Tokyo
        await _activity(pool, redis, u.id, datetime(2026, 3, day, 20, tzinfo=timezone.utc) - tokyo)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE learner_profiles SET timezone = 'America/Los_Angeles' WHERE user_id = $1", u.id)
    la = timedelta(hours=7)  # PDT
    for day in (11, 12):  # Wed 11 and Thu 12, 20:00 in Los Angeles
        st = await _activity(pool, redis, u.id, datetime(2026, 3, day, 20, tzinfo=timezone.utc) + la)
    assert st.current == 4, st
    async with pool.acquire() as conn:
        n = await conn.fetchval("SELECT count(*) FROM xp_events WHERE user_id = $1 AND kind = 'daily_streak'", u.id)
    assert n == 4


async def test_after_moving_west_days_are_counted_where_the_learner_lives(make: Factory, xp_store):
    """Tokyo, this week's freeze spent; moves to Los Angeles and is active every local day there, late evenings
    and just after midnight included: after the Thursday that overlaps the Tokyo one already counted, every Los
    Angeles day counts once (23:30 and 00:30 are two days), nothing is charged as missed, and each day earns its
    XP (the old calendar used to stay a day ahead for good)."""
    pool, redis = xp_store
    u = make.user("learner")
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO learner_profiles (user_id, timezone) VALUES ($1, 'Asia/Tokyo')", u.id)
    tokyo = timedelta(hours=9)
    for day in (16, 18, 19):  # Mon 16, (Tue 17 missed: the week's freeze), Wed 18, Thu 19 March 2026, noon Tokyo
        await _activity(pool, redis, u.id, datetime(2026, 3, day, 12, tzinfo=timezone.utc) - tokyo)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE learner_profiles SET timezone = 'America/Los_Angeles' WHERE user_id = $1", u.id)
    la = timedelta(hours=7)  # PDT
    seen = []
    for day, hour, minute in ((19, 20, 0), (20, 23, 30), (21, 0, 30), (22, 9, 0), (23, 21, 0)):
        seen.append(await _activity(pool, redis, u.id, datetime(2026, 3, day, hour, minute, tzinfo=timezone.utc) + la))
    assert [s.current for s in seen] == [3, 4, 5, 6, 7], seen
    assert seen[-1].day_tz == "America/Los_Angeles" and seen[-1].last_day.isoformat() == "2026-03-23"
    async with pool.acquire() as conn:
        n = await conn.fetchval("SELECT count(*) FROM xp_events WHERE user_id = $1 AND kind = 'daily_streak'", u.id)
    assert n == 7


async def test_switching_timezone_there_and_back_every_day_counts_each_day_once(make: Factory, xp_store):
    """Every day just after midnight in Tokyo, a learner switches to Los Angeles, reports, switches back and
    reports again: one streak day and one day's XP per day, as for a learner who stays in Tokyo."""
    pool, redis = xp_store
    flipper, steady = make.user("learner"), make.user("learner")
    async with pool.acquire() as conn:
        for u in (flipper, steady):
            await conn.execute("INSERT INTO learner_profiles (user_id, timezone) VALUES ($1, 'Asia/Tokyo')", u.id)

    async def move(tz: str) -> None:
        async with pool.acquire() as conn:
            await conn.execute("UPDATE learner_profiles SET timezone = $2 WHERE user_id = $1", flipper.id, tz)

    first = datetime(2026, 3, 16, 3, tzinfo=timezone.utc)  # Monday noon in Tokyo
    await _activity(pool, redis, flipper.id, first)
    await _activity(pool, redis, steady.id, first)
    for d in range(1, 7):
        at = datetime(2026, 3, 16 + d, 0, 30, tzinfo=timezone.utc) - timedelta(hours=9)  # 00:30 in Tokyo
        await move("America/Los_Angeles")
        await _activity(pool, redis, flipper.id, at)
        await move("Asia/Tokyo")
        flipped = await _activity(pool, redis, flipper.id, at + timedelta(minutes=1))
        stayed = await _activity(pool, redis, steady.id, at + timedelta(minutes=1))
    assert flipped.current == stayed.current == 7, (flipped, stayed)
    async with pool.acquire() as conn:
        n = await conn.fetchval("SELECT count(*) FROM xp_events WHERE user_id = $1 AND kind = 'daily_streak'",
                                flipper.id)
    assert n == 7


async def test_moving_east_and_active_early_on_arrival_loses_nothing(make: Factory, xp_store):
    """Los Angeles, this week's freeze spent; active Thursday morning, moves to Tokyo and is active Friday 15:00
    there (still Thursday in Los Angeles: not a new day) and Saturday evening: nothing missed, the streak goes on."""
    pool, redis = xp_store
    u = make.user("learner")
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO learner_profiles (user_id, timezone) VALUES ($1, 'America/Los_Angeles')", u.id)
    la = timedelta(hours=7)  # PDT
    for day in (16, 18, 19):  # Mon 16, (Tue 17 missed: the week's freeze), Wed 18, Thu 19 March 2026, 09:00 LA
        await _activity(pool, redis, u.id, datetime(2026, 3, day, 9, tzinfo=timezone.utc) + la)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE learner_profiles SET timezone = 'Asia/Tokyo' WHERE user_id = $1", u.id)
    tokyo = timedelta(hours=9)
    arrival = await _activity(pool, redis, u.id, datetime(2026, 3, 20, 15, tzinfo=timezone.utc) - tokyo)
    assert arrival.current == 3
    async with pool.acquire() as conn:
        stored, tz = await streaks.get(conn, u.id)
        assert streaks.counted_today(stored, date(2026, 3, 20), tz)  # nothing more to do today
    st = await _activity(pool, redis, u.id, datetime(2026, 3, 21, 20, tzinfo=timezone.utc) - tokyo)
    assert (st.current, st.day_tz) == (4, "Asia/Tokyo"), st


async def test_switching_timezone_at_each_local_midnight_counts_each_day_once(make: Factory, xp_store):
    """Each day a learner switches to Los Angeles and reports just after midnight in Tokyo, then switches back to
    Tokyo and reports just after midnight in Los Angeles: one streak day per real day, not two."""
    pool, redis = xp_store
    u = make.user("learner")
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO learner_profiles (user_id, timezone) VALUES ($1, 'Asia/Tokyo')", u.id)
    await _activity(pool, redis, u.id, datetime(2026, 3, 16, 3, tzinfo=timezone.utc))
    for d in range(6):
        for tz, at in (("America/Los_Angeles", datetime(2026, 3, 16 + d, 15, 30, tzinfo=timezone.utc)),
                       ("Asia/Tokyo", datetime(2026, 3, 17 + d, 7, 30, tzinfo=timezone.utc))):
            async with pool.acquire() as conn:
                await conn.execute("UPDATE learner_profiles SET timezone = $2 WHERE user_id = $1", u.id, tz)
            st = await _activity(pool, redis, u.id, at)
    async with pool.acquire() as conn:
        n = await conn.fetchval("SELECT count(*) FROM xp_events WHERE user_id = $1 AND kind = 'daily_streak'", u.id)
    assert st.current == n == 7, (st, n)


async def test_a_move_across_a_dst_night_charges_no_missed_day(make: Factory, xp_store):
    """Beirut falls back at midnight on 25 October 2026 (the hour before midnight comes twice): the counted Saturday
    ends at an instant that wall-clock arithmetic got an hour wrong, so a move to Amman charged its Sunday (which
    overlaps the counted Saturday) as missed and, the week's freeze spent, ended the streak."""
    pool, redis = xp_store
    u = make.user("learner")
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO learner_profiles (user_id, timezone) VALUES ($1, 'Asia/Beirut')", u.id)
    for day in (19, 21, 22, 23, 24):  # Mon 19, (Tue 20 missed: the week's freeze), Wed 21 to Sat 24, noon UTC
        await _activity(pool, redis, u.id, datetime(2026, 10, day, 12, tzinfo=timezone.utc))
    async with pool.acquire() as conn:
        await conn.execute("UPDATE learner_profiles SET timezone = 'Asia/Amman' WHERE user_id = $1", u.id)
    await _activity(pool, redis, u.id, datetime(2026, 10, 24, 21, 30, tzinfo=timezone.utc))  # Sun 00:30 in Amman
    st = await _activity(pool, redis, u.id, datetime(2026, 10, 26, 9, tzinfo=timezone.utc))  # Monday
    assert st.current == 6, st


async def _move(pool, user_id: int, tz: str, at: datetime) -> None:  # type: ignore[no-untyped-def]
    async with pool.acquire() as conn:
        await conn.execute("""INSERT INTO learner_profiles (user_id, timezone, timezone_changed_at) VALUES ($1, $2, $3)
                              ON CONFLICT (user_id) DO UPDATE SET timezone = $2, timezone_changed_at = $3""",
                           user_id, tz, at)


async def test_moving_west_after_missing_two_days_does_not_take_one_back(make: Factory, xp_store):
    """Active Tuesday (UTC), away Wednesday and Thursday: the streak is broken. Moving to UTC-12 on Friday at 05:00
    UTC (Thursday 17:00 there) counted the gap in the new zone, where it held one whole day (Wednesday), which the
    week's freeze covered: repeated weekly, a streak skipping two days a week. The days before the move are the
    old zone's."""
    pool, redis = xp_store
    u = make.user("learner")
    tue = datetime(2026, 12, 8, 10, tzinfo=timezone.utc)
    for d in (1, 0):  # Monday, Tuesday
        await _activity(pool, redis, u.id, tue - timedelta(days=d))
    friday = datetime(2026, 12, 11, 5, tzinfo=timezone.utc)
    await _move(pool, u.id, "Etc/GMT+12", friday)
    async with pool.acquire() as conn:
        stored, tz = await streaks.get(conn, u.id)
    assert status(stored, streaks.local_day(friday, tz), tz) == (0, True)
    st = await _activity(pool, redis, u.id, friday + timedelta(minutes=1))
    assert st.current == 1 and st.freeze_weeks == frozenset()


async def test_a_move_made_on_arrival_still_misses_nothing(make: Factory, xp_store):
    """The same moves, made when they happen: active every local day, west (Tokyo to Los Angeles) and then east
    (back to Tokyo), the streak runs on and no freeze is spent."""
    pool, redis = xp_store
    u = make.user("learner")
    await _move(pool, u.id, "Asia/Tokyo", datetime(2026, 3, 1, tzinfo=timezone.utc))
    tokyo, la = timedelta(hours=9), timedelta(hours=7)
    for day in (9, 10, 11):  # Mon-Wed 20:00 Tokyo
        await _activity(pool, redis, u.id, datetime(2026, 3, day, 20, tzinfo=timezone.utc) - tokyo)
    await _move(pool, u.id, "America/Los_Angeles", datetime(2026, 3, 12, 2, tzinfo=timezone.utc))  # landed
    for day in (12, 13):  # Thu, Fri 20:00 Los Angeles
        st = await _activity(pool, redis, u.id, datetime(2026, 3, day, 20, tzinfo=timezone.utc) + la)
    await _move(pool, u.id, "Asia/Tokyo", datetime(2026, 3, 14, 12, tzinfo=timezone.utc))  # landed Sat 21:00
    st = await _activity(pool, redis, u.id, datetime(2026, 3, 15, 20, tzinfo=timezone.utc) - tokyo)  # Sun
    assert (st.current, st.freeze_weeks) == (6, frozenset()), st


async def test_a_profile_change_stamps_only_a_new_timezone(make: Factory, xp_store):
    from store import profiles

    pool, _ = xp_store
    u = make.user("learner")
    async with pool.acquire() as conn:
        await profiles.update_profile(conn, u.id, goals=["graphs"])
        assert await conn.fetchval("SELECT timezone_changed_at FROM learner_profiles WHERE user_id = $1", u.id) is None
        await profiles.update_profile(conn, u.id, timezone_name="Europe/Berlin")
        first = await conn.fetchval("SELECT timezone_changed_at FROM learner_profiles WHERE user_id = $1", u.id)
        await profiles.update_profile(conn, u.id, timezone_name="Europe/Berlin", goals=["trees"])
        assert first is not None and await conn.fetchval(
            "SELECT timezone_changed_at FROM learner_profiles WHERE user_id = $1", u.id) == first


def test_a_move_leaves_less_than_a_day_of_a_gap_uncharged():
    """Idle Tuesday to Thursday (UTC): moving to Paris at Wednesday 23:30 UTC and coming back Friday 22:59 UTC kept
    the streak (the old zone's move day and the new zone's day begun before the move went uncharged: ~47 hours), as
    did a move to another name for the same zone. Whatever the move, at most under a day goes uncharged."""
    mon = date(2025, 1, 6)
    s = Streak(10, 10, mon, frozenset(), "UTC")
    back = datetime(2025, 1, 10, 22, 59, tzinfo=timezone.utc)
    for tz, moved in (("Europe/Paris", datetime(2025, 1, 8, 23, 30, tzinfo=timezone.utc)),
                      ("Etc/UTC", datetime(2025, 1, 8, 23, 59, tzinfo=timezone.utc))):
        moving = Streak(10, 10, mon, frozenset(), "UTC", moved)
        after, new = advance(moving, streaks.local_day(back, tz), tz)
        assert new and after.current == 1, (tz, after)
    assert advance(s, streaks.local_day(back, "UTC"), "UTC")[0].current == 1  # as staying put
    # brute force: active Monday (UTC), then a move at any time in the next two days to any whole-hour zone, then
    # back at any time: kept (one freeze) only when the idle time before the new day began is under two days (the
    # freeze's day and less than a day uncharged)
    zones = [f"Etc/GMT{'+' if h > 0 else '-'}{abs(h)}" if h else "UTC" for h in range(-14, 13)]
    ended = datetime(2025, 1, 7, tzinfo=timezone.utc)
    kept = 0
    for tz in zones:
        for hour in range(0, 48, 3):
            moving = Streak(10, 10, mon, frozenset(), "UTC", ended + timedelta(hours=hour))
            for back_hour in range(hour + 1, 96, 2):
                at = ended + timedelta(hours=back_hour)
                day = streaks.local_day(at, tz)
                after, new = advance(moving, day, tz)
                if new and after.current > 1:
                    kept += 1
                    assert datetime.combine(day, datetime.min.time(), tzinfo=streaks.zone(tz)) - ended < \
                        timedelta(hours=48), (tz, hour, at)
    assert kept  # (moves that keep the streak honestly exist too)


async def test_a_day_active_in_a_zone_visited_is_not_charged_after_coming_back(make: Factory, xp_store):
    """(Tester) New York, Monday counted; the learner moves to London and is active there Tuesday 10:00 (Tuesday
    05:00 in New York: not a new day, it overlaps the counted one), moves back and is active Wednesday. Tuesday in
    New York was charged as missed: the week's freeze spent (or, spent already, the streak reset), though they were
    active on it. The activity is remembered; a day with none in it is still missed."""
    pool, redis = xp_store
    u, idle = make.user("learner"), make.user("learner")

    async def move(user_id: int, tz: str, at: datetime) -> None:
        async with pool.acquire() as conn:
            await conn.execute("""INSERT INTO learner_profiles (user_id, timezone, timezone_changed_at) VALUES ($1, $2, $3)
                                  ON CONFLICT (user_id) DO UPDATE SET timezone = $2, timezone_changed_at = $3""",
                               user_id, tz, at)

    utc = timezone.utc
    for who in (u, idle):
        await move(who.id, "America/New_York", datetime(2026, 11, 1, tzinfo=utc))
        await _activity(pool, redis, who.id, datetime(2026, 12, 6, 17, tzinfo=utc))  # Sun 12:00 NY
        await _activity(pool, redis, who.id, datetime(2026, 12, 7, 17, tzinfo=utc))  # Mon 12:00 NY
        await move(who.id, "Europe/London", datetime(2026, 12, 7, 20, tzinfo=utc))
    st = await _activity(pool, redis, u.id, datetime(2026, 12, 8, 10, tzinfo=utc))  # Tue 10:00 London
    assert st.current == 2 and st.last_day == date(2026, 12, 7)  # not a new day
    for who in (u, idle):
        await move(who.id, "America/New_York", datetime(2026, 12, 8, 18, tzinfo=utc))
    st = await _activity(pool, redis, u.id, datetime(2026, 12, 9, 17, tzinfo=utc))  # Wed 12:00 NY
    assert (st.current, st.last_day, st.freeze_weeks) == (3, date(2026, 12, 9), frozenset()), st
    gone = await _activity(pool, redis, idle.id, datetime(2026, 12, 9, 17, tzinfo=utc))  # (nothing on Tuesday)
    assert gone.current == 3 and gone.freeze_weeks == {date(2026, 12, 7)}, gone
    async with pool.acquire() as conn:
        assert (await streaks.get(conn, u.id))[0].active_at is None  # (the new day counted: forgotten)
