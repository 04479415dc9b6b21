"""train.py fine-tunes with every method through the one loop: what trains, what is saved, how it resumes,
what the batches of instruction data hold, and that the whole lab pipeline learns. Every run goes through
``python train.py`` on a tiny model in a temporary directory."""

import pytest
import torch
from safetensors.torch import load_file

import llama_min.training.state
from experiments.evaluate import exact_match
from experiments.make_benchmark import make_benchmark
from llama_min.checkpoint import load_checkpoint
from llama_min.finetune.instructions import read_records
from llama_min.finetune.load import load_finetuned
from llama_min.finetune.templates import template_for_checkpoint
from llama_min.model import IGNORE_INDEX
from llama_min.peft import PeftConfig, apply_peft, load_peft
from llama_min.tokenizer import Tokenizer
from llama_min.training.data import get_batch, is_instruction_data, make_sampler, prepare_data
from llama_min.training.config import TrainConfig, parse_args
from llama_min.training.optim import make_optimizer
from llama_min.training.runtime import Runtime, setup_runtime
from llama_min.training.state import STATE_FILE
from scripts import last, metrics, run_script, train, train_losses

TINY_MODEL = ["--dim", "32", "--n_layers", "2", "--n_heads", "2", "--n_kv_heads", "1", "--multiple_of", "16",
              "--max_seq_len", "160"]
PEFT_METHODS = ("adapter", "lora", "bottleneck")


def finetune_args(word_bench, out_dir, method, *extra):
    return ["--init_from", str(word_bench / "base" / "ckpt"), "--method", method,
            "--data", str(word_bench / "benchmark" / "instructions" / "train.jsonl"), "--seq_len", "160", "--batch_size", "4",
            "--max_steps", "4", "--warmup_steps", "1", "--lr", "1e-2", "--log_every", "2", "--eval_every", "2",
            "--sample_tokens", "0", "--out_dir", str(out_dir), *extra]


def expected_peft_keys(word_bench, method) -> set[str]:
    """Names of the tensors apply_peft makes trainable on the base, with the default PeftConfig."""
    model = apply_peft(load_checkpoint(word_bench / "base" / "ckpt"), PeftConfig(method=method))
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peft_run_saves_only_the_adapter_and_leaves_the_base_untouched(word_bench, tmp_path, monkeypatch, method):
    saved_models = []
    original = llama_min.training.state.save_model

    def keep_a_copy(directory, model, *args, **kwargs):  # the trained model as the loop leaves it
        saved_models.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        original(directory, model, *args, **kwargs)

    monkeypatch.setattr(llama_min.training.state, "save_model", keep_a_copy)
    train(*finetune_args(word_bench, tmp_path, method))
    assert metrics(tmp_path)[-1]["step"] == 4 and last(tmp_path, "val_loss") > 0
    assert all(r["val_bpb"] is None for r in metrics(tmp_path)), "no bits per byte for instruction data"
    logged = [r["peft"] for r in metrics(tmp_path) if r["train_loss"] is not None]
    key = {"adapter": "adapter_gate", "lora": "lora_delta_norm", "bottleneck": None}[method]
    assert all(set(s) == ({key} if key else set()) for s in logged), f"metrics.jsonl peft stats: {logged}"
    if key:  # the adapter's effect grows from zero as it learns
        assert len(logged[-1][key]) == 2 and any(v != 0 for v in logged[-1][key]), logged

    out = tmp_path / "peft"
    assert sorted(p.name for p in out.iterdir()) == ["generation.json", "peft.json", "peft.safetensors",
                                                     STATE_FILE], "unexpected files in the adapter checkpoint"
    assert not (tmp_path / "ckpt").exists(), "a PEFT run must not write a full checkpoint"
    stored = load_file(out / "peft.safetensors")
    assert set(stored) == expected_peft_keys(word_bench, method), "the adapter checkpoint must hold the trained tensors only"

    base = load_checkpoint(word_bench / "base" / "ckpt").state_dict()
    final = saved_models[-1]
    for name, value in base.items():  # every frozen tensor bit for bit
        assert torch.equal(final[name], value), f"{method}: frozen base tensor {name} changed during training"
    fresh = apply_peft(load_checkpoint(word_bench / "base" / "ckpt"), PeftConfig(method=method)).state_dict()
    moved = [k for k in stored if not torch.equal(stored[k], fresh[k])]
    assert moved, f"{method}: no adapter tensor changed in 4 steps"

    # generate.py --checkpoint BASE --peft DIR loads it strictly (load_finetuned) and takes the Alpaca template
    model = load_finetuned(word_bench / "base" / "ckpt", peft=out)
    assert template_for_checkpoint(out, word_bench / "base" / "ckpt") == "alpaca"
    params = dict(model.named_parameters())
    for k, v in stored.items():
        assert torch.equal(params[k].detach(), v), f"generate.py did not load {k}"
    with pytest.raises(ValueError, match="unexpected tensors"):  # strict: one extra key is refused
        extra = tmp_path / "extra"
        extra.mkdir()
        (extra / "peft.json").write_text((out / "peft.json").read_text())
        from safetensors.torch import save_file
        save_file({**stored, "layers.0.attention.wq.weight": base["layers.0.attention.wq.weight"]},
                  extra / "peft.safetensors")
        load_peft(load_checkpoint(word_bench / "base" / "ckpt"), extra)


