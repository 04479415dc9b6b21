"""What weight-only quantisation costs in quality: held-out bits per byte and greedy agreement, float32
against int8 and int4 (llama_min/quantize.py), for one trained checkpoint.

    python benchmarks/quantize_quality.py --checkpoint out/ckpt            # the default Shakespeare model
    python benchmarks/quantize_quality.py --checkpoint DIR --text FILE --group_sizes 32 64

Bits per byte: the model's cross-entropy over consecutive windows of the held-out text, in bits, divided
by the UTF-8 bytes of the predicted text (the training script's figure; tokenizer-independent).
Greedy agreement: from the same prompts (windows of the held-out text), the greedy continuation of each
quantised model against float32's, token by token: the share of positions that agree, and how many
tokens each stays identical before the first difference (after one, the contexts differ).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from llama_min import Tokenizer, generate, load_tokenizer
from llama_min.checkpoint import load_checkpoint, tokenizer_file
from llama_min.quantize import quantize_model


@torch.no_grad()
def bits_per_byte(model, tokenizer: Tokenizer, ids: list[int], seq_len: int, max_tokens: int) -> float:
    n_windows = min(len(ids) - 1, max_tokens) // seq_len
    nats, n_bytes = 0.0, 0
    for w in range(n_windows):
        window = torch.tensor(ids[w * seq_len:(w + 1) * seq_len + 1])
        x, y = window[None, :-1], window[1:]
        logits, _ = model(x)
        nats += F.cross_entropy(logits[0], y, reduction="sum").item()
        n_bytes += sum(tokenizer.text_bytes(int(t)) for t in y)
    return nats / math.log(2) / n_bytes


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[float, list[int]]:
    """(share of positions with the same token, identical prefix length per prompt)."""
    same = sum(a == b for r, o in zip(reference, other) for a, b in zip(r, o))
    prefixes = [next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), min(len(r), len(o)))
                for r, o in zip(reference, other)]
    return same / sum(len(r) for r in reference), prefixes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--text", default="data/shakespeare/val.txt", help="held-out text")
    parser.add_argument("--eval_tokens", type=int, default=32768, help="held-out tokens scored")
    parser.add_argument("--prompts", type=int, default=4, help="greedy continuations compared")
    parser.add_argument("--prompt_len", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=256, help="(at most the model's context minus the prompt)")
    parser.add_argument("--group_sizes", type=int, nargs="+", default=[32])
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer = load_tokenizer(tokenizer_file(args.checkpoint))
    base = load_checkpoint(args.checkpoint).eval()
    with open(args.text, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(), bos=False)
    seq_len = base.config.max_seq_len
    new_tokens = min(args.new_tokens, seq_len - args.prompt_len)
    stride = len(ids) // args.prompts
    prompts = [[tokenizer.bos_id] + ids[i * stride:i * stride + args.prompt_len - 1] for i in range(args.prompts)]
    print(f"checkpoint {args.checkpoint}: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters; "
          f"{min(len(ids) - 1, args.eval_tokens) // seq_len * seq_len} held-out tokens of {args.text}; "
          f"{args.prompts} greedy continuations of {new_tokens} tokens")

    variants = [("float32", base)] + [("int8", quantize_model(copy.deepcopy(base), "int8"))]
    variants += [(f"int4 (groups of {g})", quantize_model(copy.deepcopy(base), "int4", g)) for g in args.group_sizes]
    reference_bpb = reference_tokens = None
    print(f"{'weights':<20} {'bits/byte':>9} {'change':>8} {'greedy agreement':>17}  identical prefix per prompt")
    for name, model in variants:
        start = time.perf_counter()
        bpb = bits_per_byte(model, tokenizer, ids, seq_len, args.eval_tokens)
        tokens = generate(model, prompts, new_tokens)
        if reference_bpb is None:
            reference_bpb, reference_tokens = bpb, tokens
        share, prefixes = agreement(reference_tokens, tokens)
        print(f"{name:<20} {bpb:9.4f} {(bpb / reference_bpb - 1):+8.2%} {share:17.1%}  {prefixes}"
              f"   ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
