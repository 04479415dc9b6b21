"""train.py's configuration: ``TrainConfig``, one dataclass whose every field is a flag, grouped in
``--help`` as a reader meets them (model, data, optimisation, fine-tuning, robust fine-tuning, run);
the checks that reject a bad combination in one line; and the command line that fills it.

The model's shape comes from a preset (``--model tiny``) whose ``ModelConfig`` fields can each be
overridden by a flag (``--dim 128``); a PEFT method's sizes are the fields of ``PeftConfig``. Both kinds
of override are kept as dicts of the flags actually given, so that ``--resume`` can tell them apart.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from ..cli import OneLineParser, UsageError, add_flags, flag, given_flags
from ..config import ATTN_IMPLS, PRESETS, ModelConfig
from ..peft import METHODS as PEFT_METHODS, SCRIPT_FIELDS, PeftConfig
from ..peft.config import method_reading

METHODS = ("full", "partial", *PEFT_METHODS)  # every parameter, the named base tensors, or one PEFT method
BASE_METHODS = ("full", "partial")  # base tensors change: the whole model is saved (OUT_DIR/ckpt)
PEFT_FIELDS = tuple(f.name for f in fields(PeftConfig) if f.name not in SCRIPT_FIELDS)  # --method, --train_norms: ours
MODEL, DATA, OPTIM, TUNE, ROBUST, RUN = ("model", "data", "optimisation", "fine-tuning",
                                         "robust fine-tuning (docs/robust.md)", "run")


@dataclass
class TrainConfig:
    # model
    model: str = flag("tiny", f"model preset: {', '.join(PRESETS)}; the flags below override its fields", group=MODEL)
    init_from: str = flag("", "start from this checkpoint directory instead of random weights (fine-tuning)",
                          group=MODEL)
    model_overrides: dict = field(default_factory=dict)  # the ModelConfig flags given (--dim, ...)
    # data
    data: str = flag("", "a .txt file, a .jsonl file with a \"text\" field per line, or a directory holding "
                     "train.txt|.jsonl and val.txt|.jsonl; or instruction data: a .json/.jsonl file of Alpaca "
                     "records {\"instruction\", \"input\", \"output\"} (default: the shipped Shakespeare)", group=DATA)
    val_fraction: float = flag(0.05, "share of a single data file held out for validation (its last lines or "
                               "records)", group=DATA)
    tokenizer: str = flag("", "a tokenizer.model or tokenizer.json; default: the --init_from checkpoint's, "
                          "or one trained on the training split (cached)", group=DATA)
    allow_other_tokenizer: bool = flag(False, "with --init_from: train on --tokenizer although the checkpoint has "
                                       "its own (its embeddings then meet another tokenizer's ids)", group=DATA)
    cache_dir: str = flag("", "where the trained tokenizer and token files are cached (default: data/cache "
                          "beside train.py)", group=DATA)
    image_root: str = flag("", "image-instruction data: --data holds LLaVA-style records {\"image\", \"instruction\", "
                           "\"input\", \"output\"} whose image paths are relative to this directory; trains the "
                           "multimodal LLaMA-Adapter (--method adapter; docs/multimodal.md)", group=DATA)
    image_encoder: str = flag("", "--image_root: the frozen image encoder, lab (the shipped one), clip:DIR[:L1,L2,...] "
                              "(a local Hugging Face CLIP) or features:FILE (precomputed; llama_min/peft/visual.py); "
                              "default lab", group=DATA)
    seq_len: int = flag(256, "tokens per training sequence (at most the model's max_seq_len)", group=DATA)
    # optimisation
    max_steps: int = flag(2000, "optimiser steps to run", group=OPTIM)
    batch_size: int = flag(8, "sequences per micro-batch per process", group=OPTIM)
    grad_accum: int = flag(1, "micro-batches accumulated per optimiser step", group=OPTIM)
    lr: float = flag(3e-3, "peak learning rate", group=OPTIM)
    min_lr_ratio: float = flag(0.1, "the cosine decays to this fraction of the peak learning rate", group=OPTIM)
    warmup_steps: int = flag(50, "linear warm-up steps", group=OPTIM)
    decay_steps: int = flag(0, "steps over which the cosine decays (0: max_steps)", group=OPTIM)
    weight_decay: float = flag(0.1, "AdamW weight decay, applied to matrices only", group=OPTIM)
    beta1: float = flag(0.9, "AdamW beta1", group=OPTIM)
    beta2: float = flag(0.95, "AdamW beta2", group=OPTIM)
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: no clipping)", group=OPTIM)
    # fine-tuning: what trains
    method: str = flag("full", f"which parameters train: {' | '.join(METHODS)} (partial: only what "
                       "--train_layers/--train_norms/--train_output name)", group=TUNE)
    train_layers: int = flag(0, "--method partial: train the top K transformer blocks (all their tensors)", group=TUNE)
    train_norms: bool = flag(False, "--method partial or a PEFT method: also train every RMSNorm gain (the bias-free "
                             "LLaMA's analogue of bias-only tuning; e.g. LoRA plus trainable norms)", group=TUNE)
    train_output: bool = flag(False, "--method partial: train the output head (with --tie_embeddings that is the "
                              "embedding too: one tensor)", group=TUNE)
    merge: bool = flag(False, "--method lora: at the end also write OUT_DIR/merged, a full checkpoint with "
                       "(alpha/r)·B·A folded into W; with --dev_every, of the best dev model (OUT_DIR/best)", group=TUNE)
    peft_overrides: dict = field(default_factory=dict)  # the PeftConfig flags given (--lora_rank, ...)
    # robust fine-tuning
    l2sp: float = flag(0.0, "L2-SP strength: add l2sp·Σ‖θ − θ₀‖² over the trained base tensors, θ₀ the --init_from "
                       "weights (Li et al. 2018); consider --weight_decay 0 with it (0: off)", group=ROBUST)
    embed_noise: float = flag(0.0, "NEFTune alpha: uniform noise of ±alpha/sqrt(T·dim) on the input embeddings, "
                              "training only (Jain et al. 2023 use 5, 10, 15; 0: off)", group=ROBUST)
    perturb: float = flag(0.0, "instruction data: perturb the instruction of this fraction of the training records "
                          "(typos, case, spaces, a distractor prefix; seeded by --seed; never the held-out ones)",
                          group=ROBUST)
    dev_every: int = flag(0, "instruction data: every N steps score exact-match accuracy on the held-out records "
                          "(at most --dev_records) and keep the best model in OUT_DIR/best (0: off)", group=ROBUST)
    dev_records: int = flag(64, "--dev_every: score the first this many held-out records (kept small: it is cheap)",
                            group=ROBUST)
    patience: int = flag(0, "--dev_every: stop after this many dev evaluations without improvement (0: never stop "
                         "early, only keep the best)", group=ROBUST)
    min_delta: float = flag(0.0, "--dev_every: an improvement must beat the best dev accuracy by more than this",
                            group=ROBUST)
    # run: evaluation, logging, checkpoints, hardware
    eval_every: int = flag(250, "evaluate on the held-out split (and save a checkpoint) every N steps", group=RUN)
    eval_tokens: int = flag(131072, "evaluate on at most this many held-out tokens (the Shakespeare split has ~80k)",
                            group=RUN)
    log_every: int = flag(25, "print a progress line and write metrics.jsonl every N steps", group=RUN)
    sample_tokens: int = flag(120, "length of the samples printed at the end (0: none)", group=RUN)
    sample_prompt: str = flag("", "text the end-of-training samples continue", group=RUN)
    out_dir: str = flag("out", "output directory: ckpt/ (the checkpoint; peft/ for a PEFT method: the adapter "
                        "only), metrics.jsonl, loss.png", group=RUN)
    overwrite: bool = flag(False, "replace the run OUT_DIR holds (its checkpoint, metrics.jsonl and loss.png); "
                           "without it a new run refuses an OUT_DIR that holds one", group=RUN)
    resume: bool = flag(False, "continue from OUT_DIR/ckpt (or OUT_DIR/peft on the --init_from base): weights, "
                        "optimiser, step, RNG and data order; flags given again override the saved ones", group=RUN)
    device: str = flag("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N", group=RUN)
    dtype: str = flag("auto", "autocast dtype: auto (bfloat16 on CUDA, or float16 without bf16 support; float32 "
                      "on CPU), float32, bfloat16, float16 (CUDA only)", group=RUN,
                      choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = flag(False, "torch.compile the model", group=RUN)
    threads: int = flag(0, "CPU threads torch computes with (0: its default, one per core); on a machine that other "
                        "jobs keep busy, 1 can be several times faster (docs/training.md)", group=RUN)
    fsdp: bool = flag(False, "under torchrun: shard the parameters, gradients and AdamW state across the processes "
                      "(FSDP2) instead of a whole copy on each (DDP); for models that do not fit one GPU "
                      "(docs/multi_gpu.md)", group=RUN)
    activation_checkpointing: bool = flag(False, "keep only each block's input for backward and recompute the "
                                          "block there: activations of one block instead of all, for about a "
                                          "third more compute", group=RUN)
    peak_flops: float = flag(0.0, "peak FLOP/s for the MFU estimate (0: the GPU's datasheet peak in the dtype it "
                             "trains in, else a matrix product timed at start, as on the CPU)", group=RUN)
    seed: int = flag(1337, "seed for weights, data order and samples", group=RUN)

    @property
    def trains_base(self) -> bool:
        """Whether base tensors train, so that the whole model is saved (else only the adapter)."""
        return self.method in BASE_METHODS

    @property
    def adapter_base(self) -> str | None:
        """The base checkpoint a PEFT run's adapter-only saves name (--init_from); None: the whole model is saved."""
        return None if self.trains_base else self.init_from


