"""The multimodal LLaMA-Adapter (llama_min/peft/adapter.py, VisualProjection): image features added to the
adaption prompts of every adapted layer, zero gates still giving exactly the base."""

import json

import pytest
import torch
from safetensors.torch import load_file

from llama_min import Llama, ModelConfig, generate
from llama_min.finetune.images import make_world
from llama_min.peft import PeftConfig, apply_peft, load_peft, peft_state_dict, save_peft

from conftest import random_model, random_tokens, tiny_config
from scripts import run_script, train

C_V = 12  # image feature width of these tests
MULTIMODAL = PeftConfig(method="adapter", adapter_len=3, adapter_layers=2, visual_dim=C_V)


def adapted(config: PeftConfig = MULTIMODAL) -> tuple[Llama, Llama]:
    base = random_model(tiny_config(n_layers=3))
    model = apply_peft(random_model(tiny_config(n_layers=3)), config)
    return base, model


def images(batch: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, C_V, generator=torch.Generator().manual_seed(seed))


def open_gates(model: Llama, value: float = 0.7) -> None:
    with torch.no_grad():
        for layer in model.layers:
            if layer.attention.prompt_adapter is not None:
                layer.attention.prompt_adapter.gate.fill_(value)


def test_zero_gates_equal_the_base_exactly_with_and_without_images():
    base, model = adapted()
    tokens = random_tokens(base.config, 2, 10)
    with torch.no_grad():
        want = base(tokens)[0]
        assert torch.equal(model(tokens, images=images(2))[0], want), "an image moved a zero-gated adapter's logits"
        assert torch.equal(model(tokens)[0], want), "text-only use of a multimodal adapter differs from the base"


def test_image_reaches_the_output_once_gates_open_row_by_row():
    _, model = adapted()
    open_gates(model)
    tokens = random_tokens(model.config, 2, 10)
    feats = images(2)
    with torch.no_grad():
        both = model(tokens, images=feats)[0]
        other = model(tokens, images=torch.stack([feats[0], images(1, seed=9)[0]]))[0]
        text_only = model(tokens)[0]
    assert torch.equal(both[0], other[0]), "row 0's output depends on row 1's image"
    assert (both[1] - other[1]).abs().max() > 1e-3, "a different image left row 1 unchanged"
    assert (both - text_only).abs().max() > 1e-3, "the image changed nothing with open gates"


def test_visual_term_is_the_projection_added_to_every_prompt():
    """Independent reference: a text-only adapter whose prompts are set to P + Projection(I) by hand."""
    _, model = adapted()
    open_gates(model)
    tokens = random_tokens(model.config, 1, 9)
    feat = images(1)
    reference = apply_peft(random_model(tiny_config(n_layers=3)), PeftConfig(method="adapter", adapter_len=3,
                                                                             adapter_layers=2))
    with torch.no_grad():
        added = model.visual_proj(feat)[0]  # (dim,)
        for ours, theirs in zip(model.layers, reference.layers):
            if ours.attention.prompt_adapter is not None:
                theirs.attention.prompt_adapter.prompt.copy_(ours.attention.prompt_adapter.prompt + added)
                theirs.attention.prompt_adapter.gate.copy_(ours.attention.prompt_adapter.gate)
        torch.testing.assert_close(model(tokens, images=feat)[0], reference(tokens)[0], rtol=1e-5, atol=1e-5)


def test_projection_gets_gradients_and_the_base_none():
    _, model = adapted()
    open_gates(model, 0.3)
    tokens = random_tokens(model.config, 2, 10)
    _, loss = model(tokens[:, :-1], tokens[:, 1:], images=images(2))
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("visual_proj.")} == {
        "visual_proj.net.weight", "visual_proj.net.bias", "visual_proj.norm.weight", "visual_proj.norm.bias"}
    for name, p in model.named_parameters():
        if name.startswith("visual_proj."):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        elif not p.requires_grad:
            assert p.grad is None, f"frozen base tensor {name} got a gradient"


def test_hidden_width_gives_a_two_layer_projection():
    _, model = adapted(PeftConfig(method="adapter", adapter_len=3, visual_dim=C_V, visual_hidden=20))
    assert [tuple(p.shape) for p in model.visual_proj.net.parameters()] == [(20, C_V), (20,), (64, 20), (64,)]


def test_save_load_reproduces_a_trained_multimodal_adapter(tmp_path):
    _, model = adapted()
    open_gates(model)
    with torch.no_grad():
        for p in model.visual_proj.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tokens, feats = random_tokens(model.config, 2, 10), images(2)
    save_peft(model, tmp_path / "mm")
    again = load_peft(random_model(tiny_config(n_layers=3)), tmp_path / "mm")
    assert again.peft_config == model.peft_config
    assert set(peft_state_dict(again)) == set(peft_state_dict(model))
    with torch.no_grad():
        assert torch.equal(again(tokens, images=feats)[0], model(tokens, images=feats)[0])


