"""Lab 10, assembling the model: the mistakes students make in ``Block.forward``, ``Llama.forward`` and
``Llama.init_weights``, and the inputs that show them.

A case's output is the block's (or model's) output followed by what each sub-layer received, recorded by
wrappers around the real sub-layers. The grader replaces the sub-layers with stand-ins that replay the
reference's outputs (stored by ``record``) and, when a stand-in receives something else, name the mistake
whose recorded input it equals. ``init_weights`` is graded by its statistics on a skeleton in the grader: its
mistakes change no case here, and the grader names them by the property they break.
"""

import torch
from torch import nn

from llama_min.config import ModelConfig

from ..mutations import m
from . import Case, generator

BLOCK, MODEL = "llama_min/block.py::Block.forward", "llama_min/model.py::Llama.forward"
INIT = "llama_min/model.py::Llama.init_weights"
CONFIG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=48, multiple_of=16, max_seq_len=16)
PRE_NORM = "LLaMA is pre-norm (section 2.2): each sub-layer reads its input normalised"
ADAPTER = "an adapter maps its sub-layer's output, before that output is added to the stream"
RESIDUAL = "only attention.wo and feed_forward.w2 write into the residual stream; they get 0.02 / sqrt(2·n_layers)"

MUTATIONS = [
    m("block_post_norm", 10, BLOCK, "post-norm", ("self.attention(self.attention_norm(x),", "self.attention(x,"),
      why=PRE_NORM + ", attention(attention_norm(x))"),
    m("block_parallel", 10, BLOCK, "parallel block", ("self.ffn_norm(h)", "self.ffn_norm(x)"),
      why="(GPT-J style) the feed-forward must read h = x + attention(...), the stream after the first residual"),
    m("block_no_attention_residual", 10, BLOCK, "no residual around the attention", ("h = x + a", "h = a"),
      why="h = x + attention(attention_norm(x))"),
    m("block_residual_normed", 10, BLOCK, "the residual adds the normalised input",
      ("h = x + a", "h = self.attention_norm(x) + a"), why="h = x + attention(...), with x itself"),
    m("block_ffn_unnormed", 10, BLOCK, "the feed-forward reads h un-normalised",
      ("self.feed_forward(self.ffn_norm(h))", "self.feed_forward(h)"), why=PRE_NORM + ", feed_forward(ffn_norm(h))"),
    m("block_no_ffn_residual", 10, BLOCK, "no residual around the feed-forward", ("return h + f", "return f"),
      why="out = h + feed_forward(ffn_norm(h))"),
    m("block_residual_from_x", 10, BLOCK, "the second residual adds the block input x", ("return h + f", "return x + f"),
      why="it adds h = x + attention(...), so that the attention's output stays in the stream"),
    m("block_adapter_after_residual", 10, BLOCK, "the adapter is applied after the residual",
      ("            a = self.attention_adapter(a)", "            pass"),
      ("h = x + a", "h = x + a\n        if self.attention_adapter is not None:\n            h = self.attention_adapter(h)"),
      why=ADAPTER),
    m("block_attention_adapter_ignored", 10, BLOCK, "the attention adapter is ignored",
      ("a = self.attention_adapter(a)", "pass"), why=ADAPTER),
    m("block_ffn_adapter_ignored", 10, BLOCK, "the feed-forward adapter is ignored", ("f = self.ffn_adapter(f)", "pass"),
      why=ADAPTER),
    m("model_positions_from_one", 10, MODEL, "positions counted from 1",
      ("slots = torch.arange(start_pos, start_pos + T,", "slots = torch.arange(start_pos + 1, start_pos + T + 1,"),
      why="the first token of a sequence is at position 0"),
    m("model_ignores_start_pos", 10, MODEL, "positions start at start_pos",
      ("slots = torch.arange(start_pos, start_pos + T,", "slots = torch.arange(T,"),
      why="the tokens sit at cache slots start_pos … start_pos + T − 1 and rotate by those positions"),
    m("model_padding_unclamped", 10, MODEL, "padding positions must be clamped at 0", (".clamp(min=0)", ""),
      why="slots − pad_lens is negative on the padding: (slots − pad_lens[:, None]).clamp(min=0)"),
    m("model_padding_ignored", 10, MODEL, "left padding ignored",
      ("positions = slots if pad_lens is None else (slots[None] - pad_lens[:, None]).clamp(min=0)", "positions = slots"),
      why="row b's first real token is at position 0: positions = slots − pad_lens[b], clamped at 0, (B, T)"),
    m("model_mask_always_none", 10, MODEL, "with left padding pass attention_mask",
      ("mask = None if pad_lens is None else attention_mask(start_pos, T, pad_lens, tokens.device)", "mask = None"),
      why="it hides the padding from every query"),
    m("model_every_block_reads_embeddings", 10, MODEL, "every block reads the embeddings",
      ("h = layer(h, cos, sin, mask, start_pos, visual)", "out = layer(h, cos, sin, mask, start_pos, visual)"),
      why="block i + 1 reads block i's output"),
    m("model_scaled_embeddings", 10, MODEL, "the embeddings are scaled by √dim",
      ("h = self.tok_embeddings(tokens)", "h = self.tok_embeddings(tokens) * math.sqrt(self.config.dim)"),
      why="(a Transformer-paper habit) LLaMA feeds the embedding rows as they are"),
    m("model_no_final_norm", 10, MODEL, "the final RMSNorm is skipped", ("h = self.norm(h)", "pass"),
      why="logits = output(norm(h))"),
    m("model_targets_shifted_again", 10, MODEL, "the targets are shifted again",
      ("F.cross_entropy(logits.flatten(0, 1), targets.flatten(),",
       "F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(),"),
      why="they already are the next tokens: compare logits[b, t] with targets[b, t]"),
    m("model_loss_summed", 10, MODEL, "the loss is summed",
      ("ignore_index=IGNORE_INDEX)", "ignore_index=IGNORE_INDEX, reduction='sum')"),
      why="it is the MEAN cross-entropy over the counted targets"),
    m("model_loss_counts_ignored", 10, MODEL, "averaged over every position",
      ("ignore_index=IGNORE_INDEX)", "ignore_index=IGNORE_INDEX, reduction='sum') / targets.numel()"),
      why="ignored ones included: divide by the number of targets that are not IGNORE_INDEX"),
    m("model_no_length_check", 10, MODEL, "raise a ValueError", ("if start_pos + T > self.config.max_seq_len:", "if False:"),
      why="a sequence longer than max_seq_len must be refused before anything runs"),
    m("model_last_only_ignored", 10, MODEL, "last_only ignored", ("h = h[:, -1:]", "pass"),
      why="the logits of the last position only, (B, 1, vocab): keep h[:, -1:] before the final norm and head"),
    m("init_residual_not_scaled", 10, INIT, "the residual projections are not scaled down",
      ("std=residual_std)", "std=0.02)"), why=RESIDUAL),
    m("init_sqrt_n_layers", 10, INIT, "divided by sqrt(n_layers) instead of sqrt(2·n_layers)",
      ("math.sqrt(2 * self.config.n_layers)", "math.sqrt(self.config.n_layers)"),
      why="each block adds TWO outputs to the stream"),
    m("init_wrong_projection", 10, INIT, "scaled init applied to the wrong projection",
      ("('attention.wo.weight', 'feed_forward.w2.weight')", "('attention.wq.weight', 'feed_forward.w1.weight')"),
      why=RESIDUAL),
    m("init_gains_left", 10, INIT, "RMSNorm gains must start at 1", ("nn.init.ones_(p)", "pass"),
      why="init_weights sets every parameter"),
    m("init_uniform", 10, INIT, "not normally distributed",
      ("nn.init.normal_(p, mean=0.0, std=0.02)", "nn.init.uniform_(p, -0.02 * 3 ** 0.5, 0.02 * 3 ** 0.5)"),
      why="use nn.init.normal_"),
    m("init_embedding_skipped", 10, INIT, "nn.Embedding's N(0, 1)",
      ("for name, p in self.named_parameters():",
       "for name, p in self.named_parameters():\n            if name == 'tok_embeddings.weight':\n                continue"),
      why="every matrix, the embedding too, gets N(0, 0.02²)"),
]

