"""The offline answer scorer: embedder similarity to the reference (and to graded exemplars) plus
key-concept coverage, combined by a small logistic model. No LLM, nothing downloaded.

Two models share the features below: COLD scores an answer against the reference alone; WARM also uses
exemplars — earlier answers to the same assignment whose grade an instructor set or confirmed — the way
a human grader remembers how they marked similar answers. Their weights were fitted on the SemEval-2013
training splits only (`python -m bench.grader_eval --fit` prints them again); see bench/grader_eval.py.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# Words that carry no concept. Negations are kept apart: they flip meaning and are a feature of their own.
STOPWORDS = frozenset("""
a an the of to in on at for and or but is are was were be been being it its this that these those i you he
she they we them his her their our your my me as by with from into than then there here so do does did will
would can could should may might must have has had what which who whom when where why how if because also
just very about up out over under more most less some any all each both such only own same too s t
""".split())
NEGATIONS = frozenset("""not no never none nothing cannot cant dont doesnt isnt wont wouldnt arent didnt nor
neither wasnt werent hasnt havent hadnt shouldnt couldnt mustnt neednt aint shant""".split())
# Words of any script ("größe", "энергия"), not only ASCII: an answer in Russian or Greek had no words at all, so it
# covered none of its reference's key concepts and scored as empty (offline), and against a model's grade was held
# for review every time.
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
# Scripts written without spaces between words (Chinese, Japanese kana, Thai, Lao, Myanmar, Khmer): for the hold
# rules' counts (`counted_words`) each letter is a word. A whole clause was one word, so a Chinese or Japanese answer
# never reached the length at which it is held as "not English sentences" (it was graded, confidently failed, and
# released), nor the long-answer check. (The scorer's concepts keep whole runs: single letters of an alphabet told a
# right answer from a wrong one in Thai no better than chance.)
_UNSPACED = ("\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
             "\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f")
_LETTERS = rf"(?:(?![{_UNSPACED}])[^\W_])+"
_COUNTED = re.compile(rf"(?:(?=[{_UNSPACED}])[^\W_])|{_LETTERS}(?:'{_LETTERS})?")
_SUFFIXES = ("ational", "ization", "fulness", "ousness", "iveness", "ations", "ation", "ement", "ments", "ment",
             "ness", "ities", "ity", "ings", "ing", "edly", "ies", "ied", "ed", "ly", "es", "er", "s")


def words(text: str) -> list[str]:
    return [w.replace("'", "") for w in _WORD.findall(unicodedata.normalize("NFC", text).lower())]


def counted_words(text: str) -> list[str]:
    """`words`, with each letter (not a mark, a sign or punctuation) of a script written without spaces a word of
    its own: what the hold rules count."""
    return [w.replace("'", "") for w in _COUNTED.findall(unicodedata.normalize("NFC", text).lower())]


def stem(word: str) -> str:
    """A light suffix stripper: enough to match 'connected'/'connection'/'connect'."""
    for suf in _SUFFIXES:
        if word.endswith(suf) and len(word) - len(suf) >= 3:
            word = word[: -len(suf)]
            if suf in ("ies", "ied"):
                word += "y"
            break
    return word


def concepts(text: str) -> list[str]:
    """Content stems of a text, in order (stop words and negations removed)."""
    return [stem(w) for w in words(text) if w not in STOPWORDS and w not in NEGATIONS]


def concept_words(text: str) -> dict[str, str]:
    """stem -> the first surface word it came from (to name concepts in feedback)."""
    out: dict[str, str] = {}
    for w in words(text):
        if w not in STOPWORDS and w not in NEGATIONS:
            out.setdefault(stem(w), w)
    return out


def _negated(text: str) -> bool:
    return any(w in NEGATIONS for w in words(text))  # ("current", "different", "point" end in "nt" too)


def _bag(text: str) -> set[str]:
    ws = words(text)
    return {stem(w) for w in ws if w not in STOPWORDS and w not in NEGATIONS} | {w for w in ws if w in NEGATIONS}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


def key_concepts(reference: str, question: str) -> set[str]:
    """The reference's concepts the question does not already give away."""
    ref = set(concepts(reference))
    return (ref - set(concepts(question))) or ref


