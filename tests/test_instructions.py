"""Instruction data: Alpaca records, the prompt masked out of the loss, EOS learned, padding harmless.

References: the loss written by hand over the answer positions only, and each example's loss computed
alone versus inside a padded batch."""

import json

import pytest
import torch
import torch.nn.functional as F

from llama_min import IGNORE_INDEX
from llama_min.training.data import DataError, WindowSampler
from llama_min.finetune.instructions import (InstructionRecord, build_example, encode_record, encode_records,
                                    instruction_batch, read_records)

from conftest import random_model, tiny_config

RECORDS = [
    {"instruction": "Reverse the word.", "input": "garden", "output": "nedrag"},
    {"instruction": "Name a colour.", "output": "blue"},
    {"instruction": "Spell it in capitals.", "input": "", "output": "SEA"},
]


def small_model(tokenizer):
    return random_model(tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=256))


# ---- reading ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_read_json_and_jsonl(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(RECORDS))
    else:
        path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    records = read_records(path)
    assert records == [InstructionRecord(r["instruction"], r["output"], r.get("input", "")) for r in RECORDS]


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x"}', r"data.jsonl:2: \"output\" must be a string"),
    ('{"instruction": "x", "output": "y", "input": 3}', r"data.jsonl:2: \"input\" must be a string"),
    ('{"instruction": "x", "output": "y", "answer": "z"}', r"data.jsonl:2: unknown fields \['answer'\]"),
    ('{"instruction": "x", "output": ', r"data.jsonl:2: not valid JSON"),
    ('["x", "y"]', r"data.jsonl:2: expected an object"),
])
def test_bad_records_are_named(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_bad_files_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=r"expected a .json \(a list of records\) or .jsonl"):
        read_records(tmp_path / "d.txt")
    (tmp_path / "d.json").write_text(json.dumps(RECORDS[0]))
    with pytest.raises(DataError, match="expected a JSON list of Alpaca records, got a dict"):
        read_records(tmp_path / "d.json")


def test_alpaca_prompt_with_and_without_input():
    with_input = InstructionRecord("Reverse the word.", "nedrag", "garden").prompt()
    assert with_input.endswith("### Instruction:\nReverse the word.\n\n### Input:\ngarden\n\n### Response:\n")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    without = InstructionRecord("Name a colour.", "blue").prompt()
    assert "### Input:" not in without
    assert without.endswith("### Instruction:\nName a colour.\n\n### Response:\n")


# ---- masking and EOS --------------------------------------------------------------------------------

def test_targets_are_the_answer_and_eos_only(trained_tokenizer):
    tok = trained_tokenizer
    record = InstructionRecord("Reverse the word.", "nedrag", "garden")
    tokens, targets = encode_record(record, tok)
    prompt_ids = tok.encode(record.prompt(), bos=True)
    answer_ids = tok.encode(record.output, bos=False)
    assert len(tokens) == len(targets) == len(prompt_ids) + len(answer_ids)  # + EOS - the unseen last token
    assert tokens[:len(prompt_ids)] == prompt_ids and tokens[0] == tok.bos_id
    counted = [t for t in targets if t != IGNORE_INDEX]
    assert counted == answer_ids + [tok.eos_id], "the counted targets must be exactly the answer and EOS"
    assert targets[-1] == tok.eos_id, "EOS is not the last target: the model would never learn to stop"
    assert targets[:len(prompt_ids) - 1] == [IGNORE_INDEX] * (len(prompt_ids) - 1)
    assert tok.decode(answer_ids) == record.output


def test_changing_prompt_tokens_does_not_change_the_answer_loss():
    """With the logits fixed, the loss depends on the answer's targets only: two prompts of the same
    length give the same loss; without the mask they would not (the test can tell)."""
    answer = [11, 12, 13, 2]
    prompt_a, prompt_b = [1, 20, 21, 22, 23], [1, 30, 31, 32, 33]
    logits = torch.randn(len(prompt_a) + len(answer) - 1, 50)
    (_, ya), (_, yb) = build_example(prompt_a, answer), build_example(prompt_b, answer)
    loss = lambda y: F.cross_entropy(logits, torch.tensor(y), ignore_index=IGNORE_INDEX)
    assert torch.equal(loss(ya), loss(yb)), "the prompt's label tokens changed the loss"
    unmasked = lambda p: (p + answer)[1:]
    assert not torch.equal(loss(unmasked(prompt_a)), loss(unmasked(prompt_b))), "test cannot detect unmasked prompts"


def test_model_loss_counts_answer_positions_only(trained_tokenizer):
    model = small_model(trained_tokenizer)
    tokens, targets = encode_record(InstructionRecord("Reverse the word.", "nedrag", "garden"), trained_tokenizer)
    x, y = torch.tensor([tokens]), torch.tensor([targets])
    logits, loss = model(x, y)
    # by hand: mean of -log p(answer token) over the positions whose next token is in the answer
    first = len(trained_tokenizer.encode(InstructionRecord("Reverse the word.", "nedrag", "garden").prompt())) - 1
    logp = torch.log_softmax(logits[0, first:].double(), dim=-1)
    answer = torch.tensor(targets[first:])
    by_hand = -logp.gather(1, answer[:, None]).mean()
    assert abs(loss.item() - by_hand.item()) < 1e-5


# ---- too long, batches --------------------------------------------------------------------------------

def test_too_long_records_are_dropped_and_counted(trained_tokenizer):
    records = [InstructionRecord("Reverse the word.", "nedrag", "garden"), InstructionRecord("Say", "hi")]
    examples = [encode_record(r, trained_tokenizer) for r in records]
    limit = len(examples[1][0])  # room for the short record exactly
    kept, dropped = encode_records(records, trained_tokenizer, max_seq_len=limit)
    assert dropped == 1 and kept == [examples[1]]
    assert encode_records(records, trained_tokenizer, max_seq_len=10_000) == (examples, 0)
    with pytest.raises(DataError, match=rf"no instruction record fits in --seq_len {limit - 1} tokens \(the shortest needs {limit}\); raise --seq_len"):
        encode_records(records, trained_tokenizer, max_seq_len=limit - 1)


def test_right_padded_batch_gives_each_example_its_own_loss(trained_tokenizer):
    model = small_model(trained_tokenizer)
    records = [InstructionRecord(r["instruction"], r["output"], r.get("input", "")) for r in RECORDS]
    examples, _ = encode_records(records, trained_tokenizer, model.config.max_seq_len)
    tokens, targets = instruction_batch(examples, [0, 1, 2], pad_id=trained_tokenizer.eos_id)
    assert tokens.shape == targets.shape == (3, max(len(t) for t, _ in examples))
    with torch.no_grad():
        logits, _ = model(tokens)
        batch_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        alone = sum(F.cross_entropy(model(torch.tensor([t]))[0][0], torch.tensor(y), ignore_index=IGNORE_INDEX,
                                    reduction="sum") for t, y in examples)
    assert abs(batch_sum.item() - alone.item()) < 1e-3, "padding changed the loss of the real tokens"
    # indices drawn as pretraining draws windows: WindowSampler over the examples
    indices = WindowSampler(len(examples), 0, seed=0).starts(8)
    assert all(0 <= i < len(examples) for i in indices)
