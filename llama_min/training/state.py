"""Checkpoints of a training run and resuming from them.

    OUT_DIR/ckpt/   a full checkpoint (full, partial): config.json, model.safetensors, tokenizer, train_state.pt
    OUT_DIR/peft/   a PEFT run: only the adapter (peft.safetensors, peft.json) and train_state.pt
    OUT_DIR/best/   --dev_every: the model with the best dev score, for use (no training state)
    OUT_DIR/merged/ --merge: the LoRA folded into the weights, a plain full checkpoint

train_state.pt holds what ``--resume`` needs besides the weights: the step, the optimiser, the data
sampler, the random generators (each process its own), the early-stopping progress, the run's own
settings and a fingerprint of the data files (size and sha256: a resumed run says when they changed, and
continues). It is read with ``torch.load(weights_only=True)``: plain containers and tensors only, no code.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from ..checkpoint import (STATE_FILE, check_state_dict, read_checkpoint, replace_directory, resolve_checkpoint_dir,
                          stored_state_dict, tokenizer_file, write_model_files)
from ..cli import UsageError, one_line
from ..config import ModelConfig
from ..finetune.templates import record_template
from ..model import Llama
from ..peft import PeftConfig, apply_peft, save_peft
from ..peft.save_load import read_peft_weights
from ..tokenizer import Tokenizer
from .config import TrainConfig, peft_config
from .corpus import data_changes, data_fingerprint
from .data import WindowSampler
from .distributed import FSDPModule, gather_optimizer, gather_tensors, load_optimizer, load_weights
from .progress import TrainingDiverged
from .runtime import Runtime
from .trainable import refuse_quantized

def checkpoint_dir(cfg: TrainConfig) -> Path:
    """OUT_DIR/ckpt (a full checkpoint: full, partial) or, for a PEFT method, OUT_DIR/peft (the adapter only)."""
    return Path(cfg.out_dir) / ("ckpt" if cfg.trains_base else "peft")


def rng_states(device: torch.device) -> dict:
    """The generators the loop draws from on this process (dropout, NEFTune's noise): torch's CPU
    generator and this process's GPU's, not every GPU's. The data order has its own (WindowSampler)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def all_rng_states(rt: Runtime) -> list[dict]:
    """Each process's rng_states, in rank order (a collective under torchrun: every rank calls it). Each
    state is a uint8 tensor of the same size on every process, gathered as it is."""
    mine = rng_states(rt.device)
    if rt.world_size == 1:
        return [mine]
    device = rt.device if rt.device.type == "cuda" else torch.device("cpu")  # NCCL moves GPU tensors only
    gathered = {}
    for name, state in mine.items():
        gathered[name] = [torch.empty_like(state, device=device) for _ in range(rt.world_size)]
        dist.all_gather(gathered[name], state.to(device))
    return [{name: states[rank].cpu() for name, states in gathered.items()} for rank in range(rt.world_size)]


def set_rng_states(saved: list[dict] | dict, rt: Runtime) -> str | None:
    """Restore this process's generators from what all_rng_states saved; a note when that is not
    possible (a run resumed with another number of processes draws afresh, each from its own seed).
    (Older checkpoints also hold numpy's and Python's generators, which the loop never draws from.)"""
    saved = [saved] if isinstance(saved, dict) else saved  # train_state.pt of one process
    if len(saved) != rt.world_size:
        return (f"the random generators of {len(saved)} process(es) cannot continue in {rt.world_size}: dropout, "
                "noise and sampling draw afresh from --seed")
    torch.set_rng_state(saved[rt.rank]["torch"])
    if "cuda" in saved[rt.rank] and rt.device.type == "cuda":
        torch.cuda.set_rng_state(saved[rt.rank]["cuda"], rt.device)
    return None


def save_model(directory: Path, model: Llama, tokenizer: Tokenizer, instructions: bool, adapter_base: str | None = None,
               tensors: dict | None = None, train_state: dict | None = None) -> None:
    """Write a model directory, replacing DIR atomically (checkpoint.replace_directory: an interruption at
    any instant leaves the previous directory or the new one, never a mix): the core format, or with
    ``adapter_base`` only the adapter (peft.safetensors + peft.json naming that base checkpoint). A model
    tuned on instruction data records the Alpaca template, which generate.py then uses; ``train_state``
    becomes train_state.pt. ``tensors``: the whole tensors of a model sharded with --fsdp (saved_tensors).
    A full disk or a read-only directory is one error, with the previous directory untouched."""
    try:
        with replace_directory(directory) as tmp:
            if adapter_base is None:
                write_model_files(model if tensors is None else holding(model.config, tensors), tmp, tokenizer.path)
            else:
                save_peft(model, tmp, base_checkpoint=adapter_base, tensors=tensors)  # (atomic on its own, inside ours)
            if instructions:
                record_template(tmp, "alpaca")
            if train_state is not None:
                torch.save(train_state, tmp / STATE_FILE)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors wrap a failed write in their own
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "a write failed"
        raise UsageError(f"could not write the checkpoint {directory}: {reason} (disk full, or a file size limit); the "
                         "previous one is untouched: free disk space or choose a writable --out_dir, then --resume"
                         ) from None


def holding(config: ModelConfig, tensors: dict[str, torch.Tensor], peft: PeftConfig | None = None) -> Llama:
    """A plain Llama (with ``peft``'s modules, if given) made of ``tensors`` (a whole state dict), built on
    the meta device: no second copy, no random initialisation. What a sharded model's gathered tensors
    are written as."""
    with torch.device("meta"):
        model = Llama(config)
        if peft is not None:
            apply_peft(model, peft)
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_embeddings:  # assign=True made two Parameters of the one tensor
        model.output.weight = model.tok_embeddings.weight
    return model


def saved_tensors(model: Llama, cfg: TrainConfig) -> dict[str, torch.Tensor] | None:
    """What ``save_model`` writes of a model sharded with --fsdp: its tensors gathered whole on rank 0 (only
    the trainable ones of a PEFT method; a collective: every process calls it). None for a model that is
    not sharded, which ``save_model`` reads directly."""
    if not isinstance(model, FSDPModule):
        return None
    return gather_tensors(model, trainable_only=not cfg.trains_base)


def whole_model(model: Llama, cfg: TrainConfig, image_encoder=None) -> Llama | None:
    """The model as one process holds it: ``model`` itself, or under --fsdp a copy on rank 0's CPU made of
    every gathered tensor, with the PEFT method's modules (a collective; the other ranks get None)."""
    if not isinstance(model, FSDPModule):
        return model
    tensors = gather_tensors(model)
    return holding(model.config, tensors, peft_config(cfg, image_encoder)) if tensors else None


def load_train_state(directory: Path) -> dict:
    """DIR/train_state.pt, read to the CPU (whatever device saved it), with one-line errors."""
    try:
        path = resolve_checkpoint_dir(directory) / STATE_FILE
    except FileNotFoundError:  # an adapter directory holds no config.json
        path = directory / STATE_FILE
    if not path.exists():
        raise UsageError(f"--resume: {path} does not exist; train without --resume first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects other than tensors and containers
        raise UsageError(f"--resume: {path} cannot be read ({one_line(e, 160)}); it is damaged or was not written "
                         "by train.py: resume from an intact checkpoint, or train without --resume") from None


def restore_optimizer(model: Llama, optimizer: torch.optim.Optimizer, state: dict, path: Path) -> None:
    """Load the optimiser state after checking that it belongs to these parameters (its moments have
    their shapes), so that a mismatch is named here, not at the first step. A run sharded with --fsdp
    saved it keyed by parameter name, whole: it loads into any number of processes."""
    saved = state["optimizer"]
    by_name = all(isinstance(k, str) for k in saved["state"])
    if isinstance(model, FSDPModule) and not by_name:
        raise UsageError(f"--resume: {path} was saved without --fsdp, keyed by position on one process; resume it "
                         "without --fsdp (--no-fsdp)")
    try:
        if by_name:
            load_optimizer(model, optimizer, saved)
        else:
            optimizer.load_state_dict(saved)
        for p, moments in optimizer.state.items():
            if moments["exp_avg"].shape != p.shape:
                raise ValueError(f"{tuple(moments['exp_avg'].shape)} for a {tuple(p.shape)} parameter")
    except ValueError as e:
        raise UsageError(f"--resume: the optimiser state in {path} does not fit this model ({e}); was it written "
                         "by another run?") from None


def resume_dir(cfg: TrainConfig, given: set[str]) -> Path:
    """The checkpoint --resume continues: the one of the method asked for, or, when --method is not
    given, whichever of OUT_DIR/ckpt (full, partial) and OUT_DIR/peft (a PEFT method) holds a run."""
    if "method" in given:
        return checkpoint_dir(cfg)
    out = Path(cfg.out_dir)
    found = [d for d in (out / "ckpt", out / "peft") if (d / STATE_FILE).exists()]
    if len(found) == 2:
        raise UsageError(f"--resume: both {found[0]} and {found[1]} hold a run; say which with --method")
    return found[0] if found else checkpoint_dir(cfg)


def resumed_config(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """For --resume: the saved run's settings, except the flags given again on this command line; a
    full or partial run reads its checkpoint's copy of its tokenizer (a cache may be gone since)."""
    directory = resume_dir(cfg, given)
    saved = load_train_state(directory)["train_config"]
    changed = sorted(k for k, v in cfg.model_overrides.items() if saved["model_overrides"].get(k) != v)
    changed += sorted(k for k, v in cfg.peft_overrides.items() if saved["peft_overrides"].get(k) != v)
    changed += [k for k in ("train_layers", "train_norms", "train_output")  # the optimiser state is theirs
                if k in given and saved.get(k, getattr(TrainConfig, k)) != getattr(cfg, k)]
    if changed or "method" in given and saved["method"] != cfg.method:
        raise UsageError("--resume continues the saved model and its method; model, --method, PEFT and --train_* "
                         f"flags cannot change it (drop {' '.join('--' + k for k in changed or ['method'])})")
    resumed = replace(TrainConfig(**saved), **{k: getattr(cfg, k) for k in given})
    own_tokenizer = tokenizer_file(directory) if resumed.trains_base else None
    return replace(resumed, tokenizer=str(own_tokenizer)) if own_tokenizer else resumed


def restore_run(directory: Path, model: Llama, optimizer, sampler: WindowSampler, dev, rt: Runtime,
                cfg: TrainConfig) -> tuple[int, float]:
    """--resume: put what the run had reached at its checkpoint into the run just built (its trained
    tensors, the optimiser, the data order, the random generators, the early-stopping progress) and
    return its step and best held-out loss; say if the files under --data changed since."""
    state = load_train_state(directory)
    restore_weights(model, directory, cfg)
    restore_optimizer(model, optimizer, state, directory / STATE_FILE)
    sampler.load_state_dict(state["sampler"])
    note = set_rng_states(state["rng"], rt)
    if note:
        rt.say(f"note: {note}")
    dev.load_state_dict(state.get("early_stopping"))
    rt.say(f"resuming {directory} from step {state['step']}")
    if rt.master and state.get("data") is not None:  # (checkpoints older than the fingerprint have none)
        changes = data_changes(state["data"], data_fingerprint(cfg.data))
        if changes:  # the user may mean it (more text, a corrected file): continue, but say so
            rt.say(f"note: the data changed since step {state['step']} was saved: {'; '.join(changes)}; "
                   "continuing on the data as it is now")
    return state["step"], state["best_val_loss"]


def restore_weights(model: Llama, directory: Path, cfg: TrainConfig) -> None:
    """Copy the run's trained tensors into the model just built (sharded or not): the whole model of a
    full or partial run; for a PEFT method the adapter, onto the base rebuilt from --init_from (which
    must be the base it trained on)."""
    try:
        if cfg.trains_base:
            stored, tensors = read_checkpoint(directory, dtype=torch.float32)
            refuse_quantized(stored, str(directory))  # (the except below names --resume)
            check_state_dict({k: v.shape for k, v in stored_state_dict(model).items()}, tensors, str(directory))
        else:
            tensors = read_peft_weights(model, directory)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--resume: {e}") from None
    load_weights(model, tensors)


class RunCheckpoints:
    """The run's checkpoint in OUT_DIR, and the step its last good save holds (for the messages of a
    run that diverges). Every process calls ``save``; rank 0 writes."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, model: Llama, data, optimizer, sampler: WindowSampler, dev):
        self.cfg, self.rt, self.model, self.data, self.optimizer, self.sampler, self.dev = (
            cfg, rt, model, data, optimizer, sampler, dev)
        self.directory = checkpoint_dir(cfg)
        self.saved_step: int | None = None  # (a resumed run: the step it resumed from)
        self.data_fingerprint = data_fingerprint(cfg.data) if rt.master else None  # hashed once a run

    def save(self, step: int, best_val_loss: float) -> None:
        """A checkpoint of the run after ``step``, never of weights that are not finite."""
        rng = all_rng_states(self.rt)  # (a collective: before anything that can raise on one rank only)
        if not all(p.isfinite().all() for p in self.model.parameters()):  # (sharded: every rank the same answer)
            raise TrainingDiverged(f"the weights are not finite after step {step}; not saved. {self.last_good()}")
        tensors = saved_tensors(self.model, self.cfg)
        optimizer_state = gather_optimizer(self.model, self.optimizer) if self.cfg.fsdp else self.optimizer.state_dict()
        if self.rt.master:
            train_state = {"step": step, "optimizer": optimizer_state, "sampler": self.sampler.state_dict(), "rng": rng,
                           "best_val_loss": best_val_loss, "train_config": asdict(self.cfg),
                           "early_stopping": self.dev.state_dict(), "data": self.data_fingerprint}
            save_model(self.directory, self.model, self.data.tokenizer, self.data.is_instructions,
                       self.cfg.adapter_base, tensors, train_state)
        self.saved_step = step

    def last_good(self) -> str:
        """What is left after a divergence, and what to do."""
        if self.saved_step is None:
            return "No checkpoint was saved before: lower --lr, or check the data"
        return (f"The last good checkpoint, {self.directory}, holds step {self.saved_step}: continue from it with "
                "--resume and a lower --lr")
