"""Lab 10's fixtures (assembling the model): every sub-layer's input and output in a reference block and a
reference model, so that the grader's stand-ins can replay them, and the outputs of typical wrong wirings.

Cases ``block.*`` hold, per sub-layer NAME, ``NAME.in`` (what the reference passes it) and ``NAME.out`` (what
it returns), and ``NAME.known.VARIANT`` (what a typical wrong wiring passes it instead) with the mistake in
the JSON's ``replay`` section. Cases ``model.*`` do the same for the rotary tables, each block and the final
norm of a whole ``Llama.forward``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llama_min.attention import attention_mask
from llama_min.block import Block
from llama_min.config import ModelConfig
from llama_min.model import IGNORE_INDEX, Llama

CONFIG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=48, multiple_of=16, max_seq_len=16)

PRE_NORM = ("post-norm, or no norm before the sub-layer: LLaMA is pre-norm (section 2.2), each sub-layer reads "
            "its input normalised, attention(attention_norm(x)), feed_forward(ffn_norm(h))")


def replay(w, case: str, name: str, got_in, out, known: dict | None = None, **params) -> None:
    """Store sub-layer NAME's input and output for the case, and the inputs typical mistakes give it."""
    w._put(f"{case}.{name}.in", got_in)
    w._put(f"{case}.{name}.out", out)
    entry = {"params": params} if params else {}
    for variant, (tensor, cause) in (known or {}).items():
        w._put(f"{case}.{name}.known.{variant}", tensor)
        entry.setdefault("known", {})[variant] = cause
    w.cases[case].setdefault("replay", {})[name] = entry


