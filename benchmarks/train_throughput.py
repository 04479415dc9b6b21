"""Training throughput: tokens/s and MFU of train.py's step, against Hugging Face on the same shape.

    python benchmarks/train_throughput.py              # tiny preset and the 15M shape, float32 and bf16 autocast
    python benchmarks/train_throughput.py --steps 10 --threads 2
    python benchmarks/train_throughput.py --threads 1 --clock cpu   # on a machine busy with other jobs
    python benchmarks/train_throughput.py --shapes 128k-vocab --dtypes float32 --memory   # Llama 3's vocabulary

One training step is what train.py does: forward with the loss, backward, gradient clipping, AdamW
(the optimiser train.py builds). Hugging Face's ``LlamaForCausalLM`` of the same configuration runs the
same step on the same batches in the same process, with the same optimiser settings, so the ratio
compares the models. Rounds alternate between the two and each keeps its fastest step, so a busy
machine slows both alike rather than whichever ran second.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from llama_min import Llama, ModelConfig
from llama_min.training.config import TrainConfig
from llama_min.training.optim import make_optimizer
from llama_min.training.progress import flops_per_token, peak_flops
from llama_min.training.runtime import Runtime

SHAPES = {
    # (config, batch, seq_len); tiny as train.py's default run trains it
    "tiny": (ModelConfig.from_preset("tiny"), TrainConfig().batch_size, TrainConfig().seq_len),
    # llama2.c's "stories15M" shape: 15.2M parameters with the embedding shared by the output head
    "15M": (ModelConfig(dim=288, n_layers=6, n_heads=6, vocab_size=32000, max_seq_len=256, tie_embeddings=True), 8, 256),
    # Llama 3's 128,256-token vocabulary on a small body: the output head and the loss dominate, which is
    # where llama_min's chunked head + loss (llama_min/chunked_loss.py) never builds the full logits
    "128k-vocab": (ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=128256, max_seq_len=512), 4, 512),
}


def peak_memory_of_a_step(args, shape: str, dtype_name: str, contender: str) -> float:
    """MB by which the resident set grows at its peak over two steps (the first makes the optimiser's
    state) of one model, measured in a fresh process so that each model's peak is its own. (Not a forked
    child: one forked after OpenMP's threads have run can hang at its first parallel region.)"""
    command = [sys.executable, __file__, "--memory_of", contender, "--shapes", shape, "--dtypes", dtype_name,
               "--batch", str(args.batch), "--seq_len", str(args.seq_len), "--threads", str(args.threads)]
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])


def memory_of_one_model(args) -> None:
    """The child of peak_memory_of_a_step: build one model, take two steps, print the growth in MB."""
    config, batches = shape_and_batches(args.shapes[0], args)
    torch.manual_seed(0)
    model = Llama(config) if args.memory_of == "llama_min" else hf_model(config)
    step = make_step(model, args.memory_of == "transformers", DTYPES[args.dtypes[0]])
    start = memory_status_mb("VmRSS")
    for x, y in batches:
        step(x, y)
    print(memory_status_mb("VmHWM") - start)


def memory_status_mb(field: str) -> float:
    """A field of /proc/self/status in MB: VmRSS, the resident set now; VmHWM, its peak in this process.
    (Not getrusage's ru_maxrss, which a child started by subprocess inherits from its parent's peak.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def hf_model(config: ModelConfig):
    """Hugging Face's LlamaForCausalLM with the same shape, or None when transformers is missing."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hf_config = LlamaConfig(hidden_size=config.dim, intermediate_size=config.hidden_dim,
                            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                            num_key_value_heads=config.n_kv_heads, vocab_size=config.vocab_size,
                            max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
                            rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
                            attn_implementation="sdpa")
    return LlamaForCausalLM(hf_config)


DTYPES = {"float32": None, "bf16": torch.bfloat16}  # the --dtypes choices: the autocast dtype of each


def shape_and_batches(name: str, args) -> tuple[ModelConfig, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The shape's config and two batches (inputs, targets) of random tokens, the same in every process."""
    config, batch, seq_len = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, config.vocab_size, (args.batch or batch, (args.seq_len or seq_len) + 1), generator=g)
            for _ in range(2)]
    return config, [(r[:, :-1], r[:, 1:]) for r in rows]


