"""Exact-match accuracy of a model on lab records, by greedy generation to the end of the answer.

    python -m lab.evaluate --checkpoint BASE [--peft ADAPTER_DIR] --records runs/lab/instructions/eval.jsonl
    python -m lab.evaluate --checkpoint BASE --peft ADAPTER_DIR --interpolate 0.5 --records ...
    python -m lab.evaluate --checkpoint TUNED --base BASE --interpolate 0.5 --records ...

--interpolate a scores the model θ(a) = (1 − a)·base + a·fine-tuned (``llama_min.interpolate``).

Answers are generated greedily and compared exactly as ``llama_min.exact_match`` explains; here the
score is also broken down per lab task.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

import train
from llama_min.checkpoint import load_checkpoint, tokenizer_file
from llama_min.data import split_documents, token_byte_lengths, tokenize_to_memmap
from llama_min.exact_match import answers, is_exact
from llama_min.instructions import InstructionRecord, encode_records, instruction_batch, read_records
from llama_min.interpolate_files import check_interpolation_flags, interpolate_from_files_
from llama_min.model import IGNORE_INDEX, Llama
from llama_min.peft import load_peft
from llama_min.tokenizer import Tokenizer

from .tasks import TASKS

_TASK_OF_INSTRUCTION = {t.instruction: name for name, t in TASKS.items()}


def exact_match(model: Llama, tokenizer: Tokenizer, records: Sequence[InstructionRecord],
                max_new_tokens: int = 16, batch_size: int = 64) -> dict:
    """{"accuracy": share of records answered exactly, "per_task": {task: accuracy}, "n": records}.
    Records whose instruction is not a lab task are grouped under "other"."""
    got = answers(model, tokenizer, records, max_new_tokens, batch_size)
    right, total = Counter(), Counter()
    for record, answer in zip(records, got):
        task = _TASK_OF_INSTRUCTION.get(record.instruction, "other")
        total[task] += 1
        right[task] += is_exact(answer, record)
    return {"accuracy": sum(right.values()) / max(len(records), 1),
            "per_task": {t: right[t] / total[t] for t in total}, "n": len(records)}


@torch.no_grad()
def answer_loss(model: Llama, tokenizer: Tokenizer, records: Sequence[InstructionRecord], batch_size: int = 64) -> float:
    """Mean cross-entropy (nats per token) of the records' answers (EOS included) given their prompts,
    the loss the fine-tuning minimises, measured here on held-out records."""
    examples, _ = encode_records(records, tokenizer, model.config.max_seq_len)
    total, count, device = 0.0, 0, next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        tokens, targets = instruction_batch(examples, range(i, min(i + batch_size, len(examples))), tokenizer.eos_id)
        n = int((targets != IGNORE_INDEX).sum())
        total += model(tokens.to(device), targets.to(device))[1].item() * n  # the loss is a mean over n
        count += n
    return total / count


def corpus_bpb(model: Llama, tokenizer: Tokenizer, corpus: str | Path, cache_dir: str | Path, seq_len: int,
               batch_size: int = 16) -> float:
    """Bits per byte on the held-out split of a pretraining corpus (a directory of train/val files),
    measured by train.py's own ``evaluate``: the figure pretraining logged, now for any model. The lab
    compares it before and after fine-tuning to measure forgetting."""
    _, val_docs = split_documents(corpus, val_fraction=0.05)  # (a directory: its val file, whole)
    held_out = tokenize_to_memmap(val_docs, tokenizer, Path(cache_dir), "val")
    data = train.Data(tokenizer, train=[], val=held_out, byte_lengths=token_byte_lengths(tokenizer))
    cfg = train.TrainConfig(seq_len=seq_len, batch_size=batch_size)
    device = next(model.parameters()).device
    return train.evaluate(model, data, cfg, train.Runtime(device))[1]


def load_model(checkpoint: str, peft: str = "", base: str = "", interpolate: float | None = None,
               device: str = "cpu") -> Llama:
    """The checkpoint, with the adapter ``peft`` applied, moved to θ(interpolate) when given, in eval mode."""
    if interpolate is not None:
        check_interpolation_flags(interpolate, peft, base)  # before loading: a mistake costs nothing
    elif base:
        raise ValueError("--base is the base checkpoint for --interpolate a; give --interpolate too")
    model = load_checkpoint(checkpoint, device=device)
    if peft:
        load_peft(model, peft)
    if interpolate is not None:
        interpolate_from_files_(model, interpolate, checkpoint, peft, base)
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the base model's checkpoint directory")
    parser.add_argument("--peft", default="", help="an adapter directory (peft.safetensors + peft.json) to apply")
    parser.add_argument("--base", default="", help="with --interpolate: the base checkpoint of a fully or "
                        "partially fine-tuned --checkpoint")
    parser.add_argument("--interpolate", type=float, default=None, metavar="A",
                        help="score θ(A) = (1 - A)*base + A*fine-tuned, A in [0, 1] (needs --peft or --base)")
    parser.add_argument("--records", required=True, help="Alpaca records (.json or .jsonl) to score")
    parser.add_argument("--tokenizer", default="", help="tokenizer.model (default: the checkpoint's own)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N records (0: all)")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="longest answer generated")
    parser.add_argument("--batch_size", type=int, default=64, help="prompts generated together")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.checkpoint, args.peft, args.base, args.interpolate, args.device)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    tok_path = Path(args.tokenizer) if args.tokenizer else tokenizer_file(args.checkpoint)
    if tok_path is None:
        parser.error(f"{args.checkpoint} holds no tokenizer; pass --tokenizer")
    records = read_records(args.records)
    records = records[:args.limit] if args.limit else records
    result = exact_match(model, Tokenizer(tok_path), records, args.max_new_tokens, args.batch_size)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
