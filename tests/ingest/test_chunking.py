"""Sentences from caption fragments and chunks from sentences: timing, sizes, overlap, coverage."""
from __future__ import annotations

from pathlib import Path

import pytest

from ingest.chunking import (
    DEFAULT_MAX_SECONDS,
    DEFAULT_MAX_TOKENS,
    Chunk,
    Sentence,
    chunk_sentences,
    estimate_tokens,
    to_sentences,
)
from ingest.cues import Cue
from ingest.transcripts import parse_transcript

EVAL = Path(__file__).resolve().parents[3] / "shared" / "eval"


def spans(sentences: list[Sentence]) -> list[tuple[float, float, str]]:
    return [(s.start, s.end, s.text) for s in sentences]


def assert_spans(sentences: list[Sentence], expected: list[tuple[float, float, str]]) -> None:
    assert [s.text for s in sentences] == [e[2] for e in expected]
    for s, (start, end, _) in zip(sentences, expected):
        assert s.start == pytest.approx(start, abs=1e-3), s
        assert s.end == pytest.approx(end, abs=1e-3), s


def words_of(texts) -> list[str]:
    return " ".join(texts).split()


def fresh_sentences(chunks: list[Chunk]) -> list[Sentence]:
    """Every chunk's sentences minus the ones it repeats from the chunk before."""
    out: list[Sentence] = []
    for i, chunk in enumerate(chunks):
        prev = {id(s) for s in chunks[i - 1].sentences} if i else set()
        out.extend(s for s in chunk.sentences if id(s) not in prev)
    return out


