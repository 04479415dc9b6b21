"""Meta's release format in: model-parallel shards merged back into exactly the unsharded weights."""

import shutil
from dataclasses import replace

import pytest
import torch

from llama_min.checkpoint import load_checkpoint

from conftest import max_abs_diff, random_model, random_tokens, tiny_config
from convert_helpers import config_of, run, tensors_of, write_meta


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_shards_merge_to_the_unsharded_weights(tmp_path, trained_tokenizer, n_shards):
    # vocab 400 = the trained tokenizer's; LLaMA-1's params.json says vocab_size -1, the converter reads it
    # from the embedding
    model = random_model(tiny_config(vocab_size=400))
    write_meta(model, tmp_path / "meta", n_shards)
    shutil.copyfile(trained_tokenizer.path, tmp_path / "tokenizer.model")  # Meta keeps it one level up
    code, out, err = run(tmp_path / "meta", tmp_path / "out")
    assert code == 0, f"conversion failed: {err}"

    got = tensors_of(tmp_path / "out")
    expected = model.state_dict()
    assert set(got) == set(expected), f"tensor names differ: {sorted(set(got) ^ set(expected))}"
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{name} differs from the unsharded weight after merging {n_shards} shards"
    # params.json does not record the context length; ModelConfig.from_params_json assumes LLaMA's 2048
    expected_config = replace(model.config, max_seq_len=2048)
    assert config_of(tmp_path / "out") == expected_config, "config.json does not match the model's config"
    copied = (tmp_path / "out" / "tokenizer.model").read_bytes()
    assert copied == trained_tokenizer.path.read_bytes(), "tokenizer.model was not copied"


def test_meta_conversion_runs_like_the_original(tmp_path):
    model = random_model(tiny_config(vocab_size=96))  # even, so that two shards split it
    write_meta(model, tmp_path / "meta", 2, vocab_in_params=True)
    code, _, err = run(tmp_path / "meta", tmp_path / "out", "--dtype", "float32")
    assert code == 0, err
    ids = random_tokens(model.config, 2, 20)
    with torch.no_grad():
        diff = max_abs_diff(load_checkpoint(tmp_path / "out")(ids)[0], model(ids)[0])
    assert diff == 0.0, f"converted model's logits differ by {diff}"


def test_meta_to_hf_verifies_against_transformers(tmp_path):
    pytest.importorskip("transformers")
    model = random_model(tiny_config(vocab_size=96))  # even, so that two shards split it
    write_meta(model, tmp_path / "meta", 2, vocab_in_params=True)
    code, out, err = run(tmp_path / "meta", tmp_path / "hf", "--to", "hf", "--verify")
    assert code == 0, f"--verify failed on a correct conversion:\n{out}\n{err}"
    assert "verify: max |Δlogit|" in out and ": OK" in out, f"no verification report in:\n{out}"


def test_a_tokenizer_model_sentencepiece_cannot_read_is_named_not_copied(tmp_path):
    """Llama 3's Meta release ships a tiktoken file (base64 token, rank per line) as tokenizer.model."""
    write_meta(random_model(tiny_config(vocab_size=96)), tmp_path / "meta", 2, vocab_in_params=True)
    (tmp_path / "meta" / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")
    code, out, err = run(tmp_path / "meta", tmp_path / "out")
    assert code == 0, f"the weights should still convert: {err}"
    assert "tokenizer.model is not a sentencepiece model" in out, f"the unreadable tokenizer is not named:\n{out}"
    assert not (tmp_path / "out" / "tokenizer.model").exists(), "a tokenizer llama_min cannot read was copied"
