"""--interpolate a in the lab's evaluator and the interpolation curve, on a tiny random base and a LoRA
adapter saved by each test. The records' expected answers are the base model's own greedy answers, so
the base scores 1.0 and an adapter that changes the answers scores less: the endpoints are told apart.
The references are separate evaluations of the base and of the adapted model, without --interpolate."""

import json
import re
import sys

import pytest
import torch

from conftest import random_model, tiny_config
from experiments import evaluate, interpolation_curve
from experiments.evaluate import answer_loss, corpus_bpb, exact_match
from experiments.tasks import make_words, records
from llama_min.finetune.exact_match import answers
from llama_min.finetune.instructions import InstructionRecord
from llama_min.peft import PeftConfig, apply_peft, save_peft
from llama_min.finetune.perturb import perturb_for_eval
from llama_min.checkpoint import save_checkpoint


@pytest.fixture
def word_bench(trained_tokenizer, tmp_path):
    """(base checkpoint, adapter dir, records file, records, base model, adapted model)."""
    tok = trained_tokenizer
    base = random_model(tiny_config(vocab_size=tok.vocab_size, max_seq_len=256))
    save_checkpoint(base, tmp_path / "base", tokenizer_path=tok.path)
    adapted = apply_peft(random_model(base.config), PeftConfig(method="lora", lora_targets=("wq", "wv", "w2", "output")))
    adapted.load_state_dict(base.state_dict(), strict=False)  # the same base weights under the adapter
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5)
    save_peft(adapted, tmp_path / "lora", base_checkpoint=tmp_path / "base")
    raw = [r for _, r in records(make_words(4, seed=5), ["reverse", "upper"])]
    said = answers(base, tok, raw, max_new_tokens=4)
    recs = [InstructionRecord(r.instruction, said[i].strip() or "x", r.input) for i, r in enumerate(raw)]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"instruction": r.instruction, "input": r.input, "output": r.output}) + "\n"
                            for r in recs))
    return tmp_path / "base", tmp_path / "lora", path, recs, base, adapted.eval()


def scores(model, tok, recs) -> tuple[float, float]:
    return exact_match(model, tok, recs, max_new_tokens=4)["accuracy"], answer_loss(model, tok, recs)


def test_evaluate_interpolate_endpoints_are_the_base_and_the_adapter(word_bench, trained_tokenizer):
    base_dir, lora, path, recs, base, adapted = word_bench
    base_acc, tuned_acc = exact_match(base, trained_tokenizer, recs, 4)["accuracy"], \
        exact_match(adapted, trained_tokenizer, recs, 4)["accuracy"]
    assert base_acc == 1.0 and tuned_acc < 1.0, f"the adapter must change some answers: {base_acc}, {tuned_acc}"
    common = ["--checkpoint", str(base_dir), "--records", str(path), "--max_new_tokens", "4"]
    assert evaluate.main(common + ["--peft", str(lora), "--interpolate", "0"])["accuracy"] == base_acc
    assert evaluate.main(common + ["--peft", str(lora), "--interpolate", "1"])["accuracy"] == tuned_acc
    assert evaluate.main(common + ["--peft", str(lora)])["accuracy"] == tuned_acc


