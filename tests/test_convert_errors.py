"""Bad input: each gives one line naming the file (and the tensor) and what was expected, a non-zero
exit, and no destination directory, not even half of one."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_min.checkpoint import save_checkpoint

from conftest import random_model, tiny_config
from convert_helpers import run, write_gguf, write_meta


@pytest.fixture
def hf_dir(tmp_path):
    """A valid Hugging Face directory (our export of a random model), for the tests to damage."""
    save_checkpoint(random_model(tiny_config(vocab_size=96)), tmp_path / "ours")
    assert run(tmp_path / "ours", tmp_path / "hf", "--to", "hf")[0] == 0
    return tmp_path / "hf"


def edit_weights(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def truncate(path, n_bytes=100):
    data = path.read_bytes()
    path.write_bytes(data[:-n_bytes])


def expect_error(tmp_path, src, *needles, args=()):
    dst = tmp_path / "dst"
    code, out, err = run(src, dst, *args)
    assert code != 0, f"a bad input was accepted:\n{out}"
    message = err.strip()
    assert message.count("\n") == 0, f"the error should be one line, got:\n{message}"
    for needle in needles:
        assert needle in message, f"the error should mention {needle!r}: {message}"
    assert not dst.exists(), f"{dst} was left behind after an error"
    assert not dst.with_name("dst.tmp").exists(), "the temporary output was left behind"
    return message


def test_unknown_format(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.npz").write_bytes(b"not a checkpoint")
    expect_error(tmp_path, tmp_path / "src", "src", "unknown checkpoint format", "params.json", ".gguf")


def test_missing_meta_shard(tmp_path):
    write_meta(random_model(tiny_config(vocab_size=96)), tmp_path / "meta", 2, vocab_in_params=True)
    (tmp_path / "meta" / "consolidated.01.pth").unlink()
    expect_error(tmp_path, tmp_path / "meta", "consolidated.01.pth", "missing shard", "wq")


def test_missing_hf_shard(tmp_path, hf_dir):
    weights = load_file(hf_dir / "model.safetensors")
    names = sorted(weights)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        save_file({n: weights[n] for n in part}, hf_dir / f"model-0000{i + 1}-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {n: f"model-0000{1 + (n in names[half:])}-of-00002.safetensors" for n in names}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "model-00002-of-00002.safetensors").unlink()
    expect_error(tmp_path, hf_dir, "model-00002-of-00002.safetensors", "missing shard", names[half])


def test_missing_tensor(tmp_path, hf_dir):
    edit_weights(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(tmp_path, hf_dir, "model.safetensors", "missing", "layers.1.feed_forward.w3.weight")


def test_unexpected_tensor(tmp_path, hf_dir):
    edit_weights(hf_dir, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    expect_error(tmp_path, hf_dir, "model.safetensors", "unexpected", "model.layers.0.self_attn.q_norm.weight")


def test_shape_that_does_not_match_the_config(tmp_path, hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] += 16
    (hf_dir / "config.json").write_text(json.dumps(config))
    expect_error(tmp_path, hf_dir, "model.safetensors", "wrong shapes", "layers.0.feed_forward.w1.weight")


def test_truncated_safetensors(tmp_path, hf_dir):
    truncate(hf_dir / "model.safetensors")
    expect_error(tmp_path, hf_dir, "model.safetensors", "truncated: tensor ")


def test_truncated_meta_shard(tmp_path):
    write_meta(random_model(tiny_config(vocab_size=96)), tmp_path / "meta", 2, vocab_in_params=True)
    truncate(tmp_path / "meta" / "consolidated.01.pth")
    expect_error(tmp_path, tmp_path / "meta", "consolidated.01.pth", "truncated")


def test_truncated_gguf(tmp_path):
    pytest.importorskip("gguf")
    write_gguf(random_model(tiny_config(multiple_of=32)), tmp_path / "m.gguf")
    truncate(tmp_path / "m.gguf", 1000)
    expect_error(tmp_path, tmp_path / "m.gguf", "m.gguf", "truncated")


def test_unsupported_hf_architecture(tmp_path, hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "mistral"
    (hf_dir / "config.json").write_text(json.dumps(config))
    expect_error(tmp_path, hf_dir, "config.json", "mistral")


def test_unsupported_gguf_architecture(tmp_path):
    pytest.importorskip("gguf")
    write_gguf(random_model(tiny_config(multiple_of=32)), tmp_path / "m.gguf", arch="qwen2")
    expect_error(tmp_path, tmp_path / "m.gguf", "m.gguf", "'qwen2'", "not supported")


def test_unsupported_gguf_quantisation(tmp_path):
    pytest.importorskip("gguf")
    write_gguf(random_model(tiny_config(multiple_of=32)), tmp_path / "m.gguf",
               raw_types={"layers.1.attention.wv.weight": "IQ4_NL"})
    expect_error(tmp_path, tmp_path / "m.gguf", "m.gguf", "blk.1.attn_v.weight", "IQ4_NL", "Q8_0")


def test_missing_gguf_package_is_named(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    write_gguf(random_model(tiny_config(multiple_of=32)), tmp_path / "m.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` sees when it is not installed
    expect_error(tmp_path, tmp_path / "m.gguf", "`gguf`", "pip install gguf")


class NotATensor:
    """Unpickling this would run code of the file's choosing; weights_only=True refuses it."""


