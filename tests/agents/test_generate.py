"""Item generation: offline items from key sentences with distractors from other chapters; LLM items kept
only when they cite a real sentence of the chapter."""
from __future__ import annotations

import json

import pytest

from agents.embedder import local_minilm
from agents.generate import (Sentence, _blank, _distractors, _WORD, gives_away, llm_items, masked, neutral_title,
                             offline_items)
from agents.llm import OpenAIChat
from tests.agents.fake_llm_servers import FakeLLMServer, Reply

CHAPTER = [Sentence(60 + 10 * i, 69 + 10 * i, t) for i, t in enumerate([
    "So today we are going to talk about something really interesting, okay.",
    "A hash table stores keys in buckets chosen by a hash function applied to each key.",
    "When two keys land in the same bucket we call that a collision, and chaining keeps a list per bucket.",
    "Open addressing instead probes the next free slot until it finds an empty bucket for the key.",
    "The load factor measures how full the buckets are, and resizing keeps lookups constant on average.",
])]
OTHERS = [[Sentence(300 + 10 * i, 309 + 10 * i, t) for i, t in enumerate(group)] for group in (
    ["A binary heap keeps the smallest element at the root of a complete tree stored in an array.",
     "Insertion sifts the element upward while its parent is larger, which takes logarithmic time.",
     "A priority queue built on a heap serves Dijkstra's algorithm for shortest paths in graphs."],
    ["Recursion solves a problem by calling itself on smaller inputs until a base case stops it.",
     "Memoization caches the results of recursive calls so overlapping subproblems are solved once.",
     "Dynamic programming fills a table bottom up, like computing Fibonacci numbers iteratively."])]


@pytest.fixture(scope="module")
def embedder():
    return local_minilm()


def test_offline_items_cite_key_sentences_with_distractors_from_other_chapters(embedder):
    items = offline_items("Hash tables", 5, CHAPTER, OTHERS, 4, "medium", ["multiple_choice", "short_answer"], embedder)
    assert len(items) == 4 and {i.type for i in items} == {"multiple_choice", "short_answer"}
    texts = {s.text: s for s in CHAPTER}
    other_words = " ".join(s.text for g in OTHERS for s in g).lower()
    for it in items:
        s = texts[it.citation["text"]]  # a real sentence, cited at its own time
        assert it.citation == {"video_id": 5, "start": s.start, "end": s.end, "text": s.text}
        assert "really interesting" not in s.text  # filler is never a key sentence
        if it.type == "multiple_choice":
            answer = it.options[it.correct[0]]
            assert answer in s.text.lower() and "_____" in it.prompt and answer not in it.prompt.lower()
            assert all(o in other_words for i, o in enumerate(it.options) if i != it.correct[0])
        else:
            assert it.reference_answer == s.text
    again = offline_items("Hash tables", 5, CHAPTER, OTHERS, 4, "medium", ["multiple_choice", "short_answer"],
                          embedder)
    assert [(i.prompt, i.options, i.correct) for i in again] == [(i.prompt, i.options, i.correct) for i in items]


