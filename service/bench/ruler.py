"""RULER-style long-context tasks (Hsieh et al., 2024, arXiv 2404.06654), generated offline.

The 13 tasks follow RULER's definitions and prompt templates: needle-in-a-haystack variants
(single, multi-key, multi-value, multi-query), variable tracking, common- and frequent-word
extraction, and two QA tasks. Departures, because RULER's data come from the internet:
- keys are seeded pseudo-words (RULER: English words from wonderwords); essays are seeded
  template sentences (RULER: Paul Graham essays);
- qa_1 / qa_2 are built from synthetic documents with generated facts (single-hop / two-hop),
  not SQuAD / HotpotQA;
- the context is filled to the target length in the model's own tokens by binary search over
  haystack units, then topped up with short filler sentences, so it lands within 1% below target;
- cwe repeats its 10 common words 30 times at 4k tokens (RULER) and proportionally fewer below, so
  that shorter contexts still hold them;
- niah answers get at most 64 new tokens, not 128 (see ``MAX_NEW_TOKENS``).
Everything is a pure function of (task, tokenizer, length, seed).
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")
RETRIEVAL = {t for t in TASKS if t.startswith(("niah", "qa"))} | {"vt"}
AGGREGATION = {"cwe", "fwe"}
# As RULER / kvpress's harness, except niah: 64 instead of 128 (the longest answer, four 7-digit
# values, is under 40 tokens; a CPU run spends most of its time on answers that ramble on).
MAX_NEW_TOKENS = {"niah": 64, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}

NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
SYLLABLES = ["ka", "lo", "mi", "re", "tu", "sa", "no", "vi", "de", "ra", "po", "li", "zu", "ne", "fa", "go",
             "ti", "be", "mo", "ku", "shi", "pa", "ve", "ro", "da", "ly", "qui", "xo"]
SUBJECTS = ["The committee", "A young engineer", "The old librarian", "Every startup", "The river town",
            "A careful reader", "The city council", "Our neighbour", "The museum", "A travelling merchant"]
VERBS = ["discussed", "rebuilt", "ignored", "measured", "described", "funded", "painted", "questioned",
         "borrowed", "celebrated"]
OBJECTS = ["the northern bridge", "a new theory of markets", "the harvest festival", "an unfinished novel",
           "the railway timetable", "a forgotten map", "the weekly newspaper", "an ancient clock",
           "the school garden", "a strange letter"]
TAILS = ["after the long winter.", "without telling anyone.", "for the third time.", "on a rainy afternoon.",
         "with great enthusiasm.", "before the election.", "in front of the crowd.", "despite the cost.",
         "at the edge of the valley.", "as everyone expected."]
FILLER = ["Indeed.", "So it goes.", "Quite so.", "Time passed.", "Nothing else."]


@dataclass(frozen=True)
class Sample:
    """One RULER sample: ``context`` is compressed; ``question`` + ``answer_prefix`` are asked after it."""

    task: str
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    max_new_tokens: int
    context_tokens: int = 0
    meta: dict = field(default_factory=dict)
    paraphrase: str = ""  # the question reworded (task-aware scoring with an imperfect expected question)


# A task prompt about something the context does not contain (task-aware scoring with the wrong task).
UNRELATED = "What is the boiling point of water at the top of a high mountain, and why is it lower?"


def generate(task: str, tokenizer: PreTrainedTokenizerBase, length: int, seed: int) -> Sample:
    """A sample of ``task`` whose context is ``length`` tokens of ``tokenizer`` (within 1%, below)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{length}:{seed}")
    return _BUILDERS[task](task, tokenizer, length, rng)


# -- shared pieces -------------------------------------------------------------------------------

def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _fit(tokenizer, target: int, make: Callable[[int], str], max_units: int, rng: random.Random) -> tuple[str, int]:
    """Largest n with tokens(make(n)) <= target, then filler sentences appended while they fit."""
    lo, hi = 0, max_units
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count(tokenizer, make(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    text = make(lo)
    while True:
        longer = text + " " + rng.choice(FILLER)
        if _count(tokenizer, longer) > target:
            return text, _count(tokenizer, text)
        text = longer


def _word(rng: random.Random) -> str:
    def part() -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))

    return f"{part()}-{part()}"


def _value(rng: random.Random, kind: str) -> str:
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randint(1_000_000, 9_999_999))


def _essay_sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"


def _insert(units: list[str], items: list[str], rng: random.Random) -> list[str]:
    """Items placed at random depths, keeping their relative order."""
    out = list(units)
    for at, item in sorted(zip(sorted(rng.sample(range(len(out) + 1), len(items))), items), reverse=True):
        out.insert(at, item)
    return out


# -- needle in a haystack ------------------------------------------------------------------------

_NIAH = {  # haystack, key kind, value kind, keys, values per key, queries
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
}