def make_step(model: torch.nn.Module, hf: bool, autocast_dtype: torch.dtype | None):
    """One train.py step for this model: returns a function of (x, y)."""
    cfg = TrainConfig()
    rt = Runtime(torch.device("cpu"), autocast_dtype=autocast_dtype)
    optimizer = make_optimizer(model, cfg, rt)

    def ours(x, y):
        with rt.autocast():
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def theirs(x, y):  # the loss computed as Llama.forward computes it, on the same targets
        with rt.autocast():
            logits = model(input_ids=x).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return theirs if hf else ours


def fastest_step(step, batches, steps: int, clock=time.perf_counter) -> float:
    best = float("inf")
    for i in range(steps):
        x, y = batches[i % len(batches)]
        t = clock()
        step(x, y)
        best = min(best, clock() - t)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "15M"], choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=0, help="override the shape's batch size (0: the shape's)")
    parser.add_argument("--seq_len", type=int, default=0, help="override the shape's sequence length (0: the shape's)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--memory", action="store_true", help="also the peak memory of each model's step")
    parser.add_argument("--memory_of", choices=["llama_min", "transformers"], help=argparse.SUPPRESS)  # --memory's child
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and Hugging Face")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time, which is what a quiet machine's "
                             "wall clock shows (with --threads 1, when other jobs share the machine); the matmul peak is "
                             "still timed by the wall clock, so under load it reads low and a step can beat it: MFU "
                             "is then against that step's figure (compare the ratio)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        return memory_of_one_model(args)
    peak = peak_flops(TrainConfig(), Runtime(torch.device("cpu")))
    peak_bf16 = peak_flops(TrainConfig(), Runtime(torch.device("cpu"), autocast_dtype=torch.bfloat16))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; measured matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s float32, {peak_bf16 / 1e9:.1f} GFLOP/s bfloat16")
    for name in args.shapes:
        config, batches = shape_and_batches(name, args)
        batch, seq_len = batches[0][0].shape
        tokens = batch * seq_len
        flops = flops_per_token(Llama(config), seq_len) * tokens
        torch.manual_seed(0)
        ours_model = Llama(config)
        theirs_model = hf_model(config)
        n_params = sum(p.numel() for p in ours_model.parameters())
        print(f"\n{name}: {n_params / 1e6:.1f}M parameters, dim {config.dim}, {config.n_layers} layers, "
              f"vocab {config.vocab_size}, batch {batch} x seq {seq_len}")
        for key in args.dtypes:
            dtype = DTYPES[key]
            dtype_name, dtype_peak = ("float32", peak) if dtype is None else ("bf16 autocast", peak_bf16)
            contenders = {"llama_min": make_step(ours_model, False, dtype)}
            if theirs_model is not None:
                contenders["transformers"] = make_step(theirs_model, True, dtype)
            best = {k: float("inf") for k in contenders}
            for k, step in contenders.items():
                fastest_step(step, batches, 1, clock)  # warm-up: allocator, optimizer state
            for _ in range(args.rounds):
                for k, step in contenders.items():
                    best[k] = min(best[k], fastest_step(step, batches, args.steps, clock))
            fastest = flops / min(best.values())
            if fastest > dtype_peak:  # the start-up matmuls were slowed by other work (or --clock cpu): as train.py
                print(f"  (the measured peak {dtype_peak / 1e9:.1f} GFLOP/s was below a step's {fastest / 1e9:.1f}; "
                      "MFU is against the step's figure)")
                dtype_peak = fastest
            for k, t in best.items():
                print(f"  {dtype_name:14s} {k:13s} {tokens / t:9,.0f} tok/s   MFU {100 * flops / t / dtype_peak:5.1f}%"
                      f"   ({1000 * t:.0f} ms/step)")
            if "transformers" in best:
                print(f"  {dtype_name:14s} ratio llama_min / transformers: {best['transformers'] / best['llama_min']:.2f}x")
            if args.memory:
                grown = {k: peak_memory_of_a_step(args, name, key, k) for k in contenders}
                print(f"  {dtype_name:14s} peak memory added by a step: " + ", ".join(f"{k} {mb:,.0f} MB" for k, mb in grown.items())
                      + (f"; ratio {grown['llama_min'] / grown['transformers']:.2f}" if "transformers" in grown else ""))
        if theirs_model is None:
            print("  (transformers is not installed: pip install transformers to compare)")


if __name__ == "__main__":
    main()
