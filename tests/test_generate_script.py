"""generate.py end to end, on a checkpoint each test saves: a tiny random model and a tokenizer trained
on a small text (conftest). The expected text is computed in the test from llama_min.generate and the
tokenizer, independently of the script's streaming code.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_model, tiny_config
from scripts import ROOT, run_script
from llama_min import generate
from llama_min.finetune.load import load_finetuned
from llama_min.generation import store_weights_column_major
from llama_min.peft import PeftConfig, apply_peft, save_peft
from llama_min.finetune.templates import get_template, record_template
from llama_min.checkpoint import save_checkpoint


FIGURES = re.compile(r"\[(\d+) prompt tokens, (\d+) new tokens, time to first token \d+ ms, ([\d.]+|n/a) tokens/s\]")


def save(model, tokenizer, directory: Path) -> Path:
    save_checkpoint(model, directory, tokenizer_path=tokenizer.path)
    return directory


@pytest.fixture
def model(trained_tokenizer):
    return random_model(tiny_config(vocab_size=trained_tokenizer.vocab_size, max_seq_len=192))


@pytest.fixture
def checkpoint(model, trained_tokenizer, tmp_path):
    return save(model, trained_tokenizer, tmp_path / "ckpt")


def run(*argv) -> tuple[int, str, str]:
    """generate.py in this process: (exit status, stdout, stderr)."""
    done = run_script("generate.py", *argv)
    return done.code, done.out, done.err


def expected_text(model, tokenizer, prompt_ids: list[int], n: int) -> tuple[str, list[int]]:
    """Greedy continuation as text: decoded together with the prompt, then the prompt's text cut off
    (decoding the new ids alone would lose sentencepiece's leading space)."""
    new = generate(model, [prompt_ids], n, stop_ids=[tokenizer.eos_id])[0]
    return tokenizer.decode(prompt_ids + new)[len(tokenizer.decode(prompt_ids)):], new


def test_streams_the_greedy_continuation_and_prints_the_figures(model, trained_tokenizer, checkpoint):
    prompt = "the quick brown fox"
    ids = trained_tokenizer.encode(prompt, bos=True)
    text, new = expected_text(model, trained_tokenizer, ids, 12)
    result = subprocess.run([sys.executable, "generate.py", "--checkpoint", checkpoint, "--prompt", prompt,
                             "--temperature", "0", "--max_new_tokens", "12"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + text + "\n"
    figures = FIGURES.search(result.stderr)
    assert figures, f"no figures line in stderr: {result.stderr!r}"
    assert (int(figures[1]), int(figures[2])) == (len(ids), len(new))


def test_several_prompts_from_flags_and_a_file(model, trained_tokenizer, checkpoint, tmp_path):
    prompts = ["the sea", "every river runs", "seven wizards"]
    (tmp_path / "prompts.txt").write_text(f"{prompts[1]}\n\n{prompts[2]}\n")
    code, out, err = run("--checkpoint", checkpoint, "--prompt", prompts[0], "--prompt_file",
                         tmp_path / "prompts.txt", "--temperature", "0", "--max_new_tokens", "6")
    assert code == 0, err
    texts = [p + expected_text(model, trained_tokenizer, trained_tokenizer.encode(p), 6)[0] for p in prompts]
    assert out == "\n\n".join(texts) + "\n"
    assert len(FIGURES.findall(err)) == 3


def test_eos_ends_the_answer_and_is_not_printed(model, trained_tokenizer, tmp_path):
    ids = trained_tokenizer.encode("the lazy dog", bos=True)
    free = generate(model, [ids], 10)[0]
    # Swap the output rows of EOS and of the token greedy decoding picks at step 3: the logits of every
    # other token are unchanged, so the model now says EOS exactly where it said that token.
    token, eos = free[3], trained_tokenizer.eos_id
    assert token not in free[:3] and token != eos
    with torch.no_grad():
        model.output.weight[[token, eos]] = model.output.weight[[eos, token]]
    checkpoint = save(model, trained_tokenizer, tmp_path / "eos")
    code, out, err = run("--checkpoint", checkpoint, "--prompt", "the lazy dog", "--temperature", "0",
                         "--max_new_tokens", "10")
    assert code == 0, err
    assert out == "the lazy dog" + trained_tokenizer.decode(ids + free[:3])[len(trained_tokenizer.decode(ids)):] + "\n"
    assert FIGURES.search(err)[2] == "3", err


def test_a_stop_string_ends_the_answer(model, trained_tokenizer, checkpoint):
    ids = trained_tokenizer.encode("the sea", bos=True)
    text, _ = expected_text(model, trained_tokenizer, ids, 30)
    stop = text[8:11]
    assert stop and len(text) > 11
    code, out, err = run("--checkpoint", checkpoint, "--prompt", "the sea", "--temperature", "0",
                         "--max_new_tokens", "30", "--stop", stop)
    assert code == 0, err
    assert out == "the sea" + text[:text.index(stop)] + "\n"


def test_context_overflow_is_one_clear_line_unless_truncation_is_asked_for(checkpoint):
    long_prompt = " ".join(["the quick brown fox"] * 100)
    code, out, err = run("--checkpoint", checkpoint, "--prompt", long_prompt, "--max_new_tokens", "20")
    assert code == 1
    assert err.count("\n") == 1 and "max_seq_len 192" in err and "--truncate" in err, err
    code, out, err = run("--checkpoint", checkpoint, "--prompt", long_prompt, "--max_new_tokens", "20",
                         "--truncate", "--seed", "0")
    assert code == 0, err
    assert "prompt truncated: kept 172 of its" in err
    assert FIGURES.search(err)[1] == "172"


def test_template_comes_from_the_checkpoint_unless_a_flag_names_one(trained_tokenizer, checkpoint):
    record_template(checkpoint, "alpaca")
    prompt = "reverse the word sea"
    code, out, err = run("--checkpoint", checkpoint, "--prompt", prompt, "--max_new_tokens", "4", "--seed", "0")
    assert code == 0, err
    alpaca_ids = get_template("alpaca").encode(trained_tokenizer, [("user", prompt)])
    assert FIGURES.search(err)[1] == str(len(alpaca_ids))
    code, out, err = run("--checkpoint", checkpoint, "--prompt", prompt, "--max_new_tokens", "4",
                         "--template", "raw", "--seed", "0")
    assert FIGURES.search(err)[1] == str(len(trained_tokenizer.encode(prompt)))


def test_interactive_keeps_the_conversation_until_it_overflows(trained_tokenizer, checkpoint, monkeypatch):
    lines = ["the quick brown fox", "jumps over the lazy dog", "every river runs to the sea", "seven wizards",
             "quietly hex jovial bakers", "the sea is never full", "/exit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out, err = run("--checkpoint", checkpoint, "--interactive", "--template", "raw",
                         "--max_new_tokens", "40", "--seed", "0")
    assert code == 0, err
    prompt_tokens = [int(m[0]) for m in FIGURES.findall(err)]
    assert len(prompt_tokens) == 6, f"expected one answer per message before /exit: {err}"
    assert prompt_tokens[0] == len(trained_tokenizer.encode(lines[0]))
    assert prompt_tokens[1] >= prompt_tokens[0] + len(trained_tokenizer.encode(lines[1], bos=False)), \
        "the second prompt must hold the first exchange"
    assert "forgot the oldest" in err, f"six exchanges of up to 40 tokens cannot fit in 192: {err}"
    assert max(prompt_tokens) <= 192 - 40, "a prompt was let through that leaves no room for the answer"


def test_an_adapter_checkpoint_is_applied_with_its_template(model, trained_tokenizer, checkpoint, tmp_path):
    adapted = apply_peft(random_model(model.config), PeftConfig(method="lora", lora_targets=("wq", "wv", "w2")))
    with torch.no_grad():  # B starts at zero (the exact base model): give the adapter an effect to see
        for name, p in adapted.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    save_peft(adapted, tmp_path / "lora", base_checkpoint=checkpoint)
    record_template(tmp_path / "lora", "chatml")
    prompt = "the quick brown fox"
    ids = get_template("chatml").encode(trained_tokenizer, [("user", prompt)])
    text, _ = expected_text(adapted.eval(), trained_tokenizer, ids, 10)
    base_text, _ = expected_text(model, trained_tokenizer, ids, 10)
    assert text != base_text, "the adapter does not change the output: the test would prove nothing"
    code, out, err = run("--checkpoint", checkpoint, "--peft", tmp_path / "lora", "--prompt", prompt,
                         "--temperature", "0", "--max_new_tokens", "10", "--stop", "<|im_end|>")
    assert code == 0, err
    expected = text[:text.index("<|im_end|>")] if "<|im_end|>" in text else text
    assert out == f"{prompt}\n{expected}\n"


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "float16"], "float16 is for CUDA"),
    (["--dtype", "int8"], "--dtype 'int8': expected one of float32, bfloat16, float16"),
    (["--template", "vicuna"], "unknown prompt template 'vicuna'"),
    (["--top_p", "0", "--max_new_tokens", "8"], r"top_p must be in \(0, 1\]"),
])
def test_bad_flags_are_one_clear_line(checkpoint, flags, message):
    code, out, err = run("--checkpoint", checkpoint, "--prompt", "the", *flags)
    assert code == 1 and err.count("\n") == 1 and re.search(message, err), err