RESTATED_SHARE = 0.8  # of the question's ideas an answer repeating it holds (a short answer drawing a few words
# from a long question, "Their hands could be different length.", is no restatement; nor a weak one taking half of
# a short question's, "Binary search is fast.")
RESTATED_MIN_IDEAS = 4  # a question with fewer is left to the scorer: "What is a function pointer?" / "a pointer to
# a function" is a weak answer (Mohler's graders gave it 3.5 of 5), not a copied question


# Questions a restatement can answer: yes/no ("Is a stack last-in first-out?" / "A stack is last-in first-out."),
# true or false, and choices ("which", "A or B")
_AFFIRMABLE = re.compile(r"^\W*(?:is|are|was|were|am|do|does|did|can|could|will|would|should|shall|has|have|had|may|"
                         r"might|must|isn't|aren't|doesn't|don't|didn't|can't)\b|\btrue\b|\bfalse\b|\bwhich\b"
                         r"|\bwhether\b|\bor\b", re.I)


def restates_question(question: str, references: Sequence[str], answer: str) -> bool:
    """The answer only repeats the question: every idea in it is the question's and it holds most of them (and no
    negation, which could be the answer: "it is not"), while the expected answer (`references`: the reference
    answer, else the rubric's descriptions) has ideas the question lacks. It cannot hold those; the scorer's
    similarity to a reference that shares the question's words gave a copied question 25-45 of 100 points. Not for a
    question a restatement answers: yes/no, true or false, a choice."""
    said = set(concepts(answer))
    if not said or _negated(answer) or _AFFIRMABLE.search(question.strip()):
        return False
    asked = set(concepts(question))
    return (len(asked) >= RESTATED_MIN_IDEAS and said <= asked and len(said) >= RESTATED_SHARE * len(asked)
            and any(set(concepts(r)) - asked for r in references))


@dataclass(frozen=True)
class Exemplar:
    """An earlier answer to the same item with a trusted grade (fraction 0..1 of the points)."""

    text: str
    score: float


# log_references: with several reference variants the best match is higher by chance alone.
COLD_FEATURES = ("cos_ref", "cos_question", "coverage", "precision", "negation_mismatch", "log_words", "tiny",
                 "jaccard_ref", "log_references")
WARM_FEATURES = COLD_FEATURES + ("knn", "max_sim_pass", "max_sim_fail", "sim_margin", "knn_mixed",
                                 "jaccard_margin", "mixed_max")
KNN_K = 5
KNN_TEMPERATURE = 10.0
MIN_EXEMPLARS = 4  # fewer graded exemplars than this (or only one class of them): the COLD model


@dataclass(frozen=True)
class Model:
    """A logistic model over standardised features: p = sigmoid(((x - mean) / sd) @ w + b)."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    sd: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float

    def prob(self, x: np.ndarray) -> np.ndarray:
        z = ((np.atleast_2d(x) - np.asarray(self.mean)) / np.asarray(self.sd)) @ np.asarray(self.weights) + self.bias
        return 1.0 / (1.0 + np.exp(-z))


def fit_logistic(x: np.ndarray, y: np.ndarray, features: tuple[str, ...], l2: float = 1e-2,
                 iterations: int = 50) -> Model:
    """L2-regularised logistic regression by Newton's method (y may be soft labels in [0, 1])."""
    mean, sd = x.mean(0), x.std(0) + 1e-9
    z = np.c_[(x - mean) / sd, np.ones(len(x))]
    w = np.zeros(z.shape[1])
    reg = l2 * np.r_[np.ones(len(w) - 1), 0.0]
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        grad = z.T @ (p - y) / len(y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z / len(y) + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return Model(features, tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in sd),
                 tuple(round(float(v), 6) for v in w[:-1]), round(float(w[-1]), 6))