BLOCK_PARTS = ("attention_norm", "attention", "attention_adapter", "ffn_norm", "feed_forward", "ffn_adapter")


class Recording(nn.Module):
    """A sub-layer that remembers its first argument and its output."""

    def __init__(self, inner: nn.Module, shape):
        super().__init__()
        self.inner, self.got, self.out = inner, torch.full(shape, float("nan")), None  # NaN: never called
        if hasattr(inner, "attention"):  # a block: Llama.forward asks whether its cache is active
            self.attention = inner.attention

    def forward(self, x, *args, **kwargs):
        self.got = x.detach().clone()
        self.out = self.inner(x, *args, **kwargs)
        return self.out


def block_parts(adapters: bool) -> list[str]:
    return [p for p in BLOCK_PARTS if adapters or not p.endswith("_adapter")]


def run_block(code, t, adapters: bool):
    torch.manual_seed(10)  # the same sub-layer weights in run and record
    block = code.Block(ModelConfig(**CONFIG))
    if adapters:  # any module mapping (B, T, dim) to itself stands for a bottleneck adapter
        block.attention_adapter, block.ffn_adapter = nn.Linear(CONFIG["dim"], CONFIG["dim"]), nn.Linear(
            CONFIG["dim"], CONFIG["dim"])
    parts = {}
    for name in block_parts(adapters):
        parts[name] = Recording(getattr(block, name), t["x"].shape)
        setattr(block, name, parts[name])
    out = block(t["x"], t["cos"], t["sin"], None, 0)
    return out, parts


