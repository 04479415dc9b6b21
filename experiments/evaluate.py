"""Exact-match accuracy of a model on benchmark records, by greedy generation to the end of the answer.

    python -m experiments.evaluate --checkpoint BASE [--peft ADAPTER_DIR] --records runs/benchmark/instructions/eval.jsonl
    python -m experiments.evaluate --checkpoint BASE --peft ADAPTER_DIR --interpolate 0.5 --records ...
    python -m experiments.evaluate --checkpoint TUNED --base BASE --interpolate 0.5 --records ...

--interpolate a scores the model θ(a) = (1 − a)·base + a·fine-tuned (``llama_min.finetune.interpolate``).

Answers are generated greedily and compared exactly as ``llama_min.finetune.exact_match`` explains; here the
score is also broken down per benchmark task.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from llama_min.checkpoint import tokenizer_file
from llama_min.finetune.exact_match import answers, is_exact
from llama_min.finetune.instructions import InstructionRecord, encode_records, read_records
from llama_min.finetune.load import load_finetuned
from llama_min.model import Llama
from llama_min.tokenizer import load_tokenizer
from llama_min.training import evaluate as training_evaluate
from llama_min.training.config import TrainConfig
from llama_min.training.corpus import split_documents, token_byte_lengths, tokenize_to_memmap
from llama_min.training.runtime import Runtime, exact_float32

from .tasks import TASKS

_TASK_OF_INSTRUCTION = {t.instruction: name for name, t in TASKS.items()}


def exact_match(model: Llama, tokenizer: Tokenizer, records: Sequence[InstructionRecord],
                max_new_tokens: int = 16, batch_size: int = 64) -> dict:
    """{"accuracy": share of records answered exactly, "per_task": {task: accuracy}, "n": records,
    "precision"}. Records whose instruction is not a benchmark task are grouped under "other". Greedy decoding
    in the model's dtype, float32 computed as float32 (no TF32 on GPUs): the precision train.py's dev
    scores say they use for a float32 run."""
    with exact_float32():
        got = answers(model, tokenizer, records, max_new_tokens, batch_size)
    right, total = Counter(), Counter()
    for record, answer in zip(records, got):
        task = _TASK_OF_INSTRUCTION.get(record.instruction, "other")
        total[task] += 1
        right[task] += is_exact(answer, record)
    return {"accuracy": sum(right.values()) / max(len(records), 1),
            "per_task": {t: right[t] / total[t] for t in total}, "n": len(records),
            "precision": str(next(model.parameters()).dtype).removeprefix("torch.")}


def answer_loss(model: Llama, tokenizer: Tokenizer, records: Sequence[InstructionRecord], batch_size: int = 64) -> float:
    """Mean cross-entropy (nats per token) of the records' answers (EOS included) given their prompts:
    the loss the fine-tuning minimises, measured on held-out records as train.py measures it."""
    examples, _ = encode_records(records, tokenizer, model.config.max_seq_len)
    return training_evaluate.answer_loss(model, examples, tokenizer.eos_id, batch_size)


def corpus_bpb(model: Llama, tokenizer: Tokenizer, corpus: str | Path, cache_dir: str | Path, seq_len: int,
               batch_size: int = 16) -> float:
    """Bits per byte on the held-out split of a pretraining corpus (a directory of train/val files),
    measured as train.py measures it: the figure pretraining logged, now for any model. The benchmark compares
    it before and after fine-tuning to measure forgetting."""
    _, val_docs = split_documents(corpus, val_fraction=0.05)  # (a directory: its val file, whole)
    held_out = tokenize_to_memmap(val_docs, tokenizer, Path(cache_dir), "val")
    rt = Runtime(next(model.parameters()).device)
    return training_evaluate.bits_per_byte(model, held_out, token_byte_lengths(tokenizer), seq_len, batch_size,
                                           TrainConfig.eval_tokens, rt)[1]


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
        model = load_finetuned(args.checkpoint, args.peft, args.base, args.interpolate, args.device)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    tok_path = Path(args.tokenizer) if args.tokenizer else tokenizer_file(args.checkpoint)
    if tok_path is None:
        parser.error(f"{args.checkpoint} holds no tokenizer; pass --tokenizer")
    records = read_records(args.records)
    records = records[:args.limit] if args.limit else records
    result = exact_match(model, load_tokenizer(tok_path), records, args.max_new_tokens, args.batch_size)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
