"""The progress line: an ETA that counts the periodic work still to come and does not swing on one slow
step, and an MFU that never reads above 100%. Checked on Progress itself with a clock the test drives."""

import pytest
import torch

import llama_min.training.progress as progress_module
from llama_min import Llama
from llama_min.config import ModelConfig
from llama_min.training.config import TrainConfig
from llama_min.training.progress import Progress, datasheet_peak
from llama_min.training.runtime import Runtime


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress_module.time, "time", c)
    return c


def make(tmp_path, **flags) -> Progress:
    cfg = TrainConfig(out_dir=str(tmp_path), peak_flops=1e15, seq_len=8, **flags)
    model = Llama(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=8))
    return Progress(cfg, Runtime(torch.device("cpu")), model)


def eta_printed(capsys) -> float:
    line = [line for line in capsys.readouterr().out.splitlines() if "ETA" in line][-1]
    minutes, seconds = line.rsplit("ETA ", 1)[1].rstrip("s").split("m")
    return 60 * int(minutes) + int(seconds)


def run_steps(p: Progress, clock: Clock, steps: range, step_s: float, eval_s: float, slow: dict | None = None):
    for step in steps:
        clock.now += (slow or {}).get(step, step_s)
        p.step(step, loss=1.0, lr=1e-3, tokens=8)
        if step % p.cfg.eval_every == 0:
            with p.periodic_work("eval", p.cfg.eval_every):
                clock.now += eval_s


def test_eta_counts_the_evaluations_still_to_come(tmp_path, clock, capsys):
    """20 steps of 0.1 s, an evaluation of 10 s every 5 steps. After step 6 (one evaluation measured):
    14 steps (1.4 s) and three evaluations (at 10, 15, 20: 30 s) remain."""
    p = make(tmp_path, max_steps=20, eval_every=5, log_every=1)
    run_steps(p, clock, range(1, 7), step_s=0.1, eval_s=10.0)
    assert eta_printed(capsys) == pytest.approx(31.4, abs=1.0), "the ETA must include the evaluations left"


def test_one_slow_step_does_not_swing_the_eta(tmp_path, clock, capsys):
    p = make(tmp_path, max_steps=400, eval_every=1000, log_every=1)
    run_steps(p, clock, range(1, 101), step_s=0.3, eval_s=0.0)
    before = eta_printed(capsys)
    run_steps(p, clock, range(101, 102), step_s=0.3, eval_s=0.0, slow={101: 30.0})  # one step 100x slower
    after = eta_printed(capsys)
    assert before == pytest.approx(300 * 0.3, abs=1) and after < 1.5 * before, (before, after)


def test_mfu_never_reads_above_100_percent(tmp_path, clock, capsys, monkeypatch):
    """A peak measured at start on a busy machine can be below what training then reaches."""
    p = make(tmp_path, max_steps=10, log_every=1)
    p.peak = p.flops_per_token * 8 / 0.5  # as if measured at 2x below: 8 tokens per 0.25 s reach 200%
    clock.now += 0.25
    p.step(1, loss=1.0, lr=1e-3, tokens=8)
    out = capsys.readouterr().out
    assert "MFU 100.0%" in out and "measured at start" in out, out


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12), ("NVIDIA H200", 989e12), ("NVIDIA B200", 2250e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A10G", 125e12), ("Tesla V100-SXM2-16GB", 125e12), ("Tesla T4", 65e12), ("Some Future GPU", None),
])
def test_datasheet_peak_takes_the_longest_matching_name(name, peak):
    assert datasheet_peak(name) == peak


def test_flops_of_full_training_are_palms_and_frozen_parts_cost_less():
    """PaLM's count, written out for the tiny shape: 6 per matrix weight plus 12·L·T·dim; a LoRA run pays
    2 + 2 per frozen weight (no weight gradient), an adapter on the top layer nothing backward below it."""
    from llama_min.peft import PeftConfig, apply_peft
    from llama_min.training.progress import flops_per_token

    c = ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16, max_seq_len=16)
    T, h, kv = 16, c.hidden_dim, c.n_kv_heads * c.head_dim
    per_layer = 2 * c.dim * c.dim + 2 * c.dim * kv + 3 * c.dim * h
    full = 6 * (c.n_layers * per_layer + c.dim * c.vocab_size) + 12 * c.n_layers * T * c.dim
    assert flops_per_token(Llama(c), T) == full
    lora = apply_peft(Llama(c), PeftConfig(method="lora", lora_rank=2, lora_targets=("wq",)))
    lora_ab = 6 * c.n_layers * 2 * (c.dim + c.dim)  # A (2, dim) and B (dim, 2) per layer, trained
    assert flops_per_token(lora, T) == full - 2 * (c.n_layers * per_layer + c.dim * c.vocab_size) + lora_ab
    adapter = apply_peft(Llama(c), PeftConfig(method="adapter", adapter_len=10, adapter_layers=1))
    layer0 = 2 * per_layer + 4 * T * c.dim  # below the adapted layer: forward only
    layer1 = 4 * per_layer + 6 * 10 * c.dim + 12 * T * c.dim  # frozen matrices, trained prompts (10, dim)
    assert flops_per_token(adapter, T) == layer0 + layer1 + 4 * c.dim * c.vocab_size


def test_loss_png_is_drawn_once_a_loss_is_logged(tmp_path):
    """plot() says where it drew the curve; before any loss is logged (a run that stopped early, with
    only dev scores in metrics.jsonl) it draws nothing and says nothing."""
    pytest.importorskip("matplotlib")
    p = make(tmp_path)
    assert p.plot() is None and not (tmp_path / "loss.png").exists(), "no metrics.jsonl yet"
    p.record(step=1, dev_accuracy=0.5)
    assert p.plot() is None and not (tmp_path / "loss.png").exists(), "no loss logged yet"
    p.record(step=2, train_loss=3.0)
    assert p.plot() == f"loss curve: {tmp_path / 'loss.png'}" and (tmp_path / "loss.png").stat().st_size > 0
