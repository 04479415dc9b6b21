"""Decode speed of llama_min's generate() against Hugging Face transformers and the memory-bandwidth limit,
for each weight format generate.py offers: float32, bfloat16, int8 and int4 (--quantize).

The model has the shape of a real small LLaMA-family model (dim 576, 30 layers, 9 query heads, 3 kv
heads, hidden 1536, vocabulary 49152, tied embeddings, rope_theta 100000: 135M parameters) with random
weights. Decoding one token reads every weight once, so on a CPU its speed is bounded by memory
bandwidth: ceiling tokens/s = measured read bandwidth / weight bytes per token, each format against its
own bytes (4, 2, about 1 and about 0.5 per weight).

When transformers is installed the same weights are exported in this process (hf_format) into a
LlamaForCausalLM, whose generate() runs on the same prompt; runs alternate between the two so that load
from other processes hits both alike, and the best of the repeats is reported.

    python benchmarks/decode.py                 # the full report
    python benchmarks/decode.py --repeats 1     # quicker, noisier
    python benchmarks/decode.py --repeats 1 --formats_only --new_tokens 64   # the table of formats only
    python benchmarks/decode.py --compile       # also generate.py --compile's step for each format
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from typing import Callable

import torch

from llama_min import Llama, ModelConfig
from llama_min.compiled_decode import compile_decode_step
from llama_min.generation import decode_step, generate_stream, store_weights_column_major
from llama_min.quantize import Int4Linear, Int8Linear, quantize_model
from llama_min.hf_format import config_to_hf, state_dict_to_hf

# Wall-clock time by default. On a machine shared with other busy processes, `--clock cpu --threads 1`
# counts only the CPU time this process got, which is what a quiet machine's wall clock would show
# (one thread: no time spent waiting for a second one that was descheduled).
clock = time.perf_counter

SMALL_LLAMA = ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                          tie_embeddings=True, rope_theta=100000.0, norm_eps=1e-5, max_seq_len=2048)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct parameter storage (a tied head counts once). The embedding table is read once
    per token as the output head; its lookup reads one row only, which this ignores."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Memory-read bandwidth in bytes/s: the best of a few sums over a buffer far larger than the caches."""
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        x.sum()
        best = min(best, clock() - t)
    return x.numel() * 4 / best


def time_ours(model: Llama, prompts: list[list[int]], new_tokens: int, whole_call: bool = False,
              step_fn: Callable = decode_step) -> tuple[float, float, list[int]]:
    """(time to first token in s, tokens/s per row after it (whole_call: over the whole call, prefill
    included), the tokens of row 0). step_fn: the decode step (a compiled one for generate.py --compile)."""
    start = clock()
    first = None
    out = []
    for step in generate_stream(model, prompts, new_tokens, decode_step=step_fn):
        first = first or clock()
        out.append(step[0])
    end = clock()
    if whole_call:
        return first - start, new_tokens / (end - start), out
    return first - start, (new_tokens - 1) / (end - first), out


class _Arrivals:
    """A transformers streamer that only notes when each batch of tokens arrives (the first put() is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(clock())

    def end(self):
        pass


def time_hf(hf_model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[int]]:
    arrivals = _Arrivals()
    ids = torch.tensor(prompts)
    start = clock()
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, streamer=arrivals if len(prompts) == 1 else None,
                                pad_token_id=0)
    end = clock()
    if len(prompts) > 1:
        return float("nan"), new_tokens / (end - start), out[0, ids.shape[1]:].tolist()
    first = arrivals.times[1]
    return first - start, (new_tokens - 1) / (end - first), out[0, ids.shape[1]:].tolist()


def hf_twin(model: Llama):
    """The same weights as a transformers LlamaForCausalLM, or None when transformers is not installed."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("transformers is not installed: skipping the comparison (pip install transformers)")
        return None
    hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(model.config)))
    state = state_dict_to_hf(model.state_dict(), model.config)
    if model.config.tie_embeddings:
        del state["lm_head.weight"]
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    return hf.eval()


def best_runs(fns: dict, repeats: int) -> dict:
    """Run each function `repeats` times, interleaved; per name, the best of each returned figure (the
    shortest time to first token, the highest tokens/s): other processes only ever slow a run down, so
    the best run is the closest to the machine's own speed, as in ``timeit``."""
    results = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            results[name].append(fn())
    return {name: (min(r[0] for r in runs), max(r[1] for r in runs), runs[-1][2]) for name, runs in results.items()}


