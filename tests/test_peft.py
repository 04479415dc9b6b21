"""Parameter-efficient fine-tuning: LLaMA-Adapter, LoRA and bottleneck adapters.

The references are the base model itself (every method must start as exactly the base, with and
without the KV cache), formulas written a second way (LoRA's W + (alpha/r) B A as one matrix, the
prompt attention through PyTorch's fused kernel), autograd's own record of what it saves, and the
published trainable-parameter counts at 7B.
"""

import copy
from pathlib import Path
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llama_min import Llama, ModelConfig
from llama_min.checkpoint import load_checkpoint, save_checkpoint
from llama_min.peft.adapter import AdapterPrompt
from llama_min.peft.lora import LoRALinear
from llama_min.peft import (PEFT_CONFIG, PEFT_WEIGHTS, PeftConfig, apply_peft, peft_stats, load_peft, merge_lora,
                            parameter_table, peft_state_dict, remove_peft, save_peft)

from conftest import max_abs_diff, random_model, random_tokens, tiny_config

ALL_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]
# One configuration per method and variant; the model is the 2-layer GQA model of conftest.
METHOD_CONFIGS = {
    "adapter": PeftConfig(method="adapter", adapter_len=5, adapter_layers=1),
    "adapter-tanh-all-layers": PeftConfig(method="adapter", adapter_len=3, gate_tanh=True),
    "lora": PeftConfig(method="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.1, lora_targets=ALL_TARGETS),
    "bottleneck": PeftConfig(method="bottleneck", bottleneck_dim=8),
    "bottleneck-norms": PeftConfig(method="bottleneck", bottleneck_dim=8, train_norms=True),
}


def adapted(config: PeftConfig, seed: int = 0, **model_overrides):
    """(base, adapted copy of the same weights)."""
    base = random_model(tiny_config(**model_overrides), seed=seed)
    return base, apply_peft(copy.deepcopy(base), config)


def cached_logits(model: Llama, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of every position, computed the generation way: one prefill, then one token at a time."""
    model.setup_cache(tokens.shape[0], 32)
    try:
        with torch.no_grad():
            outs = [model(tokens[:, :prefill])[0]]
            outs += [model(tokens[:, t:t + 1], start_pos=t)[0] for t in range(prefill, tokens.shape[1])]
    finally:
        model.drop_cache()
    return torch.cat(outs, dim=1)


def one_step(model: Llama, tokens: torch.Tensor, lr: float = 1e-2) -> None:
    """One AdamW step on the trainable tensors, with the language-model loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    opt.step()


def step0_grads(model: Llama, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# ---- every method starts as the base model, exactly -----------------------------------------------

@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_adapted_model_equals_base_exactly(name):
    base, model = adapted(METHOD_CONFIGS[name])
    model.train()  # LoRA's dropout is active too: with B = 0 it still must not change anything
    tokens = random_tokens(base.config, 2, 12)
    with torch.no_grad():
        want, got = base(tokens)[0], model(tokens)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name}: adapted forward differs from the base")


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_adapted_model_equals_base_exactly_with_kv_cache(name):
    base, model = adapted(METHOD_CONFIGS[name])
    tokens = random_tokens(base.config, 2, 12)
    want, got = cached_logits(base, tokens, prefill=5), cached_logits(model, tokens, prefill=5)
    torch.testing.assert_close(got, want, rtol=0, atol=0,
                               msg=f"{name}: adapted prefill + decode differs from the base's")
    # and the cached path is the full forward's (so the comparison above is about the right thing)
    full = base(tokens)[0].detach()
    assert max_abs_diff(want, full) < 1e-4, "the base's cached logits do not match its full forward"


# ---- one optimiser step: the output moves, the base does not --------------------------------------

@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_one_step_changes_output_and_only_method_tensors(name):
    config = METHOD_CONFIGS[name]
    base, model = adapted(config)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    tokens = random_tokens(base.config, 2, 12)
    one_step(model, tokens)
    with torch.no_grad():
        changed = max_abs_diff(model(tokens)[0], base(tokens)[0])
    assert changed > 1e-6, f"{name}: one optimiser step left the output unchanged ({changed})"
    state = model.state_dict()
    trained = set(peft_state_dict(model))
    for key, value in before.items():
        if key in trained:  # the RMSNorm gains, with train_norms
            continue
        assert torch.equal(state[key], value), f"{name}: base tensor {key} changed during the step"
    if config.train_norms:
        assert not torch.equal(state["norm.weight"], before["norm.weight"]), "norm gains were not trained"


def test_adapter_step0_only_gates_get_gradient():
    _, model = adapted(PeftConfig(method="adapter", adapter_len=4, adapter_layers=2))
    grads = step0_grads(model, random_tokens(model.config, 2, 10))
    assert set(grads) == {f"layers.{i}.attention.prompt_adapter.{p}" for i in (0, 1) for p in ("prompt", "gate")}
    for name, g in grads.items():
        if name.endswith("gate"):
            assert g is not None and g.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert g is None or not g.any(), f"{name} got a gradient at step 0 though every gate is zero"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad), "a frozen tensor got a gradient"


def test_lora_step0_only_b_gets_gradient():
    _, model = adapted(PeftConfig(method="lora", lora_targets=ALL_TARGETS, lora_dropout=0.0))
    grads = step0_grads(model, random_tokens(model.config, 2, 10))
    assert len(grads) == 2 * (7 * model.config.n_layers + 1), f"unexpected trainable tensors: {sorted(grads)}"
    for name, g in grads.items():
        if name.endswith("lora_b"):
            assert g is not None and g.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert name.endswith("lora_a") and (g is None or not g.any()), f"{name} got a gradient at step 0"


def test_layers_below_the_adapter_build_no_graph():
    """Autograd saves a tensor for backward only for operations it records; watch which layer is
    running whenever it saves one."""
    _, model = adapted(PeftConfig(method="adapter", adapter_len=4, adapter_layers=1), n_layers=3)
    running = {"layer": None}
    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: running.update(layer=i))
    saved_in = []

    def pack(t):
        saved_in.append(running["layer"])
        return t

    outputs = []
    for layer in model.layers:
        layer.register_forward_hook(lambda m, a, out: outputs.append(out))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(random_tokens(model.config, 2, 9), random_tokens(model.config, 2, 9, seed=3))
    assert 2 in saved_in, "the adapted top layer saved nothing: the watch is not working"
    assert 0 not in saved_in and 1 not in saved_in, f"layers below the adapter kept activations: {saved_in}"
    assert outputs[0].grad_fn is None and outputs[1].grad_fn is None, "a lower layer's output is in the graph"
    loss.backward()
    assert model.layers[2].attention.prompt_adapter.gate.grad is not None


