"""RoPE made visible (lab 3): how each pair of features turns with the position, and how the dot product of
a rotated query and key depends on their distance only.

    python -m lab.plots.rope --out rope.png [--head_dim 64 --theta 10000]

Left: cos(m·θ_i) for every pair i and position m: pair 0 turns by one radian per position, the last pair
hardly at all, so the low pairs tell near positions apart and the high pairs far ones.
Right: q_m · k_n against the offset m − n, for q = k = a vector of ones (the curve RoFormer section 3.4.3
bounds: it decays, with oscillations, as the distance grows) and for a random q and k, computed at two
different absolute positions: the curves lie on top of each other.
Everything is computed with your RotaryEmbedding and apply_rotary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llama_min.rope import RotaryEmbedding, apply_rotary

from . import pyplot, save


def dot_by_offset(q: torch.Tensor, k: torch.Tensor, rope: RotaryEmbedding, n: int, max_offset: int) -> torch.Tensor:
    """q rotated to position n + offset and k rotated to position n: their dot product for offset 0 … max_offset."""
    d = q.shape[-1]
    positions = torch.arange(n, n + max_offset + 1)
    cos, sin = rope(positions)
    qs = apply_rotary(q.expand(1, len(positions), 1, d), cos, sin)[0, :, 0]  # (offsets, d)
    k0 = apply_rotary(k.view(1, 1, 1, d), cos[:1], sin[:1])[0, 0, 0]  # k at position n
    return qs @ k0


def plot_rope(out: Path, head_dim: int = 64, theta: float = 10000.0, max_offset: int = 256) -> Path:
    plt = pyplot()
    rope = RotaryEmbedding(head_dim, theta)
    positions = torch.arange(max_offset + 1)
    cos, _ = rope(positions)  # (T, d/2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    image = left.imshow(cos.T.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=left, label="cos(m·θ_i)")
    left.set_xlabel("position m")
    left.set_ylabel("pair i (features 2i, 2i+1)")
    left.set_title(f"each pair turns at its own rate θ_i (d = {head_dim}, theta = {theta:g})")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    ones = torch.ones(head_dim)
    offsets = torch.arange(max_offset + 1)
    right.plot(offsets, dot_by_offset(ones, ones, rope, 0, max_offset), label="q = k = ones")
    right.plot(offsets, dot_by_offset(q, k, rope, 0, max_offset), label="random q, k at n = 0")
    right.plot(offsets, dot_by_offset(q, k, rope, 1000, max_offset), "--", label="random q, k at n = 1000")
    right.set_xlabel("offset m − n")
    right.set_ylabel("q_m · k_n")
    right.set_title("the dot product depends on the offset only")
    right.legend(fontsize=8)
    return save(fig, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.plots.rope", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("rope.png"))
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--theta", type=float, default=10000.0)
    args = parser.parse_args(argv)
    print(f"wrote {plot_rope(args.out, args.head_dim, args.theta)}")


if __name__ == "__main__":
    main()
