"""generate(): the cached decode loop against the uncached forward pass, batching, sampling filters,
stop ids and stop strings, and the context check.

The reference for greedy decoding is written a second way: run the *full* sequence through the model
without any cache and take the argmax of the last position, one token at a time.
"""

import pytest
import torch

from conftest import random_model, random_tokens, tiny_config
from llama_min import generate
from llama_min.generation import (TextStream, choose_next, stop_string_prefix, filter_top_k, filter_top_p, fit_context, generate_stream,
                                  store_weights_column_major)
from llama_min.finetune.instructions import InstructionRecord, encode_record
from llama_min.finetune.templates import get_template, record_template, template_for_checkpoint


@torch.no_grad()
def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))  # no cache: the whole sequence every time
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@torch.no_grad()
def full_logits(model, prompt: list[int], new: list[int]) -> torch.Tensor:
    """(len(new), vocab): the logits from which each new token was chosen, by one uncached pass."""
    logits, _ = model(torch.tensor([prompt + new]))
    return logits[0, len(prompt) - 1:-1]


@pytest.fixture
def model():
    return random_model(tiny_config())  # GQA: 4 query heads share 2 kv heads


def prompts_of(lengths, seed=1):
    return [random_tokens(tiny_config(), 1, n, seed=seed + i)[0].tolist() for i, n in enumerate(lengths)]


def test_greedy_equals_argmax_of_the_full_forward_pass(model):
    assert model.config.n_kv_heads < model.config.n_heads
    prompt = prompts_of([7])[0]
    got = generate(model, [prompt], max_new_tokens=20)[0]
    want = greedy_reference(model, prompt, 20)
    assert got == want, f"cached greedy decoding diverged from the uncached argmax:\n got  {got}\n want {want}"
    assert len(set(want)) > 3, "the reference is degenerate (one repeated token): the test would prove little"
    assert not any(layer.attention.cache.active for layer in model.layers), "generate() left the KV cache allocated"


def test_column_major_weights_compute_the_same_model(model):
    prompts = prompts_of([5, 9])
    tokens = random_tokens(model.config, 2, 12)
    with torch.no_grad():
        plain_logits, _ = model(tokens)
    plain = generate(model, prompts, max_new_tokens=16)
    fast = store_weights_column_major(model)
    assert not fast.layers[0].attention.wq.weight.is_contiguous(), "the layout did not change"
    with torch.no_grad():
        fast_logits, _ = fast(tokens)
    torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-5, atol=1e-5)
    assert generate(fast, prompts, max_new_tokens=16) == plain


def test_batched_prompts_of_different_lengths_equal_each_alone(model):
    prompts = prompts_of([3, 11, 1, 6])
    batched = generate(model, prompts, max_new_tokens=12)
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=12)[0]
        assert batched[i] == alone, f"prompt {i} (length {len(prompt)}) differs in a batch:\n {batched[i]}\n {alone}"


def test_same_seed_same_output_and_the_seed_matters(model):
    prompts = prompts_of([4, 9])
    run = lambda seed: generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=seed)
    assert run(123) == run(123), "the same seed gave different samples"
    assert run(123) != run(124), "different seeds gave the same samples: is the seed used, or is it greedy?"


def test_temperature_towards_zero_matches_greedy(model):
    prompts = prompts_of([5, 2])
    greedy = generate(model, prompts, max_new_tokens=16)
    cold = generate(model, prompts, max_new_tokens=16, temperature=1e-4, seed=0)
    assert cold == greedy


def test_sampled_tokens_stay_within_top_k_of_the_model_logits(model):
    prompt = prompts_of([6])[0]
    for seed in range(5):
        new = generate(model, [prompt], max_new_tokens=12, temperature=2.0, top_k=3, seed=seed)[0]
        allowed = full_logits(model, prompt, new).topk(3, dim=-1).indices
        for i, token in enumerate(new):
            assert token in allowed[i], f"seed {seed}, step {i}: token {token} is not among the 3 best {allowed[i].tolist()}"


def crafted_logits() -> torch.Tensor:
    """A distribution over 6 tokens, shuffled so that the best token is not id 0."""
    probs = torch.tensor([0.05, 0.30, 0.01, 0.50, 0.10, 0.04])
    return probs.log()[None]  # (1, 6)


def test_top_k_never_samples_outside_the_k_best_and_reaches_all_of_them():
    logits = crafted_logits().expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    drawn = set(choose_next(logits, 1.0, 3, None, g).tolist())
    assert drawn == {3, 1, 4}, f"top-3 of probabilities [0.05, 0.30, 0.01, 0.50, 0.10, 0.04] is {{3, 1, 4}}, drew {drawn}"
    assert torch.isinf(filter_top_k(crafted_logits(), 3)).sum() == 3


@pytest.mark.parametrize("p, nucleus", [(0.5, {3}), (0.75, {3, 1}), (0.79, {3, 1}), (0.85, {3, 1, 4}),
                                        (0.95, {3, 1, 4, 0}), (1.0, {0, 1, 2, 3, 4, 5})])
