"""Lab 10, assembling the model: ``Block.forward``, ``Llama.forward`` and ``Llama.init_weights``, against
lab/fixtures/lab10.*.

Only the wiring is graded here. The sub-layers belong to labs 1-4 (RMSNorm, attention, feed-forward, the
rotary tables) and each block is graded apart from the model, so every one of them is a stand-in that replays
the reference's output for exactly the input the reference gives it, and names what it received otherwise
(the block input where the normalised one belongs, the embeddings where the previous block's output does).
``init_weights`` runs on a skeleton with the model's parameter names, built from torch's own layers.
"""

import math

import pytest
import torch
from torch import nn

import llama_min.model as model_module
from lab.graders.check import GraderError, LabFixtures, check, fail, matches
from llama_min.block import Block
from llama_min.config import ModelConfig
from llama_min.model import Llama

LAB = LabFixtures(10)
TOL = {"atol": 1e-5, "rtol": 1e-4}


def same(got, want) -> bool:
    return torch.is_tensor(got) and matches(got, want, TOL)


def describe(t) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}" if torch.is_tensor(t) else f"a {type(t).__name__}"


class Replay(nn.Module):
    """Stands for sub-layer ``name``: returns the reference's output (``name.out``) when it receives what the
    reference passed it (item ``index`` of the case's output), and otherwise names the mistake whose recorded
    input it equals."""

    def __init__(self, case, name: str, index: int, what: str):
        super().__init__()
        self.case, self.name, self.index, self.what = case, name, index, what
        self.got = None

    def receive(self, x):
        __tracebackhide__ = True
        want = self.case.output()[self.index]
        self.got = x
        if same(x, want):
            return
        causes = [cause for outputs, cause in self.case.mistakes().values()
                  if len(outputs) > self.index and same(x, outputs[self.index])]
        if causes:
            fail(f"{self.what} received the wrong input.\nLikely mistake: " + "\nor: ".join(causes))
        fail(f"{self.what} received {describe(x)} that is not what the reference passes it ({describe(want)}).\n"
             f"Check: {self.case.meta.get('hint', '')}")

    def forward(self, x, *args, **kwargs):
        __tracebackhide__ = True
        self.receive(x)
        out = self.case.output(f"{self.name}.out")
        return out[0] if len(out) == 1 else out


class ReplayAttention(Replay):
    def forward(self, x, cos=None, sin=None, mask=None, start=0, visual=None):
        __tracebackhide__ = True
        self.receive(x)
        if not (same(cos, self.case["cos"]) and same(sin, self.case["sin"])) or mask is not None or start != 0 \
                or visual is not None:
            fail(f"{self.what} must receive the block's cos, sin, mask, start and visual unchanged (here mask=None, "
                 "start=0, visual=None)")
        return self.case[f"{self.name}.out"]


class ReplayBlock(Replay):
    """A whole block of the model: checks the stream it receives and the rotary tables, mask and start."""

    def __init__(self, case, name, index, what, cached: bool):
        super().__init__(case, name, index, what)
        self.attention = nn.Module()  # Llama.forward asks whether the first layer's cache holds anything
        self.attention.cache = nn.Module()
        self.attention.cache.active = cached

    def forward(self, x, cos=None, sin=None, mask=None, start=0, visual=None):
        __tracebackhide__ = True
        self.receive(x)
        if visual is not None:
            fail(f"{self.what} received image features, but no images were given: pass visual=None through")
        cos_, sin_ = self.case.output("rope.out")
        if not (same(cos, cos_) and same(sin, sin_)):
            fail(f"{self.what} received other cos, sin than self.rope(positions) returned: compute them once, "
                 "before the blocks, and pass them to every block")
        if "pad_lens" in self.case.tensors and not same(mask, self.case["mask"]):
            fail(f"{self.what} received mask {describe(mask) if mask is not None else 'None'}.\nLikely mistake: with "
                 "left padding pass attention_mask(start_pos, T, pad_lens, device), which hides the padding")
        if "pad_lens" not in self.case.tensors and mask is not None and not same(mask, self.case["mask"]):
            fail(f"{self.what} received a mask that is not the causal one; without padding pass mask=None")
        if start != self.case.params["start_pos"]:
            fail(f"{self.what} received start={start}; pass start_pos, the cache slot of tokens[:, 0]")
        return self.case[f"{self.name}.out"]


def received(case, replays: dict, n_out: int) -> list:
    """What each stand-in received, in the case's order; NaN for one never called (as the catalogue records)."""
    want = case.output()
    return [replays[name].got if replays[name].got is not None else torch.full_like(want[n_out + i], float("nan"))
            for i, name in enumerate(case.params["parts"])]


def replay_mask(case):
    def attention_mask(start, seq_len, pad_lens=None, device=None):
        __tracebackhide__ = True
        if start != case.params["start_pos"] or seq_len != case["tokens"].shape[1]:
            fail(f"attention_mask was called with start={start}, seq_len={seq_len}; expected start_pos and T")
        if pad_lens is not None and not same(pad_lens, case["pad_lens"]):
            fail("attention_mask received other pad_lens than Llama.forward's")
        return case["mask"]
    return attention_mask


