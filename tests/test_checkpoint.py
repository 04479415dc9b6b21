"""The checkpoint directory: bit-exact round trip, strict loading with named errors, atomic saving that
replaces only what is ours, and a weights file whose header is checked before it is believed."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_min import Llama
from llama_min.checkpoint import load_checkpoint, replace_directory, save_checkpoint, tokenizer_file, write_model_files
from llama_min.cli import UsageError
from llama_min.convert import convert, open_source
from llama_min.peft import PeftConfig, apply_peft, save_peft

from conftest import random_model, random_tokens, tiny_config


def assert_same_weights(a: Llama, b: Llama) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), f"keys differ: {sorted(sa.keys() ^ sb.keys())}"
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors not bit-identical after the round trip: {different}"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_is_bit_exact(tmp_path, tie):
    model = random_model(tiny_config(tie_embeddings=tie))
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")

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
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)
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
    save_checkpoint(random_model(tiny_config()), tmp_path / "ckpt")
    _tamper(tmp_path / "ckpt", lambda t: t.update({"layers.0.attention.wq_typo.weight": t.pop("layers.0.attention.wq.weight")}))
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path / "ckpt")
    message = str(err.value)
    for needle in ("layers.0.attention.wq.weight", "layers.0.attention.wq_typo.weight", "missing", "unexpected"):
        assert needle in message, f"the error should mention {needle!r}; got: {message}"


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    save_checkpoint(random_model(tiny_config()), tmp_path / "ckpt")
    _tamper(tmp_path / "ckpt", lambda t: t.update({"layers.1.feed_forward.w3.weight": torch.zeros(50, 64)}))
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path / "ckpt")
    message = str(err.value)
    expected_shape = (tiny_config().hidden_dim, 64)
    for needle in ("layers.1.feed_forward.w3.weight", str((50, 64)), str(expected_shape)):
        assert needle in message, f"the error should mention {needle!r}; got: {message}"


def test_config_that_does_not_fit_the_weights_is_refused(tmp_path):
    save_checkpoint(random_model(tiny_config()), tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "vocab_size": 100}))
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path / "ckpt")
    assert "tok_embeddings.weight" in str(err.value) and "(100, 64)" in str(err.value), \
        f"the error should name tok_embeddings.weight and the expected shape (100, 64); got: {err.value}"


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path / "nothing_here")


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path):
    old, new = random_model(tiny_config(), seed=1), random_model(tiny_config(), seed=2)
    save_checkpoint(old, tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="simulated crash"):
        with replace_directory(tmp_path / "ckpt") as tmp:
            write_model_files(new, tmp)  # the new files are complete ...
            raise RuntimeError("simulated crash")  # ... but the save is interrupted before the swap
    assert_same_weights(old, load_checkpoint(tmp_path / "ckpt"))
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "ckpt")
    assert not leftovers, f"an interrupted save left files behind: {leftovers}"


def test_completed_save_replaces_the_old_checkpoint(tmp_path):
    old, new = random_model(tiny_config(), seed=1), random_model(tiny_config(n_layers=1), seed=2)
    save_checkpoint(old, tmp_path / "ckpt")
    save_checkpoint(new, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.n_layers == 1, "the second save did not replace the first"
    assert_same_weights(new, loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "temporary directories were left behind"


def test_crash_between_the_two_renames_falls_back_to_old(tmp_path):
    """Saving renames DIR to .DIR.old-<random>, then .DIR.tmp-<random> to DIR; a crash in between leaves
    only the .old- directory, which the loader reads."""
    model = random_model(tiny_config())
    save_checkpoint(model, tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old-0123456789ab")
    assert_same_weights(model, load_checkpoint(tmp_path / "ckpt"))


def test_tokenizer_is_copied_beside_the_weights(tmp_path, trained_tokenizer):
    model = random_model(tiny_config(vocab_size=trained_tokenizer.vocab_size))
    save_checkpoint(model, tmp_path / "ckpt", tokenizer_path=trained_tokenizer.path)
    found = tokenizer_file(tmp_path / "ckpt")
    assert found is not None and found.read_bytes() == trained_tokenizer.path.read_bytes(), \
        f"the tokenizer file should be stored in the checkpoint; found {found}"


# ---- a save replaces only what is provably ours (never a user's file) ---------------------------------

def files_under(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("what", ["a file of the user's inside", "a sub-directory inside", "a file at the path"])
@pytest.mark.parametrize("writer", ["save_checkpoint", "save_peft"])
def test_a_save_refuses_a_path_holding_what_it_did_not_write(tmp_path, what, writer):
    """save_checkpoint(model, "ckpt") from a directory where ckpt/ holds the user's work once deleted it,
    and a file path became a directory. Refused, in one line naming the path (and what is in it)."""
    target = tmp_path / "ckpt"
    if what == "a file at the path":
        target.write_text("my notes")
    else:
        save_checkpoint(random_model(tiny_config()), target)  # ours ... until the user adds something
        mine = target / ("notes.txt" if what == "a file of the user's inside" else "tinyllama")
        mine.mkdir() if what == "a sub-directory inside" else mine.write_text("my notes")
    before = files_under(tmp_path)
    model = random_model(tiny_config(), seed=3)
    with pytest.raises(UsageError) as err:
        if writer == "save_checkpoint":
            save_checkpoint(model, target)
        else:
            save_peft(apply_peft(model, PeftConfig(method="lora")), target)
    message = str(err.value)
    assert "\n" not in message and str(target) in message and "not replaced" in message, message
    if what != "a file at the path":
        assert ("notes.txt" if "file" in what else "tinyllama") in message, message
    assert files_under(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], \
        "a refused save changed or left something"


def test_a_save_never_touches_siblings_named_like_its_temporaries(tmp_path):
    """ckpt.old and ckpt.tmp are names a user may pick (llama.old holding notes was deleted once): a save
    uses hidden names of its own with a random part and removes only those."""
    for name in ("ckpt.old", "ckpt.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
    (tmp_path / ".ckpt.old").write_text("mine too")
    before = files_under(tmp_path)
    save_checkpoint(random_model(tiny_config(), seed=1), tmp_path / "ckpt")
    save_checkpoint(random_model(tiny_config(), seed=2), tmp_path / "ckpt")  # a replacement: both renames
    after = files_under(tmp_path)
    assert {k: v for k, v in after.items() if k.parts[0] != "ckpt"} == before, "a sibling of the user's changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.old", "ckpt", "ckpt.old", "ckpt.tmp"]


def test_weights_convert_never_touches_siblings_named_like_its_temporaries(tmp_path):
    save_checkpoint(random_model(tiny_config()), tmp_path / "src")
    (tmp_path / "dst.old").write_text("mine")
    (tmp_path / "dst.tmp").write_text("mine")
    for force in (False, True):
        convert(open_source(tmp_path / "src"), tmp_path / "dst", force=force)
    assert (tmp_path / "dst.old").read_text() == "mine" and (tmp_path / "dst.tmp").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "dst.old", "dst.tmp", "src"]


# ---- the safetensors header is checked before any number in it is used -------------------------------

def rewrite_header(path, edit=None, length=None):
    """Rewrite model.safetensors with its JSON header changed by edit(header), or its length field set."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    if edit:
        edit(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)


