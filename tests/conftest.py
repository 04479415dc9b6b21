"""Shared fixtures: small configurations and models that run in milliseconds on a CPU.

``tiny_config`` builds a grouped-query configuration (4 query heads sharing 2 kv heads) small enough
for exact comparisons; ``random_model`` gives it weights large enough that attention is far from
uniform, so a wrong mask, position or head mapping moves the logits by much more than any tolerance.
"""

import json
import math
import random
import re
import signal

import pytest
import sentencepiece as spm
import torch

from llama_min import Llama, ModelConfig, Tokenizer, generate
from llama_min.checkpoint import load_checkpoint, tokenizer_file
from llama_min.finetune.instructions import InstructionRecord, read_records
from llama_min.training.data import DEV_ANSWER_TOKENS


def tiny_config(**overrides) -> ModelConfig:
    """A small GQA config: dim 64, 4 heads of 16 features, 2 kv heads, 2 layers, vocab 97."""
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                  norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64)
    fields.update(overrides)
    return ModelConfig(**fields)


@torch.no_grad()
def random_model(config: ModelConfig, seed: int = 0) -> Llama:
    """A Llama in eval mode with O(1) activations: embeddings ~ N(0, 1), every matrix ~ N(0, 1/fan_in),
    norm gains ~ U(0.5, 1.5). The training initialisation (std 0.02) makes attention nearly uniform,
    which would hide mistakes in masking and positions."""
    torch.manual_seed(seed)
    model = Llama(config)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.uniform_(0.5, 1.5)
        elif name == "tok_embeddings.weight":
            p.normal_(0.0, 1.0)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model.eval()


