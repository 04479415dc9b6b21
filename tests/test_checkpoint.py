"""The checkpoint directory: bit-exact round trip, strict loading with named errors, atomic saving."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_min import Llama
from llama_min.checkpoint import atomic_directory, tokenizer_file, write_model_files

from conftest import random_model, random_tokens, tiny_config


def assert_same_weights(a: Llama, b: Llama) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), f"keys differ: {sorted(sa.keys() ^ sb.keys())}"
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors not bit-identical after the round trip: {different}"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_is_bit_exact(tmp_path, tie):
    model = random_model(tiny_config(tie_embeddings=tie))
    model.save_checkpoint(tmp_path / "ckpt")
    loaded = Llama.from_checkpoint(tmp_path / "ckpt")

    assert loaded.config == model.config, f"config changed: {model.config} -> {loaded.config}"
    assert_same_weights(model, loaded)
    tokens = random_tokens(model.config, 2, 10)
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], loaded.eval()(tokens)[0]), "same weights, different logits: rotary tables not rebuilt?"
    if tie:
        assert loaded.output.weight is loaded.tok_embeddings.weight, "tied embeddings became two Parameters after loading"
        assert len(list(loaded.parameters())) == len(list(model.parameters())), "parameter count changed after loading"
        stored = load_file(tmp_path / "ckpt" / "model.safetensors")
        assert "output.weight" not in stored, "a tied output head should be stored once, under tok_embeddings.weight"


def test_load_with_dtype(tmp_path):
    model = random_model(tiny_config())
    model.save_checkpoint(tmp_path / "ckpt")
    loaded = Llama.from_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)
    dtypes = {p.dtype for p in loaded.parameters()}
    assert dtypes == {torch.bfloat16}, f"dtype=bfloat16 requested, parameters are {dtypes}"
    expected = model.tok_embeddings.weight.to(torch.bfloat16)
    assert torch.equal(loaded.tok_embeddings.weight, expected), "bfloat16 weights are not the cast of the saved ones"


def _tamper(directory, edit):
    """Rewrite DIR/model.safetensors through edit(dict of tensors)."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_unexpected_and_missing_keys_are_named(tmp_path):
    random_model(tiny_config()).save_checkpoint(tmp_path / "ckpt")
    _tamper(tmp_path / "ckpt", lambda t: t.update({"layers.0.attention.wq_typo.weight": t.pop("layers.0.attention.wq.weight")}))
    with pytest.raises(ValueError) as err:
        Llama.from_checkpoint(tmp_path / "ckpt")
    message = str(err.value)
    for needle in ("layers.0.attention.wq.weight", "layers.0.attention.wq_typo.weight", "missing", "unexpected"):
        assert needle in message, f"the error should mention {needle!r}; got: {message}"


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    random_model(tiny_config()).save_checkpoint(tmp_path / "ckpt")
    _tamper(tmp_path / "ckpt", lambda t: t.update({"layers.1.feed_forward.w3.weight": torch.zeros(50, 64)}))
    with pytest.raises(ValueError) as err:
        Llama.from_checkpoint(tmp_path / "ckpt")
    message = str(err.value)
    expected_shape = (tiny_config().ffn_hidden_dim, 64)
    for needle in ("layers.1.feed_forward.w3.weight", str((50, 64)), str(expected_shape)):
        assert needle in message, f"the error should mention {needle!r}; got: {message}"


def test_config_that_does_not_fit_the_weights_is_refused(tmp_path):
    random_model(tiny_config()).save_checkpoint(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "vocab_size": 100}))
    with pytest.raises(ValueError) as err:
        Llama.from_checkpoint(tmp_path / "ckpt")
    assert "tok_embeddings.weight" in str(err.value) and "(100, 64)" in str(err.value), \
        f"the error should name tok_embeddings.weight and the expected shape (100, 64); got: {err.value}"


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.from_checkpoint(tmp_path / "nothing_here")


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path):
    old, new = random_model(tiny_config(), seed=1), random_model(tiny_config(), seed=2)
    old.save_checkpoint(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="simulated crash"):
        with atomic_directory(tmp_path / "ckpt") as tmp:
            write_model_files(new, tmp)  # the new files are complete ...
            raise RuntimeError("simulated crash")  # ... but the save is interrupted before the swap
    assert_same_weights(old, Llama.from_checkpoint(tmp_path / "ckpt"))
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "ckpt")
    assert not leftovers, f"an interrupted save left files behind: {leftovers}"


def test_completed_save_replaces_the_old_checkpoint(tmp_path):
    old, new = random_model(tiny_config(), seed=1), random_model(tiny_config(n_layers=1), seed=2)
    old.save_checkpoint(tmp_path / "ckpt")
    new.save_checkpoint(tmp_path / "ckpt")
    loaded = Llama.from_checkpoint(tmp_path / "ckpt")
    assert loaded.config.n_layers == 1, "the second save did not replace the first"
    assert_same_weights(new, loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "temporary directories were left behind"


def test_crash_between_the_two_renames_falls_back_to_old(tmp_path):
    """Saving renames DIR to DIR.old, then DIR.tmp to DIR; a crash in between leaves only DIR.old."""
    model = random_model(tiny_config())
    model.save_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")
    assert_same_weights(model, Llama.from_checkpoint(tmp_path / "ckpt"))


def test_tokenizer_is_copied_beside_the_weights(tmp_path, trained_tokenizer):
    model = random_model(tiny_config(vocab_size=trained_tokenizer.vocab_size))
    model.save_checkpoint(tmp_path / "ckpt", tokenizer_path=trained_tokenizer.path)
    found = tokenizer_file(tmp_path / "ckpt")
    assert found is not None and found.read_bytes() == trained_tokenizer.path.read_bytes(), \
        f"the tokenizer file should be stored in the checkpoint; found {found}"