# Fitted by `python -m bench.grader_eval --fit` on SciEntsBank + Beetle training answers (never the tests).
COLD = Model(
    COLD_FEATURES,
    mean=(0.554766, 0.401775, 0.388631, 0.565315, 0.19596, 2.360282, 0.032548, 0.281558, 0.588358),
    sd=(0.227277, 0.225307, 0.391009, 0.316801, 0.396938, 0.565622, 0.17745, 0.244921, 0.75896),
    weights=(0.347128, -0.100383, 0.571075, 0.048904, -0.115425, 0.197857, -0.059336, 0.47091, -0.523703),
    bias=-0.461569)
WARM = Model(
    WARM_FEATURES,
    mean=(0.554766, 0.401775, 0.388631, 0.565315, 0.19596, 2.360282, 0.032548, 0.281558, 0.588358, 0.494683, 0.728852, 0.746213, -0.017361, 0.49361, -0.005984, 0.671801),
    sd=(0.227277, 0.225307, 0.391009, 0.316801, 0.396938, 0.565622, 0.17745, 0.244921, 0.75896, 0.379727, 0.20432, 0.16407, 0.17862, 0.38954, 0.293066, 0.213256),
    weights=(0.093313, -0.097712, 0.336207, 0.003499, -0.07835, 0.320532, -0.132396, 0.15567, -0.322514, 0.371795, 0.220704, -0.001447, 0.253788, 0.446118, 0.718905, 0.260533),
    bias=-0.681385)


# The answer lengths the weights were fitted on (a sentence or two): log_words is not carried beyond the training
# answers' mean + 3 sd (about 57 words). Uncapped, its weight pushed an answer up the longer it got: a sentence
# proposed at 41 of 100 went to 85 followed by 19,000 characters about a day at the beach.
LOG_WORDS_MAX = COLD.mean[COLD_FEATURES.index("log_words")] + 3 * COLD.sd[COLD_FEATURES.index("log_words")]


def stop_share(text: str) -> float:
    """The share of a text's words that are function words (English): about a third in written sentences."""
    ws = counted_words(text)
    return sum(w in STOPWORDS or w in NEGATIONS for w in ws) / max(1, len(ws))


TERMS_MIN_WORDS = 8  # a shorter answer in note form ("ATP made in the mitochondria") is left to the scorer
PROSE_SHARE = 0.2  # function words in an expected answer written in sentences (a list of terms has few or none)
TERMS_SHARE = 0.1  # fewer in an answer of TERMS_MIN_WORDS or more: not English sentences (one "and" added to a list
# of terms is 1 in 13)
SHUFFLED_MIN_IDEAS = 12  # distinct content words (3 letters or more) of an answer checked for a shuffled reference
# (and of the reference: with fewer, a correct answer putting two clauses the other way round looked shuffled)
SHUFFLED_FROM_REFERENCE = 0.9  # of them the reference's at least, and
SHUFFLED_PAIRS = 0.3  # at most this share of its neighbouring content words neighbours in the reference too
LONG_MIN_WORDS = 80  # an answer past this many words and LONG_FACTOR times the expected answer's is out of range
LONG_FACTOR = 5


def _shuffled(reference: str, answer: str) -> bool:
    """The answer is the reference's words in another order: nearly all its content words are the reference's, but
    hardly any two of them stand next to each other as they do there (a copy or a reordered phrase keeps its pairs,
    an answer in the learner's own words brings other words). On the SemEval and Mohler answers it holds none."""
    ans = [w for w in concepts(answer) if len(w) >= 3]
    ref = [w for w in concepts(reference) if len(w) >= 3]
    if min(len(set(ans)), len(set(ref))) < SHUFFLED_MIN_IDEAS or \
            sum(w in set(ref) for w in ans) < SHUFFLED_FROM_REFERENCE * len(ans):
        return False
    pairs = set(zip(ref, ref[1:])) | set(zip(ref[1:], ref))
    return sum(p in pairs for p in zip(ans, ans[1:])) <= SHUFFLED_PAIRS * (len(ans) - 1)


_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")


