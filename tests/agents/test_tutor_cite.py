"""Citations after generation: markers renumbered in order of use, indexes in quoted transcript text left alone,
and a clipped citation never longer than 60 s as shown."""
from __future__ import annotations

import asyncio

from agents.evidence import Window
from agents.tutor import MAX_CITATION_S, Tutor, citation


def _w(start: float, end: float, text: str = "x") -> Window:
    return Window(video_id=1, video_title="Arrays", youtube_id=None, start=start, end=end, text=text, chunk_rank=0)


def test_an_index_in_a_quote_is_text_not_a_marker():
    sources = [_w(10, 20, "the first element is arr[0], then arr[2]"), _w(30, 40), _w(50, 60)]
    answer = "“the first element is arr[0], then arr[2]” [1] and “more” [3]"
    out = asyncio.run(Tutor.cite(None, {"answer": answer, "sources": sources}))  # type: ignore[arg-type]
    assert out["answer"] == "“the first element is arr[0], then arr[2]” [1] and “more” [2]"
    assert [c["start"] for c in out["citations"]] == [10, 50]
    # a marker a model put inside a quote, after a space, still cites
    out = asyncio.run(Tutor.cite(None, {"answer": '"it halves the interval [2]"', "sources": sources}))  # type: ignore[arg-type]
    assert out["answer"] == '"it halves the interval [1]"' and out["citations"][0]["start"] == 30


def test_a_bracketed_number_quoted_in_an_extractive_answer_is_text():
    """The extractive answer quotes the transcript and puts its own markers after the quotes: "table [5]" in a
    lecture is what was said, not a citation of source 5 (which made source 5 the first citation)."""
    from agents.tutor import extractive_answer

    sources = [_w(10, 20, "as shown in table [5] above"), _w(30, 40, "more"), _w(50, 60), _w(70, 80), _w(90, 99)]
    for w in sources:
        w.core = w.text
    answer = extractive_answer(sources, "answer")
    state = {"answer": answer, "sources": sources, "usage": {"provider": "extractive"}}
    out = asyncio.run(Tutor.cite(None, state))  # type: ignore[arg-type]
    assert "table [5] above" in out["answer"]
    assert [c["start"] for c in out["citations"]] == [10, 30, 50]
    # nor does a quote mark in a title or a closing quote in the transcript move or add a citation
    sources[0].video_title = 'The 5" floppy'
    sources[1].text = sources[1].core = "he said ” and see table [2]"
    answer = extractive_answer(sources, "answer")
    out = asyncio.run(Tutor.cite(None, {"answer": answer, "sources": sources,  # type: ignore[arg-type]
                                        "usage": {"provider": "extractive"}}))
    assert out["answer"] == answer and [c["start"] for c in out["citations"]] == [10, 30, 50]


def test_a_clipped_citation_is_at_most_60_seconds_as_shown():
    c = citation(_w(197.605, 400.0))
    assert c["end"] - c["start"] <= MAX_CITATION_S and c["start"] == 197.6
    for start in (0.005, 12.345, 1234.565, 39999.995):
        c = citation(_w(start, start + 500))
        assert c["end"] - c["start"] <= MAX_CITATION_S, c


def test_follow_ups_leave_out_the_cited_moment_whatever_its_start():
    """Citations carry starts rounded to hundredths; a window starting at 12.345 was never found cited, so the
    follow-ups pointed at the moment just cited."""
    cited = _w(12.345, 30, "hashing buckets collisions chaining")
    other = _w(40, 50, "binary search halving intervals")
    out = asyncio.run(Tutor.follow_ups(None, {  # type: ignore[arg-type]
        "grounded": True, "standalone": "why?", "citations": [citation(cited)], "sources": [cited, other]}))
    assert "halving" in out["follow_ups"][0], out  # the moment not cited comes first


def test_follow_up_topics_are_words_the_passage_is_about():
    """Follow-ups asked about "cryptocurrencies and doesn" and "encoded and correlates": the rarest words, split
    at apostrophes, whatever their part of speech. Words said more than once come first; contractions, -ly adverbs
    and a plural beside its singular are not topics."""
    from agents.tutor import _keywords

    text = ("The ledger doesn't need a bank. Each ledger entry is signed, and signatures periodically get checked; "
            "a signature couldn't be forged. Supply is fixed.")
    got = _keywords(text)
    assert got[:2] == ["ledger", "signatures"], got  # each said twice (a word and its plural are one)
    assert not {"doesn", "couldn", "doesn't", "periodically"} & set(got), got
    assert _keywords("An anomaly and a monopoly, periodically seen.") == ["anomaly", "monopoly"]  # nouns in -ly stay
    out = asyncio.run(Tutor.follow_ups(None, {  # type: ignore[arg-type]
        "grounded": True, "standalone": "why a ledger?", "citations": [], "sources": [_w(0, 30, text)]}))
    assert out["follow_ups"] == ['What does "Arrays" say about signatures and forged?'], out