# ---- Block.forward ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["plain", "adapters"])
def test_block_forward(name):
    """One block on x (2, 5, 32) with stand-in sub-layers; the second case has bottleneck adapters installed."""
    case = LAB.case(f"block.{name}")
    block = Block(ModelConfig(**case.params["config"]))
    replays = {}
    for i, part in enumerate(case.params["parts"]):
        kind = ReplayAttention if part == "attention" else Replay
        replays[part] = kind(case, part, 1 + i, part)
        setattr(block, part, replays[part])
    with torch.no_grad():
        out = block(case["x"], case["cos"], case["sin"], None, 0)
    check((out, *received(case, replays, 1)), case, f"Block.forward(x {tuple(case['x'].shape)})"
          + (" with adapters" if case.params["adapters"] else "") + " -> (out, then what each sub-layer received)")


# ---- Llama.forward ----------------------------------------------------------------------------------------

def stand_in_model(case, monkeypatch) -> tuple[Llama, dict]:
    """A Llama whose rotary tables, blocks and final norm are stand-ins; the embedding and output head hold the
    reference's weights (torch's own layers)."""
    config = ModelConfig(**case.params["config"])
    monkeypatch.setattr(Llama, "init_weights", lambda self: None)  # graded on its own, below
    model = Llama(config)
    monkeypatch.setattr(model_module, "attention_mask", replay_mask(case))
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(case["weights.tok_embeddings.weight"])
        model.output.weight.copy_(case["weights.output.weight"])
    n_out, replays = case.params["n_out"], {}
    for i, part in enumerate(case.params["parts"]):
        if part.startswith("layers."):
            replays[part] = ReplayBlock(case, part, n_out + i, f"self.layers[{part[7:]}]", case.params["start_pos"] > 0)
        else:
            replays[part] = Replay(case, part, n_out + i, "self.rope (the rotary tables)" if part == "rope" else
                                   "self.norm (the final RMSNorm)")
    model.rope, model.norm = replays["rope"], replays["norm"]
    model.layers = nn.ModuleList(replays[p] for p in case.params["parts"] if p.startswith("layers."))
    return model.eval(), replays  # eval: the logits and the loss from them


@pytest.mark.parametrize("name", ["plain", "padded", "last_only", "cached"])
def test_model_forward(name, monkeypatch):
    """Tokens (2, 6) through 2 stand-in blocks: with targets (two ignored), left padding [0, 2], last_only, and
    2 tokens after 3 cached ones (start_pos=3)."""
    case = LAB.case(f"model.{name}")
    model, replays = stand_in_model(case, monkeypatch)
    kwargs = {"start_pos": case.params["start_pos"], "last_only": case.params["last_only"]}
    if "pad_lens" in case.tensors:
        kwargs["pad_lens"] = case["pad_lens"]
    targets = case["targets"] if "targets" in case.tensors else None
    with torch.no_grad():
        logits, loss = model(case["tokens"], targets, **kwargs)
    settings = ", ".join(f"{k}={v}" for k, v in kwargs.items() if not torch.is_tensor(v))
    what = f"Llama.forward(tokens {tuple(case['tokens'].shape)}, {settings})"
    n_out = case.params["n_out"]
    if n_out == 1 and loss is not None:
        fail(f"{what} returned a loss {loss!r} without targets; expected None")
    outputs = (logits, loss) if n_out == 2 else (logits,)
    check((*outputs, *received(case, replays, n_out)), case,
          what + (" -> (logits, loss" if n_out == 2 else " -> (logits") + ", then what each stand-in received)")


def test_model_refuses_what_it_cannot_run(monkeypatch):
    """More positions than max_seq_len (16), and start_pos > 0 with no cache holding the earlier tokens."""
    case = LAB.case("model.plain")
    model, _ = stand_in_model(case, monkeypatch)
    for tokens, start, why in ((torch.zeros(1, 17, dtype=torch.long), 0, "17 tokens for a max_seq_len of 16"),
                               (torch.zeros(1, 2, dtype=torch.long), 3, "start_pos=3 with no active KV cache")):
        try:
            model(tokens, start_pos=start)
        except ValueError:
            continue
        except GraderError:
            fail(f"Llama.forward ran into the blocks with {why}; raise a ValueError that says so first")
        fail(f"Llama.forward accepted {why}; raise a ValueError that says so")


# ---- Llama.init_weights -----------------------------------------------------------------------------------