# ---- LLaMA-Adapter against the formula written a second way --------------------------------------

@pytest.mark.parametrize("gate_tanh", [False, True])
def test_prompt_attention_matches_fused_kernel(gate_tanh):
    torch.manual_seed(0)
    config = tiny_config()
    attn = random_model(config).layers[0].attention
    adapter = AdapterPrompt(6, config.dim, config.n_heads, config.n_kv_heads, gate_tanh)
    with torch.no_grad():
        adapter.gate.normal_()
    q = torch.randn(2, config.n_heads, 7, config.head_dim)
    got = adapter(q, attn.wk, attn.wv)
    # PyTorch's kernel with no mask, its own GQA broadcast, on the unrepeated prompt keys/values
    k = attn.wk(adapter.prompt).view(6, config.n_kv_heads, config.head_dim).transpose(0, 1)[None]
    v = attn.wv(adapter.prompt).view(6, config.n_kv_heads, config.head_dim).transpose(0, 1)[None]
    ref = F.scaled_dot_product_attention(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), enable_gqa=True)
    gate = torch.tanh(adapter.gate) if gate_tanh else adapter.gate
    assert max_abs_diff(got, gate * ref) < 1e-5


def test_prompt_keys_values_follow_every_change_of_the_prompt():
    """No stale prompt keys/values: an in-place change made through ``.data`` (which moves neither the
    tensor's version counter nor its address) must show in the very next no-grad call."""
    _, model = adapted(PeftConfig(method="adapter", adapter_len=4))
    tokens = random_tokens(model.config, 1, 10)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.prompt_adapter.gate.fill_(0.5)
        before = model(tokens)[0]
        for layer in model.layers:
            layer.attention.prompt_adapter.prompt.data.mul_(2.0)
        after = model(tokens)[0]
    fresh = copy.deepcopy(model)  # the same tensors, nothing computed before
    with torch.no_grad():
        assert not torch.equal(before, after), "premise: doubling the prompts changes the output"
        assert torch.equal(after, fresh(tokens)[0]), "stale prompt keys/values were used"