def test_missing_inputs_are_named(model, tmp_path):
    code, _, err = run("--checkpoint", tmp_path / "nothing", "--prompt", "hi")
    assert code == 1 and "not a llama_min checkpoint" in err
    save_checkpoint(model, tmp_path / "no_tokenizer")
    code, _, err = run("--checkpoint", tmp_path / "no_tokenizer", "--prompt", "hi")
    assert code == 1 and "holds no tokenizer.model or tokenizer.json" in err
    code, _, err = run("--checkpoint", tmp_path / "no_tokenizer")
    assert code == 1 and "nothing to do" in err


# ---- --interpolate a: the endpoints are the two models, exactly, as the script loads them -------------

def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def loaded_logits(ids, checkpoint, peft="", base="", interpolate=None) -> torch.Tensor:
    """The logits of the model as generate.py loads it: load_finetuned, then its CPU weight layout."""
    return logits_of(store_weights_column_major(load_finetuned(checkpoint, peft, base, interpolate)), ids)


@pytest.mark.parametrize("peft", [
    PeftConfig(method="lora", lora_targets=("wq", "w2")),
    PeftConfig(method="adapter", adapter_len=3),
    PeftConfig(method="bottleneck", bottleneck_dim=8, train_norms=True),  # base norms trained too
], ids=["lora", "adapter", "bottleneck+norms"])
def test_interpolate_endpoints_are_the_base_and_the_adapted_model(model, trained_tokenizer, checkpoint, tmp_path, peft):
    adapted = apply_peft(random_model(model.config), peft)
    adapted.load_state_dict(model.state_dict(), strict=False)  # the same base under the adapter
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    save_peft(adapted, tmp_path / "lora", base_checkpoint=checkpoint)
    ids = trained_tokenizer.encode("the quick brown fox", bos=True)
    # the references, loaded by the same script without --interpolate (its CPU weight layout included)
    base = loaded_logits(ids, checkpoint)
    tuned = loaded_logits(ids, checkpoint, peft=tmp_path / "lora")
    torch.testing.assert_close(tuned, logits_of(adapted.eval(), ids), rtol=1e-4, atol=1e-4)
    assert not torch.equal(base, tuned), "the adapter does not change the logits: the test would prove nothing"
    assert torch.equal(loaded_logits(ids, checkpoint, tmp_path / "lora", interpolate=0.0), base), \
        "a = 0 is not exactly the base model"
    assert torch.equal(loaded_logits(ids, checkpoint, tmp_path / "lora", interpolate=1.0), tuned), \
        "a = 1 is not exactly the adapted model"
    middle = loaded_logits(ids, checkpoint, tmp_path / "lora", interpolate=0.5)
    assert not torch.equal(middle, base) and not torch.equal(middle, tuned), "a = 0.5 is one of the endpoints"
    # and the greedy text the script prints at a = 0 is the base model's
    code, out, err = run("--checkpoint", checkpoint, "--peft", tmp_path / "lora", "--interpolate", "0",
                         "--prompt", "the quick brown fox", "--template", "raw",
                         "--temperature", "0", "--max_new_tokens", "8")
    assert code == 0, err
    assert out == "the quick brown fox" + expected_text(model, trained_tokenizer, ids, 8)[0] + "\n"


