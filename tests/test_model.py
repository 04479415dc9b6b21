"""The Llama model: published parameter counts, Meta's parameter names, SwiGLU, the loss, the
training initialisation, tied embeddings and output dtypes."""

import math

import pytest
import torch

from llama_min import IGNORE_INDEX, Llama, ModelConfig
from llama_min.feedforward import FeedForward

from conftest import max_abs_diff, random_model, random_tokens, tiny_config

# Published parameter counts (vocabulary 32000, untied output head).
PUBLISHED_COUNTS = {
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-30b": 32_528_943_616,
    "llama-65b": 65_285_660_672,
    "llama2-7b": 6_738_415_616,  # same architecture as llama-7b
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
}


@pytest.mark.parametrize("preset", list(PUBLISHED_COUNTS))
def test_parameter_count_matches_published(preset):
    with torch.device("meta"):  # shapes only: a 70B model costs no memory here
        model = Llama(ModelConfig.from_preset(preset))
    params = list(model.parameters())
    assert all(p.is_meta for p in params), "the model allocated real memory under torch.device('meta')"
    count = sum(p.numel() for p in params)
    assert count == PUBLISHED_COUNTS[preset], \
        f"{preset}: {count:,} parameters, published {PUBLISHED_COUNTS[preset]:,} (difference {count - PUBLISHED_COUNTS[preset]:+,})"


def test_parameter_names_are_metas_state_dict_keys():
    config = tiny_config(n_layers=2)
    per_layer = ["attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                 "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
                 "attention_norm.weight", "ffn_norm.weight"]
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    expected |= {f"layers.{i}.{name}" for i in range(2) for name in per_layer}
    got = set(Llama(config).state_dict())
    assert got == expected, f"missing {sorted(expected - got)}, unexpected {sorted(got - expected)}"


def test_weight_shapes_follow_config():
    c = tiny_config(n_heads=8, n_kv_heads=2, hidden_dim=80)
    sd = Llama(c).state_dict()
    expected = {"tok_embeddings.weight": (c.vocab_size, c.dim), "output.weight": (c.vocab_size, c.dim),
                "layers.0.attention.wq.weight": (c.dim, c.dim), "layers.0.attention.wk.weight": (2 * c.head_dim, c.dim),
                "layers.0.attention.wv.weight": (2 * c.head_dim, c.dim), "layers.0.attention.wo.weight": (c.dim, c.dim),
                "layers.0.feed_forward.w1.weight": (80, c.dim), "layers.0.feed_forward.w3.weight": (80, c.dim),
                "layers.0.feed_forward.w2.weight": (c.dim, 80), "norm.weight": (c.dim,)}
    wrong = {k: (tuple(sd[k].shape), v) for k, v in expected.items() if tuple(sd[k].shape) != v}
    assert not wrong, f"wrong shapes (got, expected): {wrong}"


def test_swiglu_matches_formula():
    """FFN(x) = W2 (silu(W1 x) ⊙ W3 x), silu(z) = z · sigmoid(z) (Shazeer 2020, eq. 6)."""
    ffn = FeedForward(dim=12, hidden_dim=20)
    x = torch.randn(2, 3, 12)
    a, b = x @ ffn.w1.weight.T, x @ ffn.w3.weight.T
    expected = (a * torch.sigmoid(a) * b) @ ffn.w2.weight.T
    got = ffn(x)
    assert max_abs_diff(got, expected) < 1e-5, f"SwiGLU differs from its formula by {max_abs_diff(got, expected):.3g}"


def test_logits_shape_dtype_and_last_only():
    config = tiny_config()
    model = random_model(config)
    tokens = random_tokens(config, 2, 9)
    with torch.no_grad():
        logits, loss = model(tokens)
        last, _ = model(tokens, last_only=True)
    assert logits.shape == (2, 9, config.vocab_size) and logits.dtype == torch.float32, \
        f"logits {tuple(logits.shape)} {logits.dtype}, expected (2, 9, {config.vocab_size}) float32"
    assert loss is None, "no targets given, loss should be None"
    assert last.shape == (2, 1, config.vocab_size), f"last_only logits have shape {tuple(last.shape)}"
    assert max_abs_diff(last, logits[:, -1:]) < 1e-5, "last_only logits differ from the last row of the full logits"


def test_bfloat16_model_returns_float32_logits():
    model = random_model(tiny_config()).to(torch.bfloat16)
    with torch.no_grad():
        logits, _ = model(random_tokens(model.config, 1, 4))
    assert logits.dtype == torch.float32, f"a bfloat16 model should still return float32 logits, got {logits.dtype}"


def test_loss_is_mean_cross_entropy_over_counted_positions():
    config = tiny_config()
    model = random_model(config)
    tokens, targets = random_tokens(config, 2, 8, seed=3), random_tokens(config, 2, 8, seed=4)
    targets[0, :3] = IGNORE_INDEX
    targets[1, 6:] = IGNORE_INDEX
    with torch.no_grad():
        logits, loss = model(tokens, targets)
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    counted = [(b, t) for b in range(2) for t in range(8) if targets[b, t] != IGNORE_INDEX]
    expected = -sum(log_probs[b, t, targets[b, t]] for b, t in counted) / len(counted)
    assert abs(loss.item() - expected.item()) < 1e-5, \
        f"loss {loss.item():.6f}, mean negative log-likelihood over the {len(counted)} counted positions {expected.item():.6f}"


def test_loss_backpropagates_to_every_parameter():
    config = tiny_config()
    model = random_model(config).train()
    tokens = random_tokens(config, 2, 8)
    _, loss = model(tokens, tokens)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_training_initialisation():
    """N(0, 0.02²) for every matrix, 0.02 / sqrt(2·n_layers) for wo and w2, ones for norm gains."""
    config = tiny_config(dim=256, n_heads=8, n_kv_heads=4, n_layers=8, vocab_size=512)
    torch.manual_seed(0)
    model = Llama(config)
    residual = 0.02 / math.sqrt(2 * config.n_layers)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), f"{name}: norm gains should start at 1"
            continue
        std = residual if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 0.02
        got_std, got_mean = p.std().item(), p.mean().item()
        # Each matrix has >= 16k entries: the sample std is within ~1% of the true one, the mean within
        # 5 standard errors of 0 whatever the seed.
        assert abs(got_std / std - 1) < 0.05, f"{name}: std {got_std:.5f}, expected {std:.5f}"
        assert abs(got_mean) < 5 * std / math.sqrt(p.numel()), f"{name}: mean {got_mean:.2g}, expected 0"


def test_tied_embeddings_share_one_parameter():
    config = tiny_config(tie_embeddings=True)
    model = Llama(config)
    assert model.output.weight is model.tok_embeddings.weight, "tie_embeddings=True: output head is not the embedding"
    untied = sum(p.numel() for p in Llama(tiny_config()).parameters())
    tied = sum(p.numel() for p in model.parameters())
    assert untied - tied == config.vocab_size * config.dim, f"tying should remove vocab·dim parameters: {untied} -> {tied}"


def test_public_names():
    import llama_min

    missing = [n for n in ("ModelConfig", "Llama", "Tokenizer") if not hasattr(llama_min, n)]
    assert not missing, f"`from llama_min import ...` is missing {missing}"
