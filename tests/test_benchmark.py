"""The instruction-tuning lab: seeded words and facts, files on disk, and the exact-match evaluator.

The evaluator's reference is greedy decoding written the slow way: the full forward pass over the whole
sequence for every new token, no cache, no batching."""

import json

import pytest
import torch

from experiments.evaluate import exact_match
from llama_min.finetune.exact_match import answers
from experiments.make_benchmark import make_benchmark
from experiments.tasks import TASKS, make_words, records, sentences, split_words
from llama_min import Tokenizer
from llama_min.finetune.instructions import InstructionRecord, read_records

from conftest import random_model, tiny_config


def test_words_are_seeded_and_distinct():
    a, b, c = make_words(300, seed=0), make_words(300, seed=0), make_words(300, seed=1)
    assert a == b, "the same seed gave different words"
    assert a != c, "different seeds gave the same words"
    assert len(set(a)) == 300 and all(w.isalpha() and w.islower() for w in a)
    with pytest.raises(ValueError, match="at most 8100 distinct words"):
        make_words(10_000, seed=0)


def test_answers_follow_their_definitions():
    # each task's answer, computed a second way
    second_way = {"reverse": lambda w: "".join(w[i] for i in range(len(w) - 1, -1, -1)),
                  "upper": lambda w: "".join(chr(ord(c) - 32) for c in w),
                  "first": lambda w: w[:1], "last": lambda w: w[len(w) - 1:],
                  "length": lambda w: f"{sum(1 for _ in w)}",
                  "sort": lambda w: "".join(c * w.count(c) for c in "abcdefghijklmnopqrstuvwxyz")}
    assert set(second_way) == set(TASKS)
    for w in make_words(50, seed=3):
        for name, task in TASKS.items():
            assert task.answer(w) == second_way[name](w), f"{name}({w})"


def test_sentences_and_records_state_the_same_facts():
    words = make_words(20, seed=0)
    facts = sentences(words, list(TASKS))
    for (task, record), sentence in zip(records(words, list(TASKS)), facts):
        assert sentence == TASKS[task].sentence.format(word=record.input, answer=record.output), (task, record, sentence)
    tune, heldout = split_words(words, 5)
    assert len(heldout) == 5 and not set(tune) & set(heldout)


def test_make_benchmark_files(tmp_path):
    d = make_benchmark(tmp_path / "benchmark", n_words=40, n_heldout=10, seed=2, vocab_size=400)
    again = make_benchmark(tmp_path / "lab2", n_words=40, n_heldout=10, seed=2, vocab_size=400)
    for rel in ("pretrain/train.jsonl", "pretrain/val.jsonl", "instructions/train.jsonl", "instructions/eval.jsonl"):
        assert (tmp_path / "benchmark" / rel).read_bytes() == (tmp_path / "lab2" / rel).read_bytes(), f"{rel} is not deterministic"
    assert d == again
    tune = read_records(tmp_path / "benchmark" / "instructions" / "train.jsonl")
    heldout = read_records(tmp_path / "benchmark" / "instructions" / "eval.jsonl")
    assert len(tune) == 30 * len(TASKS) and len(heldout) == 10 * len(TASKS)
    assert not {r.input for r in tune} & {r.input for r in heldout}, "a held-out word is in the fine-tuning records"
    pretrain = (tmp_path / "benchmark" / "pretrain" / "train.jsonl").read_text()
    for task, r in records(d["heldout_words"], list(TASKS)):  # the base must see every held-out fact
        assert r in heldout and json.dumps(TASKS[task].sentence.format(word=r.input, answer=r.output))[1:-1] in pretrain
    assert json.loads((tmp_path / "benchmark" / "benchmark.json").read_text())["heldout_words"] == d["heldout_words"]
    tok = Tokenizer(tmp_path / "benchmark" / "tokenizer.model")
    assert tok.decode(tok.encode(tune[0].prompt())) == tune[0].prompt()


def slow_greedy(model, prompt_ids, eos_id, max_new_tokens):
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        next_id = model(torch.tensor([ids]))[0][0, -1].argmax().item()
        if next_id == eos_id:
            break
        ids.append(next_id)
    return ids[len(prompt_ids):]


def test_evaluator_matches_slow_greedy_and_counts_exactly(trained_tokenizer):
    tok = trained_tokenizer
    model = random_model(tiny_config(vocab_size=tok.vocab_size, max_seq_len=256))
    words = make_words(3, seed=4)
    recs = [r for _, r in records(words, ["reverse", "upper"])]
    with torch.no_grad():
        want = [tok.decode(slow_greedy(model, tok.encode(r.prompt()), tok.eos_id, 4)) for r in recs]
    assert answers(model, tok, recs, max_new_tokens=4, batch_size=4) == want
    # make the model right on exactly the first two records (one of each task): accuracy 2/6
    relabelled = [InstructionRecord(r.instruction, want[i] if i < 2 else want[i] + "x", r.input)
                  for i, r in enumerate(recs)]
    result = exact_match(model, tok, relabelled, max_new_tokens=4)
    assert result["n"] == 6 and result["accuracy"] == pytest.approx(2 / 6)
    per_task = {"reverse": 1 / 3, "upper": 1 / 3}
    assert result["per_task"] == pytest.approx(per_task)