def first_two(header):
    """The entries of the first two tensors in the file's order."""
    return sorted((e for k, e in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"][0])[:2]


def start_after_end(h):
    a, _ = first_two(h)
    a["data_offsets"] = a["data_offsets"][::-1]


def overlapping(h):
    a, b = first_two(h)
    b["data_offsets"] = [a["data_offsets"][0], b["data_offsets"][1]]


def shape_beyond_its_bytes(h):
    first_two(h)[0]["shape"] = [2**20, 2**20]


MALFORMED = {
    "start after end": dict(edit=start_after_end),
    "overlapping offsets": dict(edit=overlapping),
    "a shape larger than its byte range": dict(edit=shape_beyond_its_bytes),
    "a 2^62 header length": dict(length=2**62),
    "a shape that is a string": dict(edit=lambda h: first_two(h)[0].update(shape="64")),
    "offsets that are strings": dict(edit=lambda h: first_two(h)[0].update(data_offsets=["0", "8"])),
    "a negative offset": dict(edit=lambda h: first_two(h)[0].update(data_offsets=[-8, 0])),
    "an entry that is a list": dict(edit=lambda h: h.update({next(k for k in h if k != "__metadata__"): [1, 2]})),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_safetensors_header_is_one_error_naming_the_file(tmp_path, case):
    """Each of these once loaded uninitialised memory, aliased two weights, tried to allocate terabytes
    or raised a TypeError. Now the header is checked first (by the safetensors library) and the load is
    refused in one line naming the file."""
    save_checkpoint(random_model(tiny_config()), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    rewrite_header(path, **MALFORMED[case])
    with pytest.raises(UsageError) as err:
        load_checkpoint(tmp_path / "ckpt")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "damaged" in message, message


def test_a_truncated_weights_file_names_the_first_tensor_it_cuts(tmp_path):
    save_checkpoint(random_model(tiny_config()), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UsageError, match=r"model.safetensors: truncated: tensor \S+ ends at byte \d+ but the file has"):
        load_checkpoint(tmp_path / "ckpt")
