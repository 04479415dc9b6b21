"""Exact-match accuracy of a model on lab records, by greedy generation to the end of the answer.

    python -m lab.evaluate --checkpoint BASE [--peft ADAPTER_DIR] --records runs/lab/instructions/eval.jsonl

For each record the Alpaca prompt is encoded (with BOS), the model generates greedily until it emits
EOS (or max_new_tokens), and the decoded answer must equal the record's output exactly (surrounding
whitespace aside: the answer's first token carries sentencepiece's word-start marker). Prompts are
batched with left padding through ``llama_min.generation.generate``, whose greedy output does not
depend on the batch.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from llama_min.checkpoint import load_checkpoint, tokenizer_file
from llama_min.generation import generate
from llama_min.instructions import InstructionRecord, read_records
from llama_min.model import Llama
from llama_min.peft import load_peft
from llama_min.tokenizer import Tokenizer

from .tasks import TASKS

_TASK_OF_INSTRUCTION = {t.instruction: name for name, t in TASKS.items()}


def answers(model: Llama, tokenizer: Tokenizer, records: Sequence[InstructionRecord], max_new_tokens: int = 16,
            batch_size: int = 64) -> list[str]:
    """The model's greedy answer to every record, decoded, generation stopped at EOS."""
    was_training = model.training
    model.eval()  # no dropout while answering
    out = []
    try:
        for i in range(0, len(records), batch_size):
            prompts = [tokenizer.encode(r.prompt(), bos=True) for r in records[i:i + batch_size]]
            new = generate(model, prompts, max_new_tokens, temperature=0.0, stop_ids=[tokenizer.eos_id])
            out += [tokenizer.decode(ids) for ids in new]
    finally:
        model.train(was_training)
    return out


def exact_match(model: Llama, tokenizer: Tokenizer, records: Sequence[InstructionRecord],
                max_new_tokens: int = 16, batch_size: int = 64) -> dict:
    """{"accuracy": share of records answered exactly, "per_task": {task: accuracy}, "n": records}.
    Records whose instruction is not a lab task are grouped under "other"."""
    got = answers(model, tokenizer, records, max_new_tokens, batch_size)
    right, total = Counter(), Counter()
    for record, answer in zip(records, got):
        task = _TASK_OF_INSTRUCTION.get(record.instruction, "other")
        total[task] += 1
        right[task] += answer.strip() == record.output.strip()
    return {"accuracy": sum(right.values()) / max(len(records), 1),
            "per_task": {t: right[t] / total[t] for t in total}, "n": len(records)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the base model's checkpoint directory")
    parser.add_argument("--peft", default="", help="an adapter directory (peft.safetensors + peft.json) to apply")
    parser.add_argument("--records", required=True, help="Alpaca records (.json or .jsonl) to score")
    parser.add_argument("--tokenizer", default="", help="tokenizer.model (default: the checkpoint's own)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N records (0: all)")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="longest answer generated")
    parser.add_argument("--batch_size", type=int, default=64, help="prompts generated together")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model = load_checkpoint(args.checkpoint, device=args.device)
    if args.peft:
        load_peft(model, args.peft)
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
