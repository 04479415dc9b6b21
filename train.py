"""Train a LLaMA: pretraining or fine-tuning, one loop, top to bottom.

    python train.py                                     # the tiny model on the shipped Shakespeare, CPU, ~5 min
    python train.py --device cuda --dim 512 --n_layers 8 --max_steps 5000
    torchrun --nproc_per_node=4 train.py ...           # DistributedDataParallel, one process per GPU
    torchrun --nproc_per_node=8 train.py --fsdp --activation_checkpointing ...   # too big for one GPU
    python train.py --resume                            # continue out/ckpt exactly where it stopped
    python train.py --init_from runs/base/ckpt --method lora --data alpaca.jsonl   # fine-tune: OUT/peft
    python train.py --init_from runs/base/ckpt --method full --data alpaca.jsonl --l2sp 0.1 --weight_decay 0 \\
        --perturb 0.5 --dev_every 25 --patience 4     # robust options; the best dev model kept in OUT/best
    python train.py --init_from runs/base/ckpt --method adapter --image_root world --data world/train.json
                                                        # multimodal LLaMA-Adapter (docs/multimodal.md)

``train`` reads in three parts: the setup (where it runs, the model and its data, what trains, the
optimiser, the state it resumes), the loop (one optimiser step per iteration, then logging, evaluation
and checkpoints), and the end (samples, --merge). What it calls lives in ``llama_min/training/``, each
piece under a name that says what it does; the flags are the fields of ``TrainConfig``
(``llama_min/training/config.py``), listed by topic in ``python train.py --help``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from llama_min import IGNORE_INDEX, Llama, generate
from llama_min.cli import UsageError
from llama_min.finetune.neftune import add_embedding_noise
from llama_min.peft import merge_lora, peft_stats
from llama_min.training.data import Data, batch_images, count_targets, get_batch, make_sampler, prepare_data
from llama_min.training.config import TrainConfig, check_config, parse_args
from llama_min.training.distributed import (checkpoint_activations, gradient_sync, replicate, seed_process,
                                            shard_model, unsharded)
from llama_min.training.evaluate import evaluate
from llama_min.training.optim import get_lr, make_optimizer, set_lr
from llama_min.training.progress import Progress, TrainingDiverged
from llama_min.training.out_dir import check_out_dir, out_dir_lock
from llama_min.training.robust import DevSelection, make_l2sp
from llama_min.training.runtime import StopRequest, setup_runtime
from llama_min.training.state import (RunCheckpoints, checkpoint_dir, restore_run, resumed_config, save_model,
                                      whole_model)
from llama_min.training.trainable import build_model, choose_trainable, hold_frozen_in_autocast_dtype

REPO = Path(__file__).resolve().parent


def train(cfg: TrainConfig) -> signal.Signals | None:
    """Run the training cfg describes; returns the signal that stopped it early, if one did."""
    # ---- setup ----------------------------------------------------------------------------------------
    check_config(cfg)
    torch.manual_seed(cfg.seed)  # torch seeds itself at random: one --seed makes every run repeatable
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rt = setup_runtime(cfg.device, cfg.dtype)  # device, autocast dtype, the process group under torchrun
    ckpt_dir = checkpoint_dir(cfg)  # OUT_DIR/ckpt, or OUT_DIR/peft (the adapter only) for a PEFT method
    check_out_dir(cfg, ckpt_dir)  # not over another run (unless --overwrite), nor over its own base
    model, tokenizer_path = build_model(cfg, rt)  # --init_from's weights, or random ones
    if cfg.seq_len > model.config.max_seq_len:
        raise UsageError(f"--seq_len {cfg.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}; "
                         f"lower --seq_len or raise --max_seq_len")
    data = prepare_data(cfg, rt, model.config.vocab_size, tokenizer_path)
    if data.tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(f"the tokenizer has {data.tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}; pass --vocab_size {data.tokenizer.vocab_size}")
    rt.say(choose_trainable(model, cfg, data.image_encoder))
    seed_process(cfg.seed, rt)  # under torchrun each process its own dropout and noise
    if not cfg.trains_base:
        hold_frozen_in_autocast_dtype(model, rt)  # GPU memory: the frozen base in bf16, not float32 + copies
    if cfg.embed_noise:  # NEFTune: noisy input embeddings, in training mode only
        add_embedding_noise(model, cfg.embed_noise)
    if cfg.activation_checkpointing:
        checkpoint_activations(model)  # each block recomputed in backward: one block's activations held, not all
    if cfg.fsdp:
        shard_model(model, rt)  # FSDP2: each process holds 1/N of every parameter, gradient and AdamW moment
    l2sp = make_l2sp(model, cfg)  # anchored at the weights as they are now (the --init_from base), sharded like them
    optimizer = make_optimizer(model, cfg, rt)
    sampler = make_sampler(data, cfg)
    progress = Progress(cfg, rt, model)
    dev = DevSelection(cfg, rt, data, model, progress)  # --dev_every: keep the best, stop early
    checkpoints = RunCheckpoints(cfg, rt, model, data, optimizer, sampler, dev)
    step, best_val_loss = 0, float("inf")
    if cfg.resume:  # put back what the run had reached: weights, optimiser, data order, generators, dev scores
        step, best_val_loss = restore_run(ckpt_dir, model, optimizer, sampler, dev, rt, cfg)
        progress.forget_after(step)  # the steps after the checkpoint run again, and are logged again
        checkpoints.saved_step = step
    # `model` stays the plain module, for evaluation, samples and checkpoints; `trained` is what steps.
    trained = torch.compile(model) if cfg.compile else model
    if rt.world_size > 1 and not cfg.fsdp:
        trained = replicate(trained, rt)  # DDP: a whole copy on every process, gradients averaged
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_grad_scaler)
    describe(cfg, rt, model, data, progress)

    # ---- the loop -------------------------------------------------------------------------------------
    val_loss = val_bpb = val_step = stopped_by = None
    model.train()
    with StopRequest(rt) as stop:
        while step < cfg.max_steps and not dev.should_stop:
            lr = set_lr(optimizer, get_lr(step, cfg))
            batches = [get_batch(data, sampler, cfg, rt) for _ in range(cfg.grad_accum)]
            n_targets = count_targets(batches, rt)  # the step's loss is the mean over all its target tokens
            loss_sum = torch.zeros((), device=rt.device)
            for i, (x, y, images) in enumerate(batches):  # images: (B, C_v) features, or None for text
                # DDP and FSDP average gradients across processes at each backward: only at the last micro-batch.
                with gradient_sync(model, trained, sync=i == len(batches) - 1), rt.autocast():
                    share = ((y != IGNORE_INDEX).sum() / n_targets).float()  # of the step's targets
                    loss = trained(x, y, images=images)[1] * share  # [1]: the logits are not kept through backward
                scaler.scale(loss * rt.world_size).backward()  # (the average divides by world_size again)
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            if l2sp is not None:
                l2sp.add_to_gradients()  # L2-SP: + 2λ(θ − θ₀), once per step; the logged loss stays the task's
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            loss = rt.all_sum(loss_sum)  # the global batch's mean loss, the same on every process
            if not math.isfinite(loss):
                raise TrainingDiverged(f"the training loss is {loss} at step {step}; stopping. "
                                       f"{checkpoints.last_good()}")
            progress.step(step, loss, lr, tokens=sum(x.numel() for x, *_ in batches) * rt.world_size,
                          stats=None if cfg.trains_base else lambda: peft_stats(model))
            dev.maybe_evaluate(step)  # before the checkpoint below, which saves its progress
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                with progress.periodic_work("eval", cfg.eval_every):
                    val_loss, val_bpb = evaluate(model, data, cfg, rt)
                    val_step = step
                    rt.say(f"step {step}: held-out loss {val_loss:.4f}" + (f", {val_bpb:.4f} bits per byte" if val_bpb else ""))
                    progress.record(step=step, val_loss=val_loss, val_bpb=val_bpb)
                    if not math.isfinite(val_loss):
                        raise TrainingDiverged(f"the held-out loss is {val_loss} at step {step}; not saved. "
                                               f"{checkpoints.last_good()}")
                    best_val_loss = min(best_val_loss, val_loss)
                    checkpoints.save(step, best_val_loss)
                    if step < cfg.max_steps:
                        progress.plot()
            stopped_by = stop.agreed()  # SIGINT / SIGTERM on any process
            if (stopped_by or dev.should_stop) and step < cfg.max_steps:
                checkpoints.save(step, best_val_loss)
                rt.say(f"{stopped_by.name} at step {step}: checkpoint saved to {ckpt_dir}; continue with --resume"
                       if stopped_by else f"early stopping at step {step}: {cfg.patience} dev evaluations without "
                       f"improvement; checkpoint saved to {ckpt_dir}, best model in {dev.best_dir}")
                break

    # ---- the end --------------------------------------------------------------------------------------
    drawn = progress.plot()  # "loss curve: OUT_DIR/loss.png", or why there is none
    if drawn:
        rt.say(drawn)
    model.eval()  # no training-only noise (NEFTune, LoRA dropout) in what follows
    if stopped_by is None and cfg.sample_tokens > 0:
        with rt.autocast(), unsharded(model):  # --fsdp: every process holds the whole model meanwhile
            if rt.master:
                print_samples(model, data, cfg)
    if stopped_by is None and cfg.merge:
        dev.load_best()  # with --dev_every, the run's result is the chosen model
        whole = whole_model(model, cfg, data.image_encoder)  # --fsdp: gathered to rank 0 (every process calls it)
        if rt.master:
            merge_lora(whole)  # W + (alpha/r)·B·A: a plain full checkpoint, loaded with no --peft
            save_model(Path(cfg.out_dir) / "merged", whole, data.tokenizer, data.is_instructions)
            rt.say(f"merged LoRA into the weights: full checkpoint {Path(cfg.out_dir) / 'merged'}")
    if stopped_by is None:
        dev.finish()
    held_out = ("no held-out evaluation" if val_loss is None else f"held-out loss {val_loss:.4f}"
                + (f", {val_bpb:.4f} bits per byte" if val_bpb is not None else "") + f" (at step {val_step})")
    rt.say(f"done in {progress.elapsed():.0f}s: step {step}, {held_out}; checkpoint {ckpt_dir}{rt.memory_note()}")
    if rt.world_size > 1:
        dist.barrier()  # rank 0's last writes done: every process leaves together
    return stopped_by


def describe(cfg: TrainConfig, rt, model: Llama, data: Data, progress: Progress) -> None:
    """The run in two lines: what trains on what, where, and the peak MFU is measured against."""
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mc = model.config
    changed = "".join(f" --{k} {v}" for k, v in cfg.model_overrides.items())
    rt.say(f"model: {cfg.init_from or cfg.model + changed}, {n_params / 1e6:.2f}M parameters ({n_trainable / 1e6:.2f}M "
           f"trainable), dim {mc.dim}, {mc.n_layers} layers, vocab {mc.vocab_size}")
    unit = "instruction records" if data.is_instructions else "tokens"
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * rt.world_size  # instructions: at most
    rt.say(f"data: {len(data.train):,} training {unit}, {len(data.val):,} held-out {unit}; "
           f"{'up to ' if data.is_instructions else ''}{tokens_per_step:,} tokens per step on {rt.world_size} x "
           f"{rt.device}{', sharded (FSDP)' if cfg.fsdp else ''} "
           f"({str(rt.autocast_dtype or torch.float32).removeprefix('torch.')}); "
           f"MFU against {progress.peak / 1e9:.1f} GFLOP/s")


def print_samples(model: Llama, data: Data, cfg: TrainConfig) -> None:
    """A greedy and a temperature-0.8 continuation of --sample_prompt, or for instruction data of the
    first held-out record's prompt (with its image, for image-instruction data)."""
    prompt, images = data.tokenizer.encode(cfg.sample_prompt, bos=True), None
    if data.is_instructions and not cfg.sample_prompt:
        tokens, targets = data.val[0][:2]
        prompt = tokens[:next(i for i, t in enumerate(targets) if t != IGNORE_INDEX) + 1]
        images = batch_images(data.image_features, data.val, [0])
    for temperature in (0.0, 0.8):
        new = generate(model, [prompt], cfg.sample_tokens, temperature=temperature,
                       stop_ids=[data.tokenizer.eos_id], seed=cfg.seed, truncate=True, bos_id=data.tokenizer.bos_id,
                       images=images)[0]
        print(f"--- sample ({'greedy' if temperature == 0 else f'temperature {temperature}'}) ---\n"
              f"{data.tokenizer.decode(prompt)}{data.tokenizer.decode(new)}")


def main(argv: list[str] | None = None) -> None:
    cfg, given = parse_args(argv, description=__doc__.split("\n\n")[0])
    # The shipped corpus and its cache live beside this script, wherever it is run from.
    cfg = replace(cfg, data=cfg.data or str(REPO / "data" / "shakespeare"),
                  cache_dir=cfg.cache_dir or str(REPO / "data" / "cache"))
    try:
        with out_dir_lock(cfg.out_dir, master=int(os.environ.get("RANK", 0)) == 0):  # one train.py per OUT_DIR
            stopped_by = train(resumed_config(cfg, given) if cfg.resume else cfg)
    except (UsageError, ValueError, OSError, TrainingDiverged) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if stopped_by:  # saved, and ended by a signal: the exit status a shell or scheduler expects, 130 or 143
        raise SystemExit(128 + stopped_by.value)


if __name__ == "__main__":
    main()