def bytes_read_per_token(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every weight once, in the form the forward pass reads it (an int4
    layer's kernel copy on a CPU, not the portable one it also keeps), and the embedding table only
    when it is also the output head (otherwise its lookup reads one row)."""
    read: dict[int, torch.Tensor] = {}  # by identity: a tied head and embedding are one tensor, read once
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear) and module.kernel_codes is not None:
            tensors = [module.kernel_codes, module.kernel_scales_zeros]
        elif isinstance(module, (Int8Linear, Int4Linear)):
            tensors = list(module.buffers())
        elif name == "tok_embeddings" and model.output.weight is not module.weight:
            tensors = []
        else:
            tensors = list(module.parameters(recurse=False))
        read.update((id(t), t) for t in tensors)
    return sum(t.numel() * t.element_size() for t in read.values())


def per_token_overhead(new_tokens: int, compiled: bool = False) -> float:
    """Seconds per decoded token of a model of the benchmark's depth and head count with almost no
    arithmetic (dim 72, vocabulary 256): what the framework's calls cost, whatever the weights; with
    ``compiled``, what is left of it in generate.py --compile's step."""
    thin = Llama(replace(SMALL_LLAMA, dim=72, hidden_dim=64, vocab_size=256)).eval()
    step = compile_decode_step(thin)[0] if compiled else decode_step
    _, tps, _ = time_ours(thin, [[1, 2, 3]], new_tokens, step_fn=step)
    return 1 / tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, on a busy machine)")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prefill_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group_size", type=int, default=32, help="int4 group size")
    parser.add_argument("--formats_only", action="store_true",
                        help="only the table of weight formats (skip prefill and batched decoding)")
    parser.add_argument("--compile", action="store_true",
                        help="also each format's compiled decode step (generate.py --compile; about a minute each "
                             "to compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)

    model = Llama(SMALL_LLAMA).eval()
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, SMALL_LLAMA.vocab_size, (args.prompt_len,), generator=gen).tolist()
    long_prompt = torch.randint(3, SMALL_LLAMA.vocab_size, (args.prefill_len,), generator=gen).tolist()
    batch = [torch.randint(3, SMALL_LLAMA.vocab_size, (args.prompt_len,), generator=gen).tolist() for _ in range(args.batch)]
    hf = hf_twin(model)
    int4 = f"int4 (groups of {args.group_size})"
    formats = {  # what generate.py runs on a CPU for --dtype float32 / bfloat16 / --quantize int8 / int4
        "float32": store_weights_column_major(copy.deepcopy(model)),
        "float32 row-major": model,  # nn.Linear's own layout, without store_weights_column_major
        "bfloat16": store_weights_column_major(copy.deepcopy(model).to(torch.bfloat16)),
        "int8": quantize_model(copy.deepcopy(model), "int8"),
        int4: quantize_model(copy.deepcopy(model), "int4", args.group_size),
    }
    steps = dict.fromkeys(formats, decode_step)
    fast = formats["float32"]
    if args.compile:  # generate.py --compile: each weight format's own copy, in nn.Linear's layout
        for name, m in {"float32": model, "bfloat16": model, "int8": formats["int8"], int4: formats[int4]}.items():
            m = copy.deepcopy(m)
            if name == "bfloat16":
                m.to(torch.bfloat16)
            formats[f"{name} compiled"] = m
            steps[f"{name} compiled"], seconds = compile_decode_step(m)
            print(f"compiled the {name} decode step in {seconds:.0f} s")

    bandwidth = read_bandwidth()
    print(f"model: {n_params / 1e6:.1f}M parameters, {weight_bytes(model) / 2**20:.0f} MiB of float32 weights; "
          f"{args.threads} threads, {args.clock} clock")
    print(f"memory-read bandwidth {bandwidth / 1e9:.1f} GB/s; a format's ceiling = bandwidth / bytes it reads per token")
    overhead = per_token_overhead(args.new_tokens)
    compiled = f"; compiled: {per_token_overhead(args.new_tokens, compiled=True) * 1e3:.1f} ms" if args.compile else ""
    print(f"per-token overhead (same depth, dim 72, vocabulary 256): {overhead * 1e3:.1f} ms per token{compiled}")

    runs = {name: (lambda m=m, s=steps[name]: time_ours(m, [prompt], args.new_tokens, step_fn=s))
            for name, m in formats.items()}
    if hf is not None:
        runs["transformers float32"] = lambda: time_hf(hf, [prompt], args.new_tokens)
    decode = best_runs(runs, args.repeats)
    hf_tps = decode["transformers float32"][1] if hf is not None else float("nan")
    print(f"\ndecode, batch 1, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, greedy, best of {args.repeats}:")
    print(f"  {'weights':<22} {'tokens/s':>8} {'x HF fp32':>9} {'ceiling':>8} {'of it':>6} {'ms/token':>8}  greedy = float32")
    for name, (_, tps, tokens) in decode.items():
        m = formats.get(name, model)
        ceiling = bandwidth / bytes_read_per_token(m)
        same = sum(a == b for a, b in zip(tokens, decode["float32"][2]))
        print(f"  {name:<22} {tps:8.1f} {tps / hf_tps:8.2f}x {ceiling:8.1f} {tps / ceiling:6.0%} {1e3 / tps:8.1f}  "
              f"{same}/{args.new_tokens}")
    if args.formats_only:
        return

    runs = {"ours": lambda: time_ours(fast, [long_prompt], 1)[:1] + (0.0, None)}
    if hf is not None:
        runs["hf"] = lambda: time_hf(hf, [long_prompt], 1)[:1] + (0.0, None)
    prefill = best_runs(runs, args.repeats)
    print(f"\nprefill of a {args.prefill_len}-token prompt (time to first token), float32:")
    print(f"  llama_min     {prefill['ours'][0] * 1e3:7.0f} ms  ({args.prefill_len / prefill['ours'][0]:.0f} tokens/s)")
    if hf is not None:
        print(f"  transformers  {prefill['hf'][0] * 1e3:7.0f} ms  ({args.prefill_len / prefill['hf'][0]:.0f} tokens/s)"
              f"   ratio {prefill['hf'][0] / prefill['ours'][0]:.2f}x")

    runs = {"ours": lambda: time_ours(fast, batch, args.new_tokens, whole_call=True)}
    if hf is not None:
        runs["hf"] = lambda: time_hf(hf, batch, args.new_tokens)
    batched = best_runs(runs, args.repeats)
    print(f"\nbatch {args.batch}, float32, aggregate tokens/s over the whole generate() call, prefill included:")
    print(f"  llama_min     {batched['ours'][1] * args.batch:7.1f} tokens/s")
    if hf is not None:
        print(f"  transformers  {batched['hf'][1] * args.batch:7.1f} tokens/s")


if __name__ == "__main__":
    main()
