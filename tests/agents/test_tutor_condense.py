"""The tutor's condense step: a follow-up becomes a standalone question from the asker's own thread; in a room
the model sees who said what (through the OpenAI SDK against a local server speaking its wire format)."""
from __future__ import annotations

import pytest

from agents.llm import OpenAIChat
from agents.tutor import Tutor
from tests.agents.fake_llm_servers import FakeLLMServer, Reply

ROOM = [
    {"role": "user", "content": "@tutor what does a hash function do?", "name": "Ana", "mine": True},
    {"role": "assistant", "content": "It maps keys to buckets [1].", "name": "tutor", "mine": False},
    {"role": "user", "content": "anyone up for pizza later", "name": "Bo", "mine": False},
]


def state(question: str, history: list[dict]) -> dict:
    return {"question": question, "history": history,
            "usage": {"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 0, "output_tokens": 0,
                      "cost_usd": 0.0}}


async def test_offline_follow_up_borrows_the_askers_own_last_message():
    tutor = Tutor(None, None, None)  # type: ignore[arg-type]  # condense touches neither pool nor embedder
    out = await tutor.condense(state("why?", ROOM))
    assert out["standalone"] == "why? (@tutor what does a hash function do?)"  # not Bo's pizza
    # someone else's chatter alone gives a follow-up nothing to borrow
    assert (await tutor.condense(state("why?", ROOM[1:])))["standalone"] == "why?"
    # a private session's turns are all the learner's own
    private = [{"role": "user", "content": "what is a hash function?"}, {"role": "assistant", "content": "…"}]
    assert (await tutor.condense(state("and why?", private)))["standalone"] == "and why? (what is a hash function?)"


async def test_offline_a_second_follow_up_keeps_the_thread_and_a_reply_goes_on_with_it():
    """(Tutor review) the follow-up borrowed the asker's previous message as typed: after "and why is that?", "can you
    give an example?" borrowed just that and cited another video. It borrows what that message asked, condensed.
    And "yes" right after an answer was taken for a greeting."""
    tutor = Tutor(None, None, None)  # type: ignore[arg-type]
    first = "What is proof of work in bitcoin?"
    second = await tutor.condense(state("and why is that?", [{"role": "user", "content": first}]))
    assert first in second["standalone"]
    history = [{"role": "user", "content": first, "standalone": first},
               {"role": "assistant", "content": "Miners search for a nonce [1]."},
               {"role": "user", "content": "and why is that?", "standalone": second["standalone"]},
               {"role": "assistant", "content": "So that rewriting history costs work [1]."}]
    third = await tutor.condense(state("can you give an example?", history))
    assert "proof of work in bitcoin" in third["standalone"], third
    for reply in ("yes", "ok", "sure, thanks"):
        assert first in (await tutor.condense(state(reply, history[:2])))["standalone"], reply
    # with nothing before it, "yes" is still a greeting's business (nothing borrowed)
    assert (await tutor.condense(state("yes", [])))["standalone"] == "yes"


async def test_offline_a_follow_up_passes_over_chat_and_topicless_turns():
    """(Tester) in a room "@tutor can you give an example?" borrowed the asker's "thanks, brb getting coffee" sent
    after their answered question, and was declined; in a session "why?" after "hi" was searched as "why? (hi)"."""
    tutor = Tutor(None, None, None)  # type: ignore[arg-type]
    asked = "what is natural selection?"
    room = [{"role": "user", "content": "@tutor " + asked, "mine": True, "standalone": asked, "grounded": True},
            {"role": "assistant", "content": "Traits that help survival spread [1].", "mine": False},
            {"role": "user", "content": "thanks, brb getting coffee", "mine": True, "standalone": None,
             "grounded": None}]
    assert (await tutor.condense(state("can you give an example?", room)))["standalone"] == \
        f"can you give an example? ({asked})"
    # a later message of theirs with a topic is the topic, asked or not, answered or declined (review: passing over
    # it to the older answered question answered "why?" about natural selection)
    for said, grounded in (("how do eigenvectors work?", None), ("I am stuck on eigenvectors", None),
                           ("CRISPR gene editing", False)):
        later = room + [{"role": "user", "content": said, "mine": True, "grounded": grounded}]
        assert (await tutor.condense(state("why?", later)))["standalone"] == f"why? ({said})"
    session = [{"role": "user", "content": "hi", "standalone": "hi", "grounded": False},
               {"role": "assistant", "content": "Hello! Ask me about the course."}]
    assert (await tutor.condense(state("why?", session)))["standalone"] == "why?"


