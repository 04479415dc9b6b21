"""Attention maps of a trained model (lab 6): which earlier tokens each head of each layer looks at.

    python -m lab.plots.attention_maps --checkpoint out/lab06/ckpt --prompt "ROMEO:" --out attention.png

One panel per layer and head: row t is the attention weights of the token at position t over the tokens
0 … t (the causal mask leaves the upper triangle empty). The weights are your model's own: each layer's
attention function (``Attention.attend``, your plain_attention) is called a second time with the identity
matrix as the values, which returns the weights themselves (weights @ I = weights).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import pyplot, save


def attention_weights(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Run the model on tokens (1, T); return each layer's attention weights (H, T, T)."""
    weights = []
    originals = [layer.attention.attend for layer in model.layers]

    def recording(attend):
        def attend_and_record(q, k, v, mask):
            S = k.shape[2]
            eye = torch.eye(S, dtype=v.dtype, device=v.device).expand(k.shape[0], k.shape[1], S, S)
            weights.append(attend(q, k, eye, mask)[0].detach())  # (H, T, S): weights @ I
            return attend(q, k, v, mask)
        return attend_and_record

    try:
        for layer, attend in zip(model.layers, originals):
            layer.attention.attend = recording(attend)
        with torch.no_grad():
            model(tokens)
    finally:
        for layer, attend in zip(model.layers, originals):
            layer.attention.attend = attend
    return weights


def plot_attention(weights: list[torch.Tensor], labels: list[str], out: Path, title: str = "") -> Path:
    plt = pyplot()
    n_layers, n_heads = len(weights), weights[0].shape[0]
    T = weights[0].shape[-1]
    size = max(2.2, 0.18 * T)
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(size * n_heads, size * n_layers), squeeze=False)
    for layer, w in enumerate(weights):
        for head in range(n_heads):
            ax = axes[layer][head]
            ax.imshow(w[head].float().numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
            ticks = range(T) if T <= 32 else range(0, T, max(1, T // 16))
            ax.set_xticks(list(ticks))
            ax.set_yticks(list(ticks))
            ax.set_xticklabels([labels[i] for i in ticks], rotation=90, fontsize=6)
            ax.set_yticklabels([labels[i] for i in ticks], fontsize=6)
    if title:
        fig.suptitle(title)
    return save(fig, out)


def main(argv: list[str] | None = None) -> None:
    from llama_min.checkpoint import load_checkpoint, tokenizer_file
    from llama_min.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(prog="python -m lab.plots.attention_maps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint directory with its tokenizer")
    parser.add_argument("--prompt", default="ROMEO:\nBut soft, what light through yonder window breaks?")
    parser.add_argument("--max_tokens", type=int, default=24, help="plot at most this many tokens of the prompt")
    parser.add_argument("--out", type=Path, default=Path("attention.png"))
    args = parser.parse_args(argv)
    model = load_checkpoint(args.checkpoint).eval()
    path = tokenizer_file(args.checkpoint)
    if path is None:
        raise SystemExit(f"lab.plots.attention_maps: error: {args.checkpoint} holds no tokenizer to encode the prompt")
    tokenizer = load_tokenizer(path)  # tokenizer.model or tokenizer.json
    ids = tokenizer.encode(args.prompt, bos=True)[:args.max_tokens]
    labels = [repr(tokenizer.decode([i]))[1:-1] or "·" for i in ids]
    weights = attention_weights(model, torch.tensor([ids]))
    print(f"wrote {plot_attention(weights, labels, args.out, f'{args.checkpoint}: attention weights')}")


if __name__ == "__main__":
    main()
