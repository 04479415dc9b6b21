"""Robust fine-tuning pieces: NEFTune embedding noise, the L2-SP penalty, weight-space interpolation
(full, partial, LoRA, LLaMA-Adapter, bottleneck), prompt perturbations and early stopping.

Every check compares against something computed another way: the noise against the plain embedding
lookup and the uniform distribution's moments, the penalty and its gradient against the state dicts'
difference, interpolated models against the base and fine-tuned logits and against weights mixed
with ``torch.lerp``, perturbations against properties each edit must have, early stopping against a
loop written from its definition."""

import copy
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llama_min.peft.adapter import AdapterPrompt
from llama_min.peft.bottleneck import Bottleneck
from llama_min.finetune.early_stopping import EarlyStopping
from llama_min.finetune.instructions import InstructionRecord
from llama_min.finetune.interpolate import interpolate_model_, interpolate_state_dicts
from llama_min.finetune.l2sp import L2SP
from llama_min.peft.lora import LoRALinear
from llama_min.finetune.neftune import NoisyEmbedding, add_embedding_noise
from llama_min.peft import PeftConfig, apply_peft
from llama_min.finetune.perturb import (DISTRACTOR_PREFIXES, PERTURBATIONS, perturb_for_eval, perturb_records,
                               perturb_text)

from conftest import max_abs_diff, random_model, random_tokens, tiny_config


# ---- NEFTune embedding noise ---------------------------------------------------------------------

def test_embedding_noise_has_the_stated_scale_in_training_mode():
    config = tiny_config()
    model = add_embedding_noise(random_model(config), alpha=5.0).train()
    for T in (32, 8):  # the scale depends on the sequence length
        tokens = random_tokens(config, batch=16, length=T)
        noise = model.tok_embeddings(tokens) - F.embedding(tokens, model.tok_embeddings.weight)
        scale = 5.0 / math.sqrt(T * config.dim)
        n = noise.numel()
        assert noise.abs().max() <= scale * (1 + 1e-5), f"T={T}: noise exceeds alpha/sqrt(T*dim) = {scale:.5f}"
        # n uniform draws: the largest is within 1% of the bound unless 0.99^n (< 1e-30) strikes.
        assert noise.abs().max() >= 0.99 * scale, f"T={T}: noise never reaches its bound {scale:.5f}: wrong scale?"
        mean_tol = 5 * scale / math.sqrt(3 * n)  # 5 standard errors of the mean of U(-s, s)
        assert abs(noise.mean()) < mean_tol, f"T={T}: noise mean {noise.mean():.2e} is not ~0"
        var = noise.pow(2).mean().item()
        assert abs(var / (scale**2 / 3) - 1) < 0.05, f"T={T}: variance {var:.3e}, expected s²/3 = {scale**2 / 3:.3e}"
        inner = (noise.abs() < scale / 2).float().mean().item()  # U(-s, s) puts half its mass in (-s/2, s/2)
        assert abs(inner - 0.5) < 0.03, f"T={T}: {inner:.3f} of the noise in (-s/2, s/2), expected 0.5 (uniform)"
    again = model.tok_embeddings(tokens) - F.embedding(tokens, model.tok_embeddings.weight)
    assert not torch.equal(noise, again), "the noise must be drawn afresh on every forward pass"


def test_embedding_noise_matches_the_transformers_neftune_hook():
    """Hugging Face's NEFTune (transformers.integrations.neftune) as an independent reference: both
    draw one uniform number per entry from torch's global generator, so with one seed they agree."""
    neftune = pytest.importorskip("transformers.integrations.neftune", reason="transformers is not installed")
    config = tiny_config()
    model = add_embedding_noise(random_model(config), alpha=7.0).train()
    tokens = random_tokens(config, batch=3, length=24)
    clean = F.embedding(tokens, model.tok_embeddings.weight)
    torch.manual_seed(3)
    ours = model.tok_embeddings(tokens)
    torch.manual_seed(3)
    theirs = neftune.neftune_post_forward_hook(SimpleNamespace(training=True, neftune_noise_alpha=7.0), (tokens,), clean)
    assert not torch.equal(theirs, clean), "test setup: the reference added no noise"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6,
                               msg=lambda m: f"NEFTune noise differs from transformers' hook: {m}")


