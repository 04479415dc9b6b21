"""train.py's robust fine-tuning options, each through ``python train.py`` on a tiny model: partial
unfreezing (--method partial), checked against names worked out independently from the model's layout;
the L2-SP pull (--l2sp), NEFTune embedding noise (--embed_noise) and prompt perturbation (--perturb)."""

import pytest
import torch
from safetensors.torch import load_file

import llama_min.training.data
from llama_min.finetune.instructions import read_records
from scripts import Run, last, run_script, train_losses

TINY_MODEL = ["--dim", "32", "--n_layers", "2", "--n_heads", "2", "--n_kv_heads", "1", "--multiple_of", "16",
              "--max_seq_len", "160"]


def finetune(word_bench, out_dir, *extra, steps=4, check=True) -> Run:
    """``python train.py`` fine-tuning the lab base; every step's loss logged."""
    run = run_script("train.py", "--init_from", word_bench / "base" / "ckpt",
                     "--data", word_bench / "benchmark" / "instructions" / "train.jsonl", "--seq_len", "160",
                     "--batch_size", "4", "--max_steps", steps, "--warmup_steps", "1", "--lr", "1e-2",
                     "--log_every", "1", "--eval_every", steps, "--sample_tokens", "0", "--out_dir", out_dir, *extra)
    assert run.code == 0 or not check, run.err
    return run


def resume(out_dir, *extra) -> Run:
    return run_script("train.py", "--resume", "--method", "partial", "--out_dir", out_dir, *extra)


def base_weights(word_bench) -> dict[str, torch.Tensor]:
    return load_file(word_bench / "base" / "ckpt" / "model.safetensors")


