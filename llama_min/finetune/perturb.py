"""Seeded text-level perturbations of instruction prompts, for training augmentation and for
measuring robustness.

A fine-tuned model that has only ever seen one clean phrasing of each instruction often fails when a
user types it slightly differently. Six families of small edits imitate what users do:

    swap        two adjacent letters of a word exchanged       "reverse" -> "revrese"
    drop        one letter of a word deleted                   "reverse" -> "revrse"
    insert      one random letter inserted inside a word       "reverse" -> "revxerse"
    case        one word's case changed                        "reverse" -> "REVERSE"
    whitespace  extra spaces at a word boundary                "the word" -> "the   word"
    prefix      a neutral distractor sentence before the text  "Please read carefully. Reverse ..."

Applied to a fraction p of the training records (``perturb_records``, train.py's ``--perturb p``) they
are a data augmentation; applied to every test prompt with held-out seeds (``perturb_for_eval``) they
measure robustness: exact-match on the perturbed test set against exact-match on the clean one.

What is edited, and what never is:
- Only the fields named in ``fields``, by default ``instruction``: the phrasing of the request. The
  ``input`` field carries the data the answer is computed from (the word to reverse), so editing it
  would change what the right answer is; the ``output`` field (the expected answer) is never edited,
  whatever ``fields`` says.
- The records given are never modified: every function returns new records (dicts, or
  ``instructions.InstructionRecord`` dataclasses: both are accepted and returned in kind).

Determinism: each record gets its own ``random.Random`` seeded by the string "stream:seed:index"
(Python hashes str seeds with SHA-512, so this is the same on every run and machine, whatever
PYTHONHASHSEED is). A record's edit therefore depends only on (stream, seed, its index), not on the
other records or on p. Training and evaluation draw from different streams ("train", "eval"), so test
perturbations are held out from the training ones even when the same integer seed is used.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from typing import Callable, Iterable, Sequence, TypeVar

Record = TypeVar("Record")  # an Alpaca dict, or an instructions.InstructionRecord: returned as given
WORD = re.compile(r"[A-Za-z]+")  # the letters-only words that character edits apply to

# Neutral sentences that carry no information about the task: a robust model ignores them.
DISTRACTOR_PREFIXES = (
    "Please read the following carefully.",
    "Here is a small task for you.",
    "Take your time with this one.",
    "This request comes from a user.",
    "Answer as well as you can.",
    "Note: the task is described below.",
)


def _words(text: str, min_len: int) -> list[re.Match]:
    return [m for m in WORD.finditer(text) if len(m.group()) >= min_len]


def _edit_word(text: str, rng: random.Random, min_len: int, edit: Callable[[str, random.Random], str | None]) -> str | None:
    """Apply ``edit`` to one word chosen at random among the words it can change; None if none."""
    words = _words(text, min_len)
    rng.shuffle(words)
    for m in words:
        new = edit(m.group(), rng)
        if new is not None and new != m.group():
            return text[:m.start()] + new + text[m.end():]
    return None


def swap_letters(text: str, rng: random.Random) -> str | None:
    """Exchange two adjacent, different letters of one word."""
    def edit(word, rng):
        spots = [i for i in range(len(word) - 1) if word[i] != word[i + 1]]
        if not spots:
            return None
        i = rng.choice(spots)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return _edit_word(text, rng, 2, edit)


def drop_letter(text: str, rng: random.Random) -> str | None:
    """Delete one letter of a word of at least three letters (so the word stays a word)."""
    def edit(word, rng):
        i = rng.randrange(len(word))
        return word[:i] + word[i + 1:]
    return _edit_word(text, rng, 3, edit)


def insert_letter(text: str, rng: random.Random) -> str | None:
    """Insert a random lower-case letter strictly inside a word (not before or after it)."""
    def edit(word, rng):
        i = rng.randrange(1, len(word))
        return word[:i] + rng.choice(string.ascii_lowercase) + word[i:]
    return _edit_word(text, rng, 2, edit)


def change_case(text: str, rng: random.Random) -> str | None:
    """Write one word in upper, lower, title or swapped case (whichever changes it)."""
    def edit(word, rng):
        options = [c for c in (word.upper(), word.lower(), word.title(), word.swapcase()) if c != word]
        return rng.choice(options)  # swapcase always differs for letters, so never empty
    return _edit_word(text, rng, 1, edit)


def extra_whitespace(text: str, rng: random.Random) -> str:
    """Insert one to three extra spaces at a word boundary (an existing space, or either end)."""
    gaps = [0, len(text)] + [i for i, c in enumerate(text) if c == " "]
    i = rng.choice(gaps)
    return text[:i] + " " * rng.randint(1, 3) + text[i:]


def distractor_prefix(text: str, rng: random.Random) -> str:
    """Put a neutral sentence in front of the text."""
    return rng.choice(DISTRACTOR_PREFIXES) + " " + text


PERTURBATIONS: dict[str, Callable[[str, random.Random], str | None]] = {
    "swap": swap_letters,
    "drop": drop_letter,
    "insert": insert_letter,
    "case": change_case,
    "whitespace": extra_whitespace,
    "prefix": distractor_prefix,
}


def _check_families(families: Iterable[str]) -> tuple[str, ...]:
    families = tuple(families)
    unknown = [f for f in families if f not in PERTURBATIONS]
    if unknown or not families:
        raise ValueError(f"unknown perturbation families {unknown or '(none given)'}; "
                         f"choose from: {', '.join(PERTURBATIONS)}")
    return families


def perturb_text(text: str, rng: random.Random, families: Sequence[str] = tuple(PERTURBATIONS),
                 edits: int = 1) -> str:
    """Apply ``edits`` perturbations to ``text``, each from a family drawn uniformly from ``families``.

    A family that cannot change this text (e.g. ``drop`` on a text with no word of three letters)
    is replaced by another draw among the families that can; whitespace and prefix always can.
    """
    families = _check_families(families)
    if edits < 1:
        raise ValueError(f"edits per perturbed record must be >= 1, got {edits}")
    for _ in range(edits):
        candidates = list(families)
        while candidates:
            family = candidates.pop(rng.randrange(len(candidates)))
            new = PERTURBATIONS[family](text, rng)
            if new is not None and new != text:
                text = new
                break
    return text


def _copy_with(record: Record, changes: dict[str, str]) -> Record:
    """A copy of a dict or a (frozen) dataclass record with some fields replaced."""
    return {**record, **changes} if isinstance(record, dict) else dataclasses.replace(record, **changes)


def perturb_record(record: Record, rng: random.Random, families: Sequence[str] = tuple(PERTURBATIONS),
                   edits: int = 1, fields: Sequence[str] = ("instruction",)) -> Record:
    """A copy of one Alpaca record with ``fields`` perturbed; ``output`` is never touched."""
    if "output" in fields:
        raise ValueError("the 'output' field is the expected answer and is never perturbed; "
                         "perturb 'instruction' (and 'input' only if the answer does not depend on it)")
    changes = {}
    for field in fields:
        value = record.get(field) if isinstance(record, dict) else getattr(record, field, None)
        if not isinstance(value, str):
            have = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"record has no string field {field!r} to perturb; expected an Alpaca record "
                             f"{{'instruction', 'input', 'output'}}, got {have}")
        if value:  # an empty input stays empty: there is nothing to misspell
            changes[field] = perturb_text(value, rng, families, edits)
    return _copy_with(record, changes)


def _record_rng(stream: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{stream}:{seed}:{index}")


def perturb_records(records: Sequence[Record], p: float, seed: int, *, stream: str = "train",
                    families: Sequence[str] = tuple(PERTURBATIONS), edits: int = 1,
                    fields: Sequence[str] = ("instruction",)) -> list[Record]:
    """New list of records in which round(p · n) of them, chosen at random, are perturbed.

    records: Alpaca dicts {"instruction", "input", "output"} or ``instructions.InstructionRecord``s;
        never modified.
    p: the fraction of records to perturb, in [0, 1] (``--perturb p``).
    seed: the run's seed; with ``stream`` it decides which records are chosen and how each is edited.
    Returns copies, in the same order; the ``output`` of every record is the original one.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"perturbation fraction p must be in [0, 1], got {p}; e.g. --perturb 0.3 edits 30% of records")
    families = _check_families(families)
    n = len(records)
    chosen = set(random.Random(f"{stream}:{seed}:select").sample(range(n), round(p * n)))
    return [perturb_record(r, _record_rng(stream, seed, i), families, edits, fields) if i in chosen
            else _copy_with(r, {}) for i, r in enumerate(records)]


def perturb_for_eval(records: Sequence[Record], seed: int, *, families: Sequence[str] = tuple(PERTURBATIONS),
                     edits: int = 1, fields: Sequence[str] = ("instruction",)) -> list[Record]:
    """The perturbed copy of a test set: every record edited, from the "eval" stream, so the edits are
    held out from any training perturbation. The clean test set passed in is left as it was; score
    the model on both to measure robustness."""
    return perturb_records(records, 1.0, seed, stream="eval", families=families, edits=edits, fields=fields)