def test_images_without_a_visual_projection_are_refused():
    _, model = adapted(PeftConfig(method="adapter", adapter_len=3))
    with pytest.raises(ValueError, match="no visual projection"):
        model(random_tokens(model.config, 1, 4), images=images(1))


@pytest.mark.parametrize("fields, message", [
    (dict(method="lora", visual_dim=8), "belong to the multimodal adapter"),
    (dict(method="adapter", visual_hidden=8), "text-only adapter"),
    (dict(method="adapter", image_encoder="lab"), "text-only adapter"),
    (dict(method="adapter", visual_dim=-1), "must be >= 0"),
])
def test_bad_visual_fields_are_clear(fields, message):
    with pytest.raises(ValueError, match=message):
        PeftConfig(**fields)


def test_llama_7b_with_clip_vit_l14_trainable_count():
    """CLIP ViT-L/14's vision tower pools to 1024 features (its hidden size). LLaMA-Adapter at 7B: K = 10
    prompts in the top 30 of 32 layers, one gate per head; plus Linear(1024, 4096) and LayerNorm(4096)."""
    with torch.device("meta"):
        model = apply_peft(Llama(ModelConfig.from_preset("llama-7b")),
                           PeftConfig(method="adapter", adapter_len=10, adapter_layers=30, visual_dim=1024))
    prompts_and_gates = 30 * (10 * 4096 + 32)
    projection = 1024 * 4096 + 4096 + 2 * 4096
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == prompts_and_gates + projection == 5_436_352


def test_batched_generation_with_images_equals_each_alone():
    _, model = adapted()
    open_gates(model, 0.9)
    with torch.no_grad():
        for p in model.visual_proj.parameters():
            p.add_(torch.randn_like(p))  # a projection that matters
    prompts = [random_tokens(model.config, 1, n, seed=n)[0].tolist() for n in (5, 9, 3)]
    feats = images(3)
    together = generate(model, prompts, 8, temperature=0.0, images=feats)
    alone = [generate(model, [p], 8, temperature=0.0, images=feats[i:i + 1])[0] for i, p in enumerate(prompts)]
    assert together == alone
    swapped = generate(model, prompts[:1], 8, temperature=0.0, images=feats[1:2])[0]
    assert swapped != alone[0], "the image does not steer generation: the comparison above proves nothing"
    with pytest.raises(ValueError, match="one image per prompt"):
        generate(model, prompts, 2, images=feats[:2])


# ---- the scripts: train.py --image_root, generate.py --image (a shortened version of the pipeline) -----

def test_train_and_generate_with_images(word_bench, tmp_path):
    world = tmp_path / "world"
    make_world(world, n_train=8, n_test=2, seed=0)
    base = word_bench / "base" / "ckpt"
    common = ["--init_from", base, "--method", "adapter", "--image_root", world, "--seq_len", "160", "--batch_size", "4",
              "--warmup_steps", "1", "--log_every", "1", "--sample_tokens", "0"]
    train(*common, "--data", world / "train.json", "--max_steps", "2", "--eval_every", "2", "--out_dir", tmp_path / "mm")
    meta = json.loads((tmp_path / "mm" / "peft" / "peft.json").read_text())
    assert (meta["config"]["visual_dim"], meta["config"]["image_encoder"]) == (64, "lab")
    saved = load_file(tmp_path / "mm" / "peft" / "peft.safetensors")
    assert {k for k in saved if k.startswith("visual_proj.")} == {
        "visual_proj.net.weight", "visual_proj.net.bias", "visual_proj.norm.weight", "visual_proj.norm.bias"}
    ran = run_script("generate.py", "--checkpoint", base, "--peft", tmp_path / "mm" / "peft", "--image_root", world,
                     "--image", "test/00000.png", "--prompt", "What colour is the shape?", "--temperature", "0",
                     "--max_new_tokens", "3")
    assert ran.code == 0, ran.err

    records = json.loads((world / "train.json").read_text())
    records[3]["image"] = "train/gone.png"
    (tmp_path / "broken.json").write_text(json.dumps(records))
    failed = run_script("train.py", *common, "--data", tmp_path / "broken.json", "--out_dir", tmp_path / "x")
    assert failed.code == 1 and "record 3: image train/gone.png not found" in failed.err
    assert len(failed.err.strip().splitlines()) == 1, failed.err


@pytest.mark.parametrize("argv, message", [
    (["train.py", "--init_from", "B", "--method", "adapter", "--image_encoder", "lab"], "--image_root"),
    (["train.py", "--init_from", "B", "--method", "lora", "--image_root", "W"], "needs --method adapter"),
    (["generate.py", "--checkpoint", "B", "--image", "x.png", "--prompt", "hi"], "--image needs --peft"),
])
def test_image_flags_without_their_method_are_errors(argv, message):
    ran = run_script(*argv)
    assert ran.code != 0 and message in ran.err, ran.err