async def test_llm_items_must_cite_a_real_moment():
    reply = {"items": [
        {"type": "multiple_choice", "prompt": "What resolves collisions by keeping a list per bucket?",
         "options": ["chaining", "probing", "hashing", "sorting"], "correct": [0], "start": 80.0},
        {"type": "short_answer", "prompt": "What is the load factor?", "reference_answer": "How full the table is.",
         "start": 100.4},
        {"type": "short_answer", "prompt": "Invented moment", "reference_answer": "x", "start": 999.0},
        {"type": "multiple_choice", "prompt": "Bad index", "options": ["a", "b"], "correct": [5], "start": 70.0},
    ]}
    with FakeLLMServer() as fake:
        fake.script(Reply("Here you go:\n" + json.dumps(reply)))
        llm = OpenAIChat("sk-test", "gpt-4o-mini", base_url=fake.openai_base_url, max_retries=0)
        items = await llm_items(llm, "Hash tables", 5, CHAPTER, 4, "easy", ["multiple_choice", "short_answer"])
        assert "[80.0] When two keys land" in fake.requests[-1].body["messages"][-1]["content"]
        fake.script(Reply("no json at all"))
        assert await llm_items(llm, "Hash tables", 5, CHAPTER, 4, "easy", ["short_answer"]) == []
        # prose with braces after the JSON does not cost the items (it did: nothing parsed, all were dropped)
        fake.script(Reply(json.dumps(reply) + "\nNote: I skipped the {aside}."))
        again = await llm_items(llm, "Hash tables", 5, CHAPTER, 4, "easy", ["multiple_choice", "short_answer"])
        assert [(i.type, i.citation["start"]) for i in again] == [("multiple_choice", 80), ("short_answer", 100)]
        # room for every item asked for
        assert fake.requests[-1].body["max_tokens"] == 1500
        await llm_items(llm, "Hash tables", 5, CHAPTER, 20, "easy", ["short_answer"])
        assert fake.requests[-1].body["max_tokens"] == 4096
        # a lone surrogate in the reply is a reply that cannot be used, not a 500
        fake.script(Reply('{"items": [{"type": "short_answer", "prompt": "\\ud83d", "start": 80.0}]} \ud83d'))
        assert await llm_items(llm, "Hash tables", 5, CHAPTER, 4, "easy", ["short_answer"]) == []
        # an item an instructor could not write is dropped: nothing visible, control characters, a multi-line option
        bad = [{"type": "short_answer", "prompt": "\u200b\u200b", "reference_answer": "\u200b", "start": 80.0},
               {"type": "short_answer", "prompt": "Why\x1b[2J?", "reference_answer": "x", "start": 80.0},
               {"type": "multiple_choice", "prompt": "Which?", "options": ["a\nb", "c"], "correct": [0], "start": 80.0}]
        fake.script(Reply(json.dumps({"items": bad})))
        assert await llm_items(llm, "Hash tables", 5, CHAPTER, 4, "easy", ["short_answer", "multiple_choice"]) == []
        # JSON nested past the parsers' depth: unusable, not a 500 (a RecursionError)
        for depth in (900, 3000):
            fake.script(Reply('{"items": ' + "[" * depth + "]" * depth + "}"))
            assert await llm_items(llm, "Hash tables", 5, CHAPTER, 4, "easy", ["short_answer"]) == []
    assert [(i.type, i.citation["start"]) for i in items] == [("multiple_choice", 80), ("short_answer", 100)]
    assert items[0].correct == [0] and items[1].reference_answer == "How full the table is."


async def test_llm_items_are_checked_one_by_one_like_an_instructors_own():
    """A malformed item (a string where indexes go) costs only itself; options that differ only in case or spaces
    are refused, as for an instructor's item; the count is taken from the items kept."""
    reply = {"items": [
        {"type": "multiple_choice", "prompt": "Bad correct", "options": ["a", "b"], "correct": "a", "start": 80.0},
        {"type": "multiple_choice", "prompt": "Same options", "options": ["Chaining", "chaining", " Chaining ", "x"],
         "correct": [0], "start": 80.0},
        {"type": "multiple_choice", "prompt": "Look-alike", "options": ["Yes", "\uff39es", "no", "maybe"],
         "correct": [0], "start": 80.0},  # the same to a learner: an instructor's item is refused that way
        {"type": "multiple_choice", "prompt": "All right", "options": ["a", "b", "c", "d"], "correct": [0, 1, 2, 3],
         "start": 80.0},  # nothing to choose
        {"type": "short_answer", "prompt": "What is the load factor?", "reference_answer": "How full it is.",
         "start": 100.0},
        {"type": "short_answer", "prompt": "What is a collision?", "reference_answer": "Two keys, one bucket.",
         "start": 80.0},
    ]}
    with FakeLLMServer() as fake:
        fake.script(Reply(json.dumps(reply)))
        llm = OpenAIChat("sk-test", "gpt-4o-mini", base_url=fake.openai_base_url, max_retries=0)
        items = await llm_items(llm, "Hash tables", 5, CHAPTER, 2, "easy", ["multiple_choice", "short_answer"])
    assert [i.prompt for i in items] == ["What is the load factor?", "What is a collision?"]


