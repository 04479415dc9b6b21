"""Lab 9: your byte-level BPE against the project's sentencepiece tokenizer, trained on the same text.

    python -m lab.plots.bpe_compare --out handin/09/compare.png [--train_bytes 100000 --vocab_size 512]

Trains both on the first TRAIN_BYTES of data/shakespeare/train.txt with the same vocabulary size, encodes the
held-out plays (data/shakespeare/val.txt), and prints and plots for each: bytes per token (compression: higher
is shorter sequences), whether decode(encode(text)) gives the text back, and the time training took. Your BPE
is llama_min/from_scratch/bpe.py; sentencepiece is llama_min.tokenizer.Tokenizer.train (BPE too, on
characters with byte fallback, with its own pre-tokenisation).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from . import pyplot, save

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "shakespeare"


def compare(train_text: str, held_out: str, vocab_size: int) -> list[dict]:
    """For each tokenizer: name, bytes per token on held_out, exact round trip, training seconds."""
    from llama_min.from_scratch.bpe import decode, encode, train_bpe
    from llama_min.tokenizer import Tokenizer

    n_bytes = len(held_out.encode("utf-8"))
    start = time.time()
    merges = train_bpe(train_text, vocab_size)
    bpe_seconds = time.time() - start
    bpe_ids = encode(held_out, merges)
    rows = [{"name": "your byte-level BPE", "bytes_per_token": n_bytes / len(bpe_ids),
             "round_trip": decode(bpe_ids, merges) == held_out, "seconds": bpe_seconds}]
    with tempfile.TemporaryDirectory(prefix="bpe_compare_") as tmp:
        corpus = Path(tmp) / "train.txt"
        corpus.write_text(train_text, encoding="utf-8")
        start = time.time()
        sp = Tokenizer.train([corpus], Path(tmp) / "tokenizer.model", vocab_size)
        sp_seconds = time.time() - start
    sp_ids = sp.encode(held_out, bos=False)
    rows.append({"name": "sentencepiece (llama_min.tokenizer)", "bytes_per_token": n_bytes / len(sp_ids),
                 "round_trip": sp.decode(sp_ids) == held_out, "seconds": sp_seconds})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.plots.bpe_compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("handin/09/compare.png"))
    parser.add_argument("--train_bytes", type=int, default=100_000)
    parser.add_argument("--vocab_size", type=int, default=512)
    args = parser.parse_args(argv)
    train_text = (DATA / "train.txt").read_text(encoding="utf-8")[:args.train_bytes]
    held_out = (DATA / "val.txt").read_text(encoding="utf-8")
    rows = compare(train_text, held_out, args.vocab_size)
    print(f"trained on {len(train_text.encode('utf-8')):,} bytes, vocabulary {args.vocab_size}; "
          f"held-out text {len(held_out.encode('utf-8')):,} bytes")
    for r in rows:
        print(f"  {r['name']:<38} {r['bytes_per_token']:.3f} bytes per token, round trip "
              f"{'exact' if r['round_trip'] else 'NOT exact'}, trained in {r['seconds']:.1f} s")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r["name"] for r in rows], [r["bytes_per_token"] for r in rows])
    ax.set(xlabel="held-out bytes per token (higher: shorter sequences)",
           title=f"vocabulary {args.vocab_size}, trained on {args.train_bytes:,} bytes")
    save(fig, args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
