"""Hugging Face format in and out: the parity fixture, GQA with tied embeddings against transformers,
round trips that are bit-exact, sharded and pickled checkpoints, and a --verify that can fail."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llama_min.hf_format as hf_format
from llama_min.checkpoint import load_checkpoint, save_checkpoint

from conftest import max_abs_diff, random_model, random_tokens, tiny_config
from convert_helpers import config_of, hf_logits, load_hf, random_hf_model, run, tensors_of

FIXTURE = Path(__file__).parent / "fixtures" / "hf_tiny_llama"


def test_parity_fixture_converts_and_matches_its_logits(tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(FIXTURE, src)
    (src / "reference_logits.safetensors").unlink()  # not part of the model
    code, _, err = run(src, tmp_path / "out")
    assert code == 0, err
    reference = load_file(FIXTURE / "reference_logits.safetensors")
    with torch.no_grad():
        logits, _ = load_checkpoint(tmp_path / "out")(reference["input_ids"])
    diff = max_abs_diff(logits, reference["logits"])
    assert diff <= 1e-4, f"converted fixture's logits differ from transformers' stored ones by {diff}"


def test_llama_min_to_hf_to_llama_min_is_bit_exact(tmp_path):
    model = random_model(tiny_config(tie_embeddings=True))
    save_checkpoint(model, tmp_path / "a")
    assert run(tmp_path / "a", tmp_path / "hf", "--to", "hf")[0] == 0
    assert run(tmp_path / "hf", tmp_path / "b")[0] == 0
    a, b = tensors_of(tmp_path / "a"), tensors_of(tmp_path / "b")
    assert set(a) == set(b), f"tensor names changed on the round trip: {sorted(set(a) ^ set(b))}"
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} changed on the round trip llama_min -> hf -> llama_min"
    # Hugging Face stores the SwiGLU width itself, not the rule's inputs (multiple_of, ffn_dim_multiplier):
    # compare the model they describe.
    described = [replace(c, multiple_of=1, ffn_dim_multiplier=None)
                 for c in (config_of(tmp_path / "a"), config_of(tmp_path / "b"))]
    assert described[0] == described[1], f"the round trip changed the config: {described[0]} -> {described[1]}"


def test_gqa_tied_model_from_transformers_converts(tmp_path):
    pytest.importorskip("transformers")
    hf = random_hf_model(n_kv_heads=2, tie=True)
    hf.save_pretrained(tmp_path / "hf")
    code, _, err = run(tmp_path / "hf", tmp_path / "out")
    assert code == 0, err
    ours = load_checkpoint(tmp_path / "out")
    assert ours.config.n_kv_heads == 2 and ours.config.tie_embeddings and ours.config.rope_theta == 5000.0
    ids = random_tokens(ours.config, 2, 24)
    with torch.no_grad():
        diff = max_abs_diff(ours(ids)[0], hf_logits(hf, ids))
    assert diff <= 1e-4, f"max |Δlogit| = {diff} between the converted model and transformers"


def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path):
    pytest.importorskip("transformers")
    model = random_model(tiny_config(tie_embeddings=True))
    save_checkpoint(model, tmp_path / "ours")
    code, _, err = run(tmp_path / "ours", tmp_path / "hf", "--to", "hf")
    assert code == 0, err
    ids = random_tokens(model.config, 2, 24)
    with torch.no_grad():
        diff = max_abs_diff(hf_logits(load_hf(tmp_path / "hf"), ids), model(ids)[0])
    assert diff <= 1e-4, f"transformers on our export differs from llama_min by {diff}"


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pytorch_bin"])
def test_sharded_checkpoint_with_index_converts(tmp_path, safe_serialization):
    pytest.importorskip("transformers")
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB", safe_serialization=safe_serialization)
    shards = sorted(p.name for p in (tmp_path / "hf").glob("*-of-*"))
    assert len(shards) > 1, f"expected several shards, transformers wrote {shards}"
    code, _, err = run(tmp_path / "hf", tmp_path / "out")
    assert code == 0, err
    # The same weights saved as one file convert to the same tensors.
    hf.save_pretrained(tmp_path / "single")
    assert run(tmp_path / "single", tmp_path / "out_single")[0] == 0
    sharded, single = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "out_single")
    assert set(sharded) == set(single)
    for name in single:
        assert torch.equal(sharded[name], single[name]), f"{name} differs between sharded and single-file sources"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_passes_on_a_correct_conversion(tmp_path, dtype):
    pytest.importorskip("transformers")
    random_hf_model().save_pretrained(tmp_path / "hf")  # float32: bfloat16 rounds every weight
    code, out, err = run(tmp_path / "hf", tmp_path / "out", "--verify", "--dtype", dtype)
    assert code == 0 and ": OK" in out, f"--verify rejected a correct conversion:\n{out}\n{err}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_fails_on_a_corrupted_conversion(tmp_path, monkeypatch, dtype):
    """The classic GQA import bug: k's rows permuted with the number of query heads."""
    pytest.importorskip("transformers")
    random_hf_model(n_kv_heads=2).save_pretrained(tmp_path / "hf")
    monkeypatch.setattr(hf_format, "_rope_heads", lambda name, config: config.n_heads
                        if name.endswith(("attention.wq.weight", "attention.wk.weight")) else None)
    code, out, err = run(tmp_path / "hf", tmp_path / "out", "--verify", "--dtype", dtype)
    assert code == 1, f"--verify accepted a conversion with k permuted by the wrong head count:\n{out}\n{err}"
    assert "FAILED" in out, f"the failure is not reported:\n{out}"