def check_config(cfg: TrainConfig) -> None:
    """Refuse flags that are out of range or do not go together, naming them and the fix."""
    counts = ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_tokens", "log_every")
    sizes = ("lr", "weight_decay", "grad_clip", "warmup_steps", "decay_steps", "sample_tokens", "peak_flops", "l2sp",
             "embed_noise", "dev_every", "threads", "dev_records", "patience", "min_delta", "train_layers")
    in_range = {k: getattr(cfg, k) >= 1 for k in counts} | {k: getattr(cfg, k) >= 0 for k in sizes} | {
        "val_fraction": 0 < cfg.val_fraction < 1, "min_lr_ratio": 0 <= cfg.min_lr_ratio <= 1,
        "perturb": 0 <= cfg.perturb <= 1}
    bad = [f"--{k} {getattr(cfg, k)}" for k, ok in in_range.items() if not ok]  # (NaN is never in range)
    if bad:
        raise UsageError(f"out of range: {', '.join(bad)}; counts must be at least 1, rates and sizes not negative, "
                         "--val_fraction in (0, 1), --min_lr_ratio and --perturb in [0, 1]")
    if cfg.method not in METHODS:
        raise UsageError(f"--method {cfg.method!r}: expected one of {', '.join(METHODS)}")
    dev_flags = " ".join(f"--{k} {getattr(cfg, k)}" for k in ("patience", "min_delta") if getattr(cfg, k))
    peft_flags = " ".join(sorted(f"--{k}" for k in cfg.peft_overrides))
    foreign = sorted(f"--{k}" for k in cfg.peft_overrides if method_reading(k) not in (None, cfg.method))
    partial_flags = [f"--{k}" for k in ("train_layers", "train_norms", "train_output") if getattr(cfg, k)]
    base_flags = " ".join(f for f in partial_flags if f != "--train_norms" or cfg.method not in PEFT_METHODS)
    rules = [  # (broken, what is wrong and what to do), in the order they are checked
        (dev_flags and not cfg.dev_every, f"{dev_flags} act on dev evaluations, which are off: add --dev_every N "
         "(score the held-out records every N steps)"),
        (cfg.dev_every and cfg.dev_records < 1, "--dev_records 0 leaves nothing to score: give at least 1, or drop "
         "--dev_every"),
        (cfg.trains_base and peft_flags, f"{peft_flags} configure a PEFT method, but --method is {cfg.method}; add "
         f"--method {' | '.join(PEFT_METHODS)} or drop them"),
        (not cfg.trains_base and foreign, f"{', '.join(foreign)}: read only by --method "  # every PEFT flag given is read
         f"{' or '.join(sorted({method_reading(k[2:]) for k in foreign}))}, not by --method {cfg.method}; drop "
         f"{'it' if len(foreign) == 1 else 'them'} or change --method"),
        (cfg.method == "partial" and not partial_flags, "--method partial trains only what is named: add "
         "--train_layers K, --train_norms and/or --train_output"),
        (cfg.method != "partial" and base_flags, f"{base_flags} choose what --method partial trains, not --method "
         f"{cfg.method}; use --method partial (with a PEFT method only --train_norms combines)"),
        (cfg.method != "full" and not cfg.init_from, f"--method {cfg.method} adapts a trained base model: pass "
         "--init_from BASE_CHECKPOINT_DIR"),
        (cfg.l2sp and not cfg.init_from, f"--l2sp {cfg.l2sp} pulls toward the pretrained weights: pass --init_from "
         "BASE_CHECKPOINT_DIR"),
        (cfg.image_encoder and not cfg.image_root, f"--image_encoder {cfg.image_encoder} encodes the images of "
         "--image_root, which is not given; add --image_root DIR or drop --image_encoder"),
        (cfg.image_root and cfg.method != "adapter", "--image_root trains the multimodal LLaMA-Adapter; it needs "
         f"--method adapter, not {cfg.method}"),
        (cfg.merge and cfg.method != "lora", f"--merge folds LoRA into the weights; it needs --method lora, not "
         f"{cfg.method}"),
        # --fsdp needs the processes torchrun starts, and a numeric mode it supports
        (cfg.fsdp and "RANK" not in os.environ, "--fsdp shards the model across the processes torchrun starts: run "
         "torchrun --nproc_per_node=N train.py --fsdp ... (a run saved with --fsdp resumes under torchrun, or add "
         "--no-fsdp)"),
        (cfg.fsdp and cfg.dtype == "float16", "--fsdp trains in bfloat16 (CUDA) or float32; float16's gradient "
         "scaler does not work on sharded gradients: use --dtype bfloat16 or float32, or drop --fsdp"),
    ]
    broken = next((message for is_broken, message in rules if is_broken), None)
    if broken:
        raise UsageError(broken)


