"""The model a run trains and which of its parameters learn: the one place a fine-tuning method decides
what trains. Everything after it (optimiser, L2-SP, checkpoints) follows ``requires_grad``.

    full        every parameter (pretraining, or full fine-tuning from --init_from)
    partial     only named base tensors: the top --train_layers blocks, --train_norms, --train_output
    adapter, lora, bottleneck
                apply_peft adds the method's modules and freezes the base (llama_min/peft)
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, tokenizer_file
from ..cli import UsageError
from ..config import ModelConfig
from ..model import Llama
from ..peft import apply_peft, parameter_table
from ..peft.lora import LoRALinear
from ..rmsnorm import RMSNorm
from ..tokenizer import load_tokenizer
from .config import TrainConfig, peft_config
from .runtime import Runtime


def refuse_quantized(config: ModelConfig, source: str) -> None:
    """A quantised checkpoint (weights_convert.py --quantize) cannot be trained: integer codes have no
    gradient, and LoRA wraps float projections only. ``source`` names the flag and the checkpoint."""
    if config.quantization:
        raise UsageError(f"{source} holds {config.quantization.kind} weights (weights_convert.py --quantize), which "
                         "cannot be trained; train from the float checkpoint it was made from, and quantise the "
                         "trained model")


def build_model(cfg: TrainConfig, rt: Runtime) -> tuple[Llama, Path | None]:
    """The model to train, on rt.device in float32, and the tokenizer that goes with it (or None:
    train one). --init_from: that checkpoint's weights and tokenizer (a model's embeddings are read with
    its own token ids, so there is no training a new tokenizer for it). Otherwise random weights of the
    preset with the model flags applied. (A resumed run is built the same way; restore_run then copies
    its trained tensors in.)"""
    if cfg.init_from:
        if cfg.model_overrides:
            raise UsageError(f"--init_from takes the model from the checkpoint; drop the model flags "
                             f"{' '.join(sorted('--' + k for k in cfg.model_overrides))}")
        try:
            model = load_checkpoint(cfg.init_from, device=rt.device, dtype=torch.float32)
            tokenizer_path = tokenizer_file(cfg.init_from)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--init_from: {e}") from None
        refuse_quantized(model.config, f"--init_from: {cfg.init_from}")
        if cfg.tokenizer:
            own, tokenizer_path = tokenizer_path, Path(cfg.tokenizer)
            if own is not None and not cfg.allow_other_tokenizer and not filecmp.cmp(own, tokenizer_path, shallow=False):
                raise UsageError(f"--tokenizer {cfg.tokenizer} is not the tokenizer of --init_from {cfg.init_from} "
                                 f"({own}): the model reads its own token ids; drop --tokenizer, or pass "
                                 "--allow_other_tokenizer to retrain it on another tokenizer's ids")
        if tokenizer_path is None:
            raise UsageError(f"--init_from: {cfg.init_from} holds no tokenizer.model or tokenizer.json, and the model "
                             "must read its own token ids: copy its tokenizer into that directory or pass --tokenizer")
        return model, tokenizer_path
    overrides = dict(cfg.model_overrides)
    if cfg.tokenizer:
        size = load_tokenizer(cfg.tokenizer).vocab_size  # the model's vocabulary is the tokenizer's
        if overrides.get("vocab_size", size) != size:
            raise UsageError(f"--vocab_size {overrides['vocab_size']} but --tokenizer {cfg.tokenizer} has {size} tokens; "
                             "drop --vocab_size (the model takes the tokenizer's) or pass another tokenizer")
        overrides["vocab_size"] = size
    try:
        model_config = ModelConfig.from_preset(cfg.model, **overrides)
    except (ValueError, TypeError) as e:
        flags = "".join(f" --{k} {v}" for k, v in cfg.model_overrides.items())
        advice = "; change that flag" if str(e).startswith("invalid ModelConfig") else ""
        raise UsageError(f"--model {cfg.model}{flags}: {e}{advice}") from None
    check_memory(model_config, cfg, rt)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and every run
    with torch.device(rt.device):
        model = Llama(model_config)
    return model, Path(cfg.tokenizer) if cfg.tokenizer else None


def check_memory(config: ModelConfig, cfg: TrainConfig, rt: Runtime) -> None:
    """Refuse, with the figures, a model whose training state cannot fit in the device's free memory:
    float32 weights and gradients and AdamW's two moments are 16 bytes per parameter (activations come
    on top). Without this, a 70B preset on a laptop ends in an allocator traceback, or in swap."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Llama(config).parameters())
    if rt.device.type == "cuda":
        free = torch.cuda.mem_get_info(rt.device)[0]
    else:
        meminfo = Path("/proc/meminfo")
        lines = meminfo.read_text().splitlines() if meminfo.exists() else []
        free = next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")), None)
    need = 16 * n_params // (rt.world_size if cfg.fsdp else 1)  # FSDP shards all of it across the processes
    if free is not None and need > free:
        raise UsageError(f"--model {cfg.model}: training its {n_params / 1e9:.2f}B parameters needs about "
                         f"{need / 2**30:,.0f} GiB (16 bytes each: float32 weights, gradients and AdamW's two moments) "
                         f"but {rt.device} has {free / 2**30:,.1f} GiB free; choose a smaller --model or fewer "
                         "--n_layers / a smaller --dim")


def choose_trainable(model: Llama, cfg: TrainConfig, image_encoder=None) -> str:
    """Set requires_grad on exactly the parameters that train, and return the table of trainable versus
    total parameters per module group. A PEFT method adds its new tensors; with --image_root's encoder
    the adapter is multimodal."""
    config = peft_config(cfg, image_encoder)
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
    else:
        torch.manual_seed(cfg.seed)  # the same new tensors (LoRA's A, the prompts) on every rank and every run
        try:
            apply_peft(model, config)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return parameter_table(model)


def hold_frozen_in_autocast_dtype(model: Llama, rt: Runtime) -> None:
    """PEFT runs on a GPU under autocast: store the frozen matrices in the autocast dtype (the trainable
    tensors stay float32; a PEFT checkpoint holds only those, so nothing saved loses precision). Autocast would otherwise keep a low-precision copy of every float32 weight for the backward
    pass: a 7B LoRA run would hold 27 GB of float32 base and 13.5 GB of copies instead of 13.5 GB. Only
    the projection matrices: the embedding and the norm gains stay float32, which keeps the residual
    stream in float32 as with float32 weights. Everything the run computes with the model (training,
    evaluation, dev scores, samples) then runs under the same autocast."""
    if rt.device.type != "cuda" or rt.autocast_dtype is None:
        return
    for module in model.modules():
        frozen_matrix = isinstance(module, (torch.nn.Linear, LoRALinear)) and not module.weight.requires_grad
        if frozen_matrix and module.weight is not model.tok_embeddings.weight:  # (a tied head is the embedding)
            module.weight.data = module.weight.data.to(rt.autocast_dtype)