def block_cases(w) -> None:
    config = ModelConfig(**CONFIG)
    g = torch.Generator().manual_seed(10)
    B, T = 2, 5
    for adapters in (False, True):
        block = Block(config)
        if adapters:  # any module mapping (B, T, dim) to itself stands for a bottleneck adapter
            block.attention_adapter, block.ffn_adapter = nn.Linear(config.dim, config.dim), nn.Linear(config.dim,
                                                                                                      config.dim)
        x = torch.randn(B, T, config.dim, generator=g)
        cos, sin = torch.randn(T, config.head_dim // 2, generator=g), torch.randn(T, config.head_dim // 2, generator=g)
        with torch.no_grad():
            n1 = block.attention_norm(x)
            a = block.attention(n1, cos, sin, None, 0)
            a2 = block.attention_adapter(a) if adapters else a
            h = x + a2
            n2 = block.ffn_norm(h)
            f = block.feed_forward(n2)
            f2 = block.ffn_adapter(f) if adapters else f
            out = h + f2
            assert torch.equal(out, block(x, cos, sin, None, 0)), "the reference Block.forward changed"
        name = f"block.{'adapters' if adapters else 'plain'}"
        c = w.case(name, {"x": x, "cos": cos, "sin": sin}, out, params={"adapters": adapters},
                   hint="h = x + attention(attention_norm(x), cos, sin, mask, start); out = h + "
                        "feed_forward(ffn_norm(h))" + (", each sub-layer's output through its adapter before its "
                                                      "residual" if adapters else ""))
        replay(w, name, "attention_norm", x, n1)
        replay(w, name, "attention", n1, a, {"x": (x, PRE_NORM)})
        ffn_norm_known = {"x": (x, "parallel block (GPT-J style): the feed-forward branch must read h = x + "
                                   "attention(...), the stream after the first residual, not the block input x"),
                          "a": (a2, "no residual around the attention: h = x + attention(attention_norm(x))"),
                          "n1": (n1 + a2, "the residual adds the normalised input: h = x + attention(...) with x "
                                          "itself, not attention_norm(x); the stream stays un-normalised")}
        if adapters:
            replay(w, name, "attention_adapter", a, a2,
                   {"h": (x + a, "the adapter is applied after the residual: it maps the attention's output, "
                                 "h = x + attention_adapter(attention(...))")})
            ffn_norm_known["no_adapter"] = (x + a, "the attention adapter is ignored: when self.attention_adapter "
                                                   "is not None, h = x + attention_adapter(attention(...))")
        replay(w, name, "ffn_norm", h, n2, ffn_norm_known)
        replay(w, name, "feed_forward", n2, f, {"h": (h, PRE_NORM)})
        if adapters:
            replay(w, name, "ffn_adapter", f, f2,
                   {"sum": (h + f, "the adapter is applied after the residual: it maps the feed-forward's output, "
                                   "out = h + ffn_adapter(feed_forward(...))")})
            c.mistake("no_ffn_adapter", h + f, "the feed-forward adapter is ignored: when self.ffn_adapter is not "
                      "None, out = h + ffn_adapter(feed_forward(ffn_norm(h)))")
        c.mistake("no_ffn_residual", f2, "no residual around the feed-forward: out = h + feed_forward(ffn_norm(h))")
        c.mistake("residual_from_x", x + f2, "the second residual adds the block input x; it adds h = x + "
                  "attention(...), so that the attention's output stays in the stream")
        c.mistake("ffn_dropped", h, "the feed-forward's output is not added: out = h + feed_forward(ffn_norm(h))")


def record_model(model: Llama, tokens, targets, start_pos, pad_lens, last_only):
    """Run the reference forward and collect what the rotary tables, each block and the final norm received."""
    seen: dict[str, tuple] = {}

    def keep(name):
        def hook(module, args, kwargs, out):
            seen[name] = (args, out)
        return hook

    handles = [model.rope.register_forward_hook(keep("rope"), with_kwargs=True),
               model.norm.register_forward_hook(keep("norm"), with_kwargs=True)]
    handles += [layer.register_forward_hook(keep(f"layers.{i}"), with_kwargs=True)
                for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        out = model(tokens, targets, start_pos=start_pos, pad_lens=pad_lens, last_only=last_only)
    for h in handles:
        h.remove()
    return out, seen


def model_cases(w) -> None:
    torch.manual_seed(100)
    config = ModelConfig(**CONFIG)
    model = Llama(config)
    g = torch.Generator().manual_seed(11)
    B, T, V = 2, 6, config.vocab_size
    tokens = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = IGNORE_INDEX  # a prompt whose tokens do not count
    pad_lens = torch.tensor([0, 2])
    settings = {"plain": dict(targets=targets, start_pos=0, pad_lens=None, last_only=False),
                "padded": dict(targets=targets, start_pos=0, pad_lens=pad_lens, last_only=False),
                "last_only": dict(targets=None, start_pos=0, pad_lens=None, last_only=True),
                "cached": dict(targets=None, start_pos=3, pad_lens=None, last_only=False)}
    for name, s in settings.items():
        toks = tokens[:, :2] if name == "cached" else tokens
        if name == "cached":  # slots 0..2 hold earlier tokens
            model.setup_cache(B, config.max_seq_len)
            with torch.no_grad():
                model(tokens[:, 2:5], start_pos=0)
        (logits, loss), seen = record_model(model, toks, s["targets"], s["start_pos"], s["pad_lens"], s["last_only"])
        expected = (logits,) if loss is None else (logits, loss)
        inputs = {"tokens": toks, "tok_embeddings": model.tok_embeddings.weight, "output": model.output.weight}
        if s["targets"] is not None:
            inputs["targets"] = s["targets"]
        if s["pad_lens"] is not None:
            inputs["pad_lens"] = s["pad_lens"]
            inputs["mask"] = attention_mask(s["start_pos"], T, s["pad_lens"])
        else:  # the causal mask, which a forward may pass instead of None
            inputs["causal"] = attention_mask(s["start_pos"], toks.shape[1])
        case = f"model.{name}"
        c = w.case(case, inputs, expected,
                   params={"start_pos": s["start_pos"], "last_only": s["last_only"], "n_layers": config.n_layers,
                           "config": CONFIG},
                   hint="tok_embeddings -> each block in turn (cos, sin, mask, start_pos) -> norm -> output, "
                        "logits in float32" + ("; the loss: mean cross-entropy over the targets that are not "
                                               "IGNORE_INDEX" if s["targets"] is not None else ""),
                   shape_causes={str([B, T, V]): "last_only: the logits of the last position only, (B, 1, vocab)"}
                   if s["last_only"] else None)
        emb = model.tok_embeddings(toks).detach()
        slots = torch.arange(s["start_pos"], s["start_pos"] + toks.shape[1])
        rope_known = {"from_one": (seen["rope"][0][0] + 1, "positions counted from 1: the first token of a "
                                                          "sequence is at position 0")}
        if s["start_pos"]:
            rope_known["no_start"] = (torch.arange(toks.shape[1]), "positions start at start_pos: the tokens sit at "
                                      "cache slots start_pos … start_pos + T − 1 and rotate by those positions")
        if s["pad_lens"] is not None:
            rope_known["unpadded"] = (slots, "left padding ignored: row b's first real token is at position 0, "
                                      "positions = slots − pad_lens[b] (clamped at 0), a (B, T) tensor")
            rope_known["unclamped"] = (slots[None] - s["pad_lens"][:, None], "padding positions must be clamped at "
                                       "0 (they are negative otherwise): (slots − pad_lens[:, None]).clamp(min=0)")
        else:
            rope_known["tokens"] = (toks, "the rotary tables are indexed by positions, not by token ids")
        replay(w, case, "rope", seen["rope"][0][0], seen["rope"][1], rope_known)
        for i in range(config.n_layers):
            args, out = seen[f"layers.{i}"]
            known = {"scaled": (emb * math.sqrt(config.dim), "the embeddings are scaled by √dim (a Transformer-paper "
                                "habit): LLaMA feeds the embedding rows as they are")} if i == 0 else \
                {"embeddings": (emb, "every block reads the embeddings: block i + 1 reads block i's output")}
            replay(w, case, f"layers.{i}", args[0], out, known, start=s["start_pos"])
        last = seen[f"layers.{config.n_layers - 1}"][1]
        norm_known = {"first_layer": (seen["layers.0"][1], "only the first block's output reaches the final norm: "
                                      "each block's output feeds the next, the last one's the norm")}
        if s["last_only"]:
            norm_known["all_positions"] = (last, "last_only ignored: the logits of the last position only, (B, 1, "
                                           "vocab); keep h[:, -1:] before the final norm and the output head")
        replay(w, case, "norm", seen["norm"][0][0], seen["norm"][1], norm_known)
        if s["last_only"]:
            c.mistake("norm_skipped", F.linear(last[:, -1:], model.output.weight).float(),
                      "the final RMSNorm is skipped: logits = output(norm(h))")
        else:
            raw = F.linear(last, model.output.weight).float()
            if s["targets"] is None:
                c.mistake("norm_skipped", raw, "the final RMSNorm is skipped: logits = output(norm(h))")
            else:
                flat_t = s["targets"].flatten()
                c.mistake("norm_skipped", (raw, F.cross_entropy(raw.flatten(0, 1), flat_t)),
                          "the final RMSNorm is skipped: logits = output(norm(h))")
                shifted = F.cross_entropy(logits[:, :-1].flatten(0, 1), s["targets"][:, 1:].flatten())
                c.mistake("shifted_again", (logits, shifted), "the targets are shifted again: they already are the "
                          "next tokens (targets[b, t] is the token after tokens[b, t]); compare logits[b, t] with "
                          "targets[b, t]")
                summed = F.cross_entropy(logits.flatten(0, 1), flat_t, reduction="sum")
                c.mistake("loss_sum", (logits, summed), "the loss is summed: it is the MEAN cross-entropy over the "
                          "counted targets")
                c.mistake("mean_over_all", (logits, summed / flat_t.numel()),
                          "the loss is averaged over every position, ignored ones included: divide by the number "
                          "of targets that are not IGNORE_INDEX")
    model.drop_cache()


def lab10(w) -> None:
    block_cases(w)
    model_cases(w)