def changed_tensors(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys(), f"checkpoint keys differ: {sorted(before.keys() ^ after.keys())}"
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("flags, expected", [
    # expected names written from the layout (2 blocks: the top one is layers.1), not from train.py
    (["--train_layers", "1"], lambda k: k.startswith("layers.1.")),
    (["--train_norms"], lambda k: k.endswith("norm.weight")),
    (["--train_output"], lambda k: k == "output.weight"),
    (["--train_layers", "1", "--train_norms", "--train_output"],
     lambda k: k.startswith("layers.1.") or k.endswith("norm.weight") or k == "output.weight"),
])
def test_partial_trains_only_the_named_tensors_and_saves_a_full_checkpoint(word_bench, tmp_path, flags, expected):
    finetune(word_bench, tmp_path / "run", "--method", "partial", *flags)
    assert (tmp_path / "run" / "ckpt" / "model.safetensors").is_file(), "a partial run saves OUT_DIR/ckpt like full"
    before, after = base_weights(word_bench), load_file(tmp_path / "run" / "ckpt" / "model.safetensors")
    want = {k for k in before if expected(k)}
    got = changed_tensors(before, after)
    assert got == want, (f"{flags}: tensors that changed {sorted(got)}, expected exactly {sorted(want)}; "
                         f"unexpectedly changed {sorted(got - want)}, unexpectedly frozen {sorted(want - got)}")


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_train_norms_combines_with_a_peft_method(word_bench, tmp_path, method):
    """--method lora|adapter --train_norms: the adapter file holds the method's tensors plus every RMSNorm
    gain, the gains moved, and loading the adapter onto the base reproduces the fine-tuned model."""
    from llama_min.checkpoint import load_checkpoint
    from llama_min.peft import load_peft

    finetune(word_bench, tmp_path / "run", "--method", method, "--train_norms")
    saved = load_file(tmp_path / "run" / "peft" / "peft.safetensors")
    base = base_weights(word_bench)
    norms = {k for k in base if k.endswith("norm.weight")}  # attention_norm, ffn_norm per block, and the final norm
    assert norms <= saved.keys(), f"norm gains missing from the adapter: {sorted(norms - saved.keys())}"
    assert not (saved.keys() - norms) & base.keys(), "no other base tensor may be trained"
    assert all(not torch.equal(saved[k], base[k]) for k in norms), "every norm gain should have moved"
    model = load_peft(load_checkpoint(word_bench / "base" / "ckpt"), tmp_path / "run" / "peft")
    params = dict(model.named_parameters())
    for k in norms:
        torch.testing.assert_close(params[k].detach(), saved[k], rtol=0, atol=0, msg=f"{k} not loaded from the adapter")


def test_partial_resumes_from_its_own_checkpoint(word_bench, tmp_path):
    finetune(word_bench, tmp_path / "a", "--method", "partial", "--train_layers", "1", steps=4)
    finetune(word_bench, tmp_path / "b", "--method", "partial", "--train_layers", "1", steps=2)
    assert resume(tmp_path / "b", "--max_steps", "4").code == 0
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a"), "resuming a partial run must continue it exactly"
    # what trains cannot change under the saved optimiser state
    changed = resume(tmp_path / "b", "--max_steps", "5", "--train_layers", "2")
    assert changed.code == 1 and "drop --train_layers" in changed.err, "changing --train_layers on resume must be refused"


@pytest.mark.parametrize("argv, message", [
    (["--method", "partial"], "add --train_layers K"),
    (["--method", "full", "--train_norms"], "not --method full"),
    (["--method", "lora", "--train_output"], "not --method lora"),
    (["--method", "partial", "--train_layers", "3"], "exceeds the model's 2 blocks"),
])
def test_partial_flags_misused_are_one_line_errors(word_bench, tmp_path, argv, message):
    run = finetune(word_bench, tmp_path / "run", *argv, check=False)
    err = run.err
    assert run.code == 1 and message in err and err.count("\n") == 1, f"expected a one-line error containing {message!r}, got {err!r}"


def squared_distance(before: dict, after: dict) -> float:
    return sum(float((after[k].double() - before[k].double()).pow(2).sum()) for k in before)


def test_l2sp_keeps_the_weights_closer_to_the_base(word_bench, tmp_path):
    runs = {}
    for lam in ("0", "10"):
        finetune(word_bench, tmp_path / lam, "--method", "full", "--weight_decay", "0", "--l2sp", lam, steps=6)
        runs[lam] = squared_distance(base_weights(word_bench), load_file(tmp_path / lam / "ckpt" / "model.safetensors"))
    assert 0 < runs["10"] < runs["0"], f"‖θ − θ₀‖²: {runs['10']:.4g} with --l2sp 10, {runs['0']:.4g} without"


def test_l2sp_resumed_anchors_at_the_base_not_at_the_resumed_weights(word_bench, tmp_path):
    args = ("--method", "partial", "--train_layers", "1", "--train_output", "--l2sp", "10")
    finetune(word_bench, tmp_path / "a", *args, steps=4)
    finetune(word_bench, tmp_path / "b", *args, steps=2)
    assert resume(tmp_path / "b", "--max_steps", "4").code == 0
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a"), \
        "a resumed --l2sp run must pull toward the --init_from base, exactly as the uninterrupted run does"


def test_l2sp_needs_a_trained_base_tensor(word_bench, tmp_path):
    run = finetune(word_bench, tmp_path / "run", "--method", "lora", "--l2sp", "1", check=False)
    assert run.code == 1 and "no trained base tensor" in run.err


def test_embed_noise_changes_training_but_not_evaluation(word_bench, tmp_path):
    # --lr 0: the weights never move, so the held-out loss of both runs is on the same weights.
    for a in ("0", "5"):
        finetune(word_bench, tmp_path / a, "--method", "full", "--lr", "0", "--embed_noise", a)
    assert train_losses(tmp_path / "5") != train_losses(tmp_path / "0"), "--embed_noise 5 left the training losses unchanged"
    val = {a: last(tmp_path / a, "val_loss") for a in ("0", "5")}
    assert val["5"] == val["0"], f"evaluation must be noise-free: held-out loss {val['5']} with noise, {val['0']} without"
    for a in ("0", "5"):
        finetune(word_bench, tmp_path / f"lr{a}", "--method", "full", "--embed_noise", a)
    assert last(tmp_path / "lr5", "val_loss") != last(tmp_path / "lr0", "val_loss"), \
        "training with noise should reach different weights"


def test_perturb_edits_training_prompts_only(word_bench, tmp_path, monkeypatch):
    seen = []
    original = llama_min.training.data.encode_records

    def spy(records, *args):  # the records train.py encodes: the training split first, then the held-out one
        seen.append(list(records))
        return original(records, *args)

    monkeypatch.setattr(llama_min.training.data, "encode_records", spy)
    finetune(word_bench, tmp_path / "run", "--method", "full", "--perturb", "0.5", "--seed", "3", steps=1)
    clean = read_records(word_bench / "benchmark" / "instructions" / "train.jsonl")
    trained, held_out = seen
    assert held_out == clean[len(trained):], "the held-out records must stay clean"
    edited = [i for i, (t, c) in enumerate(zip(trained, clean)) if t.instruction != c.instruction]
    assert len(edited) == round(0.5 * len(trained)), f"{len(edited)} of {len(trained)} prompts edited, expected half"
    assert [(t.input, t.output) for t in trained] == [(c.input, c.output) for c in clean[:len(trained)]], \
        "--perturb must never change the input the answer depends on, nor the answer"
    seen.clear()
    finetune(word_bench, tmp_path / "again", "--method", "full", "--perturb", "0.5", "--seed", "3", steps=1)
    assert seen[0] == trained, "--perturb with the same --seed must edit the same records the same way"


def test_perturb_on_plain_text_is_a_one_line_error(word_bench, tmp_path):
    run = run_script("train.py", *TINY_MODEL, "--data", word_bench / "benchmark" / "pretrain", "--tokenizer",
                     word_bench / "benchmark" / "tokenizer.model", "--cache_dir", word_bench / "cache", "--seq_len", "48", "--perturb", "0.3",
                     "--out_dir", tmp_path / "run")
    assert run.code == 1 and "plain text" in run.err
