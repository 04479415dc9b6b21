"""Train a LLaMA: the whole loop in one file, top to bottom.

    python train.py                                     # tiny model on the shipped Shakespeare, CPU, ~5 min
    python train.py --device cuda --model tiny --dim 512 --n_layers 8 --max_steps 5000
    torchrun --nproc_per_node=4 train.py ...           # DistributedDataParallel, one process per GPU
    python train.py --resume                            # continue out/ckpt exactly where it stopped
    python train.py --init_from runs/base/ckpt --method lora --data alpaca.jsonl   # fine-tune: OUT/peft
    python train.py --init_from runs/base/ckpt --method full --data alpaca.jsonl --l2sp 0.1 --weight_decay 0 \
        --perturb 0.5 --dev_every 25 --patience 4     # robust options; the best dev model kept in OUT/best

Reading order: the configuration (a dataclass, every field a flag), the learning-rate schedule, the
building blocks the loop calls (data, model, trainable parameters, optimiser, evaluation, checkpoints),
then ``train`` itself, then the command line. The model comes from ``llama_min``; this file is the
only place that knows about devices, processes, files and the clock.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from llama_min import Llama, ModelConfig, Tokenizer, generate
from llama_min.checkpoint import atomic_directory, load_checkpoint, resolve_checkpoint_dir, tokenizer_file, write_model_files
from llama_min.config import PRESETS
from llama_min.data import (DataError, WindowSampler, split_documents, token_byte_lengths, tokenize_to_memmap,
                            train_tokenizer, windows)
from llama_min.early_stopping import EarlyStopping
from llama_min.exact_match import exact_match_accuracy
from llama_min.instructions import InstructionRecord, encode_records, instruction_batch, read_records
from llama_min.l2sp import L2SP
from llama_min.model import IGNORE_INDEX
from llama_min.neftune import add_embedding_noise
from llama_min.peft import (METHODS as PEFT_METHODS, SCRIPT_FIELDS, PeftConfig, add_peft_arguments, apply_peft,
                            fold_lora, load_peft, parameter_table, save_peft)
from llama_min.perturb import perturb_records
from llama_min.rmsnorm import RMSNorm
from llama_min.templates import record_template

REPO = Path(__file__).resolve().parent
STATE_FILE = "train_state.pt"  # next to config.json + model.safetensors in the checkpoint directory
DEV_ANSWER_TOKENS = 16  # --dev_every generates answers this long at most: lab/evaluate.py's default, the same measure
METHODS = ("full", "partial", *PEFT_METHODS)  # every parameter, the named base tensors, or one PEFT method
FULL_CHECKPOINT_METHODS = ("full", "partial")  # base tensors change: the whole model is saved (OUT_DIR/ckpt)
PEFT_FIELDS = tuple(f.name for f in fields(PeftConfig) if f.name not in SCRIPT_FIELDS)  # --method, --train_norms: ours


def _flag(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data
    data: str = _flag(str(REPO / "data" / "shakespeare"), "a .txt file, a .jsonl file with a \"text\" field per line, "
                      "or a directory holding train.txt|.jsonl and val.txt|.jsonl; or instruction data: a .json/.jsonl "
                      "file of Alpaca records {\"instruction\", \"input\", \"output\"}")
    val_fraction: float = _flag(0.05, "share of a single data file held out for validation (its last lines or records)")
    tokenizer: str = _flag("", "a sentencepiece tokenizer.model; empty: train one on the training split (cached)")
    cache_dir: str = _flag(str(REPO / "data" / "cache"), "where the trained tokenizer and token files are cached")
    # model
    model: str = _flag("tiny", f"model preset: {', '.join(PRESETS)}; the model flags below override its fields")
    init_from: str = _flag("", "start from this checkpoint directory instead of random weights (fine-tuning)")
    method: str = _flag("full", f"which parameters train: {' | '.join(METHODS)} (partial: only what "
                        "--train_layers/--train_norms/--train_output name)")
    train_layers: int = _flag(0, "--method partial: train the top K transformer blocks (all their tensors)")
    train_norms: bool = _flag(False, "--method partial or a PEFT method: also train every RMSNorm gain (the "
                              "bias-free LLaMA's analogue of bias-only tuning; e.g. LoRA plus trainable norms)")
    train_output: bool = _flag(False, "--method partial: train the output head (with --tie_embeddings that is "
                               "the embedding too: one tensor)")
    model_overrides: dict = field(default_factory=dict, metadata={"help": None})  # filled by the model flags
    # filled by the PEFT flags (PeftConfig's fields, added by llama_min.peft.add_peft_arguments)
    peft_overrides: dict = field(default_factory=dict, metadata={"help": None})
    # robust fine-tuning (README "Robust, efficient fine-tuning")
    l2sp: float = _flag(0.0, "L2-SP strength: add l2sp·Σ‖θ − θ₀‖² over the trained base tensors, θ₀ the --init_from "
                        "weights (Li et al. 2018); consider --weight_decay 0 with it (0: off)")
    embed_noise: float = _flag(0.0, "NEFTune alpha: uniform noise of ±alpha/sqrt(T·dim) on the input embeddings, "
                               "training only (Jain et al. 2023 use 5, 10, 15; 0: off)")
    perturb: float = _flag(0.0, "instruction data: perturb the instruction of this fraction of the training "
                           "records (typos, case, spaces, a distractor prefix; seeded by --seed; never the held-out ones)")
    merge: bool = _flag(False, "--method lora: at the end also write OUT_DIR/merged, a full checkpoint with "
                        "(alpha/r)·B·A folded into W (no --peft needed to use it); with --dev_every, of the best "
                        "dev model (OUT_DIR/best)")
    # low-cost validation: exact match on a small dev split, keep the best model, stop early
    dev_every: int = _flag(0, "instruction data: every N steps score exact-match accuracy on the held-out records "
                           "(at most --dev_records) and keep the best model in OUT_DIR/best (0: off)")
    dev_records: int = _flag(64, "--dev_every: score the first this many held-out records (kept small: it is cheap)")
    patience: int = _flag(0, "--dev_every: stop after this many dev evaluations without improvement "
                          "(0: never stop early, only keep the best)")
    min_delta: float = _flag(0.0, "--dev_every: an improvement must beat the best dev accuracy by more than this")
    # optimisation
    max_steps: int = _flag(2000, "optimiser steps to run")
    batch_size: int = _flag(8, "sequences per micro-batch per process")
    grad_accum: int = _flag(1, "micro-batches accumulated per optimiser step")
    seq_len: int = _flag(256, "tokens per training sequence (at most the model's max_seq_len)")
    lr: float = _flag(3e-3, "peak learning rate")
    min_lr_ratio: float = _flag(0.1, "the cosine decays to this fraction of the peak learning rate")
    warmup_steps: int = _flag(50, "linear warm-up steps")
    decay_steps: int = _flag(0, "steps over which the cosine decays (0: max_steps)")
    weight_decay: float = _flag(0.1, "AdamW weight decay, applied to matrices only")
    beta1: float = _flag(0.9, "AdamW beta1")
    beta2: float = _flag(0.95, "AdamW beta2")
    grad_clip: float = _flag(1.0, "clip the global gradient norm to this (0: no clipping)")
    # evaluation, logging, checkpoints
    eval_every: int = _flag(250, "evaluate on the held-out split (and save a checkpoint) every N steps")
    eval_tokens: int = _flag(131072, "evaluate on at most this many held-out tokens (the Shakespeare split has ~80k)")
    log_every: int = _flag(25, "print a progress line and write metrics.jsonl every N steps")
    sample_tokens: int = _flag(120, "length of the samples printed at the end (0: none)")
    sample_prompt: str = _flag("", "text the end-of-training samples continue")
    out_dir: str = _flag("out", "output directory: ckpt/ (the checkpoint; peft/ for a PEFT method: the adapter "
                         "only), metrics.jsonl, loss.png")
    resume: bool = _flag(False, "continue from OUT_DIR/ckpt (or OUT_DIR/peft on the --init_from base): weights, "
                         "optimiser, step, RNG and data order; "
                         "flags given again override the saved ones")
    # hardware
    device: str = _flag("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    dtype: str = _flag("auto", "autocast dtype: auto (bfloat16 on CUDA, or float16 without bf16 support; "
                       "float32 on CPU), float32, bfloat16, float16 (CUDA only)")
    compile: bool = _flag(False, "torch.compile the model")
    peak_flops: float = _flag(0.0, "peak FLOP/s for the MFU estimate (0: the GPU's bf16 peak on CUDA, "
                              "a matmul measured at start on CPU)")
    seed: int = _flag(1337, "seed for weights, data order and samples")


class UsageError(ValueError):
    """A bad flag or input: printed as one line, without a traceback."""


def check_config(cfg: TrainConfig) -> None:
    positive = ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_tokens", "log_every")
    bad = [f"--{k} {getattr(cfg, k)}" for k in positive if getattr(cfg, k) < 1]
    bad += [f"--{k} {getattr(cfg, k)}" for k in ("lr", "weight_decay", "grad_clip", "warmup_steps", "decay_steps",
                                                 "sample_tokens", "peak_flops", "l2sp", "embed_noise", "dev_every",
                                                 "dev_records", "patience", "min_delta")
            if not getattr(cfg, k) >= 0]
    if not 0 < cfg.val_fraction < 1 or not 0 <= cfg.min_lr_ratio <= 1 or not 0 <= cfg.perturb <= 1:
        bad.append(f"--val_fraction {cfg.val_fraction} / --min_lr_ratio {cfg.min_lr_ratio} / --perturb {cfg.perturb} "
                   "(fractions)")
    if bad:
        raise UsageError(f"out of range: {', '.join(bad)}; counts must be at least 1, rates and sizes not negative, "
                         "--val_fraction in (0, 1), --min_lr_ratio and --perturb in [0, 1]")
    dev_flags = [f"--{k} {getattr(cfg, k)}" for k in ("patience", "min_delta") if getattr(cfg, k)]
    if dev_flags and not cfg.dev_every:
        raise UsageError(f"{' '.join(dev_flags)} act on dev evaluations, which are off: add --dev_every N "
                         "(score the held-out records every N steps)")
    if cfg.dev_every and cfg.dev_records < 1:
        raise UsageError("--dev_records 0 leaves nothing to score: give at least 1, or drop --dev_every")
    if cfg.method not in METHODS:
        raise UsageError(f"--method {cfg.method!r}: expected one of {', '.join(METHODS)}")
    if cfg.method in FULL_CHECKPOINT_METHODS and cfg.peft_overrides:
        raise UsageError(f"{' '.join(sorted('--' + k for k in cfg.peft_overrides))} configure a PEFT method, but "
                         f"--method is {cfg.method}; add --method {' | '.join(PEFT_METHODS)} or drop them")
    partial_flags = [f"--{k}" for k in ("train_layers", "train_norms", "train_output") if getattr(cfg, k)]
    base_flags = [f for f in partial_flags if f != "--train_norms" or cfg.method not in PEFT_METHODS]
    if cfg.train_layers < 0:
        raise UsageError(f"--train_layers {cfg.train_layers}: expected a number of top blocks, at least 0")
    if cfg.method == "partial" and not partial_flags:
        raise UsageError("--method partial trains only what is named: add --train_layers K, --train_norms "
                         "and/or --train_output")
    if cfg.method != "partial" and base_flags:  # a PEFT method may add the norms, nothing else of the base
        raise UsageError(f"{' '.join(base_flags)} choose what --method partial trains, not --method {cfg.method}; "
                         f"use --method partial (with a PEFT method only --train_norms combines)")
    if cfg.method != "full" and not cfg.init_from:
        raise UsageError(f"--method {cfg.method} adapts a trained base model: pass --init_from BASE_CHECKPOINT_DIR")
    if cfg.l2sp and not cfg.init_from:
        raise UsageError(f"--l2sp {cfg.l2sp} pulls toward the pretrained weights: pass --init_from BASE_CHECKPOINT_DIR")
    if cfg.merge and cfg.method != "lora":
        raise UsageError(f"--merge folds LoRA into the weights; it needs --method lora, not {cfg.method}")


def peft_config(cfg: TrainConfig) -> PeftConfig | None:
    """The PEFT method's configuration (None for full or partial fine-tuning / pretraining)."""
    if cfg.method in FULL_CHECKPOINT_METHODS:
        return None
    try:
        return PeftConfig(method=cfg.method, train_norms=cfg.train_norms, **cfg.peft_overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None


# ---- learning-rate schedule ----------------------------------------------------------------------


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio·peak (as in the LLaMA paper,
    section 2.3: 2000 warm-up steps, final rate 10% of the peak), constant after the decay ends."""
    decay_steps = cfg.decay_steps or cfg.max_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


# ---- processes and devices -----------------------------------------------------------------------


@dataclass
class Runtime:
    """Where this process runs: its device, its rank among the processes, and its numeric mode."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    autocast_dtype: torch.dtype | None = None  # None: plain float32
    use_grad_scaler: bool = False  # float16 needs loss scaling; bfloat16 has float32's range

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def keep_freed_memory() -> None:
    """Let glibc's malloc keep the large blocks a training step frees, instead of handing them back to
    the OS; the next step would fault them in again page by page.

    On GPUs PyTorch's caching allocator does this; on CPU every tensor comes from malloc, whose default
    trims the freed top of the heap and serves big blocks by mmap. Measured (README "Train"): 200 steps
    of the dim-128 model took 41.0 s instead of 44.5 s, with 0.14M minor page faults instead of 1.16M;
    a whole default run now has 0.24M (the dim-128 one had 8.6M). The same as starting Python with
    MALLOC_MMAP_THRESHOLD_=33554432 and MALLOC_TRIM_THRESHOLD_ set high. Does nothing where the C
    library is not glibc (macOS, Windows).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: blocks up to 32 MiB come from the heap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and up to 1 GiB of freed heap stays with the process


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Pick the device and dtype; join the process group when started by torchrun."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    wants_cuda = cfg.device == "auto" and torch.cuda.is_available() or cfg.device.startswith("cuda")
    if wants_cuda and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
    if distributed:
        dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if wants_cuda:
        if distributed:  # one GPU per process
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            device = torch.device("cuda" if cfg.device == "auto" else cfg.device)
            device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for any float32 matmul left
        torch.backends.cudnn.allow_tf32 = True
    elif cfg.device in ("auto", "cpu"):
        device = torch.device("cpu")
        keep_freed_memory()
    else:
        raise UsageError(f"--device {cfg.device!r}: expected auto, cpu, cuda or cuda:N")

    dtype = cfg.dtype
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype {cfg.dtype!r}: expected auto, float32, bfloat16 or float16")
    if dtype == "float16" and device.type != "cuda":
        raise UsageError("--dtype float16 needs CUDA (it trains with a gradient scaler); use bfloat16 on CPU")
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--dtype bfloat16: this GPU does not support it; use float16")
    autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
    return Runtime(device, rank, world, autocast_dtype, use_grad_scaler=dtype == "float16")


# ---- data ----------------------------------------------------------------------------------------


# Two kinds of data, one loop. Plain text is one long stream of token ids cut into random windows;
# instruction data is a list of encoded Alpaca records, each a whole sequence with its prompt masked
# out of the loss (llama_min/instructions.py). Only get_batch, evaluate and the sampler's length differ.


def is_instruction_data(path: str | Path) -> bool:
    """Instruction data is a .json file (a list of records) or a .jsonl file whose first record has an
    "instruction" field; anything else (.txt, .jsonl of {"text"}, a directory) is plain text."""
    path = Path(path)
    if path.is_dir() and (path / "train.jsonl").is_file() and is_instruction_data(path / "train.jsonl"):
        raise DataError(f"{path} holds instruction records; pass the file itself (--data {path / 'train.jsonl'}): "
                        "instruction data is one .json/.jsonl file, its last --val_fraction held out")
    if not path.is_file() or path.suffix not in (".json", ".jsonl"):
        return False
    if path.suffix == ".json":
        return True  # plain text never comes as .json
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False  # read_documents will say what is wrong with the file
    return isinstance(record, dict) and "instruction" in record


@dataclass
class Data:
    tokenizer: Tokenizer
    train: np.ndarray | list  # (N_train,) token ids, or instruction examples [(tokens, targets), ...]
    val: np.ndarray | list  # (N_val,) token ids, or instruction examples
    byte_lengths: np.ndarray | None  # (vocab_size,) UTF-8 bytes per token, for bits per byte (plain text only)
    dev: list[InstructionRecord] | None = None  # instruction data: the held-out records themselves (--dev_every)

    @property
    def instructions(self) -> bool:
        return self.byte_lengths is None


def prepare_instructions(cfg: TrainConfig, tokenizer_path: Path | None, say) -> Data:
    """Alpaca records, the last val_fraction of them held out, encoded with the base's tokenizer.
    A record longer than seq_len tokens is dropped whole (instructions.py explains why) and counted."""
    if tokenizer_path is None:
        raise UsageError("instruction data needs the tokenizer of the model it fine-tunes: pass --init_from "
                         "(a checkpoint with its tokenizer.model) or --tokenizer")
    tokenizer = Tokenizer(tokenizer_path)
    records = read_records(cfg.data)
    if len(records) < 2:
        raise DataError(f"{cfg.data} holds {len(records)} record; at least 2 are needed (one is held out)")
    cut = len(records) - max(1, round(len(records) * cfg.val_fraction))
    # --perturb: text-level augmentation of the training prompts only (perturb.py); the held-out records
    # stay clean, so the held-out loss measures the same thing with and without it.
    train_records = perturb_records(records[:cut], cfg.perturb, cfg.seed) if cfg.perturb else records[:cut]
    train_examples, dropped_train = encode_records(train_records, tokenizer, cfg.seq_len)
    val_examples, dropped_val = encode_records(records[cut:], tokenizer, cfg.seq_len)
    if dropped_train or dropped_val:
        say(f"dropped {dropped_train} training and {dropped_val} held-out records longer than --seq_len {cfg.seq_len}")
    return Data(tokenizer, train_examples, val_examples, None, dev=records[cut:])


def prepare_data(cfg: TrainConfig, rt: Runtime, vocab_size: int, tokenizer_path: Path | None, say=print) -> Data:
    """Tokenizer and token files, built once by rank 0 while the others wait, then opened by all."""
    if is_instruction_data(cfg.data):
        return prepare_instructions(cfg, tokenizer_path, say)
    if cfg.perturb:
        raise UsageError(f"--perturb {cfg.perturb} edits instruction records, but {cfg.data} is plain text; "
                         "drop --perturb or pass a .json/.jsonl file of instruction records")
    if cfg.dev_every:
        raise UsageError(f"--dev_every {cfg.dev_every} scores exact-match answers to held-out instruction records, but "
                         f"{cfg.data} is plain text; pass instruction data, or rely on --eval_every's held-out loss")
    train_docs, val_docs = split_documents(cfg.data, cfg.val_fraction)
    cache = Path(cfg.cache_dir)
    if rt.master:
        tokenizer = Tokenizer(tokenizer_path) if tokenizer_path else train_tokenizer(train_docs, cache, vocab_size)
        tokenize_to_memmap(train_docs, tokenizer, cache, "train")
        tokenize_to_memmap(val_docs, tokenizer, cache, "val")
    if rt.world_size > 1:
        dist.barrier()
    tokenizer = Tokenizer(tokenizer_path) if tokenizer_path else train_tokenizer(train_docs, cache, vocab_size)
    return Data(tokenizer, tokenize_to_memmap(train_docs, tokenizer, cache, "train"),
                tokenize_to_memmap(val_docs, tokenizer, cache, "val"), token_byte_lengths(tokenizer))


def make_sampler(data: Data, cfg: TrainConfig) -> WindowSampler:
    """Random window starts in the token stream, or random record indices (windows of length 0)."""
    return WindowSampler(len(data.train), 0 if data.instructions else cfg.seq_len, cfg.seed)


def dev_split(data: Data, cfg: TrainConfig, max_seq_len: int) -> list[InstructionRecord]:
    """--dev_every's records: the first --dev_records held-out records whose prompt leaves room in the
    model's context for a DEV_ANSWER_TOKENS answer. Kept small, the score costs a few batches of greedy
    decoding, so it can run often."""
    room = max_seq_len - DEV_ANSWER_TOKENS
    fits = [r for r in data.dev if len(data.tokenizer.encode(r.prompt(), bos=True)) <= room]
    if not fits:
        raise UsageError(f"--dev_every: no held-out record's prompt fits in {room} tokens (max_seq_len {max_seq_len} "
                         f"minus a {DEV_ANSWER_TOKENS}-token answer); use shorter records or a larger --val_fraction")
    return fits[:cfg.dev_records]


def get_batch(data: np.ndarray | list, sampler: WindowSampler, cfg: TrainConfig, rt: Runtime, pad_id: int = 0):
    """Inputs and targets for this rank, on its device: (batch_size, seq_len) windows of the token
    stream, or (batch_size, longest) instruction examples padded on the right (targets IGNORE_INDEX)."""
    picks = sampler.starts(cfg.batch_size, rt.rank, rt.world_size)
    if isinstance(data, list):
        x, y = instruction_batch(data, picks, pad_id)
    else:
        x, y = windows(data, picks, cfg.seq_len)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
    if rt.device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(rt.device, non_blocking=True), y.pin_memory().to(rt.device, non_blocking=True)
    return x, y


# ---- the model and what trains -------------------------------------------------------------------


def build_model(cfg: TrainConfig, rt: Runtime, resume_from: Path | None = None) -> tuple[Llama, Path | None]:
    """The model to train, on rt.device in float32, and the tokenizer that goes with it (or None:
    train one). Resuming: the run's own last checkpoint. --init_from: that checkpoint's weights and
    tokenizer. Otherwise random weights of the preset with the model flags applied."""
    source = resume_from or cfg.init_from
    if source:
        if cfg.init_from and not resume_from and cfg.model_overrides:
            raise UsageError(f"--init_from takes the model from the checkpoint; drop the model flags "
                             f"{' '.join(sorted('--' + k for k in cfg.model_overrides))}")
        try:
            model = load_checkpoint(source, device=rt.device, dtype=torch.float32)
            tokenizer_path = tokenizer_file(source)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"{'--resume' if resume_from else '--init_from'}: {e}") from None
        return model, (Path(cfg.tokenizer) if cfg.tokenizer and not resume_from else tokenizer_path)
    overrides = dict(cfg.model_overrides)
    if cfg.tokenizer:
        overrides["vocab_size"] = Tokenizer(cfg.tokenizer).vocab_size  # the model's vocabulary is the tokenizer's
    try:
        model_config = ModelConfig.from_preset(cfg.model, **overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and every run
    with torch.device(rt.device):
        model = Llama(model_config)
    return model, Path(cfg.tokenizer) if cfg.tokenizer else None


def choose_trainable(model: Llama, cfg: TrainConfig, resume_from: Path | None = None) -> str:
    """Set requires_grad on exactly the parameters that train, and return the table of trainable versus
    total parameters per module group. "full": all of them. "partial": only the named base tensors (the
    top --train_layers blocks, the RMSNorm gains, the output head). A PEFT method: apply_peft adds its modules
    and freezes the rest; resuming, the run's own adapter tensors are loaded (strictly) on top. This is
    the one place a fine-tuning method decides what learns; everything after it follows requires_grad."""
    config = peft_config(cfg)
    if cfg.method == "full":
        model.requires_grad_(True)
    elif cfg.method == "partial":
        # Partial fine-tuning: update only some base tensors and keep the rest pretrained. The top blocks
        # hold the most task-specific features (Yosinski et al. 2014, "How transferable are features in
        # deep neural networks?", section 4.1); norms alone are the bias-free analogue of BitFit (Ben Zaken
        # et al. 2022), the gains being the only per-channel vectors LLaMA has.
        n_layers = len(model.layers)
        if cfg.train_layers > n_layers:
            raise UsageError(f"--train_layers {cfg.train_layers} exceeds the model's {n_layers} blocks; "
                             f"choose at most {n_layers}")
        model.requires_grad_(False)
        for layer in model.layers[n_layers - cfg.train_layers:]:  # empty for --train_layers 0
            layer.requires_grad_(True)
        if cfg.train_norms:
            for module in model.modules():
                if isinstance(module, RMSNorm):
                    module.weight.requires_grad_(True)
        if cfg.train_output:
            model.output.weight.requires_grad_(True)
    elif resume_from is not None:
        try:
            load_peft(model, resume_from)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--resume: {e}") from None
        if model.peft_config != config:
            raise UsageError(f"--resume: {resume_from} holds {model.peft_config}, but the flags ask for {config}; "
                             "PEFT flags cannot change on resume")
    else:
        torch.manual_seed(cfg.seed)  # the same new tensors (LoRA's A, the prompts) on every rank and every run
        try:
            apply_peft(model, config)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return parameter_table(model)


def make_l2sp(model: Llama, cfg: TrainConfig, rt: Runtime, resumed: bool) -> L2SP | None:
    """--l2sp: the L2-SP penalty over the tensors choose_trainable left trainable (None when off). θ₀ is
    the --init_from base. A resumed full/partial run has loaded its own, already moved weights, so θ₀ is
    read again from the base checkpoint (a PEFT run rebuilt the base from --init_from: already θ₀)."""
    if not cfg.l2sp:
        return None
    try:
        penalty = L2SP(model, cfg.l2sp)
    except ValueError as e:
        raise UsageError(f"--l2sp: {e}") from None
    if resumed:
        base = dict(load_checkpoint(cfg.init_from, device=rt.device, dtype=torch.float32).named_parameters())
        penalty.anchors = [base[name].detach() for name in penalty.names]
    return penalty


def decays(p: torch.Tensor) -> bool:
    """Whether weight decay applies: to the genuine weight matrices (2-D: projections, embeddings,
    LoRA's A and B, the adapter prompts) and nothing else. The RMSNorm gains and the bottleneck biases
    are vectors: decay would only fight the normalisation / shift. LLaMA-Adapter's gate is (1, H, 1, 1),
    4-D only so that it broadcasts over (B, H, T, d); it is one scalar per head, the amount of prompt
    attention let in (section 3.2), and decay would pull every head back toward the closed gate the
    method starts from: a prior against adapting at all, on the very tensor that decides how much."""
    return p.dim() == 2


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, rt: Runtime) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with LLaMA's betas (section 2.3), weight decay on matrices
    only (``decays``). Frozen parameters never reach the optimiser, so they cost no optimiser state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if decays(p)], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trainable if not decays(p)], "weight_decay": 0.0},
    ]
    # fused: one kernel for all tensors on GPU. PyTorch has a fused CPU AdamW too (0.8 ms instead of 3.2 ms
    # per tiny update, 2% of a step), but it rounds differently from the for-each update by an ulp, so
    # every CPU figure in the README would move; not worth it at that size.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=rt.device.type == "cuda")


# ---- measurement: evaluation and FLOPs -----------------------------------------------------


@torch.no_grad()
def evaluate(model: Llama, data: Data, cfg: TrainConfig, rt: Runtime) -> tuple[float, float | None]:
    """Mean loss per token (nats) and bits per byte over consecutive windows of the held-out split.

    bits per byte = total nats / ln 2 / total UTF-8 bytes of the predicted text. Windows are shared
    out across ranks and the sums added up, so every process count gives the same figure.
    Instruction data: the mean loss over the answer tokens (EOS included) of every held-out record,
    and None for bits per byte (the answers are a sliver of the text; a per-byte figure means little).
    """
    if data.instructions:
        return evaluate_instructions(model, data, cfg, rt), None
    n_windows = min(len(data.val) - 1, cfg.eval_tokens) // cfg.seq_len
    if n_windows == 0:
        raise DataError(f"the held-out split has {len(data.val)} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}; "
                        "give more held-out text or a smaller --seq_len")
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=rt.device)
    n_tokens = torch.zeros((), dtype=torch.float64, device=rt.device)
    n_bytes = 0
    mine = np.arange(rt.rank, n_windows, rt.world_size) * cfg.seq_len
    for i in range(0, len(mine), cfg.batch_size):
        x, y = windows(data.val, mine[i:i + cfg.batch_size], cfg.seq_len)
        n_bytes += int(data.byte_lengths[y].sum())
        x, y = torch.from_numpy(x).to(rt.device), torch.from_numpy(y).to(rt.device)
        with rt.autocast():
            logits, _ = model(x)
        nats += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").double()
        n_tokens += y.numel()
    totals = torch.stack([nats, n_tokens, torch.tensor(float(n_bytes), dtype=torch.float64, device=rt.device)])
    if rt.world_size > 1:
        dist.all_reduce(totals)
    model.train()
    nats, n_tokens, n_bytes = totals.tolist()
    return nats / n_tokens, nats / math.log(2) / n_bytes


@torch.no_grad()
def evaluate_instructions(model: Llama, data: Data, cfg: TrainConfig, rt: Runtime) -> float:
    """Mean loss per answer token over the held-out records, shared out across ranks like evaluate."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=rt.device)  # nats, answer tokens
    mine = np.arange(rt.rank, len(data.val), rt.world_size)
    for i in range(0, len(mine), cfg.batch_size):
        x, y = instruction_batch(data.val, mine[i:i + cfg.batch_size], data.tokenizer.eos_id)
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast():
            logits, _ = model(x)
        totals[0] += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum").double()
        totals[1] += (y != IGNORE_INDEX).sum()
    if rt.world_size > 1:
        dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[1]).item()


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward 2, backward 4) for every matrix a token goes
    through (not the embedding lookup), plus attention's scores and weighted sum, 6·2·L·T·dim
    (Chowdhery et al. 2022, PaLM, appendix B; T/2 on average under the causal mask, as kernels skip
    nothing here we keep PaLM's count)."""
    d, L, h = config.dim, config.n_layers, config.ffn_hidden_dim
    kv = config.n_kv_heads * config.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * h
    matmul_weights = L * per_layer + d * config.vocab_size
    return 6 * matmul_weights + 12 * L * seq_len * d


# Dense bf16 tensor-core peaks from the vendors' datasheets, FLOP/s.
GPU_BF16_PEAK = {"H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                 "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(cfg: TrainConfig, rt: Runtime) -> float:
    """The FLOP/s MFU is measured against: --peak_flops, else the GPU's datasheet bf16 peak, else (CPU
    or an unknown GPU) the best of a few large matmuls in the training dtype, timed now."""
    if cfg.peak_flops > 0:
        return cfg.peak_flops
    if rt.device.type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        for key, flops in GPU_BF16_PEAK.items():
            if key in name:
                return flops
    n = 1024
    dtype = rt.autocast_dtype or torch.float32
    g = torch.Generator(rt.device).manual_seed(0)  # its own: a resumed run's restored RNG must stay untouched
    a, b = (torch.randn(n, n, device=rt.device, dtype=dtype, generator=g) for _ in range(2))
    best = float("inf")
    for _ in range(10):  # the best of several: other work on the machine only ever slows a run down
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# ---- checkpoints ---------------------------------------------------------------------------------


def rng_states() -> dict:
    """Every random generator the loop touches, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    states = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np_state = dict(states["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.array(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def write_model(directory: Path, model: Llama, tokenizer: Tokenizer, cfg: TrainConfig, instructions: bool) -> None:
    """The model part of a checkpoint, into an existing directory: the core format (full, partial) or,
    for a PEFT method, the adapter-only peft.safetensors + peft.json naming the base --init_from.
    A model tuned on instruction data records the Alpaca template, which generate.py then uses."""
    if cfg.method in FULL_CHECKPOINT_METHODS:
        write_model_files(model, directory, tokenizer.path)
    else:
        save_peft(model, directory, base_checkpoint=cfg.init_from)  # (atomic on its own, inside ours)
    if instructions:
        record_template(directory, "alpaca")


def save_checkpoint(directory: Path, model: Llama, tokenizer: Tokenizer, optimizer, sampler: WindowSampler,
                    step: int, best_val_loss: float, cfg: TrainConfig, instructions: bool = False,
                    early_stopping: dict | None = None) -> None:
    """The model (``write_model``) plus train_state.pt, written to DIR.tmp and swapped in by renames,
    so an interruption at any instant leaves the previous checkpoint or the new one, never a mix."""
    with atomic_directory(directory) as tmp:
        write_model(tmp, model, tokenizer, cfg, instructions)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(),
                    "rng": rng_states(), "best_val_loss": best_val_loss, "train_config": asdict(cfg),
                    "early_stopping": early_stopping}, tmp / STATE_FILE)


def save_best(directory: Path, model: Llama, tokenizer: Tokenizer, cfg: TrainConfig, instructions: bool) -> None:
    """--dev_every: the model with the best dev score so far, in the run's checkpoint format (weights only:
    it is for use, not for --resume), replacing the previous best atomically."""
    with atomic_directory(directory) as tmp:
        write_model(tmp, model, tokenizer, cfg, instructions)


def checkpoint_dir(cfg: TrainConfig) -> Path:
    """OUT_DIR/ckpt (a full checkpoint: full, partial) or, for a PEFT method, OUT_DIR/peft (an adapter-only one)."""
    return Path(cfg.out_dir) / ("ckpt" if cfg.method in FULL_CHECKPOINT_METHODS else "peft")


def write_merged(directory: Path, model: Llama, tokenizer: Tokenizer, instructions: bool) -> None:
    """--merge: fold (alpha/r)·B·A into W (the adapter is gone from ``model`` afterwards) and write a
    full checkpoint, atomically; it loads as a plain model, with no --peft."""
    fold_lora(model)
    with atomic_directory(directory) as tmp:
        write_model_files(model, tmp, tokenizer.path)
        if instructions:
            record_template(tmp, "alpaca")


def load_train_state(directory: Path) -> dict:
    try:
        path = resolve_checkpoint_dir(directory) / STATE_FILE
    except FileNotFoundError:  # an adapter directory holds no config.json
        path = directory / STATE_FILE
    if not path.exists():
        raise UsageError(f"--resume: {path} does not exist; train without --resume first")
    return torch.load(path, weights_only=True)


def write_metrics(out_dir: Path, record: dict) -> None:
    keys = ("step", "train_loss", "val_loss", "val_bpb", "dev_accuracy", "lr", "tokens_per_s", "elapsed_s")
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({k: record.get(k) for k in keys}) + "\n")


def forget_metrics_after(out_dir: Path, step: int) -> None:
    path = out_dir / "metrics.jsonl"
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
        path.write_text("".join(kept))


def plot_losses(out_dir: Path) -> str | None:
    """Draw loss.png from metrics.jsonl; returns a note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no loss.png: matplotlib is not installed (pip install matplotlib)"
    path = out_dir / "metrics.jsonl"
    if not path.exists():  # stopped before the first log step: nothing to draw
        return None
    records = [json.loads(line) for line in open(path)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "held-out")):
        points = [(r["step"], r[key]) for r in records if r[key] is not None]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_dir / "loss.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_dir / "loss.png")
    return None