def test_embedding_noise_is_off_in_eval_mode_and_keeps_weights_keys_and_tie():
    config = tiny_config(tie_embeddings=True)
    base = random_model(config)
    tokens = random_tokens(config, batch=2, length=12)
    expected_logits, _ = base(tokens)
    model = copy.deepcopy(base)  # in eval mode, as random_model leaves it
    weight = model.tok_embeddings.weight
    add_embedding_noise(model, alpha=10.0)
    assert not model.tok_embeddings.training, "the noisy embedding must keep the model's eval mode"
    assert isinstance(model.tok_embeddings, NoisyEmbedding), "tok_embeddings was not replaced"
    assert model.tok_embeddings.weight is weight, "the noisy embedding must hold the same Parameter, not a copy"
    assert model.output.weight is model.tok_embeddings.weight, "the tied output head lost its tie"
    assert list(model.state_dict()) == list(base.state_dict()), "state-dict keys changed"
    logits, _ = model.eval()(tokens)
    assert torch.equal(logits, expected_logits), "evaluation mode must be noise-free (logits differ from the base)"
    noisy, _ = model.train()(tokens)
    assert not torch.equal(noisy, expected_logits), "training mode should add noise"
    add_embedding_noise(model, alpha=0.0)  # wrapping again only changes alpha
    assert isinstance(model.tok_embeddings, NoisyEmbedding) and model.tok_embeddings.weight is weight
    assert torch.equal(model(tokens)[0], expected_logits), "alpha = 0 must add no noise, even in training mode"


def test_embedding_noise_gradient_reaches_the_shared_weight():
    config = tiny_config(tie_embeddings=True)
    model = add_embedding_noise(random_model(config), alpha=5.0).train()
    tokens = random_tokens(config, batch=2, length=10)
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert model.tok_embeddings.weight.grad is not None and model.tok_embeddings.weight.grad.abs().sum() > 0


def test_embedding_noise_rejects_negative_alpha():
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        add_embedding_noise(random_model(tiny_config()), alpha=-1.0)


# ---- L2-SP -----------------------------------------------------------------------------------------

def partially_trainable(config, trained_prefixes=("layers.1.", "norm.")):
    """A model with only the tensors under ``trained_prefixes`` trainable (a partial fine-tuning)."""
    model = random_model(config)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(trained_prefixes))
    return model