def test_a_question_the_lecture_asks_is_a_follow_up_when_it_stands_on_its_own():
    """"So what's to prevent Bob from forging a transaction?" is a follow-up as it is; a question about "this" or
    "you", or one about what the learner asked already, is not."""
    from agents.tutor import _lecture_question
    from agents.evidence import terms

    text = ("Now can you see this? So what's to prevent Bob from writing a fraudulent transaction? "
            "That is where signatures come in.")
    assert _lecture_question(text, set()) == "What's to prevent Bob from writing a fraudulent transaction?"
    assert _lecture_question(text, set(terms("preventing a fraudulent transaction by Bob"))) is None
    assert _lecture_question("Why does this matter so much here?", set()) is None
    out = asyncio.run(Tutor.follow_ups(None, {  # type: ignore[arg-type]
        "grounded": True, "standalone": "what is a ledger?", "citations": [], "sources": [_w(0, 30, text)]}))
    assert out["follow_ups"] == ["What's to prevent Bob from writing a fraudulent transaction?"], out


def test_an_offline_answer_streams_in_a_few_pieces_not_a_word_each():
    """The extractive answer is written before it streams: one `tutor.delta` per word was ~150 publishes and ~150
    frames to every socket in the room for one answer (a briefly blocked client overflowed its queue)."""
    from types import SimpleNamespace

    sources = [_w(10 * i, 10 * i + 9, "a hash function maps any input to a short fixed-size digest " * 3)
               for i in range(3)]
    for w in sources:
        w.core = w.text
    got: list[str] = []

    async def on_delta(piece: str) -> None:
        got.append(piece)

    out = asyncio.run(Tutor.answer(SimpleNamespace(llm=None), {  # type: ignore[arg-type]
        "sources": sources, "mode": "answer", "on_delta": on_delta}))
    words = len(out["answer"].split())
    assert "".join(got) == out["answer"] and words > 60 and 2 <= len(got) <= words // 8, (len(got), words)


def test_follow_up_topics_keep_a_name_as_said():
    """Offline follow-ups read "What does "Bitcoin" say about ledger and alice?": a name lost its capital."""
    from agents.tutor import _keywords

    words = _keywords("If Alice signs a transaction like Alice pays Bob, the ledger shows it. Ledger entries are "
                      "public.")
    assert "Alice" in words and "ledger" in words and "alice" not in words and "Ledger" not in words, words


def test_a_model_decline_while_videos_await_a_re_embed_says_so_and_is_not_cached():
    """The model's NOT_IN_COURSE (an empty, ungrounded answer) is worded as a decline is: with videos not
    searchable yet, it says so, and another asker does not get it from the cache."""
    sources = [_w(10, 20), _w(30, 40)]
    out = asyncio.run(Tutor.cite(None, {"answer": "", "grounded": False, "sources": sources, "awaiting": 2}))  # type: ignore[arg-type]
    assert out["answer"].startswith("The course videos don't cover this") and out["cacheable"] is False
    assert "2 of the course's videos are still being indexed" in out["answer"]
    assert [n["start"] for n in out["nearest"]] == [10, 30]
    plain = asyncio.run(Tutor.cite(None, {"answer": "", "grounded": False, "sources": sources, "awaiting": 0}))  # type: ignore[arg-type]
    assert "being indexed" not in plain["answer"] and plain.get("cacheable", True)
    # a model failure says that, not this
    failed = asyncio.run(Tutor.cite(None, {"answer": "", "error": "boom", "sources": sources, "awaiting": 2}))  # type: ignore[arg-type]
    assert "being indexed" not in failed["answer"] and "failed" in failed["answer"]


def test_an_offline_answer_names_the_time_its_quote_is_said():
    """(Tester) "at 12:26: “…”" for words said at 12:48: the moment starts with the sentence before the quote, and the
    answer named the moment's start. The citation keeps its moment (start, label) and says when the quote is said."""
    from types import SimpleNamespace

    from agents.evidence import windows
    from agents.tutor import extractive_answer

    hit = SimpleNamespace(video_id=1, video_title="Good Life", youtube_id=None, start=746.0, end=790.0, text="",
                          sentences=[[746.17, 768.0, "Everything that can go wrong in mental life was studied."],
                                     [768.5, 775.0, "Can psychology give us insight into flourishing?"],
                                     [775.5, 790.0, "It can."]])
    w = next(w for w in windows([hit]) if w.core.startswith("Can psychology"))
    assert w.start == 746.17 and w.quote_at == 768.5
    c = citation(w)
    assert c["label"] == "12:26" and c["quote_at"] == 768.5
    assert "at 12:48: “Can psychology" in extractive_answer([w], "answer")