def model_parts(n_layers: int) -> list[str]:
    return ["rope", *[f"layers.{i}" for i in range(n_layers)], "norm"]


def run_model(code, t, settings):
    """Llama.forward with the case's weights, recording what the rotary tables, each block and the final norm got."""
    model = code.Llama(ModelConfig(**CONFIG))
    model.load_state_dict({k[len("weights."):]: v for k, v in t.items() if k.startswith("weights.")})
    model.eval()  # the plain path: logits and the loss from them (training mode chunks the loss instead)
    tokens = t["tokens"]
    if settings["start_pos"]:  # the earlier tokens in the cache, before the recorders go in
        model.setup_cache(tokens.shape[0], CONFIG["max_seq_len"])
        model(t["earlier"], start_pos=0)
    parts = {"rope": Recording(model.rope, tokens.shape[-1:])}
    model.rope = parts["rope"]
    for i, layer in enumerate(model.layers):
        parts[f"layers.{i}"] = model.layers[i] = Recording(layer, (*tokens.shape, CONFIG["dim"]))
    parts["norm"] = model.norm = Recording(model.norm, (*tokens.shape, CONFIG["dim"]))
    logits, loss = model(tokens, t.get("targets"), start_pos=settings["start_pos"], pad_lens=t.get("pad_lens"),
                         last_only=settings["last_only"])
    return (logits,) if loss is None else (logits, loss), parts


def record_model(code, t, settings):
    outputs, parts = run_model(code, t, settings)
    kept = {f"{name}.out": part.out for name, part in parts.items()}
    T = t["tokens"].shape[1]
    kept["mask"] = code.attention_mask(settings["start_pos"], T, t.get("pad_lens"))
    return kept


MODEL_SETTINGS = {"plain": dict(targets=True, start_pos=0, padded=False, last_only=False),
                  "padded": dict(targets=True, start_pos=0, padded=True, last_only=False),
                  "last_only": dict(targets=False, start_pos=0, padded=False, last_only=True),
                  "cached": dict(targets=False, start_pos=3, padded=False, last_only=False)}


def cases():
    g = generator(10)
    B, T, dim, head_dim = 2, 5, CONFIG["dim"], CONFIG["dim"] // CONFIG["n_heads"]
    for adapters in (False, True):
        inputs = {"x": torch.randn(B, T, dim, generator=g), "cos": torch.randn(T, head_dim // 2, generator=g),
                  "sin": torch.randn(T, head_dim // 2, generator=g)}

        def run(code, t, adapters=adapters):
            out, parts = run_block(code, t, adapters)
            return (out, *[parts[name].got for name in block_parts(adapters)])

        def record(code, t, adapters=adapters):
            _, parts = run_block(code, t, adapters)
            return {f"{name}.out": part.out for name, part in parts.items()}

        yield Case(f"block.{'adapters' if adapters else 'plain'}", inputs, run, record=record,
                   params={"adapters": adapters, "parts": block_parts(adapters), "config": CONFIG},
                   hint="h = x + attention(attention_norm(x), cos, sin, mask, start); out = h + "
                        "feed_forward(ffn_norm(h))" + (", each sub-layer's output through its adapter before its "
                                                      "residual" if adapters else ""))

    torch.manual_seed(100)
    from llama_min.model import Llama  # the reference's weights, drawn once: every version loads the same
    weights = {f"weights.{k}": v.detach().clone() for k, v in Llama(ModelConfig(**CONFIG)).state_dict().items()}
    V, T = CONFIG["vocab_size"], 6
    tokens = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = -100  # a prompt whose tokens do not count
    for name, s in MODEL_SETTINGS.items():
        inputs = dict(weights, tokens=tokens[:, :2] if s["start_pos"] else tokens)
        if s["targets"]:
            inputs["targets"] = targets
        if s["padded"]:
            inputs["pad_lens"] = torch.tensor([0, 2])
        if s["start_pos"]:
            inputs["earlier"] = tokens[:, 2:5]
        settings = {"start_pos": s["start_pos"], "last_only": s["last_only"]}
        n_out = 2 if s["targets"] else 1

        def run(code, t, settings=settings):
            outputs, parts = run_model(code, t, settings)
            return (*outputs, *[part.got for part in parts.values()])

        yield Case(f"model.{name}", inputs, run, record=lambda code, t, settings=settings: record_model(code, t, settings),
                   params=settings | {"n_out": n_out, "parts": model_parts(CONFIG["n_layers"]), "config": CONFIG},
                   hint="tok_embeddings -> each block in turn (cos, sin, mask, start_pos) -> norm -> output, logits in "
                        "float32" + ("; the loss: mean cross-entropy over the targets that are not IGNORE_INDEX"
                                     if s["targets"] else ""),
                   shape_causes={str([B, T, V]): "last_only ignored: the logits of the last position only, (B, 1, "
                                 "vocab)"} if s["last_only"] else {})

