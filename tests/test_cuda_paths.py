"""The CUDA path's decisions, checked on a CPU (CI has no GPU): each test forces the device check it
needs (a torch.device("cuda") object needs no GPU; CUDA queries are monkeypatched) and watches what
the code does with it. benchmarks/gpu_check.py runs the real thing on a GPU."""

import subprocess
import sys

import pytest
import torch

import llama_min.training.state as state_module
from conftest import random_model, tiny_config
from llama_min.peft import PeftConfig, apply_peft
from llama_min.training.runtime import Runtime, choose_autocast_dtype, exact_float32
from llama_min.training.trainable import hold_frozen_in_autocast_dtype
from scripts import ROOT

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_dtype_auto_takes_float16_where_bfloat16_is_only_emulated(monkeypatch, native_bf16, expected):
    """V100 and T4 emulate bfloat16: is_bf16_supported() says yes unless including_emulation=False."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native_bf16)
    assert choose_autocast_dtype("auto", CUDA) == expected
    if not native_bf16:
        with pytest.raises(ValueError, match="only emulates it"):
            choose_autocast_dtype("bfloat16", CUDA)
    assert choose_autocast_dtype("auto", torch.device("cpu")) is None  # float32 on the CPU


def test_peft_on_a_gpu_holds_the_frozen_projections_in_bfloat16():
    """Trainable tensors stay float32; the frozen projections go to the autocast dtype; the embedding
    and the norms stay float32, so the residual stream does too."""
    model = apply_peft(random_model(tiny_config(tie_embeddings=True)), PeftConfig(method="lora"))
    hold_frozen_in_autocast_dtype(model, Runtime(CUDA, autocast_dtype=torch.bfloat16))
    for name, p in model.named_parameters():
        expected = torch.float32 if p.requires_grad or p.dim() == 1 or name == "tok_embeddings.weight" else torch.bfloat16
        assert p.dtype == expected, f"{name}: {p.dtype}"
    assert model.output.weight is model.tok_embeddings.weight and model.output.weight.dtype == torch.float32
    cpu = apply_peft(random_model(tiny_config()), PeftConfig(method="lora"))
    hold_frozen_in_autocast_dtype(cpu, Runtime(torch.device("cpu"), autocast_dtype=torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in cpu.parameters()), "on the CPU nothing changes"


def test_exact_float32_switches_tf32_off_and_back():
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with exact_float32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def test_resume_state_is_read_to_the_cpu(tmp_path, monkeypatch):
    """A GPU run's train_state.pt must load on any rank and on a machine without a GPU."""
    (tmp_path / "train_state.pt").write_bytes(b"")
    seen = {}
    monkeypatch.setattr(state_module.torch, "load", lambda path, **kwargs: seen.update(kwargs) or {"step": 1})
    state_module.load_train_state(tmp_path)
    assert seen["map_location"] == "cpu" and seen["weights_only"] is True


def test_each_process_restores_its_own_generators(monkeypatch):
    """Rank 1 of 2 takes the second saved state (not rank 0's), and its own GPU's; a different number of
    processes draws afresh and says so."""
    cuda_states = {}
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: cuda_states.update({device: s}))
    rt = Runtime(CUDA, rank=1, world_size=2)
    first = state_module.rng_states(torch.device("cpu"))
    torch.manual_seed(1234)
    second = {**state_module.rng_states(torch.device("cpu")), "cuda": torch.tensor([7], dtype=torch.uint8)}
    torch.manual_seed(0)
    assert state_module.set_rng_states([first, second], rt) is None
    assert torch.equal(torch.get_rng_state(), second["torch"]), "rank 1 must continue its own stream"
    assert torch.equal(cuda_states[CUDA], second["cuda"])
    note = state_module.set_rng_states([first], rt)
    assert note and "1 process(es) cannot continue in 2" in note


def test_the_logits_are_not_kept_through_backward(tmp_path, monkeypatch):
    """A training step takes only the loss from the model: the (B, T, vocab) float32 logits (4.2 GB at
    8 x 4096 x 32k) must be freed before backward, not held by a name in the loop."""
    import weakref

    from llama_min import Llama
    from scripts import run_script

    alive_at_backward = []
    forward, backward = Llama.forward, torch.Tensor.backward
    logits_refs = []

    def spy_forward(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        if loss is not None:  # in training the chunked loss builds no logits at all (None): fine too
            logits_refs.append(weakref.ref(logits) if logits is not None else lambda: None)
        return logits, loss

    def spy_backward(self, *args, **kwargs):
        alive_at_backward.append(logits_refs[-1]() is not None)
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(Llama, "forward", spy_forward)
    monkeypatch.setattr(torch.Tensor, "backward", spy_backward)
    (tmp_path / "data.txt").write_text((ROOT / "data/shakespeare/val.txt").read_text()[:20_000])
    done = run_script("train.py", "--dim", "32", "--n_layers", "1", "--n_heads", "2", "--vocab_size", "512",
                      "--multiple_of", "16", "--data", tmp_path / "data.txt", "--cache_dir", tmp_path / "cache",
                      "--out_dir", tmp_path / "out", "--seq_len", "16", "--batch_size", "2", "--max_steps", "2",
                      "--eval_every", "2", "--eval_tokens", "64", "--sample_tokens", "0")
    assert done.code == 0, done.err
    assert alive_at_backward == [False, False], "the logits were still referenced when backward ran"


RSS_OF_A_LOAD = """
import sys, torch
from llama_min.checkpoint import load_checkpoint, save_checkpoint
def rss_kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
load_checkpoint(sys.argv[2], dtype=torch.bfloat16)  # a tiny load first: the code it runs is paged in
base = rss_kb("VmRSS:")
model = load_checkpoint(sys.argv[1], dtype=torch.bfloat16)
print(rss_kb("VmHWM:") - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_with_a_dtype_change_never_holds_two_copies(tmp_path):
    """A float32 checkpoint loaded as bfloat16 converts tensor by tensor: the peak is the bfloat16 model
    plus about one float32 tensor, not the whole float32 model besides (measured in a fresh process)."""
    from llama_min import Llama, ModelConfig, save_checkpoint

    config = ModelConfig(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256, max_seq_len=64)
    model = Llama(config)
    save_checkpoint(model, tmp_path / "ckpt")
    save_checkpoint(random_model(tiny_config()), tmp_path / "tiny")
    float32_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20  # 127 MB; bfloat16 half of it
    largest_mb = max(p.numel() for p in model.parameters()) * 4 / 2**20  # the 62.5 MB embedding
    peak_mb = int(subprocess.run([sys.executable, "-c", RSS_OF_A_LOAD, str(tmp_path / "ckpt"), str(tmp_path / "tiny")],
                                 capture_output=True, text=True, check=True).stdout) / 1024
    assert peak_mb < float32_mb / 2 + largest_mb + 20, (
        f"peak {peak_mb:.0f} MB above the start to load a {float32_mb:.0f} MB float32 checkpoint as bfloat16: "
        f"expected about {float32_mb / 2:.0f} MB plus one tensor ({largest_mb:.0f} MB)")