def assert_chunks_sound(
    chunks: list[Chunk], max_tokens: int = DEFAULT_MAX_TOKENS, max_seconds: float = DEFAULT_MAX_SECONDS
) -> None:
    assert [c.position for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert c.sentences and c.text == " ".join(s.text for s in c.sentences)
        assert (c.start, c.end) == (c.sentences[0].start, c.sentences[-1].end)
        assert 0 <= c.end - c.start <= max_seconds + 1e-9, c
        assert estimate_tokens(c.text) <= max_tokens, c
    for prev, c in zip(chunks, chunks[1:]):
        assert prev.start < c.start and prev.end < c.end, (prev, c)


def word(i: int, j: int) -> str:
    """A made-up word of letters only (sized as words are: digits are counted by the tokenizer), e.g. "sbwc"."""
    return f"s{i}w{j}".translate(_LETTERS)


_LETTERS = str.maketrans("0123456789", "abcdefghij")


def even_sentences(n: int, words: int = 10, seconds: float = 4.0, gap: float = 0.0) -> list[Sentence]:
    out, t = [], 0.0
    for i in range(n):
        out.append(Sentence(t, t + seconds, " ".join(word(i, j) for j in range(words)) + "."))
        t += seconds + gap
    return out


# --- to_sentences ----------------------------------------------------------------------------


def test_sentence_spanning_cues_runs_from_first_start_to_last_end() -> None:
    cues = [
        Cue(1.0, 2.0, "The cat"),
        Cue(2.0, 4.0, "sat on the"),
        Cue(4.5, 6.0, "mat."),
        Cue(6.0, 7.0, "Then it slept."),
    ]
    assert_spans(to_sentences(cues), [(1.0, 6.0, "The cat sat on the mat."), (6.0, 7.0, "Then it slept.")])


def test_sentences_sharing_a_cue_split_its_time_by_characters() -> None:
    # "One two." is 8 of the cue's 29 characters: it gets 8/29 of the cue's 10 seconds.
    cues = [Cue(10.0, 20.0, "One two. Three four five six.")]
    assert_spans(to_sentences(cues), [(10.0, 10 + 80 / 29, "One two."), (10 + 80 / 29, 20.0, "Three four five six.")])


def test_sentence_ending_mid_cue_continues_into_next() -> None:
    cues = [Cue(0.0, 4.0, "It is red. The next"), Cue(4.0, 8.0, "one is blue? Yes! It is")]
    assert_spans(
        to_sentences(cues),
        [
            (0.0, 4 * 10 / 19, "It is red."),
            (4 * 10 / 19, 4.0 + 4 * 12 / 23, "The next one is blue?"),
            (4.0 + 4 * 12 / 23, 4.0 + 4 * 17 / 23, "Yes!"),
            (4.0 + 4 * 17 / 23, 8.0, "It is"),
        ],
    )


def test_abbreviations_and_lowercase_continuations_do_not_end_sentences() -> None:
    cues = [
        Cue(0.0, 2.0, "We do better now, and Dr."),
        Cue(2.0, 4.0, "Nolen-Hoeksema reviewed therapies, e.g. CBT and drugs."),
        Cue(4.0, 6.0, "Mr. Smith lives in the U.S. and then"),
        Cue(6.0, 8.0, "left for 18.06. ok so the lecture continues."),
    ]
    assert [s.text for s in to_sentences(cues)] == [
        "We do better now, and Dr. Nolen-Hoeksema reviewed therapies, e.g. CBT and drugs.",
        "Mr. Smith lives in the U.S. and then left for 18.06. ok so the lecture continues.",
    ]


def test_unpunctuated_captions_split_on_pauses() -> None:
    cues = [
        Cue(0.0, 2.0, "so today we"),
        Cue(3.0, 5.0, "talk about graphs"),  # 1.0 s pause: same sentence
        Cue(7.0, 9.0, "and then we"),  # 2.0 s pause: new sentence
        Cue(9.0, 11.0, "do trees"),
    ]
    assert_spans(to_sentences(cues), [(0.0, 5.0, "so today we talk about graphs"), (7.0, 11.0, "and then we do trees")])


def test_unpunctuated_captions_capped_at_thirty_seconds() -> None:
    cues = [Cue(i * 3.0, i * 3.0 + 3.0, f"chunk{i} of words with no stops") for i in range(25)]
    sentences = to_sentences(cues)
    assert [(s.start, s.end) for s in sentences] == [(0.0, 30.0), (30.0, 60.0), (60.0, 75.0)]
    assert words_of(s.text for s in sentences) == words_of(c.text for c in cues)


def test_punctuated_captions_ignore_short_pauses_inside_a_sentence() -> None:
    cues = [Cue(i * 2.0, i * 2.0 + 2.0, f"Sentence number {i}.") for i in range(10)]
    cues += [Cue(20.0, 22.0, "This one pauses"), Cue(24.0, 26.0, "in the middle.")]
    last = to_sentences(cues)[-1]
    assert spans([last]) == [(20.0, 26.0, "This one pauses in the middle.")]


def test_overlong_single_cue_split_by_words_with_interpolated_times() -> None:
    text = " ".join(f"w{i}" for i in range(100))
    sentences = to_sentences([Cue(0.0, 70.0, text)])
    assert len(sentences) == 3
    assert sentences[0].start == 0.0 and sentences[-1].end == 70.0
    for a, b in zip(sentences, sentences[1:]):
        assert a.end == b.start
    assert all(s.end - s.start <= 30.0 for s in sentences)
    assert words_of(s.text for s in sentences) == text.split()


def test_unsorted_overlapping_cues_still_give_monotonic_sentences() -> None:
    cues = [Cue(0.0, 5.0, "First one."), Cue(3.0, 4.0, "Second."), Cue(2.0, 6.0, "Third.")]
    sentences = to_sentences(cues)
    assert [s.text for s in sentences] == ["First one.", "Second.", "Third."]
    for a, b in zip(sentences, sentences[1:]):
        assert a.start <= a.end <= b.start <= b.end


def test_no_cues_no_sentences() -> None:
    assert to_sentences([]) == []
    assert to_sentences([Cue(0.0, 1.0, "  ")]) == []


# --- chunk_sentences -------------------------------------------------------------------------


def test_chunks_reach_the_target_and_overlap_by_one_sentence() -> None:
    sentences = even_sentences(40)  # 10 words = 13 tokens each, 4 s each
    chunks = chunk_sentences(sentences, target_tokens=100, max_tokens=150)
    assert_chunks_sound(chunks, max_tokens=150)
    for prev, c in zip(chunks, chunks[1:]):
        assert c.sentences[0] is prev.sentences[-1]
    assert all(estimate_tokens(c.text) >= 100 for c in chunks[:-1])
    assert [s.text for s in fresh_sentences(chunks)] == [s.text for s in sentences]
    assert (chunks[0].start, chunks[-1].end) == (0.0, 160.0)


@pytest.mark.parametrize("overlap", [0, 2])
def test_overlap_setting(overlap: int) -> None:
    chunks = chunk_sentences(even_sentences(40), target_tokens=100, max_tokens=150, overlap_sentences=overlap)
    assert_chunks_sound(chunks, max_tokens=150)
    for prev, c in zip(chunks, chunks[1:]):
        shared = [s for s in c.sentences if any(s is p for p in prev.sentences)]
        assert len(shared) == overlap


def test_defaults_fit_the_embedder_window() -> None:
    chunks = chunk_sentences(even_sentences(200, words=12, seconds=4.5))
    assert_chunks_sound(chunks)
    assert all(150 <= estimate_tokens(c.text) <= DEFAULT_MAX_TOKENS for c in chunks[:-1])


def test_slow_speech_is_cut_at_ninety_seconds() -> None:
    sentences = even_sentences(30, words=3, seconds=10.0)  # few tokens, lots of time
    chunks = chunk_sentences(sentences, target_tokens=400, max_tokens=500)
    assert_chunks_sound(chunks, max_tokens=500)
    assert all(c.end - c.start <= 90.0 for c in chunks)
    assert max(c.end - c.start for c in chunks) == 90.0
    assert [s.text for s in fresh_sentences(chunks)] == [s.text for s in sentences]


def test_long_silence_ends_a_chunk_without_overlap() -> None:
    before = even_sentences(6)  # 78 tokens, ends at 24 s
    after = [Sentence(s.start + 40.0, s.end + 40.0, s.text.replace("s", "t")) for s in even_sentences(6)]
    chunks = chunk_sentences(before + after, target_tokens=180, max_tokens=240)
    assert [len(c.sentences) for c in chunks] == [6, 6]
    assert chunks[0].end == 24.0 and chunks[1].start == 40.0


def test_short_bit_before_a_silence_is_not_a_chunk_of_its_own() -> None:
    before = even_sentences(2)  # 26 tokens: too small to stand alone
    after = [Sentence(s.start + 20.0, s.end + 20.0, s.text) for s in even_sentences(6)]
    chunks = chunk_sentences(before + after, target_tokens=180, max_tokens=240)
    assert len(chunks) == 1 and chunks[0].start == 0.0 and chunks[0].end == after[-1].end


def test_overlong_sentence_split_by_words() -> None:
    words = [f"w{i}" for i in range(500)]  # 650 tokens in 100 s
    chunks = chunk_sentences([Sentence(0.0, 100.0, " ".join(words))], target_tokens=180, max_tokens=240)
    assert_chunks_sound(chunks, max_tokens=240)
    pieces = fresh_sentences(chunks)
    assert words_of(s.text for s in pieces) == words
    assert pieces[0].start == 0.0 and pieces[-1].end == 100.0
    for a, b in zip(pieces, pieces[1:]):
        assert a.end == b.start  # interpolated, contiguous
    assert all(0 < s.end - s.start < 40 for s in pieces)


def test_a_few_words_held_on_screen_for_minutes_are_not_spread_over_them() -> None:
    """A cue held through a silent demo (four minutes, six words) was cut by time into one-word chunks at made-up
    moments ("demo." cited at 13:02); its words were said near its start."""
    cues = [Cue(600.0, 840.0, "Let me show you the demo."), Cue(840.0, 843.0, "Okay, that was it.")]
    sentences = to_sentences(cues)
    assert spans(sentences)[0] == (600.0, 630.0, "Let me show you the demo.")
    chunks = chunk_sentences(sentences)  # (the silence after the words ends a chunk)
    assert [(c.start, c.end, c.text) for c in chunks] == [(600.0, 630.0, "Let me show you the demo."),
                                                          (840.0, 843.0, "Okay, that was it.")]


def test_a_long_cue_of_chinese_keeps_its_time() -> None:
    """Chinese has no spaces: a cue of 164 characters counted as one word was squeezed into its first 30 s."""
    text = "我们今天讨论的是算法的复杂度以及如何分析一个程序运行所需要的时间和空间" * 4 + "这是结尾的部分内容"
    cues = [Cue(0.0, 90.0, text), Cue(90.0, 92.0, "下一句。")]
    sentences = to_sentences(cues)
    assert sentences[0].start == 0.0 and max(s.end for s in sentences[:-1]) == 90.0


def test_chinese_and_japanese_sentence_marks_end_sentences() -> None:
    """"。！？" end sentences with no space after them: 60 cues of Chinese became six 30-second "sentences"."""
    cues = [Cue(3.0 * i, 3.0 * i + 3.0, f"这是第{i}句话。") for i in range(60)]
    assert len(to_sentences(cues)) == 60
    jp = to_sentences([Cue(0.0, 4.0, "これはペンです！本当ですか？「はい。」次へ")])
    assert [s.text for s in jp] == ["これはペンです！", "本当ですか？", "「はい。」", "次へ"]
    hi = to_sentences([Cue(0.0, 4.0, "यह पहला वाक्य है। यह दूसरा है।")])
    assert [s.text for s in hi] == ["यह पहला वाक्य है।", "यह दूसरा है।"]


def test_small_tail_joins_the_previous_chunk() -> None:
    sentences = even_sentences(15)  # 14 sentences reach 182 tokens; the 15th alone would be a scrap
    chunks = chunk_sentences(sentences, target_tokens=180, max_tokens=240)
    assert len(chunks) == 1 and len(chunks[0].sentences) == 15


def test_bad_parameters_and_empty_input() -> None:
    assert chunk_sentences([]) == []
    assert chunk_sentences([Sentence(0.0, 1.0, "")]) == []
    with pytest.raises(ValueError):
        chunk_sentences(even_sentences(3), target_tokens=300, max_tokens=200)
    with pytest.raises(ValueError):
        chunk_sentences(even_sentences(3), max_seconds=0)


# --- the evaluation lectures -------------------------------------------------------------------


def eval_files() -> list[Path]:
    if not EVAL.is_dir():
        pytest.skip(f"evaluation data not found at {EVAL}")
    return sorted((EVAL / "transcripts").iterdir()) + sorted((EVAL / "corpus").glob("*.vtt"))[::20]


def test_eval_lectures_chunk_cleanly() -> None:
    for path in eval_files():
        cues = parse_transcript(path.read_bytes(), path.name)
        sentences = to_sentences(cues)
        chunks = chunk_sentences(sentences)
        name = path.name

        assert words_of(s.text for s in sentences) == words_of(c.text for c in cues), name
        for a, b in zip(sentences, sentences[1:]):
            assert a.start <= a.end <= b.start + 1e-3, (name, a, b)
        assert all(s.end - s.start <= 30.0 for s in sentences), name

        assert_chunks_sound(chunks)
        assert chunks[0].start == pytest.approx(cues[0].start, abs=1e-3), name
        assert chunks[-1].end == pytest.approx(cues[-1].end, abs=1e-3), name
        # No text lost: every word, in order, once the overlap is taken out.
        assert words_of(s.text for s in fresh_sentences(chunks)) == words_of(c.text for c in cues), name
        chunk_words = set(words_of(c.text for c in chunks))
        assert all(w in chunk_words for c in cues for w in c.text.split()), name


def test_overlap_dropped_when_it_would_overflow_the_next_chunk() -> None:
    sizes = [77, 77, 154]  # words: 100, 100 and 200 tokens
    sentences, t = [], 0.0
    for i, n in enumerate(sizes):
        sentences.append(Sentence(t, t + 10.0, " ".join(word(i, j) for j in range(n))))
        t += 10.0
    chunks = chunk_sentences(sentences, target_tokens=180, max_tokens=240)
    assert [[s.text[:4] for s in c.sentences] for c in chunks] == [["sawa", "sbwa"], ["scwa"]]


def test_one_huge_sentence_is_split_in_few_passes(monkeypatch):
    """A cue of 100,000 words squeezed into 2 s: the fewest pieces that fit are found by doubling and bisecting
    (one more piece per pass took minutes and starved the worker's heartbeat)."""
    from ingest import chunking

    calls = []
    real = chunking._split_words
    monkeypatch.setattr(chunking, "_split_words", lambda *a: calls.append(a[2]) or real(*a))
    s = chunking.Sentence(10.0, 12.0, " ".join(f"w{i}" for i in range(100_000)))
    pieces = chunking.split_sentence(s, max_seconds=0.5, max_tokens=50)
    assert len(calls) <= 40
    assert all(chunking.estimate_tokens(p.text) <= 50 and p.end - p.start <= 0.5 for p in pieces)
    assert " ".join(p.text for p in pieces) == s.text
    fewer = real(s, chunking._units(s.text), len(pieces) - 1)  # one piece fewer does not fit
    assert any(chunking.estimate_tokens(p.text) > 50 or p.end - p.start > 0.5 for p in fewer)


def test_text_without_spaces_is_counted_and_split_by_its_characters():
    """A Chinese transcript (no spaces) was counted as a few words a cue: its chunks were ~390 word-pieces, a
    third never embedded; a run of letters without spaces made a chunk of 100,000 characters. Now CJK characters
    count one piece each and long runs by their characters, and both split inside (the text kept as it was)."""
    from ingest import chunking

    assert chunking.estimate_tokens("the cat sat") == 4  # English as before
    assert chunking.estimate_tokens("注意力机制让模型关注输入的不同部分") == 17
    assert chunking.estimate_tokens("x" * 999) >= 333
    zh = "。".join("注意力机制让模型关注输入的不同部分" for _ in range(6))
    cues = [Cue(i * 3.0, i * 3.0 + 3, zh) for i in range(40)]
    chunks = chunk_sentences(to_sentences(cues), target_tokens=120)
    assert chunks and all(chunking.estimate_tokens(c.text) <= DEFAULT_MAX_TOKENS for c in chunks)
    s = chunking.Sentence(0.0, 60.0, zh * 10)  # one long sentence: split inside, nothing added or lost
    pieces = chunking.split_sentence(s, max_seconds=90, max_tokens=100)
    assert len(pieces) > 1 and "".join(p.text for p in pieces) == s.text
    assert all(chunking.estimate_tokens(p.text) <= 100 for p in pieces)
    blob = chunking.Sentence(0.0, 60.0, " ".join("y" * 999 for _ in range(200)))
    chunks = chunk_sentences([blob], target_tokens=120)
    assert all(len(c.text) < 2000 for c in chunks)  # was one chunk of 100,000 characters
    assert sum(len(c.text.replace(" ", "")) for c in chunks) >= 999 * 200  # nothing lost


def test_chunks_in_other_scripts_fit_the_embedders_window():
    """MiniLM's vocabulary is English: a Russian word is about one word-piece per letter. Sized by words, a
    Russian chunk was ~770 pieces and two thirds of it was never embedded; German ones ran over the window too."""
    from agents.embedder import MAX_SEQ_LENGTH, minilm_pieces
    from ingest import chunking

    ru = ("Машинное обучение это область искусственного интеллекта, которая изучает методы построения "
          "алгоритмов, способных обучаться на данных.")
    de = ("Maschinelles Lernen ist ein Teilgebiet der künstlichen Intelligenz, das Algorithmen untersucht, die aus "
          "Daten lernen und sich durch Erfahrung verbessern.")
    assert chunking.estimate_tokens(ru) == minilm_pieces(ru) > 100  # counted, not guessed from 15 words
    assert chunking.estimate_tokens("the cat sat") == 4  # ASCII: the estimate, as before
    for text in (ru, de):
        chunks = chunk_sentences([chunking.Sentence(i * 6.0, i * 6.0 + 5.5, text) for i in range(60)],
                                 target_tokens=180)
        assert chunks and max(minilm_pieces(c.text) for c in chunks) <= DEFAULT_MAX_TOKENS < MAX_SEQ_LENGTH - 2


def test_chunks_of_numbers_identifiers_and_formulas_fit_the_embedders_window():
    """Words x 1.3 undercounts numbers and symbols: one-word cues "w100001 …" made chunks of 534 pieces and a
    transcript of formulas 325, past MiniLM's 256 (the end of each chunk never embedded)."""
    from agents.embedder import MAX_SEQ_LENGTH, minilm_pieces
    from ingest.cues import Cue
    from ingest.chunking import to_sentences

    ids = to_sentences([Cue(i * 0.5, i * 0.5 + 0.4, f"w{i + 100000}") for i in range(3000)])
    line = "The values are 3.14159, 2.71828 and x_12 = 4096 * 8192 / 65536 for the run."
    maths = to_sentences([Cue(i * 3.0, i * 3.0 + 2.5, line) for i in range(300)])
    for sentences in (ids, maths):
        chunks = chunk_sentences(sentences, target_tokens=120)
        assert chunks and max(minilm_pieces(c.text) for c in chunks) <= DEFAULT_MAX_TOKENS < MAX_SEQ_LENGTH - 2
    assert estimate_tokens("w100001 w100002") == minilm_pieces("w100001 w100002") > 4