def test_top_p_never_samples_outside_the_nucleus(p, nucleus):
    # the nucleus written out: the most probable tokens, in order, until their mass reaches p
    probs = crafted_logits().exp()[0].tolist()
    expected, mass = set(), 0.0
    for token in sorted(range(6), key=lambda t: -probs[t]):
        if mass >= p - 1e-6:
            break
        expected.add(token)
        mass += probs[token]
    assert expected == nucleus  # the table above agrees with the definition
    g = torch.Generator().manual_seed(0)
    drawn = set(choose_next(crafted_logits().expand(4000, -1), 1.0, None, p, g).tolist())
    assert drawn == nucleus, f"top_p={p}: expected samples from {nucleus}, drew {drawn}"
    kept = set(torch.nonzero(~torch.isinf(filter_top_p(crafted_logits(), p))[0]).flatten().tolist())
    assert kept == nucleus


def test_stop_ids_end_each_row_before_the_stop_token(model):
    prompts = prompts_of([4, 8])
    free = generate(model, prompts, max_new_tokens=16)
    stop = free[0][5]  # a token row 0 produces; the output must end just before its first occurrence
    cut = generate(model, prompts, max_new_tokens=16, stop_ids=[stop])
    for row, full in zip(cut, free):
        expected = full[:full.index(stop)] if stop in full else full
        assert row == expected, f"stop id {stop}: expected {expected}, got {row}"
    assert stop not in cut[0], "the stop id itself must not be part of the output"


def test_stream_yields_none_for_stopped_rows_and_ends_when_all_stop(model):
    prompts = prompts_of([4, 8])
    free = generate(model, prompts, max_new_tokens=16)
    stop = free[0][2]
    steps = list(generate_stream(model, prompts, 16, stop_ids=[stop]))
    assert [s[0] for s in steps[:2]] == free[0][:2] and steps[2][0] is None
    assert all(s[0] is None for s in steps[2:])
    if stop not in free[1]:
        assert len(steps) == 16, "the loop must go on while one row is still generating"


def test_abandoning_the_stream_releases_the_cache(model):
    steps = generate_stream(model, prompts_of([3]), 10)
    next(steps)
    assert model.layers[0].attention.cache.active
    steps.close()
    assert not any(layer.attention.cache.active for layer in model.layers)


def test_context_overflow_is_a_clear_error_and_truncation_keeps_bos_and_the_end(model):
    max_len = model.config.max_seq_len  # 64
    bos = 1
    prompt = [bos] + list(range(3, 3 + 59))
    with pytest.raises(ValueError, match=r"prompt 0 has 60 tokens.*70 positions.*max_seq_len 64"):
        generate(model, [prompt], max_new_tokens=10)
    got = generate(model, [prompt], max_new_tokens=10, truncate=True, bos_id=bos)[0]
    kept = [bos] + prompt[-(max_len - 10 - 1):]  # BOS, then the last 53 tokens: 54 + 10 = 64
    assert got == generate(model, [kept], max_new_tokens=10)[0], "a truncated prompt must keep its BOS"
    assert fit_context([prompt], 10, max_len, truncate=True, bos_id=bos) == [kept]
    without_bos = prompt[1:]  # a prompt that does not start with BOS just keeps its end
    assert fit_context([without_bos], 10, max_len, truncate=True, bos_id=bos) == [without_bos[-(max_len - 10):]]
    with pytest.raises(ValueError, match="max_new_tokens 64 leaves no room"):
        generate(model, [[1]], max_new_tokens=64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be a positive"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
])
def test_bad_sampling_arguments_are_named(model, kwargs, message):
    args = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2]], **args)


def test_bad_prompts_are_named(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match=r"outside the model's vocabulary of 97"):
        generate(model, [[1, 500]], 4)


# ---- text: stop strings and incremental decoding ---------------------------------------------------------

def stream_text(tokenizer, text: str, stop_strings, anchor=None) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop_strings, anchor=anchor)
    pieces = []
    for token in tokenizer.encode(text, bos=False):
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces, stream


def test_stop_string_ends_the_text_just_before_it_and_is_never_streamed(trained_tokenizer):
    text = "the quick brown fox jumps over the lazy dog and every river runs to the sea"
    pieces, stream = stream_text(trained_tokenizer, text, ["lazy dog", "never"])
    assert stream.stopped
    assert stream.text == "the quick brown fox jumps over the ", repr(stream.text)
    assert "".join(pieces) == stream.text, "what was streamed differs from the final text"
    assert not any("lazy" in p or p.endswith("la") for p in pieces), f"part of the stop string was streamed: {pieces}"


def test_without_a_stop_string_the_whole_text_streams_back_exactly(trained_tokenizer):
    text = "café naïve wizards in 2023 and 31415"  # accents: byte-fallback pieces arrive one byte at a time
    pieces, stream = stream_text(trained_tokenizer, text, ["zebra"])
    assert not stream.stopped and "".join(pieces) == stream.text == text
    assert not any("\ufffd" in p for p in pieces), f"an incomplete UTF-8 character was streamed: {pieces}"