class Skeleton(nn.Module):
    """The model's parameter names and shapes, built from torch's layers; gains start at 0.5 and matrices at
    nn.Linear's and nn.Embedding's defaults, so that init_weights must set every one."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dim, kv = config.dim, config.n_kv_heads * config.head_dim
        self.tok_embeddings = nn.Embedding(config.vocab_size, dim)
        self.layers = nn.ModuleList()
        for _ in range(config.n_layers):
            layer = nn.Module()
            layer.attention_norm, layer.ffn_norm = nn.Module(), nn.Module()
            for norm in (layer.attention_norm, layer.ffn_norm):
                norm.weight = nn.Parameter(torch.full((dim,), 0.5))
            layer.attention = nn.Module()
            for name, shape in (("wq", (dim, dim)), ("wk", (dim, kv)), ("wv", (dim, kv)), ("wo", (dim, dim))):
                setattr(layer.attention, name, nn.Linear(*shape, bias=False))
            layer.feed_forward = nn.Module()
            for name, shape in (("w1", (dim, config.hidden_dim)), ("w2", (config.hidden_dim, dim)),
                                ("w3", (dim, config.hidden_dim))):
                setattr(layer.feed_forward, name, nn.Linear(*shape, bias=False))
            self.layers.append(layer)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.full((dim,), 0.5))
        self.output = nn.Linear(dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight


INIT_CONFIG = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=64, max_seq_len=64)
RESIDUAL = ("attention.wo.weight", "feed_forward.w2.weight")


def diagnose(name: str, p: torch.Tensor, want: float, n_layers: int) -> str | None:
    """What is wrong with matrix ``name``'s values, or None when they look like N(0, want²)."""
    x = p.detach().double().flatten()
    std, mean = x.std().item(), x.mean().item()
    kurtosis = (((x - mean) / std) ** 4).mean().item() if std > 0 else float("nan")
    close = lambda a, b: abs(a - b) <= 0.06 * b  # noqa: E731  (the std of 65k draws is within 1% of its value)
    if close(std, want) and abs(mean) < 0.05 * want and 2.6 < kurtosis < 3.4:
        return None
    got = f"{name}: std {std:.4g}, mean {mean:.2g}; expected N(0, {want:.4g}²)."
    residual = 0.02 / math.sqrt(2 * n_layers)
    if close(std, 1.0):
        cause = "the embedding is left at nn.Embedding's N(0, 1): every matrix, the embedding too, gets N(0, 0.02²)"
    elif close(std, 1 / math.sqrt(3 * p.shape[1])):
        cause = "left at nn.Linear's default (uniform ±1/√in): every matrix gets N(0, 0.02²)"
    elif close(std, want) and not 2.6 < kurtosis < 3.4:
        cause = f"the values are not normally distributed (kurtosis {kurtosis:.2f}; a normal's is 3): use nn.init.normal_"
    elif name.endswith(RESIDUAL) and close(std, 0.02):
        cause = ("the residual projections are not scaled down: attention.wo and feed_forward.w2 write into the "
                 "residual stream and get std 0.02 / sqrt(2·n_layers)")
    elif name.endswith(RESIDUAL) and close(std, 0.02 / math.sqrt(n_layers)):
        cause = ("divided by sqrt(n_layers) instead of sqrt(2·n_layers): each block adds TWO outputs to the stream "
                 "(attention and feed-forward)")
    elif not name.endswith(RESIDUAL) and close(std, residual):
        cause = ("scaled init applied to the wrong projection: only attention.wo and feed_forward.w2 (the outputs "
                 "that are added to the residual stream) get 0.02 / sqrt(2·n_layers)")
    elif not close(std, want) and abs(mean) < 0.05 * std and close(std, 0.02 / math.sqrt(2)):
        cause = "std 0.02 / sqrt(2) = 0.0141: the scaling uses 2 but not n_layers"
    else:
        return got
    return got + f"\nLikely mistake: {cause}"


def initialised(tie: bool) -> Skeleton:
    torch.manual_seed(0)
    skeleton = Skeleton(ModelConfig(**INIT_CONFIG, tie_embeddings=tie))
    Llama.init_weights(skeleton)
    return skeleton


def check_init(skeleton: Skeleton) -> None:
    __tracebackhide__ = True
    n_layers = skeleton.config.n_layers
    for name, p in skeleton.named_parameters():
        if p.dim() == 1:
            if not torch.equal(p.detach(), torch.ones_like(p)):
                fail(f"{name} (an RMSNorm gain) holds {p.detach()[:4].tolist()}...; expected all ones.\nLikely "
                     "mistake: RMSNorm gains must start at 1: init_weights sets every parameter (nn.init.ones_)")
            continue
        want = 0.02 / math.sqrt(2 * n_layers) if name.endswith(RESIDUAL) else 0.02
        problem = diagnose(name, p, want, n_layers)
        if problem:
            fail(problem)


def test_init_weights():
    """A 4-layer model (dim 256): every matrix N(0, 0.02²), attention.wo and feed_forward.w2 N(0, (0.02/√8)²),
    every gain 1."""
    check_init(initialised(tie=False))


def test_init_weights_keeps_tied_weights_tied():
    """With tie_embeddings the output head IS the embedding: still one tensor after init_weights, N(0, 0.02²)."""
    skeleton = initialised(tie=True)
    if skeleton.output.weight is not skeleton.tok_embeddings.weight:
        fail("after init_weights, output.weight is no longer tok_embeddings.weight although the config ties them. "
             "Likely mistake: parameters were replaced (nn.Parameter(...)) instead of filled in place "
             "(nn.init.normal_(p, ...) under torch.no_grad())")
    check_init(skeleton)