def numbers_differ(references: Sequence[str], answer: str) -> bool:
    """The answer gives numbers, and against every reference that gives some it both lacks one of the reference's
    and has one the reference does not: "8 newtons" for 6 (words and similarity alike, it scored 100). A correct
    answer showing its steps ("2 x 3 = 6") holds the reference's numbers; one giving only the result lacks some but
    adds none. On the SemEval test answers no passing grade has numbers that differ."""
    said = {float(x) for x in _NUMBER.findall(answer)}
    theirs = [ns for r in references if (ns := {float(x) for x in _NUMBER.findall(r)})]
    return bool(said and theirs and all(said - ns and ns - said for ns in theirs))


def doubt(references: Sequence[str], answer: str, expected: str = "the expected answer", *,
          exemplars: int = 0) -> str | None:
    """Why the offline scorer cannot be trusted with this answer, whatever its confidence (the grade goes to an
    instructor), or None. Its similarity and key-concept coverage read a bag of words, and it was fitted on English
    answers of a sentence or two: a list of the expected answer's terms ("selection drift mutation gene flow
    heritable traits populations ...") scored 100 of 100, released with its XP, and so did the reference's words
    strung together in random order. Held: an answer that is not English sentences where the expected answer is
    (a list of terms; also code, or another language, which it cannot read either), the reference's words shuffled,
    and an answer many times the expected answer's length (all the rubric's descriptions together, without a
    reference answer) while no instructor-graded answers (`exemplars`) teach it what long answers earn.
    `expected` names the references in the reason."""
    ws = counted_words(answer)
    prose = [r for r in references if len(counted_words(r)) >= TERMS_MIN_WORDS and stop_share(r) >= PROSE_SHARE]
    if len(ws) >= TERMS_MIN_WORDS and prose and stop_share(answer) < TERMS_SHARE:
        return ("the answer is not written in English sentences where the expected answer is (a list of terms, code, "
                "or another language?)")
    if any(_shuffled(r, answer) for r in references):
        return f"the answer is the words of {expected} in another order"
    total = sum(len(counted_words(r)) for r in references)
    if not exemplars and total and len(ws) > max(LONG_MIN_WORDS, LONG_FACTOR * total):
        return f"the answer is {len(ws) / total:.1f} times as long as {expected}"
    return None


@dataclass
class Scored:
    """What the scorer found for one answer against one reference."""

    prob: float  # estimated chance a human marks the answer correct for this criterion
    features: dict[str, float]
    covered: list[str] = field(default_factory=list)  # key concepts present (surface words)
    missing: list[str] = field(default_factory=list)  # key concepts absent
    exemplars_used: int = 0
    nearest: float | None = None  # similarity to the closest exemplar


def _soft_in(concept: str, answer_stems: set[str]) -> bool:
    # misspellings: 'seperated' ~ 'separat', 'termianl' ~ 'terminal' (one edit; not a shared start, which took
    # 'translation' for 'transcription' and 'positive' for 'position')
    if concept in answer_stems:
        return True
    if len(concept) >= 5:
        return any(len(a) >= 5 and (a.startswith(concept) or concept.startswith(a) or _edit1(a, concept))
                   for a in answer_stems)
    return False


def _edit1(a: str, b: str) -> bool:
    if abs(len(a) - len(b)) > 1 or a == b:
        return a == b
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    if len(a) > len(b):
        a, b = b, a
    return any(b[:i] + b[i + 1:] == a for i in range(len(b)))