def test_adapter_gates_get_no_weight_decay(word_bench):
    """With zero gradients AdamW's update is the decay alone: the prompts (matrices) shrink by
    1 - lr·wd, the gates keep their value."""
    cfg = TrainConfig(lr=0.5, weight_decay=0.1, method="adapter", init_from="x")
    model = apply_peft(load_checkpoint(word_bench / "base" / "ckpt"), PeftConfig(method="adapter"))
    rt = Runtime(torch.device("cpu"))
    optimizer = make_optimizer(model, cfg, rt)
    gates = [m.gate for m in model.modules() if hasattr(m, "gate")]
    prompts = [m.prompt for m in model.modules() if hasattr(m, "prompt")]
    assert gates and prompts
    with torch.no_grad():
        for g in gates:
            g.fill_(0.7)
    before = [p.detach().clone() for p in prompts]
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for g in gates:
        assert torch.equal(g.detach(), torch.full_like(g, 0.7)), "weight decay reached an adapter gate"
    for p, b in zip(prompts, before):
        torch.testing.assert_close(p.detach(), b * (1 - 0.5 * 0.1), msg="the adapter prompts should be decayed")


def test_peft_run_resumes_exactly(word_bench, tmp_path):
    # LoRA with dropout: the resumed run must also restore the random state
    straight = tmp_path / "straight"
    train(*finetune_args(word_bench, straight, "lora", "--lora_dropout", "0.2", "--decay_steps", "4"))
    halves = tmp_path / "halves"
    train(*finetune_args(word_bench, halves, "lora", "--lora_dropout", "0.2", "--decay_steps", "4", "--max_steps", "2"))
    train(*finetune_args(word_bench, halves, "lora", "--resume", "--max_steps", "4"))
    a, b = load_file(straight / "peft" / "peft.safetensors"), load_file(halves / "peft" / "peft.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed LoRA run differs from the straight one at {k}"
    changed = run_script("train.py", *finetune_args(word_bench, halves, "adapter", "--resume", "--max_steps", "6"))
    assert changed.code == 1 and "cannot change" in changed.err, "the method cannot change on resume"


def test_instruction_batches_mask_the_prompt_and_end_with_eos(word_bench, tmp_path):
    cfg = parse_args(finetune_args(word_bench, tmp_path, "full"))[0]
    assert is_instruction_data(cfg.data)
    assert not is_instruction_data(word_bench / "benchmark" / "pretrain" / "train.jsonl"), "plain text taken for instructions"
    rt = setup_runtime(cfg.device, cfg.dtype)
    tokenizer_path = word_bench / "base" / "ckpt" / "tokenizer.model"
    data = prepare_data(cfg, rt, 400, tokenizer_path)
    assert data.is_instructions
    tok = Tokenizer(tokenizer_path)
    records = read_records(cfg.data)
    sampler = make_sampler(data, cfg)
    picks = make_sampler(data, cfg).starts(cfg.batch_size)  # the same seeded draws the loop makes
    x, y, _ = get_batch(data, sampler, cfg, rt)
    for row, i in enumerate(picks):
        prompt = tok.encode(records[i].prompt(), bos=True)
        answer = tok.encode(records[i].output, bos=False) + [tok.eos_id]
        n = len(prompt) + len(answer) - 1
        assert x[row, :n].tolist() == (prompt + answer)[:-1], "inputs are not BOS + prompt + answer"
        assert y[row, :len(prompt) - 1].eq(IGNORE_INDEX).all(), "a prompt position is in the loss"
        assert y[row, len(prompt) - 1:n].tolist() == answer, "the answer and its EOS must be the targets"
        assert y[row, n:].eq(IGNORE_INDEX).all(), "padding is in the loss"


def test_accumulated_micro_batches_weigh_every_answer_token_alike(word_bench, tmp_path):
    """Two micro-batches of 2 records must train exactly like one batch of 4: the step's loss is the mean
    over all its answer tokens, not the mean of two means, which would weigh short answers more."""
    cfg = parse_args(finetune_args(word_bench, tmp_path, "full", "--batch_size", "4"))[0]
    data = prepare_data(cfg, Runtime(torch.device("cpu")), 400, word_bench / "base" / "ckpt" / "tokenizer.model")
    picks = make_sampler(data, cfg).starts(4)
    answer_tokens = [sum(t != IGNORE_INDEX for t in data.train[i][1]) for i in picks]
    assert sum(answer_tokens[:2]) != sum(answer_tokens[2:]), f"premise: unequal micro-batches {answer_tokens}"
    common = ("--max_steps", "3", "--log_every", "1", "--weight_decay", "0")
    train(*finetune_args(word_bench, tmp_path / "one", "full", "--batch_size", "4", *common))
    train(*finetune_args(word_bench, tmp_path / "two", "full", "--batch_size", "2", "--grad_accum", "2", *common))
    torch.testing.assert_close(train_losses(tmp_path / "two"), train_losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    one, two = (load_file(tmp_path / d / "ckpt" / "model.safetensors") for d in ("one", "two"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs after accumulation")


def test_lora_merge_writes_a_full_checkpoint_equal_to_base_plus_adapter(word_bench, tmp_path):
    train(*finetune_args(word_bench, tmp_path, "lora", "--merge"))
    merged = load_checkpoint(tmp_path / "merged").eval()
    adapted = load_peft(load_checkpoint(word_bench / "base" / "ckpt"), tmp_path / "peft").eval()
    tokens = torch.randint(0, merged.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens)[0], adapted(tokens)[0], rtol=1e-5, atol=1e-5)


def test_bad_peft_flags_are_one_line_errors(word_bench, tmp_path):
    cases = [(finetune_args(word_bench, tmp_path, "full", "--lora_rank", "4"), "--method is full"),
             (finetune_args(word_bench, tmp_path, "lora", "--merge", "--lora_rank", "0"),
              "lora_rank must be >= 1"),
             (finetune_args(word_bench, tmp_path, "adapter", "--merge"), "--merge folds LoRA"),
             # a directory of instruction records, not the file
             ([*finetune_args(word_bench, tmp_path, "lora"), "--data", str(word_bench / "benchmark" / "instructions")],
              "pass the file itself")]
    for argv, message in cases:
        run = run_script("train.py", *argv)
        assert run.code == 1 and message in run.err and run.err.count("\n") == 1, run.err


def test_short_lab_run_learns_with_full_fine_tuning(tmp_path):
    """The lab end to end, shortened to CI size: make it, pretrain on the sentences, fine-tune on the
    instructions (first letter only), score by greedy generation to EOS. So few steps teach the format
    on the fine-tuning words but not reliably the held-out ones, so those words are scored here; the
    held-out figures belong to experiments/run_benchmark.py (docs/results.md)."""
    make_benchmark(tmp_path / "benchmark", n_words=60, n_heldout=10, seed=0, tasks=["first"], vocab_size=400)
    common = ["--sample_tokens", "0", "--seed", "0", "--batch_size", "16", "--warmup_steps", "10"]
    train(*TINY_MODEL, *common, "--data", tmp_path / "benchmark" / "pretrain",
          "--tokenizer", tmp_path / "benchmark" / "tokenizer.model", "--cache_dir", tmp_path / "cache",
          "--seq_len", "48", "--max_steps", "20", "--eval_every", "20", "--log_every", "20",
          "--out_dir", tmp_path / "base")
    records = read_records(tmp_path / "benchmark" / "instructions" / "train.jsonl")[:40]
    tok = Tokenizer(tmp_path / "benchmark" / "tokenizer.model")
    before = exact_match(load_checkpoint(tmp_path / "base" / "ckpt"), tok, records)["accuracy"]
    train(*common, "--init_from", tmp_path / "base" / "ckpt", "--method", "full",
          "--data", tmp_path / "benchmark" / "instructions" / "train.jsonl", "--seq_len", "160", "--lr", "1e-2",
          "--max_steps", "80", "--eval_every", "80", "--log_every", "40", "--out_dir", tmp_path / "full")
    after = exact_match(load_checkpoint(tmp_path / "full" / "ckpt"), tok, records)["accuracy"]
    assert before == 0 and after > 0, \
        f"full fine-tuning on the lab should answer some records exactly: exact match {before} -> {after}"


def test_fine_tuning_keeps_the_tokenizers_companion_files(word_bench, tmp_path):
    """A converted chat model's tokenizer_config.json, chat template and generation config belong with its
    tokenizer: a model fine-tuned from it carries them on."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(word_bench / "base" / "ckpt", base)
    companions = {"tokenizer_config.json": '{"bos_token": "<s>", "eos_token": "</s>"}\n',
                  "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                  "generation_config.json": '{"eos_token_id": 2}\n'}
    for name, text in companions.items():
        (base / name).write_text(text)
    train("--init_from", base, "--method", "full", "--data", word_bench / "benchmark" / "instructions" / "train.jsonl",
          "--seq_len", "160", "--batch_size", "4", "--max_steps", "1", "--eval_every", "1", "--sample_tokens", "0",
          "--out_dir", tmp_path / "run")
    for name, text in companions.items():
        assert (tmp_path / "run" / "ckpt" / name).read_text() == text, f"{name} was not carried on"


def test_a_torchrun_resume_continues_each_processs_own_random_stream(word_bench, tmp_path):
    """Two processes with instruction batches of different widths and NEFTune noise draw different
    amounts of randomness, so their generators part ways; resumed, each must continue its own stream
    (not rank 0's), or the noise and with it the losses change."""
    import os
    import subprocess
    import sys

    from scripts import ROOT

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
               *map(str, finetune_args(word_bench, out, "full", "--embed_noise", "5", "--batch_size", "2", "--log_every", "1",
                                       "--decay_steps", "4", *extra))]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]

    torchrun(tmp_path / "straight")
    torchrun(tmp_path / "halves", "--max_steps", "2")
    torchrun(tmp_path / "halves", "--resume", "--max_steps", "4")
    assert train_losses(tmp_path / "halves") == train_losses(tmp_path / "straight"), \
        "a resumed torchrun run must give the uninterrupted run's losses"
