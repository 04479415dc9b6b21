"""The plot scripts students look at each write a PNG: RoPE's rotation, the attention maps of a model from a
checkpoint, and the PEFT statistics of a real (tiny) adapter run's metrics.jsonl."""

import pytest

from llama_min.checkpoint import save_checkpoint

from conftest import random_model, tiny_config
from scripts import train

PNG = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib")


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 2000, f"{path} is not a drawn PNG ({len(data)} bytes)"


def test_rope_plot(tmp_path):
    from lab.plots.rope import plot_rope

    assert_png(plot_rope(tmp_path / "rope.png", head_dim=16, max_offset=40))


def test_attention_maps_of_a_checkpoint(tmp_path, trained_tokenizer, capsys):
    from lab.plots.attention_maps import attention_weights, main

    model = random_model(tiny_config(vocab_size=trained_tokenizer.vocab_size, attn_impl="plain"))
    save_checkpoint(model, tmp_path / "ckpt", tokenizer_path=trained_tokenizer.path)
    main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "the quick brown fox", "--out", str(tmp_path / "a.png")])
    assert_png(tmp_path / "a.png")
    import torch
    weights = attention_weights(model, torch.tensor([[1, 5, 9, 4]]))
    assert len(weights) == 2 and weights[0].shape == (4, 4, 4)
    assert torch.allclose(weights[0].sum(-1), torch.ones(4, 4), atol=1e-5), "attention rows must sum to 1"
    assert (weights[1].triu(1) == 0).all(), "causal: no weight on later tokens"


def test_peft_plot_from_a_real_run(word_bench, tmp_path):
    from lab.plots.peft import plot_peft, read_peft_records

    train("--init_from", word_bench / "base" / "ckpt", "--method", "adapter", "--data", word_bench / "benchmark" / "instructions" /
          "train.jsonl", "--seq_len", "160", "--batch_size", "2", "--max_steps", "2", "--warmup_steps", "1",
          "--lr", "1e-2", "--log_every", "1", "--eval_every", "2", "--sample_tokens", "0", "--out_dir", tmp_path)
    steps, rows = read_peft_records(tmp_path / "metrics.jsonl")["adapter_gate"]
    assert steps == [1, 2] and len(rows[0]) == 2
    assert_png(plot_peft(tmp_path / "metrics.jsonl", tmp_path / "gates.png"))


def test_multimodal_world_and_scores(word_bench, tmp_path, capsys):
    """Lab 13's script: the world with its blind records, then a blind and a multimodal adapter (open gates, so
    that the picture matters) scored on the test pictures, each as the study's own scoring scores it."""
    import torch

    from experiments.multimodal import score
    from lab.plots.multimodal import main
    from llama_min.checkpoint import load_checkpoint
    from llama_min.peft import PeftConfig, apply_peft, save_peft

    main(["world", "--out", str(tmp_path / "world"), "--n_train", "4", "--n_test", "6"])
    assert (tmp_path / "world" / "train_blind.json").is_file() and len(list((tmp_path / "world" / "test").iterdir())) == 6
    base = word_bench / "base" / "ckpt"
    for name, visual in (("blind", {}), ("multimodal", {"visual_dim": 64, "image_encoder": "lab"})):
        model = apply_peft(load_checkpoint(base), PeftConfig(method="adapter", adapter_len=3, **visual))
        with torch.no_grad():
            for layer in model.layers:
                layer.attention.prompt_adapter.gate.fill_(2.0)
        save_peft(model, tmp_path / name / "peft", base_checkpoint=base)
    main(["score", "--base", str(base), "--world", str(tmp_path / "world"), "--runs", str(tmp_path / "blind"),
          str(tmp_path / "multimodal"), "--out", str(tmp_path / "bars.png")])
    printed = capsys.readouterr().out
    assert_png(tmp_path / "bars.png")
    for name in ("blind", "multimodal"):
        want = score(base, tmp_path / name, tmp_path / "world")[0]
        line = next(line for line in printed.splitlines() if line.startswith(name + " "))
        assert all(f"{column} {want[column]:.2f}" in line for column in want), (line, want)
