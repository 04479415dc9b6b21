"""The chunked output head + cross-entropy (llama_min/chunked_loss.py) against the plain path of
model.py (logits, then F.cross_entropy, differentiated by autograd): the same loss and the same gradient
of every parameter up to float32 rounding (both paths take float32 logits; the model's weights are float64
so that nothing else rounds), with ignored positions, tied
embeddings, several chunks and a ragged last one; and no (positions, vocabulary) tensor kept for backward.
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_model, random_tokens, tiny_config
from llama_min import IGNORE_INDEX
import llama_min.chunked_loss as chunked_loss


def loss_and_grads(model, tokens, targets, scale=1.0):
    model.zero_grad(set_to_none=True)
    logits, loss = model(tokens, targets)
    (loss * scale).backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk_rows", [1000, 5])  # one chunk for the batch; several, the last one ragged
def test_chunked_loss_and_gradients_equal_the_plain_path(tie, chunk_rows, monkeypatch):
    config = tiny_config(tie_embeddings=tie)
    model = random_model(config).double()
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", chunk_rows * config.vocab_size)
    monkeypatch.setattr(chunked_loss, "MIN_CHUNK_POSITIONS", 1)
    tokens, targets = random_tokens(config, 3, 9, seed=3), random_tokens(config, 3, 9, seed=4)
    targets[0, :4] = IGNORE_INDEX  # a prompt's positions
    targets[2, 7:] = IGNORE_INDEX  # right padding
    plain_logits, plain_loss, plain = loss_and_grads(model.eval(), tokens, targets)
    logits, loss, chunked = loss_and_grads(model.train(), tokens, targets, scale=1.0)
    assert plain_logits is not None and logits is None, "training mode should take the chunked path"
    assert torch.allclose(loss, plain_loss, rtol=1e-6, atol=0), (loss.item(), plain_loss.item())
    for name in plain:
        scale = plain[name].abs().max()
        assert (chunked[name] - plain[name]).abs().max() <= 1e-6 * scale, name
    if tie:
        assert model.output.weight is model.tok_embeddings.weight
    # negative control: counting the ignored positions gives another loss and other gradients
    _, _, unmasked = loss_and_grads(model.eval(), tokens, targets.clamp(min=0))
    assert (unmasked["norm.weight"] - plain["norm.weight"]).abs().max() > 1e-3 * plain["norm.weight"].abs().max()


@pytest.mark.parametrize("tie", [False, True])
def test_bfloat16_weights_get_the_plain_paths_loss_and_gradients_up_to_its_rounding(tie, monkeypatch):
    """In bfloat16 the weight gradient is accumulated in float32 across chunks; it must still be the
    plain path's (which rounds every product to bfloat16) to within bfloat16's precision."""
    config = tiny_config(tie_embeddings=tie)
    model = random_model(config).to(torch.bfloat16)
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 5 * config.vocab_size)
    monkeypatch.setattr(chunked_loss, "MIN_CHUNK_POSITIONS", 1)
    tokens, targets = random_tokens(config, 3, 9, seed=3), random_tokens(config, 3, 9, seed=4)
    targets[0, :4] = IGNORE_INDEX
    _, plain_loss, plain = loss_and_grads(model.eval(), tokens, targets)
    _, loss, chunked = loss_and_grads(model.train(), tokens, targets)
    assert torch.allclose(loss, plain_loss, rtol=1e-2, atol=0), (loss.item(), plain_loss.item())
    for name in plain:
        assert chunked[name].dtype == torch.bfloat16, name
        scale = plain[name].float().abs().max()
        assert (chunked[name].float() - plain[name].float()).abs().max() <= 3e-2 * scale, name


def test_the_gradient_is_scaled_by_what_backward_brings():
    """Gradient accumulation backpropagates loss * share: the stored gradients must be scaled by it."""
    config = tiny_config()
    model = random_model(config).double().train()
    tokens = random_tokens(config, 2, 8)
    _, _, once = loss_and_grads(model, tokens, tokens)
    _, _, scaled = loss_and_grads(model, tokens, tokens, scale=0.25)
    for name in once:
        assert torch.allclose(scaled[name], once[name] * 0.25, rtol=1e-12, atol=0), name


def test_no_logits_sized_tensor_is_kept_for_backward():
    config = tiny_config(vocab_size=300)
    model = random_model(config)
    tokens = random_tokens(config, 2, 64)  # 128 positions > dim 64: the logits outgrow the weight's gradient
    sizes = {}
    for mode in ("eval", "train"):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            getattr(model, mode)()(tokens, tokens)
        sizes[mode] = max(saved)
    assert sizes["eval"] >= 2 * 64 * 300, "the plain path should keep the logits (the control failed)"
    assert sizes["train"] < 2 * 64 * 300, f"the chunked path kept a tensor of {sizes['train']} elements"


def test_a_frozen_head_keeps_no_weight_gradient():
    """Parameter-efficient fine-tuning freezes the head: the chunked path then keeps no (vocabulary, dim)
    tensor for backward (measured by autograd's saved-tensors hook), and every other gradient is the plain
    path's. Control: the same model with the head trainable keeps one."""
    config = tiny_config(vocab_size=300)
    model = random_model(config).double()
    tokens = random_tokens(config, 2, 8)
    head_elements = config.vocab_size * config.dim

    def largest_saved(head_trainable: bool) -> int:
        model.output.weight.requires_grad_(head_trainable)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            model.train()(tokens, tokens)
        return max(saved)

    assert largest_saved(True) >= head_elements, "the control failed: a trainable head keeps its gradient"
    assert largest_saved(False) < head_elements, "a frozen head's (vocabulary, dim) gradient was kept"
    _, _, plain = loss_and_grads(model.eval(), tokens, tokens)
    _, _, chunked = loss_and_grads(model.train(), tokens, tokens)
    assert model.output.weight.grad is None
    for name in plain:
        assert (chunked[name] - plain[name]).abs().max() <= 1e-6 * plain[name].abs().max(), name
