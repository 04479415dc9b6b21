"""Convert LLaMA checkpoints: Meta, Hugging Face, GGUF or llama_min in; llama_min or Hugging Face out
(and train.py's LoRA adapters out in Hugging Face's PEFT layout).

    python weights_convert.py SRC DST [--to llama_min|hf] [--dtype float32|bfloat16|float16] [--verify] [--force]
    python weights_convert.py SRC DST --quantize int8|int4 [--group_size 32]     # for generate.py
    python weights_convert.py OUT_DIR/peft DST --to peft [--base_hf HF_EXPORT_OF_THE_BASE]

SRC's format is detected from what it contains (see llama_min/convert/). DST is written atomically: it
appears complete or not at all. With --verify, the result is compared by logits with Hugging Face
transformers (see llama_min/convert/verify.py) and the exit status is non-zero above the tolerance.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from llama_min.cli import OneLineParser, UsageError, add_flags, flag, peak_rss_mb
from llama_min.convert import DTYPES, TARGETS, convert, convert_adapter, open_source
from llama_min.quantize import quantization_scheme


@dataclass
class ConvertConfig:
    src: str = flag("", "Meta directory, Hugging Face directory, .gguf file, or llama_min checkpoint", positional=True)
    dst: str = flag("", "output directory (must not exist, unless --force)", positional=True)
    to: str = flag("llama_min", "llama_min: our checkpoint directory; hf: a directory transformers loads; peft: a "
                   "LoRA adapter directory of train.py (OUT_DIR/peft) in Hugging Face's PEFT layout", choices=TARGETS)
    dtype: str | None = flag(None, "dtype of the written weights (default: the source's; float32 for quantised "
                             "GGUF)", choices=list(DTYPES))
    quantize: str = flag("", "int8 or int4: store every linear layer's weights quantised (int8 per output channel, "
                         "int4 in groups of --group_size; llama_min/quantize.py); embeddings and norms keep --dtype",
                         choices=["", "int8", "int4"])
    group_size: int = flag(32, "inputs per scale with --quantize int4 (32, 64, 128 or 256)")
    verify: bool = flag(False, "compare logits with Hugging Face transformers; exit 1 when they differ")
    force: bool = flag(False, "replace DST if it exists")
    base_hf: str = flag("", "--to peft: the --to hf export of the adapter's base, recorded as base_model_name_or_path "
                        "so that AutoPeftModelForCausalLM finds it (default: the llama_min base the adapter records, "
                        "which transformers cannot load)")


def parse_args(argv: list[str] | None = None) -> ConvertConfig:
    parser = OneLineParser(prog="weights_convert.py", description=__doc__.split("\n\n")[0],
                           usage="%(prog)s SRC DST [--to llama_min|hf|peft] [--dtype DTYPE] [--quantize int8|int4] "
                                 "[--verify] [--force]")
    add_flags(parser, ConvertConfig)
    return ConvertConfig(**vars(parser.parse_args(argv)))


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        if args.to == "peft":
            if args.verify or args.dtype:
                raise UsageError("--to peft writes an adapter as it was trained: --verify and --dtype apply to model "
                                 "checkpoints; drop them")
            written = convert_adapter(args.src, args.dst, force=args.force, base_hf=args.base_hf or None)
            print(f"wrote {args.dst}: a PEFT LoRA adapter (r {written['r']}, alpha {written['lora_alpha']}, "
                  f"targets {' '.join(written['target_modules'])}) for base {written['base_model_name_or_path']}")
            if not args.base_hf:
                print(f"note: that base is a llama_min checkpoint, which transformers cannot load: export it with "
                      f"--to hf and load the adapter with PeftModel.from_pretrained(that model, {args.dst!r}), or "
                      "convert again with --base_hf EXPORT for AutoPeftModelForCausalLM")
            return 0
        if args.base_hf:
            raise UsageError("--base_hf names the base of an adapter: it goes with --to peft")
        source = open_source(args.src)
        c = source.config
        print(f"source: {source.format_name} checkpoint {source.path} ({c.n_layers} layers, dim {c.dim}, "
              f"{c.n_heads} heads / {c.n_kv_heads} kv heads, vocab {c.vocab_size}, {dtype_name(source.dtype)})")
        scheme = quantization_scheme(args.quantize, args.group_size)
        if scheme and args.verify:
            raise UsageError("--verify compares float logits with transformers, which cannot load a quantised "
                             "checkpoint; measure a quantised model with benchmarks/quantize_quality.py")
        done = convert(source, args.dst, to=args.to, dtype=DTYPES.get(args.dtype), force=args.force, quantize=scheme)
        print(f"wrote {done.path} ({done.to}, {dtype_name(done.dtype)}{', ' + args.quantize if scheme else ''}, "
              f"{done.n_tensors} tensors, "
              f"{done.n_bytes / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s; peak RSS {peak_rss_mb():.0f} MB")
        if done.note:
            print(f"note: {done.note}")
        if args.verify:
            from llama_min.convert.verify import verify

            v = verify(source, done.path, args.to, done.dtype)
            verdict = "OK" if v.ok else "FAILED: the conversion does not reproduce the reference"
            print(f"verify: max |Δlogit| = {v.max_diff:.3g} over {v.n_tokens} tokens against transformers "
                  f"loading {v.reference}, weights rounded to {dtype_name(done.dtype)} on both sides "
                  f"(tolerance {v.tolerance:.3g}): {verdict}")
            if not v.ok:
                return 1
    except UsageError as e:  # ConversionError and the checkpoint readers' errors
        print(f"weights_convert.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a file size limit, a read-only destination
        print(f"weights_convert.py: error: could not write {args.dst}: {e.strerror or e}; nothing of it was kept: "
              "free disk space (or choose another DST) and convert again", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
