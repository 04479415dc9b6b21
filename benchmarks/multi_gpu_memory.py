"""Per-GPU memory of fine-tuning llama-7b on 1, 2, 4 and 8 GPUs: DDP against --fsdp; full fine-tuning
against LoRA and LLaMA-Adapter; without and with --activation_checkpointing. On paper, for train.py's
CUDA path (bfloat16 autocast, AdamW), from the model's own counts:

    parameters   counted on the model itself (built on the meta device, the method applied): P in all,
                 T trainable; the frozen matrices of a PEFT method are held in bfloat16
                 (hold_frozen_in_autocast_dtype), everything else in float32
    weights      DDP: what is held, whole on every GPU, plus for full fine-tuning autocast's bfloat16
                 copy of every matrix, kept from forward to backward (2 bytes x P);
                 FSDP: 1/N of what is held, plus the bfloat16 weights gathered for the computation: two
                 blocks (the one computing and the one prefetched) and the embedding and head
    grads        float32, trainable tensors only: 4 x T (FSDP: / N)
    AdamW        two float32 moments: 8 x T (FSDP: / N)
    activations  measured, not modelled: a 1- and a 2-block model of the real width run forward on the
                 CPU under bfloat16 autocast at two sequence lengths, bytes saved for backward counted by a
                 hook; the differences give bytes per token per block and per token outside the blocks
                 (embedding, final norm, head and loss). With checkpointing a block keeps only its float32
                 input (4 x dim bytes a token) plus, during its backward, one block's activations.

Not counted: the CUDA context and allocator slack (~1-2 GB), communication buffers, and temporary
tensors inside one operation. A figure to choose a configuration with, not a promise.

    python benchmarks/multi_gpu_memory.py [--model llama-7b --batch 1 --seq_len 2048]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from llama_min import Llama, ModelConfig
from llama_min.peft import PeftConfig, apply_peft
from llama_min.training.distributed import checkpoint_activations

METHODS = {"full": None, "lora": PeftConfig(method="lora", lora_rank=8, lora_targets=("wq", "wv")),
           "adapter": PeftConfig(method="adapter", adapter_len=10, adapter_layers=30)}
GPUS = (1, 2, 4, 8)
GB = 1e9


def build(config: ModelConfig, method: str, device: str) -> Llama:
    with torch.device(device):
        model = Llama(config)
    if METHODS[method] is not None:
        peft = METHODS[method]
        if peft.method == "adapter":
            peft = replace(peft, adapter_layers=min(peft.adapter_layers, config.n_layers))
        apply_peft(model, peft)
    return model


def weight_bytes(model: Llama) -> tuple[int, int, int]:
    """(bytes held, bytes of autocast copies kept for backward, trainable parameters) for train.py on CUDA."""
    held = copies = trainable = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
        frozen_matrix = not p.requires_grad and p.dim() == 2 and name != "tok_embeddings.weight"
        held += p.numel() * (2 if frozen_matrix else 4)
        copies += p.numel() * 2 if p.requires_grad and p.dim() == 2 else 0
    return held, copies, trainable


def saved_bytes(config: ModelConfig, method: str, n_layers: int, seq_len: int, recompute: bool) -> int:
    """Bytes autograd keeps for backward in one forward of (1, seq_len) tokens under bfloat16 autocast."""
    model = build(replace(config, n_layers=n_layers), method, "meta").to_empty(device="cpu").train()
    for p in model.parameters():  # what is saved does not depend on the values: skip the random init
        p.data.fill_(0.01)
    if recompute:
        checkpoint_activations(model)
    storages: dict[int, torch.UntypedStorage] = {}  # held until the end, so that no address is reused
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> None:  # (nothing kept in the graph: there is no backward)
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage()

    tokens = torch.randint(0, config.vocab_size, (1, seq_len + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None), torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens[:, :-1], tokens[:, 1:])
    return sum(s.nbytes() for s in storages.values())


def activation_bytes_per_token(config: ModelConfig, method: str) -> tuple[float, float]:
    """(bytes per token per block, bytes per token outside the blocks), from four small forwards. Terms that do
    not grow with the tokens (autocast's weight copies) cancel in the differences."""
    short, long = 16, 32
    s = {(n, t): saved_bytes(config, method, n, t, recompute=False) for n in (1, 2) for t in (short, long)}
    per_block = ((s[2, long] - s[1, long]) - (s[2, short] - s[1, short])) / (long - short)
    outside = (s[1, long] - s[1, short]) / (long - short) - per_block
    return per_block, outside


def table(config: ModelConfig, batch: int, seq_len: int) -> list[dict]:
    rows = []
    tokens = batch * seq_len
    for method in METHODS:
        model = build(config, method, "meta")
        held, copies, trainable = weight_bytes(model)
        n_params = sum(p.numel() for p in model.parameters())
        block = sum(p.numel() for p in model.layers[0].parameters())
        root = n_params - block * config.n_layers
        per_block, outside = activation_bytes_per_token(config, method)
        plain = tokens * (per_block * config.n_layers + outside)
        recomputed = tokens * (4 * config.dim * config.n_layers + per_block + outside)
        for n in GPUS:
            for mode in ("DDP", "FSDP"):
                shard = n if mode == "FSDP" else 1
                weights = held / shard + (2 * (2 * block + root) if mode == "FSDP" else copies)
                rows.append({"method": method, "gpus": n, "mode": mode, "params": n_params, "trainable": trainable,
                             "weights": weights, "grads": 4 * trainable / shard, "adamw": 8 * trainable / shard,
                             "activations": plain, "activations_ac": recomputed})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-7b")
    parser.add_argument("--batch", type=int, default=1, help="sequences per GPU per micro-batch")
    parser.add_argument("--seq_len", type=int, default=2048)
    args = parser.parse_args()
    config = ModelConfig.from_preset(args.model)
    rows = table(config, args.batch, args.seq_len)
    print(f"{args.model}: per-GPU memory in GB (1e9 bytes), batch {args.batch} x {args.seq_len} tokens per GPU, "
          "bfloat16 autocast, AdamW")
    print("| method | GPUs | mode | weights | grads | AdamW | activations | total | with --activation_checkpointing |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        states = r["weights"] + r["grads"] + r["adamw"]
        print(f"| {r['method']} ({r['trainable'] / 1e6:,.1f}M of {r['params'] / 1e9:.2f}B trainable) | {r['gpus']} | "
              f"{r['mode']} | {r['weights'] / GB:.1f} | {r['grads'] / GB:.1f} | {r['adamw'] / GB:.1f} | "
              f"{r['activations'] / GB:.1f} | {(states + r['activations']) / GB:.1f} | "
              f"{(states + r['activations_ac']) / GB:.1f} |")


if __name__ == "__main__":
    main()
