"""Train the lab's image encoder (llama_min/peft/visual.py, LabEncoder) on the image world, then freeze it.

    python -m experiments.train_image_encoder          # writes llama_min/peft/lab_encoder.safetensors

It stands in for CLIP: a small CNN taught, with four classification heads that are thrown away after
training, to see what the world's pictures show (colour, shape, side, count). Only the colour-shape
combinations of the *training* pictures are used (images.HELD_OUT_COMBINATIONS never appear), so a
held-out combination is new to the encoder too. Its 64 features are what the multimodal adapter reads.

Seeded and single-threaded, so the same command writes the same weights; it takes about half a minute
on one CPU core and prints each head's accuracy on fresh pictures, held-out combinations included.
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from llama_min.finetune.images import BACKGROUND, COLOURS, HELD_OUT_COMBINATIONS, SHAPES, SIDES, draw
from llama_min.peft.visual import LAB_WEIGHTS, LabEncoder, to_unit_tensor

HEADS = {"colour": len(COLOURS), "shape": len(SHAPES), "side": len(SIDES), "count": 3}


def pictures(n: int, seed: int, held_out: bool, recolour: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n pictures (n, 3, 32, 32) and their labels; of the held-out combinations only, or never of them.
    A `recolour` share of them get shapes of a random colour instead (colour label -100: not learned), so
    that the shape, side and count features cannot lean on colour; without it the encoder learns that
    no blue shape is a square, and fails on the held-out combinations."""
    rng = random.Random(seed)
    combos = [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT_COMBINATIONS) == held_out]
    images, labels = [], {k: [] for k in HEADS}
    for _ in range(n):
        colour, shape = rng.choice(combos)
        side, count = rng.choice(SIDES), rng.randint(1, 3)
        image = draw(colour, shape, side, count, rng)
        colour_label = list(COLOURS).index(colour)
        if rng.random() < recolour:
            image[(image != BACKGROUND).any(-1)] = [rng.randint(0, 255) for _ in range(3)]
            colour_label = -100
        images.append(to_unit_tensor(image))
        for key, value in (("colour", colour_label), ("shape", SHAPES.index(shape)),
                           ("side", SIDES.index(side)), ("count", count - 1)):
            labels[key].append(value)
    return torch.stack(images), {k: torch.tensor(v) for k, v in labels.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(LAB_WEIGHTS))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    x, y = pictures(4000, args.seed, held_out=False, recolour=0.5)
    encoder = LabEncoder()
    heads = nn.ModuleDict({k: nn.Linear(encoder.dim, n) for k, n in HEADS.items()})
    opt = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        pick = torch.randint(0, len(x), (128,), generator=g)
        feats = encoder(x[pick])
        loss = sum(F.cross_entropy(heads[k](feats), y[k][pick]) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    with torch.no_grad():
        for name, held in (("new pictures, seen combinations", False), ("held-out combinations", True)):
            tx, ty = pictures(500, args.seed + 1, held_out=held)
            feats = encoder(tx)
            accuracy = {k: (heads[k](feats).argmax(-1) == ty[k]).float().mean().item() for k in HEADS}
            print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, args.out)
    print(f"wrote {args.out} ({sum(p.numel() for p in encoder.parameters()):,} parameters)")


if __name__ == "__main__":
    main()