def test_interpolate_between_two_full_checkpoints(model, trained_tokenizer, checkpoint, tmp_path):
    tuned_model = random_model(model.config, seed=1)  # a "fully fine-tuned" model: every tensor moved
    tuned = save(tuned_model, trained_tokenizer, tmp_path / "tuned")
    ids = trained_tokenizer.encode("every river runs", bos=True)
    base = loaded_logits(ids, checkpoint)
    assert torch.equal(loaded_logits(ids, tuned, base=checkpoint, interpolate=0.0), base), "a = 0 is not exactly the base"
    assert torch.equal(loaded_logits(ids, tuned, base=checkpoint, interpolate=1.0), loaded_logits(ids, tuned)), \
        "a = 1 is not exactly the fine-tuned model"
    halfway = random_model(model.config)
    with torch.no_grad():
        for p, q in zip(halfway.parameters(), tuned_model.parameters()):
            p.mul_(0.5).add_(0.5 * q)  # the formula written a second way: θ₀ + ½(θ − θ₀)
    torch.testing.assert_close(loaded_logits(ids, tuned, base=checkpoint, interpolate=0.5), logits_of(halfway, ids),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--interpolate", "0.5"], "--interpolate needs the base to move towards: --peft ADAPTER_DIR"),
    (["--interpolate", "1.5", "--base", "X"], r"--interpolate 1.5: expected a in \[0, 1\]"),
    (["--base", "X"], "--base is the base checkpoint for --interpolate a; give --interpolate too"),
    (["--interpolate", "0.5", "--base", "X", "--peft", "Y"], "either --peft ADAPTER .* or --base BASE"),
])
def test_bad_interpolation_flags_are_one_clear_line(checkpoint, flags, message):
    code, out, err = run("--checkpoint", checkpoint, "--prompt", "the", *flags)
    assert code == 1 and err.count("\n") == 1 and re.search(message, err), err