async def test_offline_a_question_with_a_topic_of_its_own_is_taken_as_it_is():
    """Every question of up to 8 words (or opening with how/why) borrowed the last one's words: "How do plants make
    food?" after a question on hashing was searched as a hashing question, passed the relevance check on them and
    was answered with hashing moments. Only a question that goes on, points back, or has no topic borrows."""
    tutor = Tutor(None, None, None)  # type: ignore[arg-type]
    private = [{"role": "user", "content": "What is a hash function?"}, {"role": "assistant", "content": "…"}]
    for own in ("How do plants make food?", "What is a binary search tree?", "Why do prices rise in winter?",
                "Which algorithm that sorts lists is stable?",
                "Does correlation mean that one variable causes the other?",
                # (Tester) a "they" or "it" inside a topic of its own: searched with the hashing words, cited bitcoin
                "Explain the mask in attention and why they use negative infinity",
                "What is the softmax function in attention and why is it needed?"):
        assert (await tutor.condense(state(own, private)))["standalone"] == own
    for follow in ("Why does it matter?", "Is this always true?", "Can you give an example?", "tell me more",
                   "What about collisions?", "so what?", "why?", "Is that always true?", "How is that different?",
                   "What does that mean?", "Explain again please", "example please", "What happens next?", "Huh?",
                   "Why is it hard to invert?", "How does it compare to a linked list?"):
        assert (await tutor.condense(state(follow, private)))["standalone"] == f"{follow} (What is a hash function?)"


@pytest.fixture(scope="module")
def llm_server():
    with FakeLLMServer() as srv:
        yield srv


async def test_the_model_sees_who_wrote_each_room_message(llm_server: FakeLLMServer):
    llm_server.reset()
    llm_server.script(Reply("Why does a hash function spread keys over buckets?"))
    llm = OpenAIChat("sk-test", "gpt-4o-mini", base_url=llm_server.openai_base_url, max_retries=0)
    tutor = Tutor(None, None, llm)  # type: ignore[arg-type]
    out = await tutor.condense(state("why?", ROOM))
    assert out["standalone"] == "Why does a hash function spread keys over buckets?"
    convo = llm_server.requests[-1].body["messages"][-1]["content"]
    assert convo.splitlines() == [
        'user "Ana" (the asker): "@tutor what does a hash function do?"',
        'assistant "tutor": "It maps keys to buckets [1]."',
        'user "Bo": "anyone up for pizza later"',
        'user (the asker) (the question to rewrite): "why?"',
    ]


async def test_offline_a_reaction_asked_of_the_tutor_is_no_topic_and_a_reply_word_goes_on():
    """(Tester) in a session (and anything asked of the tutor in a room, which is grounded or not) "ok thanks, that
    helps" became the topic: "and why is it one-way?" was searched as "and why is it one-way? (ok thanks, that
    helps)" and cited a linear algebra lecture. And "no" after a "yes" that went on with an answer got the hello."""
    from agents.judge import judge

    tutor = Tutor(None, None, None)  # type: ignore[arg-type]
    asked = "What is a hash function?"
    session = [{"role": "user", "content": asked, "standalone": asked, "grounded": True},
               {"role": "assistant", "content": "It maps data to a fixed-size digest [1]."}]
    for chat in ("ok thanks, that helps", "thanks, brb getting coffee", "perfect, thanks", "good night everyone"):
        out = await tutor.condense(state(chat, session))
        assert out["standalone"] == chat, out  # (nothing borrowed)
        assert judge(chat, out["standalone"], [], [], [], None).details.get("small_talk"), chat  # the hello
        later = session + [{"role": "user", "content": chat, "standalone": chat, "grounded": False},
                           {"role": "assistant", "content": "Hello!"}]
        assert (await tutor.condense(state("and why is it one-way?", later)))["standalone"] == \
            f"and why is it one-way? ({asked})", chat
    # a request after a courtesy is no reaction: it asks (review: these got the hello)
    assert (await tutor.condense(state("thanks, explain the mask", session)))["standalone"] != asked
    for said in ("hello tutor, I don't understand hashing", "hi, I have a question about SHA-256",
                 "thanks! but I am confused about the difference between proof of work and proof of stake",
                 "nice. Next: proof of stake.", "ok thanks, now the Merkle tree part", "thanks, and the attention mask",
                 "cool, so hashing is one-way then", "ok thanks, so hashing can't be reversed"):  # (checking, a limit)
        assert not judge(said, said, [], [], [], None).details.get("small_talk"), said
    # (review) and chat with a conjunction or a title in it is still chat
    for chat in ("thanks and good night everyone", "ok thanks and bye", "thanks, I was lost but now it makes sense",
                 "thanks, and see you next class", "thanks Professor",
                 # (review: something said to be something, checking nothing, is still a thank-you)
                 "thanks, the explanation is clear now", "thanks, your answer was helpful",
                 "thanks, everything is clear now", "ok thanks, the slides are helpful"):
        assert judge(chat, chat, [], [], [], None).details.get("small_talk"), chat
    said_yes = session + [{"role": "user", "content": "yes", "standalone": f"yes ({asked})", "grounded": True},
                          {"role": "assistant", "content": "More on digests [1]."}]
    assert (await tutor.condense(state("no", said_yes)))["standalone"] == f"no (yes ({asked}))"