def test_pickle_with_code_is_refused(tmp_path):
    model = random_model(tiny_config(vocab_size=96))
    write_meta(model, tmp_path / "meta", 1, vocab_in_params=True)
    state = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    state["evil"] = NotATensor()
    torch.save(state, tmp_path / "meta" / "consolidated.00.pth")
    expect_error(tmp_path, tmp_path / "meta", "consolidated.00.pth", "NotATensor", "weights_only=True")


class RunsACommand:
    """Unpickling this would call os.system: a module torch's weights-only reader blocks outright."""

    def __reduce__(self):
        import os
        return os.system, ("echo this must never run",)


@pytest.mark.parametrize("form", ["zip", "legacy", "raw pickle", "raw pickle, protocol 0"])
def test_pickle_that_would_run_a_command_is_refused_naming_it_in_every_form(tmp_path, form):
    """Refused, naming what the file holds, not reported as damaged (the advice "copy it again" would be
    wrong): torch.save's zip and legacy formats and a bare pickle, whatever torch.load's message."""
    import pickle

    model = random_model(tiny_config(vocab_size=96))
    write_meta(model, tmp_path / "meta", 1, vocab_in_params=True)
    shard = tmp_path / "meta" / "consolidated.00.pth"
    state = {**torch.load(shard, weights_only=True), "evil": RunsACommand()}
    if form.startswith("raw"):
        shard.write_bytes(pickle.dumps(state, protocol=0 if "0" in form else 4))
    else:
        torch.save(state, shard, _use_new_zipfile_serialization=form == "zip")
    expect_error(tmp_path, tmp_path / "meta", "consolidated.00.pth", "refused", "system", "weights_only=True")
    code, _, err = run(tmp_path / "meta", tmp_path / "out")
    assert "copy the file again" not in err, err


def test_existing_destination_needs_force_and_force_replaces_only_a_conversion(tmp_path, hf_dir):
    dst = tmp_path / "dst"
    assert run(hf_dir, dst)[0] == 0
    first = (dst / "model.safetensors").stat().st_mtime_ns
    code, _, err = run(hf_dir, dst)
    assert code != 0 and "--force" in err, f"an existing destination was not refused: {err}"
    code, _, err = run(hf_dir, dst, "--force")  # a directory a conversion wrote: replaced
    assert code == 0, err
    assert (dst / "model.safetensors").stat().st_mtime_ns != first, "--force did not replace it"
    (dst / "keep.txt").write_text("mine")  # now it holds something a conversion never writes
    code, _, err = run(hf_dir, dst, "--force")
    assert code != 0 and "keep.txt" in err and err.count("\n") == 1, err
    assert (dst / "keep.txt").read_text() == "mine" and (dst / "model.safetensors").is_file(), "the directory was touched"


@pytest.mark.parametrize("where", ["the source itself", "its parent"])
def test_a_destination_holding_the_source_is_refused_even_with_force(tmp_path, where):
    """weights_convert.py conv/parent/ckpt conv/parent --to hf --force once deleted the source and everything
    beside it. A destination that is the source or contains it is refused, and nothing is touched."""
    parent = tmp_path / "conv" / "parent"
    save_checkpoint(random_model(tiny_config()), parent / "ckpt")
    (parent / "notes.txt").write_text("mine")
    dst = parent / "ckpt" if where == "the source itself" else parent
    before = {p: p.read_bytes() for p in parent.rglob("*") if p.is_file()}
    code, _, err = run(parent / "ckpt", dst, "--to", "hf", "--force")
    assert code != 0 and "the source" in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in parent.rglob("*") if p.is_file()} == before, "the source was touched"
    assert run(parent / "ckpt", parent / "ckpt" / "hf", "--to", "hf")[0] == 0, "inside the source is harmless"
