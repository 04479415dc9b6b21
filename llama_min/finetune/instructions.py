"""Instruction data: Alpaca records in, (tokens, targets) with the prompt masked out of the loss.

A record is {"instruction": ..., "input": ..., "output": ...} (Taori et al. 2023, Stanford Alpaca);
"input" may be empty or absent. The instruction and input are rendered into the Alpaca prompt, the
output is the answer:

    <s> Below is an instruction ... ### Response:\\n   answer tokens   </s>
    └──────────── prompt: not in the loss ────────┘  └───── targets (with EOS) ─────┘

Only the answer is learned: the targets of prompt positions are IGNORE_INDEX, so the model is not
trained to write instructions, only to answer them. EOS is appended to every answer so that the model
learns to stop; generation then ends at EOS. The prompt and the answer are tokenised separately, so the
boundary between them is exact (a joint tokenisation could merge the last prompt character with the
first answer character into one token, and the mask would cut through it).

Too long: a record whose prompt + answer + EOS does not fit in ``max_seq_len`` + 1 tokens (the model
sees all but the last token) is dropped whole, and the number dropped is reported. Cutting it instead
would either remove the instruction or remove the answer's end and its EOS, teaching the model to run
on; a record with a cut answer is worse than no record.

Batches: draw example indices with ``data.WindowSampler(len(examples), 0, seed)`` (seeded, resumable,
rank-aware, the same draws pretraining uses) and pass them to ``instruction_batch``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..cli import DataError, read_jsonl, read_text
from ..model import IGNORE_INDEX
from ..tokenizer import Tokenizer

# The Alpaca prompt format, one with and one without an input (Taori et al. 2023).
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass(frozen=True)
class InstructionRecord:
    instruction: str
    output: str
    input: str = ""

    def prompt(self) -> str:
        """The Alpaca prompt for this record, ending where the answer begins."""
        if self.input:
            return ALPACA_PROMPT.format(instruction=self.instruction, input=self.input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=self.instruction)


def _record(obj, where: str) -> InstructionRecord:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object {{\"instruction\", \"input\", \"output\"}}, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"instruction", "input", "output"})
    problems = [f"unknown fields {unknown}"] if unknown else []
    if "image" in unknown:
        problems.append("records with images need --image_root DIR (the directory their paths are relative to)")
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str):
            problems.append(f"\"{key}\" must be a string")
    if not isinstance(obj.get("input", ""), str):
        problems.append("\"input\" must be a string when present")
    if problems:
        raise DataError(f"{where}: {'; '.join(problems)} (Alpaca records are {{\"instruction\", \"input\", \"output\"}})")
    return InstructionRecord(obj["instruction"], obj["output"], obj.get("input", ""))


def read_objects(path: str | Path) -> list[tuple[str, object]]:
    """(where, value) for each record of a .json file (one list of objects) or a .jsonl file (one object
    per line); ``where`` names the file and the record for error messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"instruction data {path} does not exist; expected a .json or .jsonl file of Alpaca records")
    if path.suffix == ".jsonl":
        objs = [(f"{path}:{n}", obj) for n, obj in read_jsonl(path, "one Alpaca record")]
    elif path.suffix == ".json":
        try:
            values = json.loads(read_text(path, "instruction data"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected a list of Alpaca records") from None
        if not isinstance(values, list):
            raise DataError(f"{path}: expected a JSON list of Alpaca records, got a {type(values).__name__}")
        objs = [(f"{path}: record {i}", obj) for i, obj in enumerate(values)]
    else:
        raise DataError(f"{path}: expected a .json (a list of records) or .jsonl (one record per line) file")
    if not objs:
        raise DataError(f"{path} holds no records")
    return objs


def read_records(path: str | Path) -> list[InstructionRecord]:
    """Records from a .json file (one list of objects) or a .jsonl file (one object per line)."""
    return [_record(obj, where) for where, obj in read_objects(path)]


def build_example(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """prompt ids and answer ids (EOS included) -> (tokens, targets), each of length P + A - 1.

    targets[i] is the token after tokens[i], or IGNORE_INDEX where that next token is still part of the
    prompt: the first target that counts is the answer's first token, predicted from the prompt's last.
    """
    sequence = list(prompt_ids) + list(answer_ids)
    targets = [IGNORE_INDEX] * (len(prompt_ids) - 1) + list(answer_ids)
    return sequence[:-1], targets


def encode_record(record: InstructionRecord, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """One record -> (tokens, targets): BOS + prompt, then the answer and EOS."""
    return build_example(tokenizer.encode(record.prompt(), bos=True),
                         tokenizer.encode(record.output, bos=False, eos=True))


def encode_records(records: Sequence[InstructionRecord], tokenizer: Tokenizer,
                   max_seq_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Every record that fits in max_seq_len model positions, encoded; and how many were dropped
    because they do not fit (see "Too long" above)."""
    examples = [encode_record(r, tokenizer) for r in records]
    kept = [e for e in examples if len(e[0]) <= max_seq_len]
    if not kept:
        shortest = min(len(e[0]) for e in examples)
        raise DataError(f"no instruction record fits in --seq_len {max_seq_len} tokens (the shortest needs "
                        f"{shortest}); raise --seq_len to at least {shortest} (up to the model's max_seq_len), or "
                        "shorten the records")
    return kept, len(examples) - len(kept)


def instruction_batch(examples: Sequence[tuple[list[int], list[int]]], indices: Sequence[int],
                      pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen examples as (B, T) tokens and targets, padded on the right to the longest one.
    Right padding needs no attention mask: causal attention never lets a real token see the padding
    after it, and the padding's targets are IGNORE_INDEX. pad_id is any valid id (LLaMA has none)."""
    rows = [examples[i][:2] for i in indices]  # (an image example carries its image id third)
    width = max(len(tokens) for tokens, _ in rows)
    tokens = torch.tensor([t + [pad_id] * (width - len(t)) for t, _ in rows], dtype=torch.long)
    targets = torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for _, y in rows], dtype=torch.long)
    return tokens, targets