def _niah(task: str, tokenizer, length: int, rng: random.Random) -> Sample:
    haystack, key_kind, value_kind, n_keys, n_values, n_queries = _NIAH[task]
    noun = "numbers" if value_kind == "numbers" else "uuids"
    keys = [_value(rng, "uuids") if key_kind == "uuids" else _word(rng) for _ in range(n_keys)]
    values = [[_value(rng, value_kind) for _ in range(n_values)] for _ in keys]
    needles = [f"One of the special magic {noun} for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    pool = [_essay_sentence(rng) if haystack == "essay" else rng.choice(NOISE) for _ in range(4 * length)]
    if haystack == "needle":  # the haystack is other keys' needles
        pool = [f"One of the special magic {noun} for "
                f"{_value(rng, 'uuids') if key_kind == 'uuids' else _word(rng)} is: {_value(rng, value_kind)}."
                for _ in range(length // 8)]
    depths = rng.random()

    def make(n: int) -> str:
        units = pool[:n]
        placed = _insert(units, needles, random.Random(depths))
        return (f"Some special magic {noun} are hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the {noun} afterwards.\n" + " ".join(placed))

    context, count = _fit(tokenizer, length, make, len(pool), rng)
    queried = list(range(n_queries))
    query = ", ".join(keys[i] for i in queried)
    answers = [v for i in queried for v in values[i]]
    many = n_queries > 1 or n_values > 1
    question = (f"What are all the special magic {noun} for {query} mentioned in the provided text?" if many else
                f"What is the special magic {noun[:-1]} for {query} mentioned in the provided text?")
    prefix = (f"The special magic {noun} for {query} mentioned in the provided text are" if many else
              f"The special magic {noun[:-1]} for {query} mentioned in the provided text is")
    reworded = f"Which {noun if many else noun[:-1]} does the text above give for {query}?"
    return Sample(task, context, question, prefix, answers, MAX_NEW_TOKENS["niah"], count, paraphrase=reworded)


# -- variable tracking ---------------------------------------------------------------------------

def _vt(task: str, tokenizer, length: int, rng: random.Random) -> Sample:
    value = str(rng.randint(10000, 99999))
    names = []
    while len(names) < 5:  # one chain of four hops
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
    pool = [rng.choice(NOISE) for _ in range(4 * length)]
    seed = rng.random()

    def make(n: int) -> str:
        body = " ".join(_insert(pool[:n], chain, random.Random(seed)))
        return f"Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{body}\n"

    context, count = _fit(tokenizer, length, make, len(pool), rng)
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
              f"assigned the value {value}, they are: ")
    return Sample(task, context, question, prefix, names, MAX_NEW_TOKENS["vt"], count,
                  paraphrase=f"Question: Which variable names end up holding {value} in the text above?")


# -- aggregation -----------------------------------------------------------------------------------

def _cwe(task: str, tokenizer, length: int, rng: random.Random) -> Sample:
    words = list(dict.fromkeys(_word(rng).split("-")[0] for _ in range(20 * length)))
    common, rare = words[:10], words[10:]
    repeats = max(6, round(30 * min(length, 4096) / 4096))  # RULER's 30 at 4k; fewer so 2k still fits

    def make(n: int) -> str:
        items = common * repeats + rare[:n] * 3
        random.Random(n).shuffle(items)
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return ("Below is a numbered list of words. In these words, some appear more often than others. "
                f"Memorize the ones that appear most often.\n{listing}\n")

    context, count = _fit(tokenizer, length, make, len(rare), rng)
    question = "Question: What are the 10 most common words in the above list?"
    return Sample(task, context, question, "Answer: The top 10 words that appear most often in the list are:",
                  common, MAX_NEW_TOKENS["cwe"], count,
                  paraphrase="Question: Which ten words occur most often in the list above?")


def _fwe(task: str, tokenizer, length: int, rng: random.Random) -> Sample:
    vocab = list(dict.fromkeys(_word(rng).split("-")[0] for _ in range(2000)))
    weights = [1 / (i + 1) ** 2.0 for i in range(len(vocab))]  # Zipf, alpha 2 (RULER's default)
    stream = rng.choices(vocab, weights=weights, k=4 * length)

    def make(n: int) -> str:
        return ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. " + " .... ".join(stream[:n]) + "\n")

    context, count = _fit(tokenizer, length, make, len(stream), rng)
    n = context.count(" .... ") + 1
    top = [w for w, _ in Counter(stream[:n]).most_common(3)]
    question = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
    return Sample(task, context, question,
                  "Answer: According to the coded text above, the three most frequently appeared words are:",
                  top, MAX_NEW_TOKENS["fwe"], count,
                  paraphrase="Question: Which three coded words occur most often in the text above?")


# -- question answering over synthetic documents ----------------------------------------------------

def _qa(task: str, tokenizer, length: int, rng: random.Random) -> Sample:
    def place() -> str:
        return _word(rng).replace("-", " ").title()

    docs, facts = [], []
    for _ in range(length // 20):
        river, city, region, year = place(), place(), place(), str(rng.randint(1500, 1990))
        docs.append(f"The {river} river flows through the city of {city}. It was first mapped in {year}.")
        docs.append(f"The city of {city} is the capital of the {region} region.")
        facts.append((river, city, region, year))
    order = list(range(len(docs)))
    rng.shuffle(order)
    pick = rng.randrange(len(facts))
    river, city, region, year = facts[pick]
    needed = docs[2 * pick : 2 * pick + 2]

    def make(n: int) -> str:
        chosen = [docs[i] for i in order[:n] if docs[i] not in needed]
        chosen = _insert(chosen, needed, random.Random(n))
        body = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(chosen))
        return ("Answer the question based on the given documents. Only give me the answer and do not output any "
                f"other words.\n\nThe following are given documents.\n\n{body}\n\n")

    context, count = _fit(tokenizer, length, make, len(docs), rng)
    if task == "qa_1":
        question, answers = f"Question: In which year was the {river} river first mapped?", [year]
        reworded = f"Question: When was the first map of the {river} river made?"
    else:
        question, answers = f"Question: Which region has as its capital the city the {river} river flows through?", [
            region]
        reworded = f"Question: The {river} river flows through a city; which region is that city the capital of?"
    return Sample(task, context, question, "Answer:", answers, MAX_NEW_TOKENS["qa"], count, paraphrase=reworded)


_BUILDERS: dict[str, Callable[..., Sample]] = {**{t: _niah for t in _NIAH}, "vt": _vt, "cwe": _cwe, "fwe": _fwe,
                                               "qa_1": _qa, "qa_2": _qa}