def random_tokens(config: ModelConfig, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """(batch, length) int64 token ids drawn with their own generator, independent of the model's."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=g)


def interruptible() -> None:
    """Popen's preexec_fn for a child a test will Ctrl-C: SIGINT back to its default. A test run started in
    the background by a script (``cmd &``) ignores SIGINT, children inherit that, and Python then never
    turns SIGINT into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def numbered_items(text: str) -> int:
    """How many lines of text open a numbered item ("1. ", "12. ", not indented): the written questions of
    a handout, the answers of a key."""
    return sum(re.match(r"\d+\. ", line) is not None for line in text.splitlines())


def hand_in_questions(handout: str) -> int:
    """How many numbered questions a lab handout asks in its "## Hand in" section (0 without one)."""
    return numbered_items(handout.partition("## Hand in")[2])


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def write_training_text(path) -> None:
    """A small deterministic corpus: 400 lines of common words, with recurring numbers (so that a
    trainer that did not split digits would learn pieces like "2023") and a few accented letters."""
    words = ("the quick brown fox jumps over lazy dog while seven wizards quietly hex jovial bakers and "
             "every river runs to the sea yet the sea is never full café naïve").split()
    rng = random.Random(0)
    lines = []
    for _ in range(400):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        lines.append(f"{line} in {rng.choice(['1999', '2023', '42', '31415'])} and {rng.randint(0, 99999)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory) -> Tokenizer:
    """A 400-piece LLaMA-style tokenizer trained once per test session (takes well under a second)."""
    directory = tmp_path_factory.mktemp("tokenizer")
    write_training_text(directory / "corpus.txt")
    return Tokenizer.train([directory / "corpus.txt"], directory / "tokenizer.model", vocab_size=400)


@pytest.fixture(scope="session")
def line_trained_tokenizer(trained_tokenizer, tmp_path_factory) -> Tokenizer:
    """The same corpus and options, trained the way LLaMA's own tokenizer was: sentencepiece's default
    input (one line per sentence, no newlines seen) and its dummy-prefix space before every text."""
    path = tmp_path_factory.mktemp("line_tokenizer") / "tokenizer.model"
    spm.SentencePieceTrainer.train(input=str(trained_tokenizer.path.parent / "corpus.txt"),
                                   model_prefix=str(path.with_suffix("")), model_type="bpe",
                                   vocab_size=trained_tokenizer.vocab_size, character_coverage=1.0,
                                   split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return Tokenizer(path)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def word_bench(tmp_path_factory):
    """A small word-task benchmark (experiments/make_benchmark.py) and a base briefly pretrained on its sentences by
    train.py: the starting point of the fine-tuning tests. Built once per test session."""
    from experiments.make_benchmark import make_benchmark
    from scripts import train

    root = tmp_path_factory.mktemp("benchmark")
    make_benchmark(root / "benchmark", n_words=40, n_heldout=10, seed=0, tasks=["first", "upper"], vocab_size=400)
    tiny = ["--dim", "32", "--n_layers", "2", "--n_heads", "2", "--n_kv_heads", "1", "--multiple_of", "16",
            "--max_seq_len", "160"]
    train(*tiny, "--data", root / "benchmark" / "pretrain", "--tokenizer", root / "benchmark" / "tokenizer.model",
          "--cache_dir", root / "cache", "--seq_len", "48", "--batch_size", "4", "--max_steps", "4",
          "--eval_every", "4", "--sample_tokens", "0", "--out_dir", root / "base")
    return root


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda run only where CUDA is present (benchmarks/gpu_check.py runs them on a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ---- instruction records with a known dev score ----------------------------------------------------

N_TRAIN, N_HELD_OUT, DEV_RECORDS = 20, 10, 8
ANSWERABLE = (0, 3, 5, 9)  # held-out positions whose output is the base's greedy answer; 9 is past DEV_RECORDS
EXPECTED_ACCURACY = 3 / 8


@pytest.fixture(scope="session")
def crafted(word_bench, tmp_path_factory):
    """Instruction records whose dev score is known without the code under test: the word_bench base's
    records, of whose first DEV_RECORDS held-out ones 3 get as expected output the base's own greedy
    answer (the rest keep real answers, which the barely trained base cannot give), so the unchanged base
    scores exactly 3/8; record 9, past the dev split, is made answerable too and must not count.
    Returns the file (20 training records, then 10 held out: pass --val_fraction 1/3), the held-out
    records, the base's tokenizer and its directory."""
    base_dir = word_bench / "base" / "ckpt"
    base, tokenizer = load_checkpoint(base_dir).eval(), Tokenizer(tokenizer_file(base_dir))
    records = read_records(word_bench / "benchmark" / "instructions" / "train.jsonl")[:N_TRAIN + N_HELD_OUT]
    held_out = records[N_TRAIN:]
    # Greedy answers of the dev records batched as one call, as the scorer batches them (left padding),
    # so that the very same computation decides; the record past the dev split alone.
    prompts = [tokenizer.encode(r.prompt(), bos=True) for r in held_out[:DEV_RECORDS]]
    new = generate(base, prompts, DEV_ANSWER_TOKENS, temperature=0.0, stop_ids=[tokenizer.eos_id])
    new += [[]] * (N_HELD_OUT - DEV_RECORDS - 1)
    new += generate(base, [tokenizer.encode(held_out[-1].prompt(), bos=True)], DEV_ANSWER_TOKENS,
                    temperature=0.0, stop_ids=[tokenizer.eos_id])
    greedy = [tokenizer.decode(ids) for ids in new]
    for i, r in enumerate(held_out[:DEV_RECORDS]):
        if i not in ANSWERABLE:
            assert greedy[i].strip() != r.output.strip(), f"premise: the base should not answer record {i} right"
    held_out = [InstructionRecord(r.instruction, greedy[i].strip() if i in ANSWERABLE else r.output, r.input)
                for i, r in enumerate(held_out)]
    path = tmp_path_factory.mktemp("crafted") / "instructions.jsonl"
    path.write_text("".join(json.dumps({"instruction": r.instruction, "input": r.input, "output": r.output}) + "\n"
                            for r in records[:N_TRAIN] + held_out), encoding="utf-8")
    return {"path": path, "held_out": held_out, "tokenizer": tokenizer, "base_dir": base_dir}
