"""Frozen image encoders for the multimodal LLaMA-Adapter: an image in, one global feature (C_v,) out.

The paper (Zhang et al. 2023, section 4.3) takes CLIP's global features at M scales, concatenated. Three
encoders give such features here, each named by a spec string that train.py's --image_encoder takes and
peft.json records, so that generation encodes images as training did:

    lab              LabEncoder: a 136k-parameter CNN trained on the shipped image world
                     (experiments/train_image_encoder.py; weights in lab_encoder.safetensors beside this
                     file), standing in for CLIP so that everything runs on a laptop CPU
    clip:DIR         a Hugging Face CLIPVisionModel saved in DIR (optional ``transformers``; read from disk,
                     never downloaded): its pooled output, post_layernorm(CLS of the last layer)
    clip:DIR:L1,L2   the same tower's CLS token after hidden layers L1, L2, ... (indices into
                     ``hidden_states``, negative from the end), each through post_layernorm, concatenated:
                     the paper's multi-scale features (M = the number of layers)
    features:FILE    precomputed features keyed by image id (the record's "image" path): a .safetensors or
                     .npz file of (C_v,) arrays, from any encoder at any scale (``save_features`` writes one)

Every encoder is frozen (no gradients, eval mode) and gives float32 (N, C_v) through ``features``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..cli import UsageError
from ..finetune.images import load_image

LAB_WEIGHTS = Path(__file__).with_name("lab_encoder.safetensors")
# CLIP's image normalisation (Radford et al. 2021; the constants of OpenAI's preprocessing), used when the
# model directory has no preprocessor_config.json.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class LabEncoder(nn.Module):
    """(B, 3, 32, 32) pixels in [0, 1] -> (B, 64) features: two stride-2 convolutions keep an 8 x 8 map (so
    where a shape is survives, which global pooling would lose), flattened through one linear layer."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())  # (B, 32, 8, 8)
        self.proj = nn.Linear(32 * 8 * 8, dim)
        self.dim = dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(self.conv(pixels).flatten(1)))  # (B, dim)


