"""The CPU tests' equalities, on a GPU: run by benchmarks/gpu_check.py (pytest -m cuda), skipped in CI.
float32 comparisons switch TF32 off (exact_float32): they test the code, not the tensor cores' rounding."""

import pytest
import torch

from conftest import max_abs_diff, random_model, random_tokens, tiny_config
from llama_min import Llama
from llama_min.peft import PeftConfig, apply_peft
from llama_min.training.runtime import Runtime, exact_float32
from llama_min.training.trainable import hold_frozen_in_autocast_dtype
from llama_min.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def test_hugging_face_parity_on_the_gpu():
    from test_hf_parity import TOL, load_fixture
    from llama_min.hf_format import config_from_hf, state_dict_from_hf

    hf_config, hf_state, input_ids, expected = load_fixture()
    config = config_from_hf(hf_config)
    model = Llama(config).eval()
    model.load_state_dict(state_dict_from_hf(hf_state, config))
    with exact_float32(), torch.no_grad():
        logits, _ = model.to(CUDA)(input_ids.to(CUDA))
    assert max_abs_diff(logits.cpu(), expected) <= 10 * TOL


@pytest.mark.parametrize("attn_impl", ["plain", "sdpa"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
def test_cached_decoding_equals_the_full_forward_pass(attn_impl, dtype, tol):
    model = random_model(tiny_config(attn_impl=attn_impl)).to(CUDA, dtype)
    tokens = random_tokens(model.config, 3, 20).to(CUDA)
    with exact_float32(), torch.no_grad():
        full, _ = model(tokens)
        model.setup_cache(3)
        steps = [model(tokens[:, :7], start_pos=0)[0]] + [model(tokens[:, i:i + 1], start_pos=i)[0] for i in range(7, 20)]
        model.drop_cache()
    assert max_abs_diff(torch.cat(steps, 1), full) <= tol


def test_plain_and_fused_attention_agree_with_grouped_heads_and_padding():
    """On CUDA with a mask the kv heads are repeated before SDPA (attention.kernel_broadcasts_kv_heads)."""
    config = tiny_config()
    plain = random_model(tiny_config(attn_impl="plain")).to(CUDA, torch.bfloat16)
    fused = Llama(config).to(CUDA, torch.bfloat16).eval()
    fused.load_state_dict(plain.state_dict())
    tokens = random_tokens(config, 3, 16).to(CUDA)
    pad_lens = torch.tensor([0, 3, 6], device=CUDA)
    with torch.no_grad():
        a, b = plain(tokens, pad_lens=pad_lens)[0], fused(tokens, pad_lens=pad_lens)[0]
    real = torch.cat([a[i, p:] for i, p in enumerate(pad_lens.tolist())]), torch.cat([b[i, p:] for i, p in enumerate(pad_lens.tolist())])
    assert max_abs_diff(*real) <= 0.15


def test_gradients_on_the_gpu_equal_the_cpus():
    cpu = random_model(tiny_config()).train()
    gpu = random_model(tiny_config()).to(CUDA).train()
    tokens = random_tokens(cpu.config, 2, 16)
    for model, x in ((cpu, tokens), (gpu, tokens.to(CUDA))):
        with exact_float32():
            model(x[:, :-1], x[:, 1:])[1].backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert max_abs_diff(p.grad, q.grad.cpu()) <= 1e-4, name


def test_loading_as_bfloat16_on_the_gpu_holds_one_copy(tmp_path):
    model = Llama(tiny_config(dim=256, n_layers=4, vocab_size=8000))
    save_checkpoint(model, tmp_path / "ckpt")
    torch.cuda.reset_peak_memory_stats()
    load_checkpoint(tmp_path / "ckpt", device=CUDA, dtype=torch.bfloat16)
    bf16 = sum(p.numel() for p in model.parameters()) * 2
    assert torch.cuda.max_memory_allocated() <= 1.1 * bf16 + 2**20, "a float32 copy was held on the GPU"


def test_peft_with_a_bfloat16_base_trains_and_scores_under_autocast():
    model = apply_peft(random_model(tiny_config()).to(CUDA), PeftConfig(method="lora"))
    rt = Runtime(CUDA, autocast_dtype=torch.bfloat16)
    hold_frozen_in_autocast_dtype(model, rt)
    tokens = random_tokens(model.config, 2, 16).to(CUDA)
    with rt.autocast():
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        model.setup_cache(2)
        assert model.layers[0].attention.cache.k.dtype == torch.bfloat16
        model.drop_cache()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
