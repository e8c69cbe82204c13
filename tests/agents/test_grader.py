"""The grader graph: offline scoring per criterion, the review rule, and the LLM path through the real SDKs
against local servers speaking the OpenAI and Anthropic wire formats."""
from __future__ import annotations

import json

import pytest

from agents import grader, scoring
from agents.embedder import local_minilm
from agents.llm import AnthropicChat, LLMError, OpenAIChat
from tests.agents.fake_llm_servers import FakeLLMServer, Reply

QUESTION = "How does binary search find an element, and how fast is it?"
REFERENCE = "Binary search halves the sorted interval at every step, so it needs logarithmic time."
RUBRIC = [{"name": "idea", "points": 60.0, "description": "The search interval is halved at every step"},
          {"name": "complexity", "points": 40.0, "description": "The running time is logarithmic, O(log n)"}]
MOMENT = {"video_id": 7, "start": 125.0, "end": 170.0, "title": "Searching"}


def inputs(answer: str, criteria=None, exemplars=(), threshold: float = 0.7) -> grader.GradeState:  # type: ignore[no-untyped-def]
    return {"question": QUESTION, "reference": REFERENCE, "criteria": criteria or RUBRIC, "answer": answer,
            "exemplars": list(exemplars), "moment": MOMENT, "threshold": threshold, "band": (40.0, 60.0)}


@pytest.fixture(scope="module")
def embedder():
    return local_minilm()


@pytest.fixture(scope="module")
def fake():
    with FakeLLMServer() as srv:
        yield srv


async def test_offline_scores_each_criterion_with_feedback_and_moment(embedder):
    good = await grader.grade(inputs(REFERENCE), embedder=embedder)
    bad = await grader.grade(inputs("I enjoy sunny weather at the beach."), embedder=embedder)
    assert [s["name"] for s in good["scores"]] == ["idea", "complexity"]
    assert all(0 <= s["score"] <= s["points"] and s["justification"] for s in good["scores"])
    assert good["total"] > 80 > 20 > bad["total"]
    assert good["grader"] == "offline" and not good["held"]
    fb = good["feedback"]
    assert fb["right"] and fb["missing"] and "Rewatch Searching at 2:05" in fb["improve"]
    assert fb["rewatch"] == MOMENT
    # what is missing names the reference's concepts the weak answer lacks, not rubric wording
    assert "interval" in bad["feedback"]["missing"] and "explain" not in bad["feedback"]["missing"].lower()


async def test_partly_right_answers_are_held_for_review(embedder):
    partial = await grader.grade(inputs("Binary search is fast."), embedder=embedder)
    assert partial["held"] and partial["reason"]
    assert partial["confidence"] < 0.7 or 40 <= partial["total"] <= 60


async def test_graded_exemplars_move_the_grade(embedder):
    answer = "It keeps cutting the sorted list in two, so it takes log n steps."
    cold = await grader.grade(inputs(answer, grader.default_rubric()), embedder=embedder)
    ex = [scoring.Exemplar("It cuts the sorted list in two each time, so log n steps.", 1.0),
          scoring.Exemplar("Cuts the list in half every time; about log n comparisons.", 1.0),
          scoring.Exemplar("Divides the sorted list in two repeatedly, logarithmic time.", 1.0),
          scoring.Exemplar("It checks every element from the start.", 0.0),
          scoring.Exemplar("It sorts the list first.", 0.0)]
    warm = await grader.grade(inputs(answer, grader.default_rubric(), ex), embedder=embedder)
    assert warm["total"] > cold["total"] + 10
    assert "compared with 5 graded answers" in warm["scores"][0]["justification"]


def test_review_rule():
    assert grader.needs_review(90, 0.5, 0.7, (40, 60))
    assert grader.needs_review(50, 0.99, 0.7, (40, 60))
    assert not grader.needs_review(90, 0.8, 0.7, (40, 60))
    assert not grader.needs_review(10, 0.8, 0.7, (40, 60))


def llm_reply(idea: float, complexity: float, confidence: float = 0.9) -> Reply:
    return Reply(json.dumps({
        "criteria": [{"name": "idea", "score": idea, "justification": "Halving is explained."},
                     {"name": "complexity", "score": complexity, "justification": "Log time stated."}],
        "confidence": confidence,
        "feedback": {"right": "You explain halving.", "missing": "Nothing.", "improve": "Add an example."}}))


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_llm_grader_through_the_sdks(embedder, fake, provider):
    fake.reset()
    llm = (OpenAIChat("sk-test", "gpt-4o-mini", base_url=fake.openai_base_url, max_retries=0) if provider == "openai"
           else AnthropicChat("sk-test", "claude-sonnet-4-5", base_url=fake.anthropic_base_url, max_retries=0))
    fake.script(llm_reply(58, 40))
    out = await grader.grade(inputs(REFERENCE), embedder=embedder, llm=llm)
    assert out["grader"].startswith(f"llm:{provider}:")
    assert [s["score"] for s in out["scores"]] == [58.0, 40.0] and out["total"] == 98.0
    assert out["feedback"]["right"] == "You explain halving." and out["feedback"]["rewatch"] == MOMENT
    assert not out["held"]
    sent = fake.requests[-1].body
    text = json.dumps(sent)
    assert "idea (60 points)" in text and REFERENCE in text  # the rubric and the reference reach the model


async def test_llm_disagreeing_with_the_offline_grade_is_held(embedder, fake):
    fake.reset()
    llm = OpenAIChat("sk-test", "gpt-4o-mini", base_url=fake.openai_base_url, max_retries=0)
    fake.script(llm_reply(60, 40, confidence=0.95))  # full marks for an answer about the weather
    out = await grader.grade(inputs("I enjoy sunny weather at the beach."), embedder=embedder, llm=llm)
    assert out["total"] == 100.0 and out["held"] and out["confidence"] < 0.7


async def test_unusable_llm_reply_falls_back_to_offline(embedder, fake):
    fake.reset()
    llm = OpenAIChat("sk-test", "gpt-4o-mini", base_url=fake.openai_base_url, max_retries=0)
    fake.script(Reply("I think this deserves a B+."))
    out = await grader.grade(inputs(REFERENCE), embedder=embedder, llm=llm)
    assert out["grader"] == "offline" and "LLM grader failed" in out["note"]


async def test_transient_llm_failure_is_raised_for_the_job_to_retry(embedder, fake):
    fake.reset()
    llm = AnthropicChat("sk-test", "claude-sonnet-4-5", base_url=fake.anthropic_base_url, max_retries=0)
    fake.script(Reply(status=529))
    with pytest.raises(LLMError) as exc:
        await grader.grade(inputs(REFERENCE), embedder=embedder, llm=llm)
    assert exc.value.retryable
