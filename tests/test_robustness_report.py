"""The robustness report (experiments/robustness.py), shortened for CI: a few fine-tuning steps on the session's
tiny lab base. Every figure it tabulates is recomputed here independently: exact match by the lab
evaluator on the models the runs wrote, the perturbed test set by perturb_for_eval, and corpus bits
per byte against the figure the base's own pretraining logged."""

import json
import shutil

import pytest

from experiments import robustness
from experiments.evaluate import corpus_bpb, exact_match
from llama_min.checkpoint import load_checkpoint
from llama_min.finetune.instructions import read_records
from llama_min.peft import load_peft
from llama_min.finetune.perturb import perturb_for_eval
from llama_min.tokenizer import Tokenizer

ROWS = ["full", "full +robust", "LoRA +robust", "partial: norms only"]


def test_corpus_bpb_is_the_figure_pretraining_logged(word_bench):
    logged = [json.loads(line) for line in open(word_bench / "base" / "metrics.jsonl")]
    want = [r["val_bpb"] for r in logged if r["val_bpb"] is not None][-1]
    base = word_bench / "base" / "ckpt"
    got = corpus_bpb(load_checkpoint(base), Tokenizer(base / "tokenizer.model"), word_bench / "benchmark" / "pretrain",
                     word_bench / "cache", seq_len=48, batch_size=4)  # as the fixture pretrained
    assert got == pytest.approx(want, rel=1e-6), f"corpus_bpb {got} differs from the logged held-out bpb {want}"


@pytest.fixture(scope="module")
def report(word_bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("robust")
    for part in ("benchmark", "base", "cache"):  # the benchmark of seed 0, already pretrained: no pretraining here
        shutil.copytree(word_bench / part, out / "seed0" / part)
    argv = ["--out", str(out), "--seeds", "0", "--finetune_steps", "3", "--batch_size", "4", "--rows", *ROWS]
    return out, robustness.main(argv)[0]


def test_every_row_is_scored_on_clean_and_perturbed_records(report, word_bench):
    out, results = report
    assert list(results) == ["base", *ROWS]
    base = word_bench / "base" / "ckpt"
    tokenizer = Tokenizer(base / "tokenizer.model")
    clean = read_records(word_bench / "benchmark" / "instructions" / "eval.jsonl")
    perturbed = perturb_for_eval(clean, 0)
    assert all(p.instruction != c.instruction and (p.input, p.output) == (c.input, c.output)
               for p, c in zip(perturbed, clean)), "the perturbed test set edits every instruction, never the answer"
    models = {"base": load_checkpoint(base),
              "full": load_checkpoint(out / "seed0" / "full" / "ckpt"),
              "LoRA +robust": load_peft(load_checkpoint(base), out / "seed0" / "LoRA_+robust" / "peft")}
    for name, model in models.items():
        for split, records in (("clean", clean), ("perturbed", perturbed)):
            want = exact_match(model, tokenizer, records)["accuracy"]
            assert results[name][split] == want, f"{name}: {split} exact match {results[name][split]}, recomputed {want}"
    assert results["full"]["trainable"] == sum(p.numel() for p in models["base"].parameters())
    norms = sum(p.numel() for n, p in models["base"].named_parameters() if n.endswith("norm.weight"))
    assert results["partial: norms only"]["trainable"] == norms


def test_forgetting_is_measured_on_the_pretraining_corpus(report, word_bench):
    out, results = report
    tokenizer = Tokenizer(word_bench / "base" / "ckpt" / "tokenizer.model")
    after = corpus_bpb(load_checkpoint(out / "seed0" / "full" / "ckpt"), tokenizer, word_bench / "benchmark" / "pretrain",
                       word_bench / "cache", seq_len=64)
    assert results["full"]["corpus_bpb"] == pytest.approx(after, rel=1e-9)
    assert results["full"]["corpus_bpb"] != results["base"]["corpus_bpb"], "fine-tuning should move the corpus figure"
    table = (out / "table.md").read_text()
    delta = results["full"]["corpus_bpb"] - results["base"]["corpus_bpb"]
    assert f"| {delta:+.4f} |" in table, f"the forgetting column should hold {delta:+.4f}:\n{table}"


def test_runs_are_cached_and_rerun_when_their_flags_change(report, monkeypatch):
    out, results = report
    log = out / "seed0" / "full" / "train.log"
    stamp = log.stat().st_mtime_ns
    args = ["--out", str(out), "--seeds", "0", "--finetune_steps", "3", "--batch_size", "4", "--rows", "full"]
    again = robustness.main(args)[0]
    assert again["full"] == results["full"] and log.stat().st_mtime_ns == stamp, "a cached run must not train again"
    longer = robustness.main([*args, "--finetune_steps", "4"])[0]  # (the later flag wins)
    assert log.stat().st_mtime_ns != stamp and longer["full"]["finetune_steps"] == 4, \
        "a run with other steps must train again"
    stamp = log.stat().st_mtime_ns
    monkeypatch.setitem(robustness.ROWS, "full", [*robustness.ROWS["full"], "--grad_clip", "0.5"])
    changed = robustness.main([*args, "--finetune_steps", "4"])[0]
    assert log.stat().st_mtime_ns != stamp and changed["full"]["flags"][-2:] == ["--grad_clip", "0.5"], \
        "a run whose flags changed must train again"
