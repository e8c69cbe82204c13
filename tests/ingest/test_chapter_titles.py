"""Chapter titles: model-written through the OpenAI wire format when configured, extractive when it fails."""
from __future__ import annotations

import asyncio

from agents.llm import OpenAIChat
from ingest.chapters import Chapter, llm_titles
from tests.agents.fake_llm_servers import FakeLLMServer, Reply


def _chapters() -> list[Chapter]:
    return [Chapter(0, 300, "Extractive one", "We start with vectors and the row picture.", 0, 4),
            Chapter(300, 600, "Extractive two", "Then the column picture of the same equations.", 5, 9)]


def test_llm_titles_and_fallback():
    with FakeLLMServer(api_key="sk-test") as srv:
        srv.script(Reply(text='"The Row Picture of Linear Equations."'), Reply(status=500))
        llm = OpenAIChat("sk-test", "gpt-4o-mini", base_url=srv.openai_base_url, max_retries=0)
        chapters = _chapters()
        seen: list[float] = []

        async def progress(fraction: float) -> None:  # the job's heartbeat, between the model's calls
            seen.append(fraction)

        changed = asyncio.run(llm_titles(llm, chapters, progress))
        assert changed == 1 and seen == [0.5]
        assert chapters[0].title == "The Row Picture of Linear Equations"
        assert chapters[1].title == "Extractive two"  # the model failed: the extractive title stays
        body = srv.requests[0].body
        assert "data, not instructions" in str(body) and "row picture" in str(body)


def test_a_model_title_is_cleaned_as_a_typed_one():
    """(Tester) a model's title holding a NUL failed the whole ingest (every attempt: it cannot be stored); one
    holding a terminal escape, a bidi override or zero-width spaces was stored and shown as written."""
    with FakeLLMServer(api_key="sk-test") as srv:
        srv.script(Reply(text="Atten\u0000tion \u202eheads\u200b\u200b"), Reply(text="\u0000\u200b \x1b"))
        llm = OpenAIChat("sk-test", "gpt-4o-mini", base_url=srv.openai_base_url, max_retries=0)
        chapters = _chapters()
        assert asyncio.run(llm_titles(llm, chapters)) == 1
        assert chapters[0].title == "Attention heads"
        assert chapters[1].title == "Extractive two"  # nothing visible left: the extractive title stays


def test_an_extractive_title_is_a_whole_short_sentence_when_one_of_the_best_is():
    """Titles were the best sentence cut at ten words ("In fact, for the hash function I'm showing here, called…"):
    now the first of the best few short enough to be whole, without spoken openers or a stray quote mark."""
    from types import SimpleNamespace as S

    from ingest.chapters import _titled

    ranked = [S(text="In fact, for the hash function I'm showing here, called SHA256, the output looks random."),
              S(text="So, directional, stabilizing and disruptive."),
              S(text="Okay.")]
    assert _titled(ranked) == "Directional, stabilizing and disruptive"
    assert _titled(ranked[:1]) == "For the hash function I'm showing here, called SHA256, the…"
    assert _titled([S(text='How happy would you feel if you did not get tenure?"')]) == \
        "How happy would you feel if you did not get tenure"
    assert _titled([S(text='"A" is an hour of pain.')]) == '"A" is an hour of pain'
    # (review) a short sentence far below the best is filler, not a title
    scores = {"Any questions so far?": 0.1}
    long_best = S(text="The hash function maps any message to a fixed-size digest that looks random and is hard to "
                       "invert by design.")
    assert _titled([long_best, S(text="Any questions so far?")], lambda s: scores.get(s.text, 10.0)).startswith(
        "The hash function maps any message to a fixed-size digest…")


def test_a_model_out_of_reach_holds_a_video_back_at_most_once_and_never_past_the_deadline():
    """(Tester) a model that accepted connections and never answered was called for every chapter, three timeouts
    each (21 minutes for a 7-chapter video at the default 60 s; its extractive titles kept in the end). Past a
    failure the SDK's retries did not get through, the rest stay extractive; all the calls stop at the deadline. A
    failure of one chapter's own (a request refused) still lets the others be titled."""
    import time

    def model(srv: FakeLLMServer) -> OpenAIChat:  # (one per event loop: its HTTP client belongs to it)
        return OpenAIChat("sk-test", "gpt-4o-mini", base_url=srv.openai_base_url, max_retries=0)

    # ((tester) an account out of credit, OpenAI's 429 insufficient_quota, is no retryable failure but holds for every
    # chapter: each was called, and each logged a warning)
    for failure in (Reply(status=500), Reply(status=429), Reply(status=401),
                    Reply(status=429, error_code="insufficient_quota", error_message="You exceeded your quota")):
        with FakeLLMServer(api_key="sk-test") as srv:
            srv.script(failure)  # (a second call would get the default reply, and a title)
            chapters = _chapters()
            assert asyncio.run(llm_titles(model(srv), chapters)) == 0, failure
            assert [c.title for c in chapters] == ["Extractive one", "Extractive two"]
    with FakeLLMServer(api_key="sk-test") as srv:
        srv.script(Reply(status=400, error_message="Invalid prompt: flagged"), Reply(text="The Column Picture"))
        chapters = _chapters()
        assert asyncio.run(llm_titles(model(srv), chapters)) == 1 and chapters[1].title == "The Column Picture"
        srv.script(Reply(text="Quick"), Reply(wait_s=5, text="Too late"))
        chapters = _chapters()
        t0 = time.monotonic()
        assert asyncio.run(llm_titles(model(srv), chapters, deadline_s=1.0)) == 1
        assert time.monotonic() - t0 < 3 and [c.title for c in chapters] == ["Quick", "Extractive two"]
