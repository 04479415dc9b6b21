"""Weight-only quantisation (llama_min/quantize.py): the formulas against element-wise bounds and a
loop written a second way, the CPU kernels against the dequantise-then-matmul reference, the model swap
(tied head quantised, lookup exact), and quantised checkpoints written by save and by weights_convert.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from conftest import max_abs_diff, random_model, random_tokens, tiny_config
from scripts import run_script, shakespeare_slice, train
from llama_min import generate
from llama_min.checkpoint import load_checkpoint, save_checkpoint
from llama_min.config import Quantization
from llama_min.quantize import (Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, int4_kernel_layout,
                                linear_int4_kernel, linear_int4_reference, linear_int8_kernel,
                                linear_int8_reference, pack_nibbles, quantize_int4, quantize_int8, quantize_model,
                                unpack_nibbles)


def weights(n=48, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[3] = 0.0  # an all-zero row must not divide by zero
    w[5, 7] = 40.0  # an outlier: its row's scale is large, the others' unaffected
    return w


def test_int8_rounds_each_weight_to_the_nearest_step_of_its_row():
    w = weights()
    codes, scales = quantize_int8(w)
    assert codes.dtype == torch.int8 and scales.shape == (w.shape[0],)
    assert codes.abs().max() <= 127
    step = scales.float()[:, None]
    assert ((dequantize_int8(codes, scales) - w).abs() <= step / 2 + 1e-6).all()
    assert (dequantize_int8(codes, scales)[3] == 0).all()
    # the row's largest magnitude gets the extreme code (up to the bfloat16 rounding of its scale)
    assert (codes.abs().amax(dim=1)[w.abs().amax(dim=1) > 0] >= 126).all()


def test_int4_rounds_each_weight_to_the_nearest_of_16_levels_of_its_group():
    w, group = weights(), 16 * 2
    codes, scales, zeros = quantize_int4(w, group)
    assert codes.dtype == torch.uint8 and codes.max() <= 15 and scales.shape == (48, 64 // group)
    # the formula written a second way: a loop over groups, level = lo + j * step
    for n in range(0, 48, 7):
        for g in range(64 // group):
            chunk = w[n, g * group:(g + 1) * group]
            s, z = scales[n, g].float(), zeros[n, g].float()
            levels = (torch.arange(16) - 8) * s + z
            nearest = levels[(chunk[:, None] - levels[None]).abs().argmin(dim=1)]
            got = dequantize_int4(codes, scales, zeros)[n, g * group:(g + 1) * group]
            # ties may round either way; the bfloat16 zero point may push the extremes past the clamp
            assert ((got - chunk).abs() <= (nearest - chunk).abs() + z.abs() * 2**-8 + 1e-6).all()


def test_nibbles_round_trip():
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (32, 32) and torch.equal(unpack_nibbles(packed), codes)
    assert packed[0, 0] == codes[0, 0] + 16 * codes[0, 1]


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_kernel_agrees_with_the_reference(rows):
    w, x = weights(), torch.randn(2, rows, 64)
    codes, scales = quantize_int8(w)
    ref = linear_int8_reference(x.bfloat16().float(), codes, scales)  # the kernel reads bfloat16 activations
    got = linear_int8_kernel(x, codes, scales)
    assert got.dtype == torch.float32 and got.shape == (2, rows, 48)
    assert max_abs_diff(got, ref) < 1e-2 * ref.abs().max()
    wrong = linear_int8_reference(x, codes, scales.flip(0))  # negative control: scales of other rows
    assert max_abs_diff(got, wrong) > 0.1 * ref.abs().max()


@pytest.mark.parametrize("group", [32, 64])
def test_int4_kernel_agrees_with_the_reference(group):
    w, x = weights(k=128), torch.randn(3, 128)
    codes, scales, zeros = quantize_int4(w, group)
    packed = pack_nibbles(codes)
    ref = linear_int4_reference(x.bfloat16().float(), packed, scales, zeros)
    got = linear_int4_kernel(x, *int4_kernel_layout(packed, scales, zeros), group)
    assert max_abs_diff(got, ref) < 1e-2 * ref.abs().max()
    assert max_abs_diff(ref, x @ w.T) < 0.15 * ref.abs().max()  # and it is the float product, roughly
    wrong = linear_int4_reference(x, pack_nibbles(codes.flip(1)), scales, zeros)  # negative control
    assert max_abs_diff(got, wrong) > 0.1 * ref.abs().max()


def test_int4_layer_whose_width_the_kernel_cannot_pack_uses_the_reference():
    linear = nn.Linear(64, 40, bias=False)
    model = nn.Sequential(linear)
    model.config = tiny_config()
    quantize_model(model, "int4", 32)
    layer = model[0]
    assert isinstance(layer, Int4Linear) and layer.kernel_codes is None
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), linear_int4_reference(x, layer.weight, layer.scales, layer.zeros))


def test_group_size_that_does_not_divide_a_layer_is_a_clear_error():
    model = random_model(tiny_config())  # dim 64: groups of 128 do not fit
    with pytest.raises(ValueError, match=r"do not divide every layer's input width \(64, 176\)"):
        quantize_model(model, "int4", 128)
    assert all(type(m.output) is nn.Linear for m in [model]), "a failed quantisation changed the model"
    with pytest.raises(ValueError, match="expected one of 32, 64, 128, 256"):
        Quantization("int4", 48)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantize_model_swaps_every_linear_and_keeps_the_tied_lookup_exact(kind):
    config = tiny_config(dim=64, vocab_size=96, hidden_dim=128, tie_embeddings=True)
    model = random_model(config)
    embedding = model.tok_embeddings.weight.clone()
    tokens = random_tokens(config, 2, 12)
    with torch.no_grad():
        want, _ = model(tokens)
        quantize_model(model, kind, 32)
        got, _ = model(tokens)
    layer = Int8Linear if kind == "int8" else Int4Linear
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, layer) for m in model.modules()) == 7 * config.n_layers + 1  # the head too
    assert isinstance(model.output, layer) and torch.equal(model.tok_embeddings.weight, embedding)
    assert model.config.quantization.kind == kind
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (0.02 if kind == "int8" else 0.2), f"{kind} logits moved by {rel:.3f} of their norm"
    assert rel > 0, "nothing was quantised"


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantised_checkpoint_loads_as_saved_without_float_weights(kind, tmp_path):
    config = tiny_config(hidden_dim=128, tie_embeddings=True)
    model = quantize_model(random_model(config), kind, 32)
    save_checkpoint(model, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization"] == {"kind": kind, "group_size": None if kind == "int8" else 32}
    loaded = load_checkpoint(tmp_path / "q")
    assert loaded.output.weight.dtype == (torch.int8 if kind == "int8" else torch.uint8)
    assert all(p.dim() == 1 or name == "tok_embeddings.weight" for name, p in loaded.named_parameters())
    tokens = random_tokens(config, 1, 10)
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model(tokens)[0])
    assert generate(loaded, [tokens[0].tolist()], 8) == generate(model, [tokens[0].tolist()], 8)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_weights_convert_quantize_writes_what_quantize_model_computes(kind, tmp_path):
    config = tiny_config(hidden_dim=128, tie_embeddings=kind == "int8")
    model = random_model(config)
    save_checkpoint(model, tmp_path / "float")
    done = run_script("weights_convert.py", tmp_path / "float", tmp_path / "q", "--quantize", kind, "--group_size", 32)
    assert done.code == 0, done.err
    assert kind in done.out
    converted = load_checkpoint(tmp_path / "q")
    quantize_model(model, kind, 32)
    assert converted.config == model.config
    for (name, a), (_, b) in zip(sorted(converted.state_dict().items()), sorted(model.state_dict().items())):
        assert torch.equal(a, b), name
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < (tmp_path / "float" / "model.safetensors").stat().st_size / 2


def test_weights_convert_refuses_to_quantise_for_transformers_and_twice(tmp_path):
    model = random_model(tiny_config())
    save_checkpoint(model, tmp_path / "float")
    done = run_script("weights_convert.py", tmp_path / "float", tmp_path / "hf", "--to", "hf", "--quantize", "int8")
    assert done.code == 1 and "--quantize writes a llama_min checkpoint" in done.err
    save_checkpoint(quantize_model(model, "int8"), tmp_path / "q")
    done = run_script("weights_convert.py", tmp_path / "q", tmp_path / "qq", "--quantize", "int8")
    assert done.code == 1 and "already quantised" in done.err
    done = run_script("weights_convert.py", tmp_path / "float", tmp_path / "q4", "--quantize", "int4", "--group_size", 48)
    assert done.code == 1 and "expected one of 32, 64, 128, 256" in done.err


@pytest.mark.parametrize("kind,method", [("int8", "full"), ("int4", "lora")])
def test_training_from_a_quantised_checkpoint_is_one_clear_line(kind, method, tmp_path):
    """Integer codes cannot be trained (no gradient; LoRA wraps float projections): train.py says so in
    one line, before any data is read, instead of failing in backward or inside apply_peft."""
    save_checkpoint(quantize_model(random_model(tiny_config(hidden_dim=128)), kind, 32), tmp_path / "q")
    done = run_script("train.py", "--init_from", tmp_path / "q", "--method", method, "--data", tmp_path / "nothing",
                      "--out_dir", tmp_path / "out", "--max_steps", 1)
    err = done.err.strip()
    assert done.code == 1 and "\n" not in err, err[-2000:]
    assert f"holds {kind} weights (weights_convert.py --quantize), which cannot be trained" in err
    assert "train from the float checkpoint" in err
    assert not (tmp_path / "out").exists(), "nothing is written for a refused run"


def test_resuming_onto_a_quantised_checkpoint_is_one_clear_line(tmp_path):
    """A run's own checkpoint replaced by a quantised one: --resume refuses it the same way."""
    data = shakespeare_slice(tmp_path)
    out = tmp_path / "run"
    train("--dim", 32, "--n_layers", 1, "--n_heads", 2, "--vocab_size", 384, "--multiple_of", 32, "--data", data,
          "--out_dir", out, "--seq_len", 16, "--batch_size", 2, "--max_steps", 1, "--eval_every", 1, "--eval_tokens",
          64, "--sample_tokens", 0)
    save_checkpoint(quantize_model(load_checkpoint(out / "ckpt"), "int8"), tmp_path / "q")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "q" / name, out / "ckpt" / name)
    done = run_script("train.py", "--resume", "--data", data, "--out_dir", out, "--max_steps", 2)
    err = done.err.strip()
    assert done.code == 1 and "\n" not in err, err[-2000:]
    assert err.endswith(f"--resume: {out / 'ckpt'} holds int8 weights (weights_convert.py --quantize), which cannot "
                        "be trained; train from the float checkpoint it was made from, and quantise the trained model")
