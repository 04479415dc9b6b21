"""Exact-match accuracy of instruction following: greedy answers compared with the records' outputs.

For each record the Alpaca prompt is encoded (with BOS), the model generates greedily until it emits
EOS (or max_new_tokens), and the decoded answer must equal the record's output exactly, surrounding
whitespace aside (a tokenizer with a dummy prefix, as LLaMA's, decodes the answer's first token with a
leading space). Prompts are batched with left padding through ``generation.generate``, whose greedy
output does not depend on the batch. Used by train.py's dev-set early stopping and by the word-task
benchmark (experiments/evaluate.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..generation import generate
from .images import HELD_OUT_COMBINATIONS, ImageRecord, question_type
from .instructions import InstructionRecord
from ..model import Llama
from ..peft.visual import load_encoder
from ..tokenizer import Tokenizer


def answers(model: Llama, tokenizer: Tokenizer, records: Sequence[InstructionRecord], max_new_tokens: int = 16,
            batch_size: int = 64, image_features: dict[str, torch.Tensor] | None = None) -> list[str]:
    """The model's greedy answer to every record, decoded, generation stopped at EOS. Records about
    images (finetune/images.py's ImageRecord) are answered with image_features[record.image]."""
    was_training = model.training
    model.eval()  # no dropout or embedding noise while answering
    out = []
    try:
        for i in range(0, len(records), batch_size):
            chunk = records[i:i + batch_size]
            prompts = [tokenizer.encode(r.prompt(), bos=True) for r in chunk]
            images = None if image_features is None else torch.stack([image_features[r.image] for r in chunk])
            new = generate(model, prompts, max_new_tokens, temperature=0.0, stop_ids=[tokenizer.eos_id], images=images)
            out += [tokenizer.decode(ids) for ids in new]
    finally:
        model.train(was_training)
    return out


def is_exact(answer: str, record: InstructionRecord) -> bool:
    return answer.strip() == record.output.strip()


def exact_match_accuracy(model: Llama, tokenizer: Tokenizer, records: Sequence[InstructionRecord],
                         max_new_tokens: int = 16, batch_size: int = 64,
                         image_features: dict[str, torch.Tensor] | None = None) -> float:
    """Share of the records answered exactly (0 for no records)."""
    got = answers(model, tokenizer, records, max_new_tokens, batch_size, image_features)
    return sum(is_exact(a, r) for a, r in zip(got, records)) / max(len(records), 1)


def image_features(model: Llama, records: Sequence[ImageRecord], image_root: str | Path) -> dict[str, torch.Tensor] | None:
    """Each record's picture (under image_root) encoded by the frozen encoder that the model's multimodal
    adapter records (peft_config.image_encoder), by image id; None for a model without a visual projection."""
    if model.visual_proj is None:
        return None
    ids = sorted({r.image for r in records})
    return dict(zip(ids, load_encoder(model.peft_config.image_encoder).features(image_root, ids)))


def image_answers(model: Llama, tokenizer: Tokenizer, records: Sequence[ImageRecord], image_root: str | Path,
                  max_new_tokens: int = 16) -> list[str]:
    """``answers`` to image-instruction records, each with its picture (``image_features``); a model without
    a visual projection answers from the text alone."""
    return answers(model, tokenizer, records, max_new_tokens, image_features=image_features(model, records, image_root))


def exact_match_by_question(got: Sequence[str], records: Sequence[ImageRecord]) -> dict[str, float]:
    """Exact match of the answers ``got`` to image-world records (one per record), per question type; colour
    and shape also on the pictures of HELD_OUT_COMBINATIONS alone (keys colour@held_out, shape@held_out), a
    picture's colour and shape read from its own records."""
    truth: dict[str, dict[str, str]] = {}  # picture -> question type -> answer
    for r in records:
        truth.setdefault(r.image, {})[question_type(r)] = r.output
    groups: dict[str, list[bool]] = {}
    for answer, r in zip(got, records, strict=True):
        kind, right = question_type(r), is_exact(answer, r)
        groups.setdefault(kind, []).append(right)
        if kind in ("colour", "shape") and (truth[r.image].get("colour"), truth[r.image].get("shape")) in \
                HELD_OUT_COMBINATIONS:
            groups.setdefault(f"{kind}@held_out", []).append(right)
    return {k: sum(v) / len(v) for k, v in groups.items()}
