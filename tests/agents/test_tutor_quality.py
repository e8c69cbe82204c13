"""Quality floors for the offline tutor on ../shared/eval, so it cannot silently get worse.

Measured with bench/tutor_eval.py (offline defaults: the MiniLM + e5 ensemble): citation hit@1 0.817, hit@3
0.933, no citation over 60 s, refusal accuracy 0.933 on out-of-scope questions, false refusals 0.017 (one
answerable question hinges on a word rarer than once per million that the course never says). Floors allow one
question of slack.
"""
from __future__ import annotations

import json

from agents.embedder import local_default
from agents.tutor import Tutor
from store.db import create_pool
from tests.conftest import EVAL, EvalCourse, run_sync


def _overlaps(c: dict, spans: list) -> bool:
    return any(c["start"] <= b and c["end"] >= a for a, b in spans)


def test_tutor_quality_floors(eval_course: EvalCourse, settings):
    spec = json.loads((EVAL / "questions.json").read_text())

    async def go() -> tuple[int, int, int, int, int]:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            tutor = Tutor(pool, local_default(), None)
            h1 = h3 = too_long = refused = 0
            for q in spec["questions"]:
                out = await tutor.run(eval_course.id, q["question"])
                vid = eval_course.videos[q["file"]]
                ok = [c["video_id"] == vid and _overlaps(c, q["spans"]) for c in out["citations"]]
                h1 += any(ok[:1])
                h3 += any(ok[:3])
                too_long += sum(c["end"] - c["start"] > 60 for c in out["citations"])
                refused += not out["grounded"]
            declined = 0
            for q in spec["out_of_scope"]:
                out = await tutor.run(eval_course.id, q["question"])
                declined += not out["grounded"] and not out.get("citations")
            return h1, h3, too_long, refused, declined
        finally:
            await pool.close()

    h1, h3, too_long, refused, declined = run_sync(go())
    n, n_oos = len(spec["questions"]), len(spec["out_of_scope"])
    print(f"hit@1 {h1 / n:.3f} hit@3 {h3 / n:.3f} refusal accuracy {declined / n_oos:.3f} false refusals {refused / n:.3f}")
    assert too_long == 0
    assert h1 / n >= 0.80
    assert h3 / n >= 0.916
    assert refused / n <= 0.04
    assert declined / n_oos >= 0.86


def test_a_misspelt_word_is_not_declined_as_not_covered(eval_course: EvalCourse, settings):
    """(Tester) one typo got "The course videos don't cover this" ("What is a digital signiture?", "what is a hash
    funtion?", "whats a blockchian"), its nearest moments right: a word one edit from the course's (two from eight
    letters) is not declined for. A word the course says nothing near is still declined."""
    async def go() -> list[dict]:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            tutor = Tutor(pool, local_default(), None)
            return [await tutor.run(eval_course.id, q) for q in (
                "What is a digital signiture?", "what is a hash funtion?", "what is the atention mechanism?",
                "what is a blockchian?", "whats a blockchian", "Why do we need Soft Max?",
                "What is the Etherum blockchain?", "What is the Bitcoin halving?", "How does staking work?")]
        finally:
            await pool.close()

    got = run_sync(go())
    for out in got[:6]:  # (and a name the course says as one word, written as two: "Soft Max", "softmax")
        assert out["grounded"] and out["citations"], out["answer"]
    # (Ethereum is not in the course, however spelt; review: real words near a course word are no typos —
    # "halving" is not "having", "staking" not "shaking")
    for out in got[6:]:
        assert not out["grounded"], out["answer"]