def test_l2sp_is_zero_at_step_0_and_its_gradient_is_2_lambda_delta():
    lam = 0.37
    model = partially_trainable(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    penalty = L2SP(model, lam)
    assert penalty().item() == 0.0, "L2-SP must be exactly zero before the weights move"
    with torch.no_grad():  # move the trained tensors as an optimiser would
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    value = penalty()
    value.backward()
    after = model.state_dict()
    # The penalty written a second way: over the whole state dict, in float64 (frozen tensors add 0).
    expected = lam * sum(((after[k].double() - before[k].double()) ** 2).sum() for k in before)
    assert math.isclose(value.item(), expected.item(), rel_tol=1e-5), f"penalty {value.item()} != {expected.item()}"
    for name, p in model.named_parameters():
        if p.requires_grad:
            expected_grad = 2 * lam * (after[name] - before[name])
            torch.testing.assert_close(p.grad, expected_grad, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{name}: grad != 2λ(θ − θ₀): {m}")
        else:
            assert p.grad is None, f"frozen {name} received a gradient"


def test_l2sp_copies_only_trained_base_tensors():
    config = tiny_config(tie_embeddings=True)
    model = partially_trainable(config, trained_prefixes=("tok_embeddings.", "layers.0.ffn_norm."))
    penalty = L2SP(model, 0.1)
    assert penalty.names == ["tok_embeddings.weight", "layers.0.ffn_norm.weight"], \
        f"anchored {penalty.names}: expected the trained tensors, the tied embedding once"
    trained_numel = config.vocab_size * config.dim + config.dim
    assert penalty.numel() == trained_numel, f"θ₀ holds {penalty.numel()} values, expected {trained_numel}"


def test_l2sp_ignores_peft_parameters_and_refuses_a_frozen_base():
    model = random_model(tiny_config()).requires_grad_(False)
    model.layers[0].attention.wq = LoRALinear(model.layers[0].attention.wq, rank=2, alpha=4.0, dropout=0.0)
    with pytest.raises(ValueError, match="no trained base tensor"):
        L2SP(model, 0.1)  # only LoRA's A and B train: they are not base tensors
    model.norm.weight.requires_grad_(True)  # LoRA plus a trained norm
    assert L2SP(model, 0.1).names == ["norm.weight"]


# ---- weight-space interpolation --------------------------------------------------------------------

def logits_of(model, tokens):
    with torch.no_grad():
        return model.eval()(tokens)[0]


def perturbed_copy(model, prefixes=("",), seed=5):
    """A "fine-tuned" copy: every tensor whose name starts with one of ``prefixes`` moved at random."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.startswith(prefixes):
                # Steps larger than the weights: a mix written as θ₀ + a(θ − θ₀) then rounds away
                # from θ at a = 1 for many entries (for nearby values the rounding would cancel).
                p.add_(torch.randn(p.shape, generator=g) * 3 * p.abs().mean())
    return tuned


def assert_endpoints_exact(make_tuned, base_logits, tokens, base_state=None):
    """θ(0) gives the base logits and θ(1) the fine-tuned logits, bit for bit; θ(1/2) is neither."""
    tuned_logits = logits_of(make_tuned(), tokens)
    assert not torch.equal(tuned_logits, base_logits), "test setup: the fine-tuned model equals the base"
    at0 = logits_of(interpolate_model_(make_tuned(), 0.0, base_state), tokens)
    assert torch.equal(at0, base_logits), f"a=0 is not the base model: max diff {max_abs_diff(at0, base_logits):.3e}"
    at1 = logits_of(interpolate_model_(make_tuned(), 1.0, base_state), tokens)
    assert torch.equal(at1, tuned_logits), f"a=1 is not the fine-tuned model: max diff {max_abs_diff(at1, tuned_logits):.3e}"
    half = logits_of(interpolate_model_(make_tuned(), 0.5, base_state), tokens)
    assert not torch.equal(half, base_logits) and not torch.equal(half, tuned_logits), "a=0.5 changed nothing"
    return half


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("trained", [("",), ("layers.1.", "norm.")], ids=["full", "partial"])
def test_interpolation_full_and_partial(tie, trained):
    config = tiny_config(tie_embeddings=tie)
    base = random_model(config)
    tokens = random_tokens(config, batch=2, length=16)
    tuned = perturbed_copy(base, trained)
    base_state = {k: v.clone() for k, v in base.state_dict().items() if not (tie and k == "output.weight")}
    half = assert_endpoints_exact(lambda: copy.deepcopy(tuned), logits_of(base, tokens), tokens, base_state)
    # Independent reference for a = 1/2: weights mixed by torch.lerp, loaded into a fresh model.
    reference = copy.deepcopy(base)
    reference.load_state_dict({k: torch.lerp(v, tuned.state_dict()[k], 0.5) for k, v in base.state_dict().items()})
    torch.testing.assert_close(half, logits_of(reference, tokens), rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"a=0.5 does not match the lerp of the weights: {m}")
    mixed = interpolate_model_(copy.deepcopy(tuned), 0.3, base_state).state_dict()
    for k, v in base.state_dict().items():  # partial: tensors that were not trained stay bit-identical
        # (a = 0.3, not 0.5: 0.5·x + 0.5·x is exactly x, 0.7·x + 0.3·x need not be)
        if not k.startswith(trained) and not (tie and k == "output.weight"):
            assert torch.equal(mixed[k], v), f"frozen tensor {k} changed under interpolation"


def test_interpolate_state_dicts_endpoints_and_strictness():
    config = tiny_config()
    base = random_model(config).state_dict()
    tuned = perturbed_copy(random_model(config)).state_dict()
    for a, expected in ((0.0, base), (1.0, tuned)):
        mixed = interpolate_state_dicts(base, tuned, a)
        assert all(torch.equal(mixed[k], expected[k]) for k in expected), f"a={a} is not exact"
    mixed = interpolate_state_dicts(base, tuned, 0.25)
    torch.testing.assert_close(mixed["norm.weight"], torch.lerp(base["norm.weight"], tuned["norm.weight"], 0.25))
    with pytest.raises(ValueError, match=r"missing tensors \['norm.weight'\]"):
        interpolate_state_dicts({k: v for k, v in base.items() if k != "norm.weight"}, tuned, 0.5)
    with pytest.raises(ValueError, match=r"a must be in \[0, 1\]"):
        interpolate_state_dicts(base, tuned, 1.5)


def with_lora(model, seed):
    """LoRA on wq and wv of every layer, B set to non-zero values as training would."""
    model.requires_grad_(False)  # the base is frozen, as apply_peft leaves it
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        for name in ("wq", "wv"):
            lora = LoRALinear(getattr(layer.attention, name), rank=4, alpha=8.0, dropout=0.0)
            with torch.no_grad():
                lora.lora_b.copy_(torch.randn(lora.lora_b.shape, generator=g) * 0.1)
            setattr(layer.attention, name, lora)
    return model


def with_adapter(model, seed, gate_tanh):
    """LLaMA-Adapter prompts on the top layer, gates opened at random."""
    model.requires_grad_(False)
    config, g = model.config, torch.Generator().manual_seed(seed)
    adapter = AdapterPrompt(4, config.dim, config.n_heads, config.n_kv_heads, gate_tanh)
    with torch.no_grad():
        adapter.prompt.copy_(torch.randn(adapter.prompt.shape, generator=g))
        adapter.gate.copy_(torch.randn(adapter.gate.shape, generator=g))
    model.layers[-1].attention.prompt_adapter = adapter
    return model


def with_bottleneck(model, seed):
    """Bottleneck adapters after attention and feed-forward of every layer, up-projections non-zero."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        for name in ("attention_adapter", "ffn_adapter"):
            adapter = Bottleneck(model.config.dim, 8)
            with torch.no_grad():
                adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=g) * 0.1)
                adapter.up.bias.copy_(torch.randn(adapter.up.bias.shape, generator=g) * 0.1)
            setattr(layer, name, adapter)
    return model


