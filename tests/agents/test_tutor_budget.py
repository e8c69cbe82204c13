"""A whole answer from a model has a time budget (`Tutor.budget_s`): the SDKs' timeouts bound each read only,
so a server that keeps sending (a token at a time, or Anthropic's pings) held an answer, the learner's slot and
held question for as long as it liked. Through the real SDKs against a local server speaking their wire formats."""
from __future__ import annotations

import asyncio
import time

import pytest

from agents.llm import AnthropicChat, OpenAIChat
from agents.tutor import Tutor
from tests.agents.fake_llm_servers import FakeLLMServer, Reply
from tests.agents.test_tutor_cite import _w

BUDGET_S = 1.5


@pytest.fixture(scope="module")
def llm_server():
    with FakeLLMServer() as srv:
        yield srv


def _llm(srv: FakeLLMServer, which: str):  # type: ignore[no-untyped-def]
    if which == "openai":
        return OpenAIChat("sk-test", "gpt-4o-mini", base_url=srv.openai_base_url, max_retries=0)
    return AnthropicChat("sk-test", "claude-sonnet-4-6", base_url=srv.anthropic_base_url, max_retries=0)


def _state(tutor: Tutor, history: list[dict] | None = None) -> dict:
    return {"question": "why does it halve?", "standalone": "why does the search halve the interval?",
            "history": history or [], "mode": "answer", "sources": [_w(10, 20, "it halves the interval")],
            "usage": {"provider": tutor.llm.name, "model": tutor.llm.model, "input_tokens": 0, "output_tokens": 0,
                      "cost_usd": 0.0},
            "deadline": asyncio.get_running_loop().time() + tutor.budget_s}


@pytest.mark.parametrize("which", ["openai", "anthropic"])
async def test_a_reply_trickling_past_the_budget_ends_as_a_model_failure(llm_server: FakeLLMServer, which: str):
    llm_server.reset()
    # 20 deltas, 0.4 s apart: each read is quick, the whole reply takes 8 s
    llm_server.script(Reply("[1] It halves the interval each step. " * 2, chunks=20, delay_s=0.4))
    tutor = Tutor(None, None, _llm(llm_server, which), budget_s=BUDGET_S)  # type: ignore[arg-type]
    deltas: list[str] = []

    async def on_delta(text: str) -> None:
        deltas.append(text)

    t0 = time.monotonic()
    out = await tutor.answer({**_state(tutor), "on_delta": on_delta})
    took = time.monotonic() - t0
    assert took < BUDGET_S + 1.0, took
    assert out["grounded"] is False and "not complete within 1.5 s" in out["error"]
    assert deltas and out["answer"].startswith("".join(deltas)[:5])  # what came is kept for the cut-off reply
    assert llm_server.wait_disconnects(1)  # the response was closed, not left streaming
    cited = await tutor.cite({**_state(tutor), **out})
    assert cited["grounded"] is False and "cut off" in cited["answer"]


async def test_a_condense_that_takes_the_budget_falls_back_at_once(llm_server: FakeLLMServer):
    llm_server.reset()
    llm_server.script(Reply("Why does binary search halve the interval?", wait_s=4))
    tutor = Tutor(None, None, _llm(llm_server, "openai"), budget_s=BUDGET_S)  # type: ignore[arg-type]
    history = [{"role": "user", "content": "what is binary search?"}, {"role": "assistant", "content": "…"}]
    t0 = time.monotonic()
    out = await tutor.condense(_state(tutor, history))
    assert time.monotonic() - t0 < BUDGET_S + 1.0
    assert out["standalone"] == "why does it halve? (what is binary search?)"  # the offline heuristic


