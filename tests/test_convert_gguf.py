"""GGUF in: files written by the gguf package's own writer, in float and quantised types; the q/k
row order checked against transformers' independent GGUF reader."""

import pytest
import torch

from llama_min.checkpoint import load_checkpoint

from conftest import max_abs_diff, random_model, random_tokens, tiny_config
from convert_helpers import config_of, q8_0_error_bound, run, tensors_of, write_gguf

gguf = pytest.importorskip("gguf")

# multiple_of=32: every matrix row a whole number of 32-weight quantisation blocks (SwiGLU width 192)
CONFIG = dict(multiple_of=32)


def test_f32_gguf_converts_exactly(tmp_path):
    model = random_model(tiny_config(**CONFIG))
    write_gguf(model, tmp_path / "m.gguf", "F32")
    code, out, err = run(tmp_path / "m.gguf", tmp_path / "out")
    assert code == 0, err
    got, expected = tensors_of(tmp_path / "out"), model.state_dict()
    assert set(got) == set(expected), f"tensor names differ: {sorted(set(got) ^ set(expected))}"
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{name} changed through an F32 GGUF file"
    c = config_of(tmp_path / "out")
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta",
              "max_seq_len")
    assert all(getattr(c, f) == getattr(model.config, f) for f in fields), f"metadata mapped to {c}"


def test_gguf_qk_order_agrees_with_transformers_reader(tmp_path):
    """transformers reads GGUF with its own code (and its own q/k permutation back to HF's layout);
    our conversion of the same file must give its logits."""
    pytest.importorskip("transformers")
    model = random_model(tiny_config(**CONFIG))
    write_gguf(model, tmp_path / "m.gguf", "F32")
    code, out, err = run(tmp_path / "m.gguf", tmp_path / "out", "--verify")
    assert code == 0 and ": OK" in out, f"--verify against transformers' GGUF reader failed:\n{out}\n{err}"


def test_tied_gguf_without_output_tensor(tmp_path):
    model = random_model(tiny_config(tie_embeddings=True, **CONFIG))
    write_gguf(model, tmp_path / "m.gguf", "F32")
    assert run(tmp_path / "m.gguf", tmp_path / "out")[0] == 0
    converted = load_checkpoint(tmp_path / "out")
    assert converted.config.tie_embeddings, "a GGUF file without output.weight reuses token_embd: tied"
    ids = random_tokens(model.config, 1, 16)
    with torch.no_grad():
        assert max_abs_diff(converted(ids)[0], model(ids)[0]) == 0.0


def test_q8_0_gguf_converts_within_the_quantisation_error(tmp_path):
    model = random_model(tiny_config(**CONFIG))
    write_gguf(model, tmp_path / "m.gguf", "Q8_0")
    code, _, err = run(tmp_path / "m.gguf", tmp_path / "out")
    assert code == 0, err
    got = tensors_of(tmp_path / "out")
    assert got["norm.weight"].dtype == torch.float32, "a quantised source converts to float32 by default"
    for name, w in model.state_dict().items():
        error = (got[name] - w).abs()
        if w.dim() == 1:
            assert error.max() == 0, f"{name} is stored F32 and must convert exactly"
            continue
        bound = q8_0_error_bound(w)
        worst = (error - bound).max().item()
        assert worst <= 0, f"{name}: error exceeds the Q8_0 bound by {worst}"
        assert error.max() > 0, f"{name}: no quantisation error at all; was it really stored as Q8_0?"
    ids = random_tokens(model.config, 1, 16)
    with torch.no_grad():
        logits, reference = load_checkpoint(tmp_path / "out")(ids)[0], model(ids)[0]
    relative = max_abs_diff(logits, reference) / reference.abs().max().item()
    assert relative < 0.05, f"Q8_0 moved the logits by {relative:.3f} of their size"


@pytest.mark.parametrize("qtype, dtype", [("F16", torch.float16), ("Q4_0", torch.float32), ("Q4_1", torch.float32)])
def test_other_types_dequantise_like_the_gguf_package(tmp_path, qtype, dtype):
    """Each matrix equals the gguf package's own round trip quantize -> dequantize of the weight."""
    model = random_model(tiny_config(**CONFIG))
    write_gguf(model, tmp_path / "m.gguf", qtype)
    code, _, err = run(tmp_path / "m.gguf", tmp_path / "out")
    assert code == 0, err
    got = tensors_of(tmp_path / "out")
    assert got["layers.0.attention.wq.weight"].dtype == dtype, f"{qtype} should convert to {dtype} by default"
    t = gguf.GGMLQuantizationType[qtype]
    for name, w in model.state_dict().items():
        if w.dim() == 2:
            expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), t), t)).to(dtype)
            assert torch.equal(got[name], expected), f"{name} differs from the {qtype} round trip"
