"""Training memory of full fine-tuning versus LLaMA-Adapter, LoRA and bottleneck adapters, each with and
without activation checkpointing (train.py --activation_checkpointing).

The model has the 135M shape of benchmarks/decode.py (dim 576, 30 layers, 9/3 heads, vocabulary 49152,
tied embeddings), random weights, float32. Each method runs in a fresh process (so the process peak is
its own): build, apply the method, recompute the blocks in backward or not, then a few AdamW steps on
a (batch, seq_len) batch. Reported:

    trainable    parameters the optimiser receives
    saved        bytes autograd kept for the backward pass (distinct storages, counted by a
                 saved-tensors hook): the activations, which frozen lower layers do not add to;
                 with checkpointing, what the recomputed blocks keep is not counted (their inputs)
    grads+adam   bytes of gradients and AdamW state: 3 x trainable x 4 bytes
    peak         the process's peak resident memory (CPU: VmHWM, via llama_min.cli.peak_rss_mb) or
                 torch.cuda.max_memory_allocated (CUDA), weights included
    of full      peak as a share of full fine-tuning's without checkpointing
    step         median seconds per optimiser step (meaningful as a ratio on a quiet machine only)

    python benchmarks/peft_memory.py [--batch 4 --seq_len 256 --steps 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for weights_convert
from decode import SMALL_LLAMA  # benchmarks/ is the script's directory
from llama_min import Llama
from llama_min.cli import peak_rss_mb
from llama_min.peft import PeftConfig, apply_peft
from llama_min.training.distributed import checkpoint_activations

METHODS = {
    "full": None,
    "adapter": PeftConfig(method="adapter", adapter_len=10, adapter_layers=28),
    "lora": PeftConfig(method="lora", lora_rank=8, lora_targets=("wq", "wv")),
    "bottleneck": PeftConfig(method="bottleneck", bottleneck_dim=32),
}


def measure(method: str, recompute: bool, batch: int, seq_len: int, steps: int, device: str) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(SMALL_LLAMA)
    if METHODS[method] is not None:
        apply_peft(model, METHODS[method])
    if recompute:
        checkpoint_activations(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    tokens = torch.randint(0, SMALL_LLAMA.vocab_size, (batch, seq_len + 1), device=device)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    times = []
    for step in range(steps):
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        saved = sum(storages.values())
        storages.clear()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    n_trainable = sum(p.numel() for p in trainable)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mb()
    return {"method": method, "recompute": recompute, "trainable": n_trainable, "saved_MB": saved / 2**20,
            "grads_adam_MB": 3 * 4 * n_trainable / 2**20, "peak_MB": peak_mb,
            "step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    # At least 2: AdamW allocates its state in the first step, so only later steps carry it through the
    # forward and backward pass, which is where full fine-tuning's peak is.
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--one", choices=list(METHODS), help=argparse.SUPPRESS)  # run one method in this process
    parser.add_argument("--recompute", action="store_true", help=argparse.SUPPRESS)  # ... with checkpointing
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.recompute, args.batch, args.seq_len, args.steps, args.device)))
        return
    print(f"135M-shape model, float32, {args.device}, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.steps} steps per method")
    print(f"{'method':<11} {'recompute':>9} {'trainable':>12} {'saved MB':>9} {'grads+adam MB':>14} {'peak MB':>8} "
          f"{'of full':>8} {'step s':>7}")
    full_peak = None
    for method in dict.fromkeys(["full", *args.methods]):  # full without checkpointing first: the reference
        for recompute in (False, True):
            out = subprocess.run([sys.executable, __file__, "--one", method, "--batch", str(args.batch),
                                  "--seq_len", str(args.seq_len), "--steps", str(args.steps), "--device", args.device,
                                  *(["--recompute"] if recompute else [])],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            full_peak = full_peak or r["peak_MB"]
            print(f"{r['method']:<11} {'yes' if recompute else 'no':>9} {r['trainable']:>12,} {r['saved_MB']:>9.0f} "
                  f"{r['grads_adam_MB']:>14.1f} {r['peak_MB']:>8.0f} {r['peak_MB'] / full_peak:>8.0%} "
                  f"{r['step_s']:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