def test_curve_writes_png_and_json_and_its_ends_are_the_two_models(word_bench, trained_tokenizer, tmp_path):
    base_dir, lora, path, recs, base, adapted = word_bench
    corpus = tmp_path / "corpus"  # a pretraining corpus directory, for the forgetting figure
    corpus.mkdir()
    (corpus / "train.txt").write_text("unused here\n")
    (corpus / "val.txt").write_text("The word garden written backwards is nedrag. " * 20)
    points = interpolation_curve.main(["--checkpoint", str(base_dir), "--peft", str(lora), "--records", str(path),
                                       "--out", str(tmp_path / "curve"), "--max_new_tokens", "4",
                                       "--corpus", str(corpus), "--corpus_seq_len", "32", "--perturb_seed", "4"])
    assert [p["a"] for p in points] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (tmp_path / "curve" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "curve.png is not a PNG"
    saved = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert saved["points"] == points and saved["n"] == len(recs)
    ends = [(points[0]["accuracy"], points[0]["answer_loss"]), (points[-1]["accuracy"], points[-1]["answer_loss"])]
    assert ends[0] == scores(base, trained_tokenizer, recs), "a = 0 is not the base model's evaluation"
    assert ends[1] == pytest.approx(scores(adapted, trained_tokenizer, recs), rel=1e-5), \
        "a = 1 is not the adapted model's evaluation"
    assert ends[0] != ends[1], "base and adapter score the same: the test would prove nothing"
    perturbed = perturb_for_eval(recs, 4)
    for point, model in ((points[0], base), (points[-1], adapted)):
        assert point["perturbed_accuracy"] == exact_match(model, trained_tokenizer, perturbed, 4)["accuracy"], \
            f"a = {point['a']}: perturbed accuracy is not the model's score on perturb_for_eval(records, 4)"
        want = corpus_bpb(model, trained_tokenizer, corpus, tmp_path / "cache", seq_len=32)
        assert point["corpus_bpb"] == pytest.approx(want, rel=1e-5), f"a = {point['a']}: corpus bits per byte"
    assert points[0]["corpus_bpb"] != points[-1]["corpus_bpb"], "the adapter must change the corpus figure"


def test_answer_loss_is_the_mean_over_answer_tokens(word_bench, trained_tokenizer):
    """Checked a second way: per record, the log-softmax of each answer token (and EOS) after the prompt."""
    _, _, _, recs, base, _ = word_bench
    tok, logps = trained_tokenizer, []
    with torch.no_grad():
        for r in recs:
            prompt, answer = tok.encode(r.prompt(), bos=True), tok.encode(r.output, bos=False, eos=True)
            logits = base(torch.tensor([prompt + answer]))[0][0]
            logps += [torch.log_softmax(logits[len(prompt) - 1 + i], -1)[t].item() for i, t in enumerate(answer)]
    assert answer_loss(base, tok, recs, batch_size=3) == pytest.approx(-sum(logps) / len(logps), rel=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--coefficients", "0", "1.5"], r"--interpolate 1.5: expected a in \[0, 1\]"),
    (["--base", "{base}"], "either --peft ADAPTER"),
])
def test_curve_bad_flags_are_one_clear_line(word_bench, tmp_path, capsys, flags, message):
    base_dir, lora, path, *_ = word_bench
    argv = ["--checkpoint", str(base_dir), "--peft", str(lora), "--records", str(path), "--out", str(tmp_path / "c")]
    with pytest.raises(SystemExit):
        interpolation_curve.main(argv + [f.format(base=base_dir) for f in flags])
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "c").exists(), "a bad flag must stop before anything is written"


def test_curve_between_two_full_checkpoints(word_bench, trained_tokenizer, tmp_path):
    base_dir, _, path, recs, base, _ = word_bench
    tuned = random_model(base.config, seed=3)  # a "fully fine-tuned" model: every base tensor moved
    save_checkpoint(tuned, tmp_path / "tuned", tokenizer_path=trained_tokenizer.path)
    points = interpolation_curve.main(["--checkpoint", str(tmp_path / "tuned"), "--base", str(base_dir),
                                       "--records", str(path), "--out", str(tmp_path / "full"),
                                       "--max_new_tokens", "4", "--coefficients", "0", "1"])
    assert (points[0]["accuracy"], points[0]["answer_loss"]) == scores(base, trained_tokenizer, recs)
    assert (points[1]["accuracy"], points[1]["answer_loss"]) == scores(tuned, trained_tokenizer, recs)
    assert points[0] != points[1], "base and tuned score the same: the test would prove nothing"


def test_missing_matplotlib_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"matplotlib is needed to draw .*curve.png \(pip install matplotlib\)"):
        interpolation_curve.plot([{"a": 0.0, "accuracy": 0.0, "answer_loss": 1.0}], tmp_path / "curve.png", "t")
