"""LoRA exported in the Hugging Face PEFT layout, loaded by ``peft`` itself onto the Hugging Face export of
the base: the two models must give the same logits. The independent reference is peft's own LoRA code."""

import json

import pytest
import torch

from llama_min.hf_format import config_to_hf, state_dict_to_hf
from llama_min.peft.lora import LoRALinear
from llama_min.peft.export_hf import HF_ADAPTER_CONFIG, export_lora_to_hf
from llama_min.peft import PeftConfig, apply_peft
from llama_min.checkpoint import save_checkpoint

from conftest import max_abs_diff, random_model, random_tokens, tiny_config

TOL = 1e-4  # float32, same as the base model's Hugging Face parity


def hf_base(transformers, model):
    hf_config = transformers.LlamaConfig(**config_to_hf(model.config), attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_config).float()
    base_state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    hf.load_state_dict(state_dict_to_hf(base_state, model.config), strict=True)
    return hf


@pytest.mark.parametrize("targets", [["wq", "wv"], ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]])
def test_peft_loads_our_lora_and_gives_our_logits(tmp_path, targets):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = apply_peft(random_model(tiny_config()), PeftConfig(method="lora", lora_rank=4, lora_alpha=12,
                                                               lora_targets=targets)).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B = 0 would make any layout pass: give B values (as if trained)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(0.3 * torch.randn(m.lora_b.shape, generator=g))
    export_lora_to_hf(model, tmp_path / "lora")
    hf = peft.PeftModel.from_pretrained(hf_base(transformers, model), tmp_path / "lora").eval()
    tokens = random_tokens(model.config, 2, 12)
    with torch.no_grad():
        ours, theirs = model(tokens)[0], hf(input_ids=tokens).logits.float()
        with hf.disable_adapter():
            without = hf(input_ids=tokens).logits.float()
    assert max_abs_diff(ours, without) > 100 * TOL, "the LoRA update is too small for this test to see a mistake"
    assert max_abs_diff(ours, theirs) <= TOL, f"max |Δlogit| vs peft = {max_abs_diff(ours, theirs):.3g}"
    written = json.loads((tmp_path / "lora" / HF_ADAPTER_CONFIG).read_text())
    assert written["r"] == 4 and written["lora_alpha"] == 12


def test_export_without_q_permutation_would_fail(tmp_path, monkeypatch):
    """The comparison above is sensitive to the q/k row permutation of B: skip it and it fails."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import llama_min.peft.export_hf as lora_hf

    model = apply_peft(random_model(tiny_config()), PeftConfig(method="lora", lora_rank=4, lora_targets=["wq"])).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.3)
    real = lora_hf.tensor_to_hf
    monkeypatch.setattr(lora_hf, "tensor_to_hf", lambda name, t, config: (real(name, t, config)[0], t))
    export_lora_to_hf(model, tmp_path / "lora")
    hf = peft.PeftModel.from_pretrained(hf_base(transformers, model), tmp_path / "lora").eval()
    tokens = random_tokens(model.config, 2, 12)
    with torch.no_grad():
        diff = max_abs_diff(model(tokens)[0], hf(input_ids=tokens).logits.float())
    assert diff > 100 * TOL, f"an unpermuted B should not match peft, but the difference is only {diff:.3g}"


def test_export_refuses_a_model_without_lora(tmp_path):
    model = apply_peft(random_model(tiny_config()), PeftConfig(method="adapter"))
    with pytest.raises(ValueError, match="needs a model with LoRA applied"):
        export_lora_to_hf(model, tmp_path / "x")


def test_weights_convert_to_peft_exports_an_adapter_directory(tmp_path):
    """weights_convert.py OUT/peft DST --to peft: the adapter train.py wrote, in the PEFT layout, without
    loading its base; peft applies it onto the base's Hugging Face export and gives our logits. Other
    methods are refused with the reason."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from llama_min.peft import save_peft
    from scripts import run_script

    base = random_model(tiny_config())
    save_checkpoint(base, tmp_path / "base")
    model = apply_peft(random_model(tiny_config()), PeftConfig(method="lora", lora_rank=4, lora_targets=("wq", "wk")))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.3)
    save_peft(model, tmp_path / "peft", base_checkpoint=tmp_path / "base")
    done = run_script("weights_convert.py", tmp_path / "peft", tmp_path / "hf_lora", "--to", "peft")
    assert done.code == 0, done.err
    hf = peft.PeftModel.from_pretrained(hf_base(transformers, model), tmp_path / "hf_lora").eval()
    tokens = random_tokens(model.config, 2, 12)
    with torch.no_grad():
        assert max_abs_diff(model.eval()(tokens)[0], hf(input_ids=tokens).logits.float()) <= TOL
    adapter = apply_peft(random_model(tiny_config()), PeftConfig(method="adapter"))
    save_peft(adapter, tmp_path / "adapter")
    refused = run_script("weights_convert.py", tmp_path / "adapter", tmp_path / "x", "--to", "peft")
    assert refused.code == 1 and "holds LoRA adapters; this one is adapter" in refused.err, refused.err
    flags = run_script("weights_convert.py", tmp_path / "peft", tmp_path / "y", "--to", "peft", "--verify")
    assert flags.code == 1 and "drop them" in flags.err and not (tmp_path / "y").exists(), flags.err


def test_an_adapter_converted_with_base_hf_loads_with_auto_peft(tmp_path):
    """--to peft --base_hf EXPORT records the base's Hugging Face export, so that
    AutoPeftModelForCausalLM.from_pretrained(DST) finds it (the llama_min base it records otherwise is a
    directory transformers cannot load, which the conversion says)."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from llama_min.peft import save_peft
    from scripts import run_script

    base = random_model(tiny_config())
    save_checkpoint(base, tmp_path / "base")
    assert run_script("weights_convert.py", tmp_path / "base", tmp_path / "base_hf", "--to", "hf").code == 0
    model = apply_peft(random_model(tiny_config()), PeftConfig(method="lora", lora_rank=4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.3)
    save_peft(model, tmp_path / "peft", base_checkpoint=tmp_path / "base")
    plain = run_script("weights_convert.py", tmp_path / "peft", tmp_path / "lora_plain", "--to", "peft")
    assert plain.code == 0 and "--base_hf" in plain.out, plain.out
    done = run_script("weights_convert.py", tmp_path / "peft", tmp_path / "lora", "--to", "peft",
                      "--base_hf", tmp_path / "base_hf")
    assert done.code == 0, done.err
    hf = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lora").float().eval()
    tokens = random_tokens(model.config, 2, 12)
    with torch.no_grad():
        assert max_abs_diff(model.eval()(tokens)[0], hf(input_ids=tokens).logits.float()) <= TOL
    wrong = run_script("weights_convert.py", tmp_path / "peft", tmp_path / "x", "--to", "peft", "--base_hf",
                       tmp_path / "base")
    assert wrong.code == 1 and "--base_hf" in wrong.err and "--to hf" in wrong.err, wrong.err