def test_a_dropped_marker_takes_its_space_and_a_cut_off_one_goes():
    """(Tester) a marker pointing at nothing was dropped but left its space ("the answer is ."); an answer cut off
    inside a marker kept half of it ("chained [ …")."""
    sources = [_w(10, 20), _w(30, 40)]
    out = asyncio.run(Tutor.cite(None, {"answer": "Blocks are chained [1]. The answer is [9].",  # type: ignore[arg-type]
                                        "sources": sources}))
    assert out["answer"] == "Blocks are chained [1]. The answer is."
    out = asyncio.run(Tutor.cite(None, {"answer": "Blocks are chained [2] by hashes [", "error": "cut",  # type: ignore[arg-type]
                                        "sources": sources}))
    assert out["answer"].startswith("Blocks are chained by hashes …"), out["answer"]


def test_a_quote_of_the_lecturers_question_goes_on_to_its_answer():
    """(Tester) offline answers quoted "So first things first, what's a hash function?" (5 of 44), the lecturer's
    question, and not the sentence after it that answers it."""
    from agents.evidence import Window
    from agents.tutor import citation, extractive_answer, said

    text = ("Let's begin. So first things first, what's a hash function? It takes any input and gives a fixed-size "
            "output. Then we move on.")
    w = Window(1, "Bitcoin", None, 740.0, 760.0, text, 0, core="So first things first, what's a hash function?",
               core_start=748.0)
    want = "So first things first, what's a hash function? It takes any input and gives a fixed-size output."
    assert said(w) == want and citation(w)["quote"] == want and want in extractive_answer([w], "answer")
    plain = Window(1, "Bitcoin", None, 740.0, 760.0, text, 0, core="It takes any input and gives a fixed-size output.")
    assert said(plain) == plain.core
    last = Window(1, "Bitcoin", None, 740.0, 760.0, "What comes next?", 0, core="What comes next?")
    assert said(last) == "What comes next?"  # (nothing after it in the moment)


def test_markers_grouped_in_one_bracket_each_cite():
    """(Tester) models write "[1, 2]": it was no marker, so an answer citing only so was thrown away as untied to
    the course (the question still counted), and one mixing both kept "[1, 2]" as text beside renumbered markers,
    pointing at other moments than the model meant."""
    sources = [_w(10, 20), _w(30, 40), _w(50, 60)]
    answer = "Signing needs the private key [3]. Anyone can verify it [1]. Both depend on the message [1, 2]."
    out = asyncio.run(Tutor.cite(None, {"answer": answer, "sources": sources}))  # type: ignore[arg-type]
    assert out["answer"] == ("Signing needs the private key [1]. Anyone can verify it [2]. Both depend on the "
                             "message [2][3]."), out["answer"]
    assert [c["start"] for c in out["citations"]] == [50, 10, 30]
    for grouped in ("It depends on the message [1,2].", "It depends on the message [2; 1]."):
        out = asyncio.run(Tutor.cite(None, {"answer": grouped, "sources": sources}))  # type: ignore[arg-type]
        assert out["grounded"] and len(out["citations"]) == 2 and "[1][2]" in out["answer"], out
    # (review) a group is markers only where a marker stands, each number an excerpt's, once: intervals, lists and
    # matrices are text, and an answer citing nothing else is still untied
    for text in ("A probability lies in [0, 1].", "The list [3, 1, 2] sorted is [1, 2, 4]!", "A [2, 9].",
                 "A 2x2 matrix [[1, 2], [3, 2]] here.", "Twice [1, 1]."):
        out = asyncio.run(Tutor.cite(None, {"answer": text, "sources": sources}))  # type: ignore[arg-type]
        assert not out["grounded"] and not out["citations"], (text, out)
    out = asyncio.run(Tutor.cite(None, {"answer": "It squashes into [0, 1] [2]. The list [3, 1, 2] sorted [1].",
                                        "sources": sources}))  # type: ignore[arg-type]
    assert out["answer"] == "It squashes into [0, 1] [1]. The list [3, 1, 2] sorted [2].", out["answer"]
    assert [c["start"] for c in out["citations"]] == [30, 10]
    # a quoted "[1, 2]" is what was said
    out = asyncio.run(Tutor.cite(None, {"answer": "“the array [1, 2] is short” [3].", "sources": sources}))  # type: ignore[arg-type]
    assert out["answer"] == "“the array [1, 2] is short” [1]." and out["citations"][0]["start"] == 50