PEFT = {
    "lora": with_lora,
    "adapter": lambda model, seed: with_adapter(model, seed, gate_tanh=False),
    "adapter_tanh": lambda model, seed: with_adapter(model, seed, gate_tanh=True),
    "bottleneck": with_bottleneck,
}


@pytest.mark.parametrize("method", list(PEFT))
def test_interpolation_peft_endpoints_exact(method):
    config = tiny_config()
    base = random_model(config)
    tokens = random_tokens(config, batch=2, length=16)
    tuned = PEFT[method](copy.deepcopy(base), seed=3)
    assert_endpoints_exact(lambda: copy.deepcopy(tuned), logits_of(base, tokens), tokens)


def test_interpolation_scales_each_peft_update_by_a():
    """Module by module, against each method's formula written out: a·ΔW for LoRA, a·g for the
    adapter gate, x + a·up(silu(down(x))) for the bottleneck."""
    config = tiny_config()
    lora_model = with_lora(random_model(config), seed=1)
    lora = lora_model.layers[0].attention.wq
    delta = (lora.lora_b @ lora.lora_a * lora.scale).detach().clone()
    x = torch.randn(3, config.dim)
    interpolate_model_(lora_model, 0.3)
    torch.testing.assert_close(lora(x), x @ (lora.weight + 0.3 * delta).T, rtol=1e-5, atol=1e-6)

    adapter_model = with_adapter(random_model(config), seed=1, gate_tanh=False)
    gate = adapter_model.layers[-1].attention.prompt_adapter.gate.detach().clone()
    interpolate_model_(adapter_model, 0.3)
    torch.testing.assert_close(adapter_model.layers[-1].attention.prompt_adapter.gate, 0.3 * gate)

    bottleneck_model = with_bottleneck(random_model(config), seed=1)
    adapter = bottleneck_model.layers[0].ffn_adapter
    with torch.no_grad():
        full_update = adapter(x) - x
    interpolate_model_(bottleneck_model, 0.3)
    torch.testing.assert_close(adapter(x), x + 0.3 * full_update, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("peft_config", [
    PeftConfig(method="lora", lora_targets=("wq", "wv", "w2", "output")),
    PeftConfig(method="adapter", adapter_len=3, adapter_layers=1, gate_tanh=True),
    PeftConfig(method="bottleneck", bottleneck_dim=4, train_norms=True),
], ids=["lora", "adapter", "bottleneck+norms"])
def test_interpolation_of_models_made_by_apply_peft(peft_config):
    """Through the real front: whatever apply_peft installs is interpolated, and trained norms (a
    partial fine-tuning combined with PEFT) need the base tensors."""
    config = tiny_config(tie_embeddings=True)
    base = random_model(config)
    tokens = random_tokens(config, batch=2, length=16)
    base_state = {k: v.clone() for k, v in base.state_dict().items() if k != "output.weight"}
    tuned = apply_peft(copy.deepcopy(base), peft_config)
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    assert_endpoints_exact(lambda: copy.deepcopy(tuned), logits_of(base, tokens), tokens, base_state)
    if peft_config.train_norms:
        with pytest.raises(ValueError, match="pass the base checkpoint's tensors"):
            interpolate_model_(copy.deepcopy(tuned), 0.5)


def test_interpolation_errors():
    config = tiny_config()
    with pytest.raises(ValueError, match="nothing to interpolate"):
        interpolate_model_(random_model(config).requires_grad_(False), 0.5)
    with pytest.raises(ValueError, match="pass the base checkpoint's tensors"):
        interpolate_model_(random_model(config), 0.5)  # fully trainable: a full fine-tuning
    model = with_lora(random_model(config), seed=0)
    model.layers[0].attention.wq.merge()
    with pytest.raises(ValueError, match="merged LoRA"):
        interpolate_model_(model, 0.5)
    with pytest.raises(ValueError, match=r"a must be in \[0, 1\]"):
        interpolate_model_(with_lora(random_model(config), seed=0), -0.1)


# ---- prompt perturbations --------------------------------------------------------------------------

def lab_records(n=40):
    words = ["apple", "river", "stone", "garden", "yellow", "planet", "window", "silver"]
    tasks = ["Write the word backwards.", "Write the word in upper case.", "Give the first letter of the word.",
             "How many letters does the word have?", "Sort the letters of the word alphabetically."]
    return [{"instruction": tasks[i % len(tasks)], "input": words[i % len(words)], "output": f"answer-{i}"}
            for i in range(n)]


def is_subsequence(short: str, long: str) -> bool:
    it = iter(long)
    return all(c in it for c in short)


def inserted_inside_a_word(text: str, inserted: str) -> bool:
    """``inserted`` is ``text`` plus one letter with letters on both sides of it (for a doubled
    letter any of the equivalent positions will do)."""
    return any(inserted[:j] + inserted[j + 1:] == text and inserted[j].isalpha()
               and inserted[j - 1].isalpha() and inserted[j + 1].isalpha() for j in range(1, len(inserted) - 1))


def test_each_family_makes_its_own_kind_of_edit():
    text = "Sort the letters of the word alphabetically."
    rng = random.Random(0)
    for _ in range(30):
        swapped = PERTURBATIONS["swap"](text, rng)
        diff = [i for i, (a, b) in enumerate(zip(text, swapped)) if a != b]
        assert len(swapped) == len(text) and len(diff) == 2 and diff[1] == diff[0] + 1 \
            and sorted(swapped) == sorted(text), f"swap: {swapped!r}"
        dropped = PERTURBATIONS["drop"](text, rng)
        assert len(dropped) == len(text) - 1 and is_subsequence(dropped, text) and len(dropped.split()) == 7, \
            f"drop: {dropped!r} (one letter, no word removed)"
        inserted = PERTURBATIONS["insert"](text, rng)
        assert inserted_inside_a_word(text, inserted), f"insert: {inserted!r} (one letter, inside a word)"
        cased = PERTURBATIONS["case"](text, rng)
        assert cased != text and cased.lower() == text.lower(), f"case: {cased!r}"
        spaced = PERTURBATIONS["whitespace"](text, rng)
        assert len(spaced) > len(text) and spaced.split() == text.split(), f"whitespace: {spaced!r}"
        prefixed = PERTURBATIONS["prefix"](text, rng)
        assert prefixed.endswith(" " + text) and prefixed[:-len(text) - 1] in DISTRACTOR_PREFIXES, f"prefix: {prefixed!r}"


def test_a_family_that_cannot_apply_falls_back_to_one_that_can():
    assert perturb_text("a b", random.Random(0), families=("drop",)) == "a b"  # no word of 3 letters
    assert perturb_text("a b", random.Random(0), families=("drop", "prefix")).endswith(" a b")


def test_perturbations_deterministic_answers_unchanged_originals_untouched():
    records = lab_records()
    pristine = copy.deepcopy(records)
    first = perturb_records(records, 0.5, seed=7)
    assert first == perturb_records(records, 0.5, seed=7), "same seed, different perturbations"
    assert first != perturb_records(records, 0.5, seed=8), "a different seed should perturb differently"
    assert records == pristine, "perturb_records modified the records it was given"
    assert all(new is not old for new, old in zip(first, records)), "returned records must be copies"
    changed = [i for i, (new, old) in enumerate(zip(first, records)) if new["instruction"] != old["instruction"]]
    assert len(changed) == 20, f"p=0.5 of 40 records should perturb 20, perturbed {len(changed)}"
    for new, old in zip(first, records):
        assert new["output"] == old["output"], f"the expected answer changed: {old['output']!r} -> {new['output']!r}"
        assert new["input"] == old["input"], "the input (what the answer is computed from) changed"
    # A record's edit depends on (seed, index) only, not on p or on the other records.
    everything = perturb_records(records, 1.0, seed=7)
    assert all(everything[i] == first[i] for i in changed)
    assert perturb_records(records, 0.0, seed=7) == records


def test_eval_perturbations_are_held_out_and_leave_the_clean_test_set_alone():
    test_set = lab_records(12)
    clean = copy.deepcopy(test_set)
    perturbed = perturb_for_eval(test_set, seed=7)
    assert test_set == clean, "perturb_for_eval modified the clean test set"
    assert all(p["instruction"] != c["instruction"] for p, c in zip(perturbed, clean)), "every test prompt should change"
    assert all(p["output"] == c["output"] and p["input"] == c["input"] for p, c in zip(perturbed, clean))
    assert perturbed != perturb_records(test_set, 1.0, seed=7), "eval edits must differ from training edits of the same seed"
    assert perturbed == perturb_for_eval(test_set, seed=7)


def test_perturbations_accept_instruction_records_and_return_them_in_kind():
    records = [InstructionRecord(r["instruction"], r["output"], r["input"]) for r in lab_records(10)]
    as_dicts = perturb_records(lab_records(10), 0.6, seed=2)
    perturbed = perturb_records(records, 0.6, seed=2)
    assert all(isinstance(r, InstructionRecord) for r in perturbed)
    assert [(r.instruction, r.input, r.output) for r in perturbed] == \
        [(d["instruction"], d["input"], d["output"]) for d in as_dicts], "the same seed must edit both kinds alike"


def test_perturbation_errors():
    records = lab_records(4)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        perturb_records(records, 1.2, seed=0)
    with pytest.raises(ValueError, match="never perturbed"):
        perturb_records(records, 0.5, seed=0, fields=("instruction", "output"))
    with pytest.raises(ValueError, match="unknown perturbation families"):
        perturb_records(records, 0.5, seed=0, families=("typo",))
    with pytest.raises(ValueError, match="no string field 'instruction'"):
        perturb_records([{"prompt": "x", "output": "y"}], 1.0, seed=0)


# ---- early stopping --------------------------------------------------------------------------------

def reference_early_stop(metrics, patience):
    """From the definition: the best index so far (first of ties) and the first index at which
    `patience` evaluations have passed since it; None if the run goes to the end."""
    best = 0
    for i, m in enumerate(metrics):
        if m > metrics[best]:
            best = i
        if i - best >= patience:
            return best, i
    return best, None


def test_early_stopping_picks_the_best_dev_checkpoint():
    metrics = [0.10, 0.30, 0.25, 0.50, 0.50, 0.45, 0.48, 0.90, 0.95]  # the late 0.90 is never reached
    steps = [100 * (i + 1) for i in range(len(metrics))]
    stopper = EarlyStopping(patience=3)
    saved = []
    for step, m in zip(steps, metrics):
        if stopper.update(step, m):
            saved.append(step)  # keep-best: the trainer writes a checkpoint here
        if stopper.should_stop:
            break
    best, stop = reference_early_stop(metrics, patience=3)
    assert (stopper.best_step, stopper.last_step) == (steps[best], steps[stop]) == (400, 700), \
        f"chose step {stopper.best_step}, stopped at {stopper.last_step}"
    assert saved == [100, 200, 400], f"checkpoints saved at {saved}: a tie (step 500) is not an improvement"
    summary = stopper.summary(total_steps=1000)
    assert summary == {"chosen_step": 400, "best_metric": 0.50, "stopped_at": 700, "total_steps": 1000,
                       "steps_saved": 300, "compute_saved": 0.3}, summary


def test_early_stopping_without_patience_runs_to_the_end_and_loss_mode():
    stopper = EarlyStopping(patience=None)
    for step, m in enumerate([0.2, 0.1, 0.4, 0.3, 0.3], start=1):
        stopper.update(step, m)
    assert not stopper.should_stop and stopper.summary(5)["compute_saved"] == 0 and stopper.best_step == 3
    losses = EarlyStopping(patience=2, mode="min", min_delta=0.05)
    for step, loss in enumerate([2.0, 1.5, 1.47, 1.46, 1.0], start=1):  # 1.47 and 1.46 gain < min_delta
        losses.update(step, loss)
        if losses.should_stop:
            break
    assert (losses.best_step, losses.last_step) == (2, 4), f"{losses}"


def test_early_stopping_resumes_from_its_state_dict():
    metrics = [0.2, 0.4, 0.3, 0.35, 0.38, 0.1]
    uninterrupted = EarlyStopping(patience=3, min_delta=0.01)
    for step, m in enumerate(metrics, start=1):
        uninterrupted.update(step, m)
    first = EarlyStopping(patience=3, min_delta=0.01)
    for step, m in enumerate(metrics[:3], start=1):
        first.update(step, m)
    resumed = EarlyStopping.from_state_dict(json.loads(json.dumps(first.state_dict())))  # through JSON, as saved
    for step, m in enumerate(metrics[3:], start=4):
        resumed.update(step, m)
    assert resumed == uninterrupted and resumed.should_stop, f"{resumed} != {uninterrupted}"


def test_early_stopping_errors():
    stopper = EarlyStopping(patience=2)
    assert not stopper.update(1, float("nan")), "NaN must never count as the best"
    with pytest.raises(ValueError, match="steps must increase"):
        stopper.update(1, 0.5)
    with pytest.raises(ValueError, match="patience must be >= 1"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="no evaluation was recorded"):
        EarlyStopping(patience=1).summary(10)


def test_l2sp_adds_the_penalty_gradient_once_per_step():
    """add_to_gradients gives exactly the gradient autograd computes for the penalty λ·Σ‖θ − θ₀‖² (the
    reference: backward of L2SP() itself), added once to the task's, whatever the accumulation."""
    from llama_min.finetune.l2sp import L2SP

    model = random_model(tiny_config())
    penalty = L2SP(model, 0.3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # moved away from θ₀
    penalty().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    penalty.add_to_gradients()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[n], rtol=1e-5, atol=1e-7, msg=n)