def peft_config(cfg: TrainConfig, image_encoder=None) -> PeftConfig | None:
    """The PEFT method's configuration (None for full or partial fine-tuning / pretraining); with the
    image encoder of --image_root, a multimodal adapter that reads its features."""
    if cfg.trains_base:
        return None
    visual = dict(visual_dim=image_encoder.dim, image_encoder=image_encoder.spec) if image_encoder else {}
    try:
        return PeftConfig(method=cfg.method, train_norms=cfg.train_norms, **visual, **cfg.peft_overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None


# ---- command line ----------------------------------------------------------------------------------


def model_flag_help(f) -> str | None:
    """Help for a model flag; rope_scaling is no flag (it comes with converted long-context models)."""
    if f.name == "rope_scaling":
        return None
    return f"overrides the preset's {f.name} (tiny: {getattr(ModelConfig.from_preset('tiny'), f.name)})"


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """Every TrainConfig field is a flag, and so is every ModelConfig field (an override of the preset,
    in the model section of ``--help``) and every PeftConfig field (in the fine-tuning section)."""
    parser = OneLineParser(prog="train.py", description=description)
    parser.once = ("--method",)  # flags that choose what a run is; a second value would silently win
    add_flags(parser, TrainConfig)
    add_flags(parser, ModelConfig, dest_prefix="model.", help=model_flag_help, group=MODEL, show_defaults=False,
              choices={"attn_impl": ATTN_IMPLS})
    add_flags(parser, PeftConfig, dest_prefix="peft.", skip=SCRIPT_FIELDS, group=TUNE)
    return parser


def parse_args(argv: list[str] | None = None, description: str = "") -> tuple[TrainConfig, set[str]]:
    """The config the flags describe, and the names of the TrainConfig flags actually given."""
    namespace = build_parser(description).parse_args(argv)
    train_flags = given_flags(namespace)
    cfg = TrainConfig(**train_flags, model_overrides=given_flags(namespace, "model."),
                      peft_overrides=given_flags(namespace, "peft."))
    return cfg, set(train_flags)
