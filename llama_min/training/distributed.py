"""Training on several processes, and fitting a larger model in memory: what the loop calls for
torchrun, ``--fsdp`` and ``--activation_checkpointing`` (docs/multi_gpu.md says what each costs and saves).

    DDP (torchrun, default)     every process holds the whole model, its gradients and the optimiser
                                state; after backward the gradients are averaged (all-reduce).
    --fsdp (FSDP2)              each process holds 1/N of every parameter, gradient and AdamW moment
                                (ZeRO stage 3: Rajbhandari et al. 2020; Zhao et al. 2023, "PyTorch FSDP").
                                A block's parameters are all-gathered just before its forward and its
                                backward and freed after; its gradients are reduce-scattered to the owners.
    --activation_checkpointing  each block keeps only its input for backward and runs its forward again
                                there (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"):
                                activations of one block at a time instead of all n_layers, for ~1/3 more
                                compute.

Gradient accumulation reduces across processes only at the step's last micro-batch (``gradient_sync``),
under DDP and FSDP alike. Each process draws its own dropout and noise (``seed_process``).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..model import Llama
from .runtime import Runtime


def seed_process(seed: int, rt: Runtime) -> None:
    """Seed this process's generators from the run's seed and its rank, once the weights and the new
    PEFT tensors (the same on every rank) are made. Under torchrun every rank would otherwise draw the
    same dropout masks and NEFTune noise, so N processes would see correlated noise instead of N
    independent draws. One process keeps the stream it has (its runs stay what they were)."""
    if rt.world_size > 1:
        # SeedSequence mixes the pair into well-separated seeds: (seed, rank) never meets (seed + 1, rank - 1).
        torch.manual_seed(int(np.random.SeedSequence([seed, rt.rank]).generate_state(1)[0]))


def checkpoint_activations(model: Llama) -> None:
    """--activation_checkpointing: every block saves only its input for backward and recomputes its
    forward there (non-reentrant: any inputs, any autograd, the random state replayed so dropout draws
    the same masks). The hooks leave parameter names and the state dict as they are."""
    for block in model.layers:
        checkpoint(block)


def shard_model(model: Llama, rt: Runtime) -> None:
    """--fsdp: shard every block, then the rest (embedding, final norm, head) with FSDP2's ``fully_shard``,
    in place; parameters become DTensors holding this process's 1/N. Call before the optimiser is made
    (it must see the sharded parameters). On CUDA the blocks compute in bfloat16 (parameters gathered in
    it) while the gradients are reduced and the weights and AdamW kept in float32; on the CPU (gloo)
    everything is float32."""
    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    policy = MixedPrecisionPolicy()
    if rt.device.type == "cuda" and rt.autocast_dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:  # one all-gather per block: only one block's full weights alive at a time
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def replicate(trained: nn.Module, rt: Runtime) -> nn.Module:
    """Under torchrun without --fsdp: DistributedDataParallel (whole model on every process)."""
    return DistributedDataParallel(trained, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def gradient_sync(model: nn.Module, trained: nn.Module, sync: bool):
    """A context for one micro-batch's backward: reduce gradients across processes (``sync``) or only
    accumulate them locally, as DDP's no_sync does; FSDP's switch lives on the sharded model itself."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    if isinstance(trained, DistributedDataParallel) and not sync:
        return trained.no_sync()
    return nullcontext()


@contextmanager
def unsharded(model: nn.Module):
    """For the block, every process holds the whole model (in the dtype it computes in) and runs forward
    passes alone, as many as it likes: held-out evaluation (each process its own share of windows) and
    rank 0's samples. Sharded again afterwards. Nothing happens for a model that is not sharded."""
    if not isinstance(model, FSDPModule):
        yield
        return
    blocks = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for block in blocks:  # (the root never reshards after its forward: FSDP gathers it again for backward)
        block.set_reshard_after_forward(False, recurse=False)
    for m in (model, *blocks):
        m.unshard()  # (a collective: every process enters the block)
    try:
        yield
    finally:
        for m in (model, *blocks):
            m.reshard()
        for block in blocks:
            block.set_reshard_after_forward(True, recurse=False)


def gather_tensors(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of the sharded model (or only the trainable ones), whole, on rank 0's CPU (an empty
    dict on the other ranks; a collective)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def gather_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's state, whole, on rank 0's CPU (empty on the other ranks; a collective), keyed by
    parameter name, so that it loads into any number of processes (``load_optimizer``)."""
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (checked by the caller: some or all of the model's) into the model's own, in
    place, so an optimiser holding them keeps them; a sharded model takes each process's 1/N of each."""
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Put ``gather_optimizer``'s optimiser state (every rank read it) into this process's shards."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