def test_a_title_or_concept_does_not_give_the_answer_away(embedder):
    assert masked("So an equal number of equations and unknowns (1:21)", ["unknowns"]) == \
        "So an equal number of equations and … (1:21)"
    assert masked("Parameter count of the model", ["parameters"]) == "… count of the model"
    # an answer however short, where it is not part of a longer word; the title's moment is kept
    assert masked("Hash lookups take O(1) time (1:42)", ["O(1)"]) == "Hash lookups take … time (1:42)"
    assert masked("The answer is 42, not 420 (0:42)", ["42"]) == "The answer is …, not 420 (0:42)"
    assert masked("Go or Rust", ["Go"]) == "… or Rust"
    only_mc = offline_items("Hash tables", 5, CHAPTER, [], 4, "medium", ["multiple_choice"], embedder)
    assert all(i.type == "multiple_choice" for i in only_mc)  # never a kind that was not asked for
    # a short answer's reference: a chapter title that is the same sentence (an extractive title is a key sentence)
    # was the item's title, the answer beside its question; masking its words would leave nothing: a neutral title
    ref = "Mitochondria produce ATP through cellular respiration inside every eukaryotic cell."
    title = "Mitochondria produce ATP through cellular respiration inside every eukaryotic ce (0:05)"
    assert gives_away(title, ref) and gives_away("Mitochondria produce ATP through cellular respiration", ref)
    assert not gives_away("Alice pays Bob $20, Bob pays Charlie $40, things like that (7:07)",
                          "That way, if Alice pays Bob $100 multiple times, each one of those lines on the ledger "
                          "requires a completely new signature.")
    assert not gives_away("Cells and energy", ref) and not gives_away("anything", "a b c")
    prompt = "Explain in your own words what the lecture says about \u201ccellular\u201d. (lecture at 0:05)"
    assert neutral_title(prompt, title) == "About \u201ccellular\u201d (0:05)"
    assert neutral_title("What is it?", "Some title") == "Written answer"
    # a quoted sentence with its blank is no keyword (it was a whole title "About “… here's an _____ of …”"), and a
    # multiple-choice item is not a written answer
    cloze = "Fill in: \u201cBut group selection--here's an _____ of group selection.\u201d (42:14)"
    assert neutral_title(cloze, "x (42:14)", "multiple_choice") == "Question (42:14)"
    assert neutral_title("Explain \u201cgroup selection\u201d.", "t") == "About \u201cgroup selection\u201d"


def test_distractor_words_are_weighed_once_per_request_not_once_per_chapter_pair():
    """Each other chapter's best words against the rest: the same weights as computing each against all the
    others (which took 38 s per target chapter on a course of 219 chapters), from document frequencies counted
    once."""
    import random
    from collections import Counter

    from agents.generate import Sentence, _pool_weights, _weights

    rnd = random.Random(3)
    vocab = ["".join(rnd.choice("abcdefghij") for _ in range(6)) for _ in range(300)]
    groups = [[Sentence(i * 5.0, i * 5.0 + 4, " ".join(rnd.choice(vocab) for _ in range(12))) for i in range(20)]
              for _ in range(12)]
    chapter, others = groups[0], groups[1:]
    naive: Counter = Counter()
    for g in others:
        w = _weights(g, [x for x in others if x is not g] + [chapter])
        for term, v in sorted(w.items(), key=lambda x: -x[1])[:40]:
            naive[term] = max(naive[term], v)
    assert _pool_weights(chapter, others, 40) == naive and naive


def test_a_blank_hides_every_form_of_the_answer_and_whole_words_of_any_script(embedder):
    """"600 million _____" kept "parameters" beside the blanked "parameter"; accented words were cut into pieces
    ("Schrödinger" gave "dinger", which blanked nothing), so an item had no blank at all."""
    assert _blank("A tally for parameter count: 600 million parameters.", "parameter") == \
        "A tally for _____ count: 600 million _____."
    assert _blank("It was very painful; the pain lasted.", "pain") == "It was very _____; the _____ lasted."
    assert _WORD.findall("The Schrödinger equation, ResNet50, well-known") == ["Schrödinger", "equation", "well-known"]
    chapter = [Sentence(10.0 * i, 10.0 * i + 9, t) for i, t in enumerate([
        "The Schrödinger equation describes how the quantum state of a physical system changes over time.",
        "Solving the Schrödinger equation gives the wave function of the electron in the hydrogen atom.",
        "Eigenvalues of the Hamiltonian operator are the allowed energies of the quantum system.",
        "The Hamiltonian operator collects the kinetic and potential energy of the particle.",
    ])]
    others = [[Sentence(0.0, 9.0, "Thermodynamics studies entropy, temperature and heat engines in equilibrium.")],
              [Sentence(0.0, 9.0, "Electromagnetism couples magnetic fields, charges, currents and induction.")],
              [Sentence(0.0, 9.0, "Relativity bends spacetime; clocks dilate and lengths contract at speed.")]]
    items = offline_items("Quantum", 1, chapter, others, 4, "easy", ["multiple_choice", "short_answer"], embedder)
    assert items and all("_____" in i.prompt for i in items if i.type == "multiple_choice")
    assert not any(o in ("dinger", "schr") for i in items for o in i.options)