# ---- the training loop ---------------------------------------------------------------------------


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step; it saves and exits cleanly.
    A second signal during that save is ignored: the save is atomic anyway, so nothing can tear."""

    def __init__(self):
        self.requested = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig) -> dict:
    """Run the training described by cfg. Returns a summary: step, last train loss, last held-out
    loss and bits per byte, the list of train losses (one per step) for tests, and with --dev_every the
    early-stopping summary (EarlyStopping.summary plus the best checkpoint's path; None when off)."""
    t_start = time.time()
    check_config(cfg)
    out_dir = Path(cfg.out_dir)
    ckpt_dir = checkpoint_dir(cfg)
    rt = setup_runtime(cfg)
    say = print if rt.master else (lambda *a, **k: None)  # rank 0 alone prints and writes

    state = load_train_state(ckpt_dir) if cfg.resume else None
    # A full or partial run resumes from its own checkpoint; a PEFT run rebuilds the base from --init_from and
    # loads its adapter on top (choose_trainable).
    resume_from = ckpt_dir if cfg.resume else None
    full_checkpoint = cfg.method in FULL_CHECKPOINT_METHODS
    model, tokenizer_path = build_model(cfg, rt, resume_from=resume_from if full_checkpoint else None)
    mc = model.config
    if cfg.seq_len > mc.max_seq_len:
        raise UsageError(f"--seq_len {cfg.seq_len} exceeds the model's max_seq_len {mc.max_seq_len}; "
                         f"lower --seq_len or raise --max_seq_len")
    data = prepare_data(cfg, rt, mc.vocab_size, tokenizer_path, say)
    if data.tokenizer.vocab_size > mc.vocab_size:
        raise UsageError(f"the tokenizer has {data.tokenizer.vocab_size} tokens but the model only "
                         f"{mc.vocab_size}; pass --vocab_size {data.tokenizer.vocab_size}")
    say(choose_trainable(model, cfg, resume_from=None if full_checkpoint else resume_from))
    l2sp = make_l2sp(model, cfg, rt, resumed=state is not None and full_checkpoint)
    if cfg.embed_noise:
        # NEFTune (Jain et al. 2023, Algorithm 1): noisy input embeddings in training mode only; the
        # embedding keeps its weight and state-dict key, and model.eval() (evaluation, samples) is noise-free.
        add_embedding_noise(model, cfg.embed_noise)
    optimizer = make_optimizer(model, cfg, rt)
    sampler = make_sampler(data, cfg)
    step, best_val_loss = 0, float("inf")
    # Low-cost validation: exact match on the dev records every --dev_every steps; a new best is saved to
    # OUT_DIR/best, and --patience evaluations without one stop the run (early_stopping.py).
    stopper = EarlyStopping(cfg.patience or None, cfg.min_delta, mode="max") if cfg.dev_every else None
    dev = dev_split(data, cfg, mc.max_seq_len) if cfg.dev_every else []
    best_dir = out_dir / "best"
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        set_rng_states(state["rng"])
        step, best_val_loss = state["step"], state["best_val_loss"]
        if stopper is not None and state.get("early_stopping"):  # the progress is restored; the flags are this run's
            stopper = EarlyStopping.from_state_dict({**state["early_stopping"], "patience": stopper.patience,
                                                     "min_delta": stopper.min_delta})

    raw_model = model  # unwrapped: for evaluation, sampling and checkpoints
    if cfg.compile:
        model = torch.compile(model)
    if rt.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_grad_scaler)

    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * rt.world_size  # instructions: at most
    flops_per_token_ = flops_per_token(mc, cfg.seq_len)
    peak = peak_flops(cfg, rt) * rt.world_size
    n_params = sum(p.numel() for p in raw_model.parameters())
    n_trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    if rt.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        if state is not None:  # forget what was logged after the checkpoint: those steps run again
            forget_metrics_after(out_dir, step)
    say(f"model: {cfg.model if not cfg.init_from else cfg.init_from}, {n_params / 1e6:.2f}M parameters "
        f"({n_trainable / 1e6:.2f}M trainable), dim {mc.dim}, {mc.n_layers} layers, vocab {mc.vocab_size}")
    unit = "instruction records" if data.instructions else "tokens"
    say(f"data: {len(data.train):,} training {unit}, {len(data.val):,} held-out {unit}; "
        f"{'up to ' if data.instructions else ''}{tokens_per_step:,} tokens per step on {rt.world_size} x {rt.device} "
        f"({str(rt.autocast_dtype or torch.float32).removeprefix('torch.')}); MFU against {peak / 1e9:.1f} GFLOP/s")
    if stopper is not None:
        say(f"dev: exact match on {len(dev)} held-out records every {cfg.dev_every} steps, best model kept in "
            f"{best_dir}" + (f"; stops after {cfg.patience} evaluations without improvement" if cfg.patience else ""))

    def checkpoint(at_step: int):
        if rt.master:
            save_checkpoint(ckpt_dir, raw_model, data.tokenizer, optimizer, sampler, at_step, best_val_loss, cfg,
                            data.instructions, stopper.state_dict() if stopper is not None else None)

    def run_dev(at_step: int) -> None:
        """Score the dev records and update the early stopping; rank 0 alone generates and saves. It
        broadcasts the score, so every rank's EarlyStopping takes the same decisions: all stop together."""
        accuracy = torch.zeros((), dtype=torch.float64, device=rt.device)
        if rt.master:
            with torch.no_grad():  # float32 greedy decoding, as the lab's evaluation does
                accuracy.fill_(exact_match_accuracy(raw_model, data.tokenizer, dev, DEV_ANSWER_TOKENS))
        if rt.world_size > 1:
            dist.broadcast(accuracy, src=0)
        accuracy = accuracy.item()
        improved = stopper.update(at_step, accuracy)
        if improved and rt.master:
            save_best(best_dir, raw_model, data.tokenizer, cfg, data.instructions)
        waited = f", {stopper.evals_since_best}/{cfg.patience} without improvement" if cfg.patience else ""
        say(f"step {at_step}: dev exact match {accuracy:.4f} on {len(dev)} records" +
            (f", new best: saved to {best_dir}" if improved else
             f"; best {stopper.best_metric:.4f} at step {stopper.best_step}{waited}"))
        if rt.master:
            write_metrics(out_dir, {"step": at_step, "dev_accuracy": accuracy, "elapsed_s": time.time() - t_start})

    def run_eval(at_step: int) -> tuple[float, float]:
        nonlocal best_val_loss
        val_loss, val_bpb = evaluate(raw_model, data, cfg, rt)
        best_val_loss = min(best_val_loss, val_loss)
        say(f"step {at_step}: held-out loss {val_loss:.4f}" + (f", {val_bpb:.4f} bits per byte" if val_bpb else ""))
        if rt.master:
            write_metrics(out_dir, {"step": at_step, "val_loss": val_loss, "val_bpb": val_bpb,
                                    "elapsed_s": time.time() - t_start})
        return val_loss, val_bpb

    losses, val_loss, val_bpb, stopped_by = [], None, None, None
    model.train()
    t_log, steps_since_log, tokens_since_log = time.time(), 0, 0
    if stopper is not None and stopper.should_stop and step < cfg.max_steps:  # resumed after an early stop
        say(f"stopped early at step {stopper.last_step} already; raise --patience to train on")
    with StopRequest() as stop:
        while step < cfg.max_steps and not (stopper is not None and stopper.should_stop):
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=rt.device)
            for micro in range(cfg.grad_accum):
                x, y = get_batch(data.train, sampler, cfg, rt, data.tokenizer.eos_id)
                tokens_since_log += x.numel() * rt.world_size
                # DDP averages gradients across processes at each backward; skip it until the last
                # micro-batch so an accumulated step costs one all-reduce, not grad_accum of them.
                sync = rt.world_size == 1 or micro == cfg.grad_accum - 1
                with (nullcontext() if sync else model.no_sync()), rt.autocast():
                    _, loss = model(x, y)
                    loss = loss / cfg.grad_accum  # the accumulated gradient is the mean over micro-batches
                # L2-SP (Li et al. 2018, section 3): + λ·Σ‖θ − θ₀‖², split over the micro-batches so each step
                # adds it once. Logged losses stay the task loss, comparable across λ.
                penalty = l2sp() / cfg.grad_accum if l2sp is not None else 0.0
                scaler.scale(loss + penalty).backward()
                loss_sum += loss.detach()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            if rt.world_size > 1:  # the loss every process agrees on: the global batch's mean
                dist.all_reduce(loss_sum)  # (gloo has no AVG)
                loss_sum /= rt.world_size
            loss_value = loss_sum.item()
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss is {loss_value} at step {step + 1}; stopping. The last good "
                                       f"checkpoint is {ckpt_dir}; lower --lr or check the data")
            losses.append(loss_value)
            step += 1
            steps_since_log += 1

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                elapsed = time.time() - t_log
                dt = elapsed / steps_since_log
                tokens_per_s = tokens_since_log / elapsed
                eta = (cfg.max_steps - step) * dt
                say(f"step {step}/{cfg.max_steps} | loss {loss_value:.4f} | lr {lr:.2e} | "
                    f"{tokens_per_s:,.0f} tok/s | MFU {100 * flops_per_token_ * tokens_per_s / peak:.1f}% | "
                    f"ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
                if rt.master:
                    write_metrics(out_dir, {"step": step, "train_loss": loss_value, "lr": lr,
                                            "tokens_per_s": tokens_per_s, "elapsed_s": time.time() - t_start})
                t_log, steps_since_log, tokens_since_log = time.time(), 0, 0
            # Before the checkpoint below, so that the state it saves includes this step's dev evaluation.
            if stopper is not None and (step % cfg.dev_every == 0 or step == cfg.max_steps):
                run_dev(step)
                t_log, steps_since_log, tokens_since_log = time.time(), 0, 0
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                val_loss, val_bpb = run_eval(step)
                checkpoint(step)
                if rt.master and step < cfg.max_steps:
                    plot_losses(out_dir)
                t_log, steps_since_log, tokens_since_log = time.time(), 0, 0  # evaluation is not training throughput

            requested = stop.requested
            if rt.world_size > 1:  # a signal may reach one process only: stop together
                flag = torch.tensor(float(requested is not None), device=rt.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                requested = requested or ("a signal on another process" if flag.item() else None)
            if requested and step < cfg.max_steps:
                stopped_by = requested
                checkpoint(step)
                say(f"{requested} at step {step}: checkpoint saved to {ckpt_dir}; continue with --resume")
                break
            if stopper is not None and stopper.should_stop and step < cfg.max_steps:  # the same on every rank
                checkpoint(step)
                say(f"early stopping at step {step}: {cfg.patience} dev evaluations without improvement; "
                    f"checkpoint saved to {ckpt_dir}, best model (step {stopper.best_step}) in {best_dir}")
                break

    if rt.master:
        note = plot_losses(out_dir)
        if note or (out_dir / "loss.png").exists():
            say(note or f"loss curve: {out_dir / 'loss.png'}")
    raw_model.eval()  # samples without training-only noise (NEFTune, LoRA dropout)
    if stopped_by is None and rt.master and cfg.sample_tokens > 0:
        prompt = data.tokenizer.encode(cfg.sample_prompt, bos=True)
        if data.instructions and not cfg.sample_prompt:  # the first held-out record's prompt
            tokens, targets = data.val[0]
            prompt = tokens[:next(i for i, t in enumerate(targets) if t != IGNORE_INDEX) + 1]
        for temperature in (0.0, 0.8):
            new = generate(raw_model, [prompt], cfg.sample_tokens, temperature=temperature,
                           stop_ids=[data.tokenizer.eos_id], seed=cfg.seed, truncate=True)[0]
            say(f"--- sample ({'greedy' if temperature == 0 else f'temperature {temperature}'}) ---\n"
                f"{data.tokenizer.decode(prompt)}{data.tokenizer.decode(new)}")
    if stopped_by is None and rt.master and cfg.merge:
        if stopper is not None and stopper.best_step is not None:  # the run's result is the chosen model
            load_peft(raw_model, best_dir)
        write_merged(out_dir / "merged", raw_model, data.tokenizer, data.instructions)
        say(f"merged LoRA into the weights: full checkpoint {out_dir / 'merged'}")
    early = None
    if stopper is not None and stopper.last_step is not None and stopped_by is None:  # a finished run
        early = {**stopper.summary(cfg.max_steps), "best_checkpoint": str(best_dir)}
        say(f"early stopping: chose step {early['chosen_step']} (dev exact match {early['best_metric']:.4f}, "
            f"{best_dir}); stopped at step {early['stopped_at']} of {cfg.max_steps}, "
            f"{100 * early['compute_saved']:.0f}% of the planned steps saved")
        if rt.master:
            tmp = out_dir / "early_stopping.tmp.json"
            tmp.write_text(json.dumps(early, indent=2) + "\n")
            tmp.replace(out_dir / "early_stopping.json")
    say(f"done in {time.time() - t_start:.0f}s: step {step}, held-out loss {val_loss}, bits per byte {val_bpb}; "
        f"checkpoint {ckpt_dir}")
    if rt.world_size > 1:
        dist.destroy_process_group()
    return {"step": step, "losses": losses, "val_loss": val_loss, "val_bpb": val_bpb, "stopped_by": stopped_by,
            "early_stopping": early}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ---- command line --------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Every TrainConfig field and every ModelConfig field (as an override of the preset) is a flag.
    Defaults are suppressed so that the flags actually given can be told apart (for --resume)."""
    parser = OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    group = parser.add_argument_group("training")
    for f in fields(TrainConfig):
        if f.metadata.get("help") is None:
            continue
        default = f.default
        help_text = f"{f.metadata['help']} (default: {default})"
        if f.type in ("bool", bool):
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(f"--{f.name}", type={"int": int, "float": float}.get(f.type, str),
                               metavar=f.name.upper(), help=help_text)
    group = parser.add_argument_group("model (override fields of the --model preset)")
    for f in fields(ModelConfig):
        kind = str(f.type)
        if "bool" in kind:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, dest=f"model.{f.name}")
        else:
            convert = int if kind.startswith("int") else float if kind.startswith("float") else str
            group.add_argument(f"--{f.name}", type=convert, metavar=f.name.upper(), dest=f"model.{f.name}",
                               help=f"(default: the preset's; tiny: {getattr(PRESETS['tiny'], f.name)})")
    add_peft_arguments(parser)  # one flag per PeftConfig field, with its help text (and its default)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """The config the flags describe, and the names of the flags actually given."""
    # The PEFT flags carry defaults: pre-filling them with a marker keeps argparse from applying those,
    # so here too only the flags actually given come through.
    unset = object()
    namespace = argparse.Namespace(**dict.fromkeys(PEFT_FIELDS, unset))
    given = {k: v for k, v in vars(build_parser().parse_args(argv, namespace)).items() if v is not unset}
    overrides = {k.removeprefix("model."): v for k, v in given.items() if k.startswith("model.")}
    peft = {k: v for k, v in given.items() if k in PEFT_FIELDS}
    train_flags = {k: v for k, v in given.items() if not k.startswith("model.") and k not in PEFT_FIELDS}
    return TrainConfig(**train_flags, model_overrides=overrides, peft_overrides=peft), set(train_flags)


def resumed_config(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """For --resume: the saved run's settings, except the flags given again on this command line."""
    saved = load_train_state(checkpoint_dir(cfg))["train_config"]
    changed = sorted(k for k, v in cfg.model_overrides.items() if saved["model_overrides"].get(k) != v)
    changed += sorted(k for k, v in cfg.peft_overrides.items() if saved["peft_overrides"].get(k) != v)
    changed += [k for k in ("train_layers", "train_norms", "train_output")  # the optimiser state is theirs
                if k in given and saved.get(k, getattr(TrainConfig, k)) != getattr(cfg, k)]
    if changed or saved["method"] != cfg.method:
        raise UsageError("--resume continues the saved model and its method; model, --method, PEFT and --train_* "
                         "flags cannot "
                         f"change it (drop {' '.join('--' + k for k in changed or ['method'])})")
    return replace(TrainConfig(**saved), **{k: getattr(cfg, k) for k in given})


def main(argv: list[str] | None = None) -> dict:
    cfg, given = parse_args(argv)
    try:
        if cfg.resume:
            cfg = resumed_config(cfg, given)
        return train(cfg)
    except (UsageError, DataError, TrainingDiverged, FileNotFoundError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
