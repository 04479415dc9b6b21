"""The multimodal study (experiments/multimodal.py), shortened for CI: two training steps per adapter on a few
pictures of the image world, from the session's tiny lab base. Every answer it scores is recomputed here by
greedy decoding written a second way (a full forward pass per token, no KV cache, one record at a time), and
every figure of its table from those answers."""

import json
import statistics

import pytest
import torch

from experiments import multimodal
from llama_min.checkpoint import load_checkpoint
from llama_min.finetune.images import HELD_OUT_COMBINATIONS, QUESTIONS, question_type, read_image_records
from llama_min.peft import load_peft, save_peft
from llama_min.peft.visual import load_encoder
from llama_min.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def study(word_bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("multimodal")
    argv = ["--base", str(word_bench / "base" / "ckpt"), "--out", str(out), "--seeds", "0", "--steps", "2",
            "--n_train", "6", "--n_test", "4", "--batch_size", "4", "--seq_len", "160", "--lr", "0.05"]
    threads = torch.get_num_threads()
    try:
        return out, multimodal.main(argv)
    finally:
        torch.set_num_threads(threads)  # main() scores on one thread; later tests' float sums must not change


def greedy(model, tokenizer, prompt: str, image: torch.Tensor | None, max_new_tokens: int = 4) -> str:
    tokens = tokenizer.encode(prompt, bos=True)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([tokens + new]), images=None if image is None else image[None])[0]  # (1, T, vocab)
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_id:
                break
            new.append(token)
    return tokenizer.decode(new)


def recomputed(base, peft, world, images: bool) -> tuple[list[str], dict[str, float]]:
    """The answers of base + the adapter in PEFT to the world's test records, and their exact match per
    question type (colour and shape also on the held-out combinations alone)."""
    tokenizer = Tokenizer(base / "tokenizer.model")
    records = read_image_records(world / "test.json", world)
    ids = sorted({r.image for r in records})
    features = dict(zip(ids, load_encoder("lab").features(world, ids)))
    model = load_peft(load_checkpoint(base), peft).eval()
    got = [greedy(model, tokenizer, r.prompt(), features[r.image] if images else None) for r in records]
    picture = {(r.image, question_type(r)): r.output for r in records}
    scores = {}
    for question in QUESTIONS:
        mine = [a == r.output for a, r in zip(got, records) if question_type(r) == question]
        scores[question] = sum(mine) / len(mine)
        if question in ("colour", "shape"):
            held = [a == r.output for a, r in zip(got, records) if question_type(r) == question and
                    (picture[r.image, "colour"], picture[r.image, "shape"]) in HELD_OUT_COMBINATIONS]
            scores[f"{question}@held_out"] = sum(held) / len(held)
    return got, scores


def test_every_answer_and_figure_is_recomputed(study, word_bench):
    out, per_seed = study
    for kind in multimodal.KINDS:
        got, scores = recomputed(word_bench / "base" / "ckpt", out / "seed0" / kind / "peft", out / "world",
                                 kind == "multimodal")
        assert per_seed[0][kind]["answers"] == got, f"{kind}: the study's answers differ from plain greedy decoding"
        assert per_seed[0][kind]["scores"] == scores, kind


def test_answer_losses_are_the_model_s_own(study, word_bench):
    """The EOS loss of each test record, recomputed from the prompt and the answer tokenized apart."""
    out, per_seed = study
    base = word_bench / "base" / "ckpt"
    tokenizer = Tokenizer(base / "tokenizer.model")
    records = read_image_records(out / "world" / "test.json", out / "world")
    model = load_peft(load_checkpoint(base), out / "seed0" / "blind" / "peft").eval()
    eos = {q: [] for q in QUESTIONS}
    with torch.no_grad():
        for r in records:
            tokens = tokenizer.encode(r.prompt(), bos=True) + tokenizer.encode(r.output, bos=False)
            logits = model(torch.tensor([tokens]))[0][0, -1].double()
            eos[question_type(r)].append(float(logits.logsumexp(-1) - logits[tokenizer.eos_id]))
    for q, values in eos.items():
        assert per_seed[0]["blind"]["answer_loss"][q]["eos"] == pytest.approx(statistics.mean(values), rel=1e-4)


def test_scores_follow_each_picture(study, word_bench, tmp_path):
    """Two steps leave every answer alike; with the gates wide open and the prompts and projection drawn
    anew, answers differ from picture to picture, and the study's scoring must still agree record by record."""
    out, _ = study
    base = word_bench / "base" / "ckpt"
    model = load_peft(load_checkpoint(base), out / "seed0" / "multimodal" / "peft")
    torch.manual_seed(3)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if tensor.requires_grad:
                tensor.copy_(torch.full_like(tensor, 4.0) if name.endswith("gate") else 3 * torch.randn_like(tensor))
    save_peft(model, tmp_path / "peft", base_checkpoint=base)
    got, scores = recomputed(base, tmp_path / "peft", out / "world", images=True)
    assert len(set(got)) > 1, "the negative control needs answers that differ between pictures"
    assert multimodal.score(base, tmp_path, out / "world") == (scores, got)


def test_the_blind_adapter_sees_the_same_records_without_images(study):
    out, per_seed = study
    blind = json.loads((out / "world" / "train_blind.json").read_text())
    full = json.loads((out / "world" / "train.json").read_text())
    assert blind == [{k: v for k, v in r.items() if k != "image"} for r in full] and len(full) == 6 * len(QUESTIONS)
    configs = {kind: json.loads((out / "seed0" / kind / "peft" / "peft.json").read_text())["config"]
               for kind in multimodal.KINDS}
    assert (configs["multimodal"]["visual_dim"], configs["blind"]["visual_dim"]) == (64, 0)


def test_table_and_gate_plot_are_written(study):
    out, per_seed = study
    rows = (out / "table.md").read_text().splitlines()
    assert [r.split("|")[1].strip() for r in rows[2:4]] == list(multimodal.KINDS)
    eos = statistics.mean(per_seed[0]["blind"]["answer_loss"][q]["eos"] for q in ["count"])
    assert rows[-1].split("|")[1].strip() == "blind" and rows[-1].split("|")[-2].strip().endswith(f"/ {eos:.2f}")
    colour = per_seed[0]["multimodal"]["scores"]["colour"]
    assert rows[2].split("|")[2].strip() == f"{colour:.3f} ({colour:.2f})"
    assert (out / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["per_seed"]["0"]["multimodal"]["scores"] == per_seed[0]["multimodal"]["scores"]
