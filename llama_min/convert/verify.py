"""``--verify``: run the same token ids through the converted model in llama_min and through an
independent implementation, Hugging Face ``transformers``, and compare the logits.

Which side reads which files, so that the two sides never share a code path that could hide a bug:

    SRC format      --to llama_min                            --to hf
    Hugging Face    transformers(SRC)   vs llama_min(DST)     transformers(DST) vs llama_min(SRC converted)
    GGUF            transformers(SRC, its own GGUF reader)    transformers(DST) vs llama_min(SRC converted)
                    vs llama_min(DST)
    Meta, llama_min transformers(DST exported to HF)          transformers(DST) vs llama_min(SRC converted)
                    vs llama_min(DST)

transformers rotates halves of each head where llama_min rotates adjacent pairs, so a wrong (or missing)
q/k permutation, a wrong GQA head count, eps, theta or tying changes the logits by far more than the
tolerance.

The output dtype enters once, as rounding: the weights of both sides are rounded to it (a no-op for the
side that already holds them in it), then both compute in float32. They then hold the very same numbers,
and the only difference left is the order of floating-point operations, whatever the dtype; so the
tolerance is float32's, relative to the size of the logits: 1e-4 · max(1, max |reference logit|).
(Comparing an unrounded reference with a bfloat16 result would need a tolerance of several percent,
wide enough to let real mistakes through.)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from .gguf import GGUFSource
from .hf import HFSource
from .native import LlamaMinSource
from .source import ConversionError, Source

# float32 arithmetic in a different order: ~1e-6 of the logits' size in practice, 100 times that allowed.
TOLERANCE = 1e-4


@dataclass
class Verification:
    max_diff: float
    tolerance: float
    n_tokens: int
    reference: str  # what transformers loaded

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance


def import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ConversionError("--verify needs the optional package `transformers`: pip install transformers") from e
    return transformers


def load_reference(path: Path, device: str, dtype: torch.dtype, gguf_file: str | None = None):
    """transformers' LlamaForCausalLM from ``path``, float32 weights rounded through ``dtype``."""
    transformers = import_transformers()
    transformers.utils.logging.disable_progress_bar()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    for p in model.parameters():
        p.data = p.data.to(dtype).float()
    return model.to(device).eval()


@torch.no_grad()
def verify(source: Source, dst: str | Path, to: str, dtype: torch.dtype, n_tokens: int = 32) -> Verification:
    """Compare llama_min and transformers on ``n_tokens`` random token ids, as the table above says."""
    from . import convert  # the package's converter, to make the other side's files when needed

    import_transformers()
    dst = Path(dst)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="llama_min_verify_") as tmp:
        tmp = Path(tmp)
        if to == "llama_min":
            ours_dir = dst
            if isinstance(source, HFSource):
                ref_path, gguf_file, described = source.path, None, str(source.path)
            elif isinstance(source, GGUFSource):
                ref_path, gguf_file, described = source.path.parent, source.path.name, str(source.path)
            else:  # Meta or llama_min: transformers cannot read them, but it can read DST exported
                ref_path, gguf_file = convert(LlamaMinSource(dst), tmp / "hf", to="hf").path, None
                described = f"{dst} exported to Hugging Face"
        else:
            ref_path, gguf_file, described = dst, None, str(dst)
            ours_dir = source.path if isinstance(source, LlamaMinSource) else \
                convert(source, tmp / "llama_min", to="llama_min", dtype=dtype).path
        ours = load_checkpoint(ours_dir, device=device, dtype=dtype).float().eval()
        reference = load_reference(ref_path, device, dtype, gguf_file)
        config = ours.config
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (1, min(n_tokens, config.max_seq_len)), generator=g).to(device)
        ours_logits, _ = ours(ids)
        ref_logits = reference(input_ids=ids).logits.float()
    max_diff = (ours_logits - ref_logits).abs().max().item()
    scale = max(1.0, ref_logits.abs().max().item())
    return Verification(max_diff, TOLERANCE * scale, ids.shape[1], described)