async def test_a_reply_that_cites_nothing_is_not_shown_nor_cached():
    """A model's reply whose markers all point at nothing retrieved (or that has none) may be invented: the asker
    gets the nearest moments instead, as in a decline, and the outcome is not cached for others."""
    sources = [_w(10, 20, "it halves the interval"), _w(30, 40, "the middle element")]
    state = {"answer": "Bitcoin was invented in 2008 [7]. Proof of work [9].", "sources": sources,
             "usage": {"provider": "openai"}, "mode": "answer"}
    out = await Tutor.cite(None, state)  # type: ignore[arg-type]
    assert out["grounded"] is False and out["citations"] == [] and out["cacheable"] is False
    assert "2008" not in out["answer"] and "could not tie an answer" in out["answer"]
    assert [n["start"] for n in out["nearest"]] == [10, 30] and '"Arrays" at 0:10' in out["answer"]


@pytest.mark.parametrize("reply", [Reply("The harmful part begins here [1] and goes on", chunks=4,
                                         finish="content_filter"),
                                   Reply("", refusal="I can't help with that.")])
async def test_what_a_content_filter_stopped_is_not_shown_even_in_part(llm_server: FakeLLMServer, reply: Reply):
    """A reply the provider's filter stopped after some text (or the model's refusal) is not kept as a partial
    answer "cut off by a model error": nothing of it reaches the stored answer."""
    llm_server.reset()
    llm_server.script(reply)
    tutor = Tutor(None, None, _llm(llm_server, "openai"), budget_s=BUDGET_S)  # type: ignore[arg-type]
    out = await tutor.answer(_state(tutor))
    assert out["answer"] == "" and out["refused"] is True and out["error"]
    # the asker is told the model would not answer (not "failed; please ask again": the same ask fails the same)
    from server.tutoring import MODEL_REFUSED, public_error
    assert public_error(out["error"]) == MODEL_REFUSED and public_error("openai: server error") != MODEL_REFUSED
    cited = await tutor.cite({**_state(tutor), **out})
    assert cited["grounded"] is False and "harmful" not in cited["answer"]
    assert cited["answer"] == "(The language model would not answer this; try asking it another way.)"



async def test_an_answer_cut_at_its_length_limit_drops_a_half_marker(llm_server: FakeLLMServer):
    """(Review) an answer cut at max_tokens inside a marker ("by hashes [", "[2") kept the half marker."""
    llm_server.reset()
    llm_server.script(Reply("It halves the interval [1] each step [", chunks=3, finish="length"))
    tutor = Tutor(None, None, _llm(llm_server, "openai"), budget_s=BUDGET_S)  # type: ignore[arg-type]
    out = await tutor.answer(_state(tutor))
    assert out["answer"] == "It halves the interval [1] each step …", out


@pytest.mark.parametrize("which", ["openai", "anthropic"])
async def test_an_answer_from_a_server_ignoring_max_tokens_is_cut_at_the_longest_kept(llm_server: FakeLLMServer,
                                                                                      which: str):
    """(Tester) a self-hosted server ignoring max_tokens wrote a 35,000-character answer into a room whose members
    keep to 4,000: the answer stops at MAX_ANSWER_CHARS, at a word, marked cut, the stream closed there."""
    from agents.tutor import MAX_ANSWER_CHARS

    llm_server.reset()
    llm_server.script(Reply("It halves the interval [1] each step. " * 1000, chunks=400))
    tutor = Tutor(None, None, _llm(llm_server, which), budget_s=10)  # type: ignore[arg-type]
    deltas: list[str] = []

    async def on_delta(text: str) -> None:
        deltas.append(text)

    state = {**_state(tutor), "on_delta": on_delta}
    out = await tutor.answer(state)
    # (review) stopped before the counts come (OpenAI's are in the last chunk): estimated, not nothing
    assert state["usage"]["output_tokens"] >= MAX_ANSWER_CHARS // 4 and state["usage"]["input_tokens"] > 50, state
    assert not out.get("error") and out["answer"].endswith(" …"), out["answer"][-40:]
    assert MAX_ANSWER_CHARS - 50 < len(out["answer"]) <= MAX_ANSWER_CHARS + 2
    assert len("".join(deltas)) <= MAX_ANSWER_CHARS
    cited = await tutor.cite({**_state(tutor), **out})
    assert cited["grounded"] and len(cited["answer"]) <= MAX_ANSWER_CHARS + 2