def features(question: str, references: Sequence[str], answer: str, vec: dict[str, np.ndarray],
             exemplars: Sequence[Exemplar] = ()) -> tuple[np.ndarray, Scored]:
    """Feature vector (COLD or WARM layout) for one answer; `vec` maps every text to its unit vector."""
    a = vec[answer]
    q_stems = set(concepts(question))
    ans_list = concepts(answer)
    ans = set(ans_list)
    bag = _bag(answer)
    cos_ref = max(float(a @ vec[r]) for r in references)
    best_cov, best_prec, covered, missing = 0.0, 0.0, [], []
    for r in references:
        keys = key_concepts(r, question)
        hit = {k for k in keys if _soft_in(k, ans)}
        cov = len(hit) / max(1, len(keys))
        if cov >= best_cov:
            names = concept_words(r)
            best_cov = cov
            covered = [names.get(k, k) for k in sorted(hit)]
            missing = [names.get(k, k) for k in sorted(keys - hit)]
        best_prec = max(best_prec, len(ans & (set(concepts(r)) | q_stems)) / max(1, len(ans)))
    n = len(words(answer))
    cold = [cos_ref, float(a @ vec[question]), best_cov, best_prec,
            float(_negated(answer) != _negated(references[0])), min(math.log1p(n), LOG_WORDS_MAX), float(n <= 2),
            max(jaccard(bag, _bag(r)) for r in references), math.log(len(references))]
    scored = Scored(prob=0.0, features=dict(zip(COLD_FEATURES, cold)), covered=covered, missing=missing)
    usable = [e for e in exemplars if e.text.strip()]
    labels = np.array([1.0 if e.score >= 0.5 else 0.0 for e in usable])
    if len(usable) < MIN_EXEMPLARS or labels.min(initial=1) == labels.max(initial=0):
        return np.asarray(cold), scored
    sims = np.array([float(a @ vec[e.text]) for e in usable])
    soft = np.array([e.score for e in usable])
    jac = np.array([jaccard(bag, _bag(e.text)) for e in usable])
    mixed = 0.5 * sims + 0.5 * jac
    top = np.argsort(-sims)[:KNN_K]
    w = np.exp(sims[top] * KNN_TEMPERATURE)
    top2 = np.argsort(-mixed)[:KNN_K]
    w2 = np.exp(mixed[top2] * KNN_TEMPERATURE)
    pos, neg = labels == 1, labels == 0
    warm = cold + [float((w * soft[top]).sum() / w.sum()), float(sims[pos].max()), float(sims[neg].max()),
                   float(sims[pos].max() - sims[neg].max()), float((w2 * soft[top2]).sum() / w2.sum()),
                   float(jac[pos].max() - jac[neg].max()), float(mixed.max())]
    scored.features = dict(zip(WARM_FEATURES, warm))
    scored.exemplars_used = len(usable)
    scored.nearest = float(sims.max())
    return np.asarray(warm), scored


def texts_to_embed(question: str, references: Sequence[str], answers: Sequence[str],
                   exemplars: Sequence[Exemplar] = ()) -> list[str]:
    """Every distinct text `features` will look up, for one embedding batch."""
    seen = dict.fromkeys([question, *references, *answers, *(e.text for e in exemplars)])
    return [t for t in seen if t is not None]


def score(question: str, references: Sequence[str], answer: str, vec: dict[str, np.ndarray],
          exemplars: Sequence[Exemplar] = (), cold: Model = COLD, warm: Model = WARM) -> Scored:
    """Probability that `answer` meets the reference, with the evidence behind it."""
    x, scored = features(question, references, answer, vec, exemplars)
    model = warm if len(x) == len(warm.features) else cold
    scored.prob = float(model.prob(x)[0])
    return scored


# Without graded exemplars the scorer has only the reference to go on, and paraphrases it cannot match
# look like wrong answers: its confidence is discounted (bench/grader_eval.py shows the effect).
COLD_CONFIDENCE = 0.85


# The probability at which an answer earns a criterion's full points. The scorer's probabilities stop short of 1
# (the reference itself, handed in as the answer, scores about 0.95), so points = probability would leave a
# perfect score out of reach of every answer the offline grader sees; on the SemEval test answers, those at or
# above 0.9 are correct by the human label 95-98% of the time (bench/grader_eval.py).
FULL_CREDIT_PROB = 0.9


def credit(prob: float) -> float:
    """The share of a criterion's points for a probability: the probability itself up to 0.5 (pass/fail
    decisions around a coin flip stay as they are), then linear up to full credit at FULL_CREDIT_PROB."""
    if prob <= 0.5:
        return max(0.0, prob)
    return min(1.0, 0.5 + 0.5 * (prob - 0.5) / (FULL_CREDIT_PROB - 0.5))


def confidence(prob: float, warm: bool = True) -> float:
    """How far from a coin flip the estimate is: 0 at p = 0.5, 1 at p = 0 or 1 (discounted when cold)."""
    return abs(2.0 * prob - 1.0) * (1.0 if warm else COLD_CONFIDENCE)
