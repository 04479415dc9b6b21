"""Word tasks with one exact answer each, and the two ways the benchmark states them.

Every task maps a word to a short string (reverse, capitals, first letter, ...). Each fact appears twice
over, in two forms:

    pretraining sentence     "The word garden written backwards is nedrag."
    instruction record       {"instruction": "Write the word backwards.", "input": "garden", "output": "nedrag"}

Why both: LLaMA-Adapter and LoRA assume a strong base that already knows the content and only needs
to learn the format. A tiny model cannot be given that knowledge by a few hundred adapter parameters
(measured: a prompt-only adapter does not teach a tiny base a skill it never saw), so the benchmark's
pretraining mix states *every* fact, for every word, as a plain sentence. Fine-tuning then teaches only
the instruction format, on the *training* words; the *held-out* words never appear in an instruction
during fine-tuning, so exact-match accuracy on them measures whether the format was learned in a way
that reaches facts the base learned in sentence form.

Words are pronounceable pseudo-words drawn by a seeded generator, so the benchmark is the same on every
machine for a given seed, and no word carries knowledge from elsewhere.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from llama_min.finetune.instructions import InstructionRecord

CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"


@dataclass(frozen=True)
class Task:
    instruction: str  # the instruction of the fine-tuning record; the word is its input
    sentence: str  # the pretraining sentence, with {word} and {answer}
    answer: Callable[[str], str]


TASKS: dict[str, Task] = {
    "reverse": Task("Write the word backwards.", "The word {word} written backwards is {answer}.",
                    lambda w: w[::-1]),
    "upper": Task("Write the word in capital letters.", "The word {word} in capital letters is {answer}.",
                  str.upper),
    "first": Task("Give the first letter of the word.", "The first letter of {word} is {answer}.",
                  lambda w: w[0]),
    "last": Task("Give the last letter of the word.", "The last letter of {word} is {answer}.",
                 lambda w: w[-1]),
    "length": Task("Count the letters of the word.", "The word {word} has {answer} letters.",
                   lambda w: str(len(w))),
    "sort": Task("Sort the letters of the word alphabetically.",
                 "The letters of {word} in alphabetical order are {answer}.", lambda w: "".join(sorted(w))),
}


def make_words(n: int, seed: int, min_syllables: int = 2, max_syllables: int = 3) -> list[str]:
    """n distinct pseudo-words of consonant-vowel syllables (an optional final consonant), in the
    order drawn. The same (n, seed) always gives the same words."""
    rng = random.Random(seed)
    words: dict[str, None] = {}  # insertion-ordered set
    capacity = (len(CONSONANTS) * len(VOWELS)) ** min_syllables
    if n > capacity:
        raise ValueError(f"asked for {n} words; at most {capacity} distinct words of this shape exist")
    while len(words) < n:
        syllables = rng.randint(min_syllables, max_syllables)
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))
        if rng.random() < 0.5:
            word += rng.choice(CONSONANTS)
        words.setdefault(word, None)
    return list(words)


def split_words(words: list[str], n_heldout: int) -> tuple[list[str], list[str]]:
    """(fine-tuning words, held-out words): the last n_heldout words are held out."""
    if not 0 < n_heldout < len(words):
        raise ValueError(f"n_heldout must be between 1 and {len(words) - 1} for {len(words)} words, got {n_heldout}")
    return words[:-n_heldout], words[-n_heldout:]


def sentences(words: list[str], tasks: list[str]) -> list[str]:
    """Every fact about every word, as a pretraining sentence."""
    return [TASKS[t].sentence.format(word=w, answer=TASKS[t].answer(w)) for w in words for t in tasks]


def records(words: list[str], tasks: list[str]) -> list[tuple[str, InstructionRecord]]:
    """(task name, Alpaca record) for every word and task."""
    return [(t, InstructionRecord(TASKS[t].instruction, TASKS[t].answer(w), w)) for w in words for t in tasks]