def test_streamed_text_keeps_the_space_after_the_prompt(trained_tokenizer):
    prompt = trained_tokenizer.encode("the quick brown", bos=True)
    continuation = trained_tokenizer.encode("the quick brown fox jumps", bos=True)[len(prompt):]
    stream = TextStream(trained_tokenizer, anchor=prompt[-1])
    text = "".join(stream.push(t) for t in continuation) + stream.finish()
    assert text == " fox jumps", f"sentencepiece's leading-space rule leaked into the stream: {text!r}"


# ---- templates ---------------------------------------------------------------------------------------------

def test_alpaca_template_encodes_exactly_like_the_fine_tuning_data(trained_tokenizer):
    record = InstructionRecord(instruction="reverse the word river", output="revir")
    tokens, targets = encode_record(record, trained_tokenizer)
    tokens = tokens + targets[-1:]  # the whole record: inputs are all its tokens but the last, EOS
    history = get_template("alpaca").encode(trained_tokenizer, [("user", record.instruction), ("assistant", "revir"),
                                                                 ("user", record.instruction)])
    prompt = get_template("alpaca").encode(trained_tokenizer, [("user", record.instruction)])
    assert prompt == tokens[:len(prompt)], "generation would prompt differently from how fine-tuning trained"
    assert tokens[-1] == trained_tokenizer.eos_id
    assert history == tokens + prompt, "a past exchange must look exactly like a fine-tuning record"


def test_llama2_chat_and_chatml_layouts(trained_tokenizer):
    tok = trained_tokenizer
    conversation = [("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "again")]
    want = ([tok.bos_id] + tok.encode("[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST] hello ", bos=False)
            + [tok.eos_id, tok.bos_id] + tok.encode("[INST] again [/INST]", bos=False))
    assert get_template("llama2-chat").encode(tok, conversation) == want
    chatml = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
              "hello<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n")
    assert get_template("chatml").encode(tok, conversation) == [tok.bos_id] + tok.encode(chatml, bos=False)


def test_bad_conversations_and_template_names_are_named(trained_tokenizer):
    with pytest.raises(ValueError, match="ending with a user message"):
        get_template("chatml").encode(trained_tokenizer, [("user", "a"), ("assistant", "b")])
    with pytest.raises(ValueError, match="unknown prompt template 'vicuna'; choose one of: raw, alpaca"):
        get_template("vicuna")


def test_the_checkpoint_records_its_template(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir(), adapter.mkdir()
    assert template_for_checkpoint(base) is None
    record_template(base, "llama2-chat")
    assert template_for_checkpoint(adapter, base) == "llama2-chat"
    record_template(adapter, "alpaca")
    assert template_for_checkpoint(adapter, base) == "alpaca"
    with pytest.raises(ValueError, match="unknown prompt template"):
        record_template(base, "nope")


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that copy a tensor's values to the host (a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_one_host_read_per_generated_token(model):
    """Each token reaches the host once: its ids and every row's stopped flag in one copy."""
    prompt = prompts_of([6])
    with HostReads() as reads:
        new = generate(model, prompt, 12)[0]
    assert new == greedy_reference(model, prompt[0], 12)
    assert reads.count <= 12 + 1, f"{reads.count} host reads for 12 tokens (one per token, one for the prompts)"


def test_on_an_asynchronous_device_the_next_step_is_queued_before_a_token_is_handed_out(model, monkeypatch):
    """Where kernels run while the host goes on (CUDA), step t+1 is queued before token t is yielded; the
    device check is forced here (no GPU in CI). The tokens must not change."""
    import llama_min.generation as generation

    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    prompt = prompts_of([6])
    expected = greedy_reference(model, prompt[0], 5)
    calls.clear()
    monkeypatch.setattr(generation, "runs_asynchronously", lambda device: True)
    stream = generate_stream(model, prompt, 5)
    first = next(stream)
    assert len(calls) == 2, f"model calls before the first token was handed out: {calls} (prefill and the next step)"
    assert [first[0], *(step[0] for step in stream)] == expected
    assert len(calls) == 1 + 4, "max_new_tokens 5: a prefill and four decode steps, none wasted after the last token"


@pytest.mark.parametrize("text, stops, held", [
    ("Hello ##", ["###"], 2),  # "##" may become "###"
    ("Hello #", ["###", "#!"], 1),
    ("ab", ["abc", "bx"], 2),  # the longer of two candidate tails
    ("a##", ["##"], 1),  # a whole stop string is a hit, found before; only its proper prefixes are held
    ("xyz", ["abc"], 0),
    ("", ["abc"], 0),
])
def test_the_hold_back_is_the_longest_tail_a_stop_string_starts_with(text, stops, held):
    assert stop_string_prefix(text, stops) == held