def test_an_item_hinges_on_a_name_only_when_nothing_else_will_do():
    """"If _____ signs a transaction like _____ pays Bob $100, even though Bob can't forge _____ signature" with
    options fast, alice, considered, proof: a name blanked among common words gives itself away, in lowercase, and
    its possessive was lost."""
    from agents.generate import key_sentences

    assert _blank("Bob can't forge Alice's signature, Alice knows.", "alice") == \
        "Bob can't forge _____'s signature, _____ knows."
    sentence = Sentence(0.0, 9.0, "If Alice signs a transaction like Alice pays Bob, only Alice holds the private "
                                  "key behind her digital signature.")
    others = [[Sentence(0.0, 9.0, "Blocks chain hashes together; miners search nonces for proof of work.")]]
    ((_, kw),) = key_sentences([sentence], others, 1)
    assert kw != "alice", kw


def test_distractors_do_not_look_alike(embedder):
    """"therapies" and "therapists", "happiness" and "happy" were offered side by side."""
    pool = ["therapies", "therapists", "happiness", "happy", "ledger", "equations", "entropy", "bucket"]
    for difficulty in ("easy", "medium", "hard"):
        wrong = _distractors("signature", "A signature proves who paid.", pool, difficulty, embedder)
        looks = [w.replace("y", "i")[:5] for w in wrong]
        assert len(wrong) == 3 and len(set(looks)) == 3, wrong


def test_no_item_hinges_on_a_word_common_in_the_lectures_language():
    """The stop words are English: a Spanish chapter blanked "durante"; and spoken English put blanks on "would" or
    "never" ("you _____ have no grandchildren"). A word as common as these in the lecture's language is not a
    keyword; the terms of the lecture are."""
    from agents.generate import key_sentences

    es = [Sentence(10.0 * i, 10.0 * i + 9, t) for i, t in enumerate([
        "Durante la fotosíntesis las plantas convierten la energía luminosa en glucosa dentro del cloroplasto.",
        "Durante la noche la respiración celular consume glucosa y libera dióxido de carbono en la mitocondria.",
        "Durante el día la clorofila absorbe la luz roja y azul y refleja la luz verde de las hojas.",
    ])]
    others = [[Sentence(0.0, 9.0, "Los mamíferos regulan su temperatura corporal y amamantan a sus crías pequeñas.")],
              [Sentence(0.0, 9.0, "Las bacterias se dividen por fisión binaria y algunas forman esporas resistentes.")]]
    got = [kw for _, kw in key_sentences(es, others, 3, "es")]
    assert got and "durante" not in got, got
    assert "durante" in [kw for _, kw in key_sentences(es, others, 3, "en")]  # (what an English list left)
    en = [Sentence(10.0 * i, 10.0 * i + 9, t) for i, t in enumerate([
        "Without helping relatives you would never have grandchildren, never, and that would matter.",
        "You would never see altruism spread if helping never paid off for the helper or kin.",
    ])]
    others = [[Sentence(0.0, 9.0, "Mammals regulate their body temperature and nurse their young offspring.")]]
    kws = [kw for _, kw in key_sentences(en, others, 2, "en")]
    assert kws and not {"never", "would"} & set(kws), kws  # ("never" came first)
    # every language whisper or YouTube may give: those with a list, those without, CJK (whose per-word lookup
    # wanted a tokenizer this install has not: a 500), regional tags
    ja = [Sentence(0.0, 9.0, "光合成では植物が光エネルギーを化学エネルギーに変換して糖を合成する仕組みがある")] * 2
    for lang in ("ja", "zh", "ko", "yue", "th", "haw", "pt-BR", "es_ES", ""):
        key_sentences(ja + es, others, 2, lang)
    from agents.generate import _terms

    # words as wordfreq lists them ("weiß" is "weiss"), and the nearest list ("no" is Bokmål's)
    assert "weiß" not in _terms("Jeder weiß, dass Licht gebrochen wird", "de") and "licht" in _terms("Licht", "de")
    assert "mellom" not in _terms("Forskjellen mellom lyset og mørket", "no")


def test_moments_after_an_hour_are_written_with_hours(embedder):
    """(Tester) items cited "(65:00)" where every other view writes 1:05:00."""
    late = [Sentence(s.start + 3840, s.end + 3840, s.text) for s in CHAPTER]
    items = offline_items("Hash tables", 5, late, OTHERS, 4, "medium", ["multiple_choice", "short_answer"], embedder)
    said = " ".join(f"{i.title} {i.prompt}" for i in items)
    assert "1:05:" in said or "1:04:" in said or "1:06:" in said, said
    assert not any(f"{m}:" in said for m in range(60, 70)), said