# ---- LoRA merging -------------------------------------------------------------------------------

def lora_with_random_b(targets=ALL_TARGETS, **model_overrides):
    base, model = adapted(PeftConfig(method="lora", lora_rank=4, lora_alpha=8, lora_targets=targets), **model_overrides)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.1)
    return base, model.eval()


def test_lora_init_is_like_nn_linear_and_zero():
    """A ~ U(-1/sqrt(in), 1/sqrt(in)), nn.Linear's default (Kaiming-uniform, a = sqrt(5)); B = 0."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(400, 50, bias=False), rank=16, alpha=16.0, dropout=0.0)
    bound = 1 / 400 ** 0.5
    assert layer.lora_a.abs().max() <= bound and layer.lora_a.abs().max() > 0.95 * bound
    assert abs(layer.lora_a.std().item() - bound / 3 ** 0.5) < 0.05 * bound, "A is not uniform on the bound"
    assert not layer.lora_b.any()


def test_lora_linear_matches_one_matrix():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 24, bias=False), rank=3, alpha=6.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(5, 16)
    w = layer.weight.double() + (6.0 / 3) * layer.lora_b.double() @ layer.lora_a.double()
    assert max_abs_diff(layer(x), x.double() @ w.T) < 1e-5


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def test_lora_merge_equals_unmerged_and_unmerge_restores():
    base, model = lora_with_random_b()
    tokens = random_tokens(base.config, 2, 12)
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
    with torch.no_grad():
        unmerged = model(tokens)[0]
        for m in lora_modules(model):
            m.merge()
        merged = model(tokens)[0]
        merged_weights = {k: v.clone() for k, v in model.state_dict().items()}
        for m in lora_modules(model):
            m.merge()  # idempotent: nothing is added twice
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in merged_weights.items()), "merge is not idempotent"
        model.train(), model.eval()  # nothing hides in train()/eval()
        assert all(m.merged for m in lora_modules(model))
        twice = model(tokens)[0]
    assert max_abs_diff(merged, unmerged) < 1e-4, "merged forward differs from the unmerged one"
    assert torch.equal(twice, merged)
    assert not torch.equal(model.layers[0].attention.wq.weight, weights["layers.0.attention.wq.weight"]), \
        "merge did not change W"
    for _ in range(2):
        for m in lora_modules(model):
            m.unmerge()
    for k, w in weights.items():
        assert max_abs_diff(model.state_dict()[k], w) < 1e-6, f"merge then unmerge did not restore {k}"


def test_merge_refuses_tied_output_head():
    _, model = lora_with_random_b(targets=["wq", "output"], tie_embeddings=True)
    with pytest.raises(ValueError, match="tied output head"):
        merge_lora(model)


def test_merge_lora_gives_plain_model_with_base_keys(tmp_path):
    base, model = lora_with_random_b()
    tokens = random_tokens(base.config, 1, 8)
    want = model(tokens)[0].detach()
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base.state_dict())
    save_checkpoint(model, tmp_path / "merged")
    assert max_abs_diff(load_checkpoint(tmp_path / "merged")(tokens)[0], want) < 1e-4


# ---- adapter-only checkpoints ---------------------------------------------------------------------

def trained_copy(base: Llama, config: PeftConfig, seed: int) -> Llama:
    """The base with ``config`` applied and every trainable tensor randomised (as if trained)."""
    model = apply_peft(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_checkpoint_round_trip(tmp_path, name):
    base = random_model(tiny_config())
    trained = trained_copy(base, METHOD_CONFIGS[name], seed=1)
    save_peft(trained, tmp_path / "a", base_checkpoint="runs/base")
    meta = json.loads((tmp_path / "a" / PEFT_CONFIG).read_text())
    assert meta["method"] == METHOD_CONFIGS[name].method
    assert meta["base_checkpoint"] == str(Path("runs/base").resolve()), "the base is recorded from any directory"
    assert PeftConfig.from_dict(meta["config"]) == METHOD_CONFIGS[name]
    assert set(load_file(tmp_path / "a" / PEFT_WEIGHTS)) == set(peft_state_dict(trained))
    loaded = load_peft(copy.deepcopy(base), tmp_path / "a").eval()
    tokens = random_tokens(base.config, 2, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], trained(tokens)[0], rtol=0, atol=0)


def test_swapping_adapters_on_one_base(tmp_path):
    base = random_model(tiny_config())
    tokens = random_tokens(base.config, 2, 10)
    a = trained_copy(base, METHOD_CONFIGS["lora"], seed=1)
    b = trained_copy(base, METHOD_CONFIGS["bottleneck-norms"], seed=2)
    c = trained_copy(base, METHOD_CONFIGS["lora"], seed=3)
    for name, m in (("a", a), ("b", b), ("c", c)):
        save_peft(m, tmp_path / name)
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, want in (("a", a), ("b", b), ("c", c), ("a", a)):
            load_peft(model, tmp_path / name).eval()
            torch.testing.assert_close(model(tokens)[0], want(tokens)[0], rtol=0, atol=0,
                                       msg=f"after loading adapter {name} the output is not that adapter's")
        for m in lora_modules(model):
            m.merge()  # a merged LoRA is unmerged before removal, so the base comes back exactly
        remove_peft(model)
        torch.testing.assert_close(model(tokens)[0], base(tokens)[0], rtol=0, atol=1e-5)
        assert set(model.state_dict()) == set(base.state_dict())


def test_load_into_base_with_different_config_is_clear(tmp_path):
    base = random_model(tiny_config())
    save_peft(trained_copy(base, METHOD_CONFIGS["lora"], seed=1), tmp_path / "a", base_checkpoint="runs/base")
    other = random_model(tiny_config(dim=96, n_heads=6, n_kv_heads=3))
    with pytest.raises(ValueError, match=r"different config \(dim: 96 here, 64 there.*runs/base"):
        load_peft(other, tmp_path / "a")
    # fields that do not change the weights (attention kernel, cache length) are no obstacle
    load_peft(random_model(tiny_config(attn_impl="plain", max_seq_len=32)), tmp_path / "a")


@pytest.mark.parametrize("stored", [None, "absent"])
def test_adapter_recording_an_unresolved_width_loads(tmp_path, stored):
    """peft.json files written before ModelConfig resolved hidden_dim record null there (or, older still,
    nothing): the same base, so the adapter loads and gives the same outputs."""
    base = random_model(tiny_config())
    adapted = trained_copy(base, METHOD_CONFIGS["lora"], seed=1)
    save_peft(adapted, tmp_path / "a")
    path = tmp_path / "a" / PEFT_CONFIG
    meta = json.loads(path.read_text())
    if stored is None:
        meta["base_config"]["hidden_dim"] = None
    else:
        del meta["base_config"]["hidden_dim"]
    path.write_text(json.dumps(meta))
    loaded = load_peft(copy.deepcopy(base), tmp_path / "a").eval()
    tokens = random_tokens(base.config, 2, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], adapted(tokens)[0], rtol=0, atol=0)


def test_adapter_recording_an_impossible_base_is_refused_by_name(tmp_path):
    save_peft(trained_copy(random_model(tiny_config()), METHOD_CONFIGS["lora"], seed=1), tmp_path / "a")
    path = tmp_path / "a" / PEFT_CONFIG
    meta = json.loads(path.read_text())
    meta["base_config"]["dim"] = "64"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"peft.json: its base_config .*dim must be an integer") as err:
        load_peft(random_model(tiny_config()), tmp_path / "a")
    assert "\n" not in str(err.value), str(err.value)


def test_load_with_missing_or_extra_tensor_is_clear(tmp_path):
    base = random_model(tiny_config())
    save_peft(trained_copy(base, METHOD_CONFIGS["lora"], seed=1), tmp_path / "a")
    path = tmp_path / "a" / PEFT_WEIGHTS
    state = load_file(path)
    missing = dict(state)
    del missing["layers.1.attention.wk.lora_b"]
    save_file(missing, path)
    with pytest.raises(ValueError, match=r"missing tensors \['layers.1.attention.wk.lora_b'\]"):
        load_peft(copy.deepcopy(base), tmp_path / "a")
    save_file({**state, "layers.0.attention.wq.lora_c": state["layers.0.attention.wq.lora_a"].clone()}, path)
    with pytest.raises(ValueError, match=r"unexpected tensors \['layers.0.attention.wq.lora_c'\]"):
        load_peft(copy.deepcopy(base), tmp_path / "a")
    save_file({**state, "layers.0.attention.wq.lora_a": torch.zeros(2, 64)}, path)
    with pytest.raises(ValueError, match=r"wrong shapes: layers.0.attention.wq.lora_a: expected \(4, 64\)"):
        load_peft(copy.deepcopy(base), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="not a PEFT checkpoint: no peft.json"):
        load_peft(copy.deepcopy(base), tmp_path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="not a PEFT checkpoint: no peft.safetensors"):
        load_peft(copy.deepcopy(base), tmp_path / "a")


def test_apply_twice_and_bad_config_are_clear():
    _, model = adapted(PeftConfig(method="lora"))
    with pytest.raises(ValueError, match="already has lora applied"):
        apply_peft(model, PeftConfig(method="adapter"))
    with pytest.raises(ValueError, match="adapter_layers 5 exceeds the model's 2 layers"):
        apply_peft(random_model(tiny_config()), PeftConfig(method="adapter", adapter_layers=5))
    with pytest.raises(ValueError, match="method must be one of adapter, lora, bottleneck"):
        PeftConfig(method="prefix")
    with pytest.raises(ValueError, match=r"lora_targets \['wq', 'q_proj'\]"):
        PeftConfig(lora_targets=["wq", "q_proj"])
    with pytest.raises(ValueError, match=r"unknown PeftConfig fields \['rank'\]"):
        PeftConfig.from_dict({"rank": 4})
    with pytest.raises(ValueError, match="has no PEFT modules"):
        merge_lora(random_model(tiny_config()))
    with pytest.raises(ValueError, match="merging applies to LoRA only; this model has adapter"):
        merge_lora(adapted(PeftConfig(method="adapter"))[1])


def test_config_json_round_trip():
    config = PeftConfig(method="adapter", adapter_len=7, adapter_layers=3, gate_tanh=True, lora_targets=["wq", "w2"])
    assert PeftConfig.from_json(config.to_json()) == config


# ---- counts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, count", [
    (PeftConfig(method="adapter", adapter_len=10, adapter_layers=30), 10 * 30 * 4096 + 30 * 32),  # 1,229,760
    (PeftConfig(method="lora", lora_rank=8, lora_targets=["wq", "wv"]), 32 * 2 * 8 * (4096 + 4096)),  # 4,194,304
])
def test_llama_7b_trainable_counts_on_meta_device(config, count):
    with torch.device("meta"):
        model = apply_peft(Llama(ModelConfig.from_preset("llama-7b")), config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == count, f"{config.method}: {trainable:,} trainable parameters, expected {count:,}"
    table = parameter_table(model)
    assert f"{count:,}" in table.splitlines()[-1], f"the table's total row disagrees:\n{table}"


def test_modules_are_visible_in_print():
    for name, needle in (("adapter", "AdapterPrompt"), ("lora", "LoRALinear"), ("bottleneck", "Bottleneck")):
        assert needle in str(adapted(METHOD_CONFIGS[name])[1]), f"{needle} not visible in print(model)"


def test_peft_stats_are_the_gates_and_the_update_norms_per_layer():
    """Written a second way from the tensors themselves: the mean gate factor of each adapted layer, and
    the Frobenius norm of (alpha/r)·B·A over each layer's LoRA projections."""
    _, adapter = adapted(PeftConfig(method="adapter", adapter_len=3, adapter_layers=1, gate_tanh=True))
    with torch.no_grad():
        adapter.layers[-1].attention.prompt_adapter.gate.copy_(torch.tensor([0.5, -0.1, 0.3, 0.2]).view(1, 4, 1, 1))
    assert peft_stats(adapter) == {"adapter_gate": [0.0, pytest.approx(torch.tanh(torch.tensor(
        [0.5, -0.1, 0.3, 0.2])).mean().item())]}
    _, model = lora_with_random_b(targets=("wq", "wv"))
    want = []
    for layer in model.layers:
        squares = 0.0
        for proj in (layer.attention.wq, layer.attention.wv):
            delta = proj.lora_b.double() @ proj.lora_a.double() * (proj.alpha / proj.rank)
            squares += float((delta.detach() ** 2).sum())
        want.append(squares ** 0.5)
    assert peft_stats(model)["lora_delta_norm"] == pytest.approx(want, rel=1e-5)
    assert peft_stats(random_model(tiny_config())) == {}