def test_what_a_question_says_about_the_asker_and_what_a_follow_up_goes_on_with(eval_course: EvalCourse, settings):
    """(Tester) A name the course never says in a sentence about the asker declined the question with it (60 of the
    eval's 60 after "I'm revising at Stanford tonight."); "why?" after a question declined for a name ("Ethereum")
    was answered from the words it borrowed (11 of 15 out-of-scope questions); a question in another script after a
    question was answered as that question; "GPT3" was declined where the course says "GPT-3"."""
    declined = "How does proof of stake in Ethereum choose who gets to create the next block?"

    async def go() -> list[dict]:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            tutor = Tutor(pool, local_default(), None)
            asked = [await tutor.run(eval_course.id, q) for q in (
                "I'm revising at Stanford tonight. What is a hash function?",
                "my professor at Stanford told me something else, but how does the hash function work in bitcoin?",
                "how big are the key and query matrices in gpt3?",
                "I read about Ethereum. How does it work?",  # (the question points back into it: judged whole)
                "I don't understand RoPE, can you explain it?",  # (asks about it: judged whole)
                # (review: what the asker is interested in, uses or works on is the question's topic)
                "I'm interested in Ethereum. How does proof of stake choose who gets to create the next block?",
                "My project runs on Ethereum, how does proof of stake choose who creates the next block?",
                "I'm studying at Stanford tonight. What is a hash function?")]  # (review: a place is no topic)
            revising = [{"role": "user", "content": "I'm revising at Stanford tonight. What is a hash function?",
                         "mine": True}, {"role": "assistant", "content": "A hash function maps ... [1]."}]
            after = [{"role": "user", "content": declined, "mine": True},
                     {"role": "assistant", "content": "The course videos don't cover this."}]
            answered = [{"role": "user", "content": "what is a digital signature?", "mine": True},
                        {"role": "assistant", "content": "A signature proves who wrote a message [1]."}]
            return asked + [await tutor.run(eval_course.id, "why?", history=after),
                            # (review: a follow-up borrowed the Stanford sentence too, and was declined for it)
                            await tutor.run(eval_course.id, "why is it one-way?", history=revising),
                            await tutor.run(eval_course.id, "why?", history=answered),
                            await tutor.run(eval_course.id, "注意力机制是什么？", history=answered),
                            await tutor.run(eval_course.id, "what time is it?", history=answered)]
        finally:
            await pool.close()

    got = run_sync(go())
    for out in got[:3] + got[7:8] + got[9:11]:
        assert out["grounded"] and out["citations"], out["answer"]
    for out in got[3:7] + got[8:9] + got[11:]:
        assert not out["grounded"] and not out["citations"], out["answer"]
    assert "another language" in got[11]["answer"] and got[12]["answer"].startswith("I can't tell the time"), got[11:]


def test_a_question_about_a_moment_is_answered_with_what_is_said_then(eval_course: EvalCourse, settings):
    """(Tester) "what does he say at 12:30 in the bitcoin video?" was searched for its words and cited 14:27, 11:21
    and 0:19. A question about a moment quotes what the video named says then; naming none, what each says then;
    a moment past every video's end is said to be so."""
    async def go() -> list[dict]:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            tutor = Tutor(pool, local_default(), None)
            named = await tutor.run(eval_course.id, "what does he say at 12:28 in the bitcoin video?")
            follow = await tutor.run(eval_course.id, "and at 12:31?", history=[
                {"role": "user", "content": "what does he say at 12:28 in the bitcoin video?", "mine": True},
                {"role": "assistant", "content": named["answer"]}])
            return [named, follow,
                    await tutor.run(eval_course.id, "what is said around minute 5?"),
                    await tutor.run(eval_course.id, "what happens at 9:59:00 in the bitcoin video?"),
                    await tutor.run(eval_course.id, "what is said at 9:59:00?"),
                    # (named, it is that video's moment or none: the others reach 30:00, the bitcoin one does not)
                    await tutor.run(eval_course.id, "what does the bitcoin video say at 30:00?"),
                    # (review) a clock or minutes in a question about something else: searched as a question
                    await tutor.run(eval_course.id, "why does a bitcoin block take 10 minutes in practice?"),
                    await tutor.run(eval_course.id, "what does he say about hashing at 5:00?"),
                    # (review) a moment a little past the end is past it
                    await tutor.run(eval_course.id, "what does the bitcoin video say at 25:28?")]
        finally:
            await pool.close()

    named, follow, unnamed, past, past_all, past_named, block, hashing, just_past = run_sync(go())
    for out in (block, hashing):
        assert "at_time" not in out["judge"] and not out["answer"].startswith(("At ", "Which video")), out["answer"]
    assert just_past["answer"].startswith('"But How Does Bitcoin Actually Work?" ends at '), just_past["answer"]
    bitcoin = eval_course.videos["3b1b-bitcoin.srt"]
    assert named["grounded"] and [c["video_id"] for c in named["citations"]] == [bitcoin], named
    (c,) = named["citations"]
    assert c["start"] <= 748.2 <= c["end"] and "what's a hash function" in c["quote"], c
    assert named["answer"].startswith('At 12:28 in "But How Does Bitcoin Actually Work?"'), named["answer"]
    assert [x["video_id"] for x in follow["citations"]] == [bitcoin] and follow["citations"][0]["start"] >= 750, follow
    assert unnamed["grounded"] and unnamed["answer"].startswith("Which video do you mean? At 5:00"), unnamed["answer"]
    assert 2 <= len(unnamed["citations"]) <= 3 and all(x["start"] <= 300 + 15 and x["end"] >= 300 - 30
                                                          for x in unnamed["citations"]), unnamed["citations"]
    for out in (past, past_all, past_named):
        assert not out["grounded"] and not out["citations"], out
    assert past["answer"].startswith('"But How Does Bitcoin Actually Work?" ends at '), past["answer"]
    assert past["answer"].endswith(", before 9:59:00."), past["answer"]
    assert past_all["answer"].startswith("None of the course's videos reaches 9:59:00: the longest ends at "), past_all
    assert past_named["answer"].startswith('"But How Does Bitcoin Actually Work?" ends at '), past_named["answer"]