class PixelEncoder:
    """A frozen network on pixels, with the preprocessing it needs. ``prepare`` maps (H, W, 3) uint8 to
    one (3, S, S) input; ``network`` maps a batch of inputs to (B, C_v)."""

    def __init__(self, spec: str, network, prepare, dim: int):
        self.spec, self.network, self.prepare, self.dim = spec, network, prepare, dim

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray], batch_size: int = 64) -> torch.Tensor:
        """images: (H, W, 3) uint8 arrays -> float32 (N, C_v)."""
        out = [self.network(torch.stack([self.prepare(im) for im in images[i:i + batch_size]])).float()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def features(self, image_root: str | Path, ids: Sequence[str]) -> torch.Tensor:
        """float32 (N, C_v) for the images IMAGE_ROOT/id."""
        return self.encode([load_image(image_root, i) for i in ids])


def to_unit_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255


def lab_encoder(weights: str | Path = LAB_WEIGHTS) -> PixelEncoder:
    from safetensors.torch import load_file

    if not Path(weights).is_file():
        raise UsageError(f"the lab image encoder's weights {weights} are missing; make them with "
                         "python -m experiments.train_image_encoder")
    network = LabEncoder()
    network.load_state_dict(load_file(weights))  # strict: a wrong or missing tensor is named
    network.requires_grad_(False).eval()

    def prepare(image: np.ndarray) -> torch.Tensor:
        if image.shape[:2] != (32, 32):
            raise UsageError(f"the lab encoder reads 32 x 32 pictures of the image world, got {image.shape[1]} x "
                             f"{image.shape[0]}")
        return to_unit_tensor(image)

    return PixelEncoder("lab", network, prepare, network.dim)


def clip_encoder(directory: str | Path, layers: Sequence[int] = ()) -> PixelEncoder:
    """A local CLIPVisionModel, frozen: its pooled output, or post_layernorm of the CLS token after each
    of ``layers`` (hidden_states indices), concatenated. Images are resized (bilinear) to its image size
    and normalised with its preprocessor's mean and std."""
    try:
        from transformers import CLIPVisionModel
    except ImportError:
        raise UsageError("a CLIP image encoder needs transformers: pip install transformers") from None
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UsageError(f"clip:{directory}: no config.json there; save a CLIPVisionModel to it with "
                         "save_pretrained (it is read from disk, never downloaded)")
    model = CLIPVisionModel.from_pretrained(directory, local_files_only=True).requires_grad_(False).eval()
    size = model.config.image_size
    pre = directory / "preprocessor_config.json"
    stats = json.loads(pre.read_text()) if pre.is_file() else {}
    mean = torch.tensor(stats.get("image_mean", CLIP_MEAN))[:, None, None]
    std = torch.tensor(stats.get("image_std", CLIP_STD))[:, None, None]
    n_hidden = model.config.num_hidden_layers + 1  # hidden_states: the embeddings, then every layer
    bad = [l for l in layers if not -n_hidden <= l < n_hidden]
    if bad:
        raise UsageError(f"clip:{directory}: layers {bad} out of range; hidden_states has {n_hidden} entries")

    def prepare(image: np.ndarray) -> torch.Tensor:
        x = torch.nn.functional.interpolate(to_unit_tensor(image)[None], size=(size, size), mode="bilinear",
                                            align_corners=False)[0]
        return (x - mean) / std

    def network(pixels: torch.Tensor) -> torch.Tensor:
        tower = getattr(model, "vision_model", model)  # transformers 4 nests the tower; 5 does not
        if not layers:
            return model(pixel_values=pixels).pooler_output  # (B, hidden)
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        return torch.cat([tower.post_layernorm(hidden[l][:, 0]) for l in layers], dim=-1)  # (B, M·hidden)

    spec = f"clip:{directory.resolve()}" + (f":{','.join(map(str, layers))}" if layers else "")
    return PixelEncoder(spec, network, prepare, model.config.hidden_size * max(1, len(layers)))


class FeatureFile:
    """Precomputed features: image id -> (C_v,), from a .safetensors or .npz file."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"features:{path}: no such file; write one with llama_min.peft.visual.save_features")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            table = load_file(path)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                table = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            raise UsageError(f"features:{path}: expected a .safetensors or .npz file of features keyed by image id")
        shapes = {tuple(v.shape) for v in table.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise UsageError(f"features:{path}: every entry must be one (C_v,) vector of the same width; found "
                             f"shapes {sorted(shapes)[:3]}")
        self.spec, self.table = f"features:{path.resolve()}", {k: v.float() for k, v in table.items()}
        self.dim = next(iter(shapes))[0]

    def features(self, image_root: str | Path, ids: Sequence[str]) -> torch.Tensor:
        missing = [i for i in ids if i not in self.table]
        if missing:
            raise UsageError(f"{self.spec}: no features for image {missing[0]} ({len(missing)} missing); the file's "
                             "keys must be the records' \"image\" paths")
        return torch.stack([self.table[i] for i in ids]) if ids else torch.zeros(0, self.dim)


def load_encoder(spec: str):
    """The encoder a spec names (see the module docstring): an object with ``spec``, ``dim`` and
    ``features(image_root, ids)``."""
    kind, _, rest = spec.partition(":")
    if kind == "lab" and not rest:
        return lab_encoder()
    if kind == "clip" and rest:
        directory, layers = rest, []
        head, _, tail = rest.rpartition(":")
        if head and all(part.lstrip("-").isdigit() for part in tail.split(",")):  # clip:DIR:L1,L2,...
            directory, layers = head, [int(part) for part in tail.split(",")]
        return clip_encoder(directory, layers)
    if kind == "features" and rest:
        return FeatureFile(rest)
    raise UsageError(f"--image_encoder {spec!r}: expected lab, clip:DIR, clip:DIR:L1,L2,... or features:FILE")


def save_features(encoder, image_root: str | Path, ids: Sequence[str], path: str | Path) -> None:
    """Write a .safetensors features file (image id -> (C_v,)) that ``features:PATH`` reads back."""
    from safetensors.torch import save_file

    ids = sorted(set(ids))
    feats = encoder.features(image_root, ids)
    save_file({i: f.contiguous() for i, f in zip(ids, feats)}, str(path))