def test_quantize_flag_generates_what_the_quantised_model_generates(model, trained_tokenizer, checkpoint, tmp_path):
    from llama_min.quantize import quantize_model

    prompt = "the quick brown fox"
    ids = trained_tokenizer.encode(prompt, bos=True)
    float_text = expected_text(model, trained_tokenizer, ids, 10)[0]
    text = expected_text(quantize_model(model, "int8"), trained_tokenizer, ids, 10)[0]
    code, out, err = run("--checkpoint", checkpoint, "--prompt", prompt, "--temperature", "0",
                         "--max_new_tokens", "10", "--quantize", "int8")
    assert code == 0, err
    assert out == prompt + text + "\n"
    assert text[:8] == float_text[:8], "int8 changed even the first greedy tokens of this model"
    save(model, trained_tokenizer, tmp_path / "q")  # a quantised checkpoint: no second quantisation
    code, out, err = run("--checkpoint", tmp_path / "q", "--prompt", prompt, "--temperature", "0",
                         "--max_new_tokens", "10")
    assert code == 0 and out == prompt + text + "\n", err
    code, _, err = run("--checkpoint", tmp_path / "q", "--prompt", prompt, "--quantize", "int8")
    assert code == 1 and "quantised already (int8): drop --quantize" in err
    code, _, err = run("--checkpoint", checkpoint, "--prompt", prompt, "--quantize", "int4", "--group_size", 32)
    assert code == 1 and "do not divide every layer's input width" in err and len(err.splitlines()) == 1


def test_compile_flag_compiles_the_named_decode_step(model, trained_tokenizer, checkpoint, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def eager_compile(fn, **kwargs):  # capture graphs but generate no code: seconds, not minutes
        compiled.append(fn)
        return real_compile(fn, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    prompt = "the sea"
    text = expected_text(model, trained_tokenizer, trained_tokenizer.encode(prompt, bos=True), 6)[0]
    code, out, err = run("--checkpoint", checkpoint, "--prompt", prompt, "--temperature", "0",
                         "--max_new_tokens", "6", "--compile")
    assert code == 0, err
    assert out == prompt + text + "\n"
    assert [fn.__name__ for fn in compiled] == ["decode_step"]
    assert re.search(r"compiled the decode step in [\d.]+ s", err)
