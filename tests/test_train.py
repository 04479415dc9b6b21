"""train.py: the loop learns, resumes bit-exactly, survives interruption, agrees across processes,
and refuses bad input in one line. Everything runs a tiny model on a slice of the shipped corpus."""

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch

from conftest import interruptible
from llama_min import Llama, ModelConfig
from llama_min.checkpoint import load_checkpoint, resolve_checkpoint_dir
from llama_min.config import PRESETS
from llama_min.training.corpus import read_documents, token_byte_lengths
from llama_min.training.data import get_batch, prepare_data
from llama_min.training.config import TrainConfig, build_parser, parse_args
from llama_min.training.data import WindowSampler
from llama_min.training.evaluate import evaluate
from llama_min.training.optim import get_lr, make_optimizer
from llama_min.training.runtime import Runtime, setup_runtime
from llama_min.training.state import STATE_FILE
from llama_min.training.trainable import build_model, choose_trainable
from scripts import ROOT as REPO, last, metrics, run_script, shakespeare_slice, train, train_losses

TINY_MODEL = ["--dim", "32", "--n_layers", "2", "--n_heads", "2", "--n_kv_heads", "1", "--vocab_size", "384",
              "--multiple_of", "16"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small train/val directory cut from the shipped corpus, and a shared token cache."""
    root = tmp_path_factory.mktemp("corpus")
    shakespeare_slice(root)
    return root


def tiny_args(corpus, out_dir, *extra, model=TINY_MODEL):
    return [*model, "--data", str(corpus / "data"), "--cache_dir", str(corpus / "cache"),
            "--out_dir", str(out_dir), "--seq_len", "32", "--batch_size", "4", "--max_steps", "6",
            "--warmup_steps", "2", "--lr", "3e-3", "--log_every", "1", "--eval_every", "3",
            "--eval_tokens", "1024", "--sample_tokens", "0", *extra]


def tiny_config(corpus, out_dir, *extra) -> TrainConfig:
    return parse_args(tiny_args(corpus, out_dir, *extra))[0]


# ---- learning ------------------------------------------------------------------------------------


def test_overfits_a_fixed_batch(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path, "--lr", "1e-2")
    rt = setup_runtime(cfg.device, cfg.dtype)
    model, tokenizer_path = build_model(cfg, rt)
    data = prepare_data(cfg, rt, model.config.vocab_size, tokenizer_path)
    choose_trainable(model, cfg)
    optimizer = make_optimizer(model, cfg, rt)
    x, y, _ = get_batch(data, WindowSampler(len(data.train), cfg.seq_len, 0), cfg, rt)
    losses = []
    for _ in range(40):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"40 steps on one batch should halve the loss; got {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_lr_schedule_values():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    lr = [get_lr(s, cfg) for s in range(130)]
    # written a second way: warm-up is a straight line through (0, lr/10) and (9, lr); the cosine
    # is half a period from lr at step 10 to 0.1·lr at step 110.
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3) and lr[10] == pytest.approx(1e-3)
    assert lr[60] == pytest.approx(0.55e-3), "half-way through the decay the rate is the mean of peak and floor"
    assert lr[35] == pytest.approx(1e-4 + 0.9e-3 * math.cos(math.pi / 8) ** 2)
    assert lr[110] == pytest.approx(1e-4) and lr[129] == pytest.approx(1e-4), "after the decay the rate stays at 10%"
    assert all(a >= b for a, b in zip(lr[10:], lr[11:])), "the cosine never rises"


def test_no_weight_decay_on_norms_and_frozen_params_left_out():
    cfg = TrainConfig(lr=0.1, weight_decay=0.1)
    rt = Runtime(torch.device("cpu"))
    torch.manual_seed(0)
    model = Llama(ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16))
    model.tok_embeddings.weight.requires_grad_(False)
    optimizer = make_optimizer(model, cfg, rt)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.tok_embeddings.weight) not in in_optimizer, "a frozen parameter reached the optimiser"
    # Behaviour, not bookkeeping: with zero gradients AdamW's only effect is the decoupled decay
    # p <- p·(1 - lr·wd), so matrices shrink by exactly that factor and norm gains must not move.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in model.named_parameters():
        if "norm" in n:
            assert torch.equal(p, before[n]), f"{n} was decayed"
        elif p.requires_grad:
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.1), msg=f"{n} not decayed by lr·wd")
        else:
            assert torch.equal(p, before[n])


def test_bits_per_byte_counts_the_text_bytes(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path)
    rt = setup_runtime(cfg.device, cfg.dtype)
    model, tokenizer_path = build_model(cfg, rt)
    data = prepare_data(cfg, rt, model.config.vocab_size, tokenizer_path)
    lengths = token_byte_lengths(data.tokenizer)
    for text in ["KING.\nO, pardon me!  ", "naïve café\n\n", "1604"]:
        ids = data.tokenizer.encode(text, bos=False)
        assert lengths[ids].sum() == len(text.encode("utf-8")), text
    val_loss, val_bpb = evaluate(model, data, cfg, rt)
    n = cfg.eval_tokens // cfg.seq_len
    targets = torch.tensor(data.val[1:n * cfg.seq_len + 1].astype("int64")).view(n, cfg.seq_len)
    assert val_bpb == pytest.approx(val_loss * targets.numel() / math.log(2) / lengths[targets.numpy()].sum())


# ---- resume and interruption ---------------------------------------------------------------------


def test_resume_is_bit_exact(corpus, tmp_path):
    train(*tiny_args(corpus, tmp_path / "whole"))
    train(*tiny_args(corpus, tmp_path / "split", "--max_steps", "3", "--decay_steps", "6"))
    train(*tiny_args(corpus, tmp_path / "split", "--resume", "--max_steps", "6"))
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "whole"), "6 steps != 3 steps + resume 3 steps"
    assert last(tmp_path / "split", "val_loss") == last(tmp_path / "whole", "val_loss")
    a, b = load_checkpoint(tmp_path / "whole" / "ckpt"), load_checkpoint(tmp_path / "split" / "ckpt")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), f"{name} differs after resuming"


SAVE_LOOP = """
import sys, torch
from pathlib import Path
from llama_min import Llama, ModelConfig
from llama_min.tokenizer import Tokenizer
from llama_min.training.config import TrainConfig
from llama_min.training.data import WindowSampler
from llama_min.training.optim import make_optimizer
from llama_min.training.runtime import Runtime
from llama_min.training.state import save_model
cfg = TrainConfig(out_dir={out!r})
torch.manual_seed(0)
model = Llama(ModelConfig(dim=64, n_layers=4, n_heads=2, vocab_size=384, multiple_of=16, max_seq_len=32))
optimizer = make_optimizer(model, cfg, Runtime(torch.device("cpu")))
sampler = WindowSampler(1000, 32, 0)
step = 0
while True:  # every checkpoint stamps its step into a weight, so a mix of two saves is detectable
    with torch.no_grad():
        model.norm.weight.fill_(step)
    save_model(Path({out!r}), model, Tokenizer({tok!r}), False,
               train_state={{"step": step, "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict()}})
    if step == 0:
        print("saved", flush=True)
    step += 1
"""


def test_resume_says_which_data_files_changed_and_continues(tmp_path):
    corpus = tmp_path / "corpus"
    data = shakespeare_slice(corpus)
    train(*tiny_args(corpus, tmp_path / "run", "--max_steps", "2"))
    same = train(*tiny_args(corpus, tmp_path / "run", "--resume", "--max_steps", "3"))
    assert "data changed" not in same.out + same.err  # the negative control: nothing changed, nothing said
    with open(data / "train.txt", "a") as f:
        f.write("More lines arrive.\n")
    text = (data / "val.txt").read_text()
    (data / "val.txt").write_text(text[::-1])  # the same bytes in another order: a hash, not a size, notices
    changed = train(*tiny_args(corpus, tmp_path / "run", "--resume", "--max_steps", "4"))
    note = next(line for line in (changed.out + changed.err).splitlines() if "data changed" in line)
    assert "since step 3" in note and "continuing" in note, note
    assert "train.txt changed (60,000 -> 60,019 bytes)" in note and "val.txt changed (same size" in note, note
    assert len(train_losses(tmp_path / "run")) == 4, "the resumed run went on to step 4"


def test_checkpoint_interrupted_mid_write_is_old_or_new(corpus, tmp_path):
    tok = next((corpus / "cache").glob("*/tokenizer.model"), None)
    if tok is None:  # this test may run first: build the cache
        prepare_data(tiny_config(corpus, tmp_path), Runtime(torch.device("cpu")), 384, None)
        tok = next((corpus / "cache").glob("*/tokenizer.model"))
    for delay in (0.05, 0.6):
        out = tmp_path / f"run{delay}" / "ckpt"
        script = SAVE_LOOP.format(out=str(out), tok=str(tok))
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=interruptible)
        try:
            assert child.stdout.readline() == "saved\n", child.stderr.read()
            time.sleep(delay)
            child.send_signal(signal.SIGINT)  # default handler: KeyboardInterrupt wherever the save is
            child.wait(timeout=60)
        finally:
            child.kill()  # after a failure the endless save loop must not outlive the test
        directory = resolve_checkpoint_dir(out)
        state = torch.load(directory / STATE_FILE, weights_only=True)
        model = load_checkpoint(directory)
        assert torch.all(model.norm.weight == state["step"]), (
            f"torn checkpoint: weights of step {model.norm.weight[0].item()} with state of step {state['step']}")


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_and_exits_with_128_plus_its_number(corpus, tmp_path, sig, status):
    """Ctrl-C or a scheduler's SIGTERM: the step ends, the checkpoint is saved, and the exit status is the
    one a shell or job scheduler expects of a process a signal ended (not 0, which reads as success)."""
    args = tiny_args(corpus, tmp_path, "--max_steps", "100000", "--eval_every", "100000")
    child = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in child.stdout:
        if line.startswith("step 3/"):
            break
    child.send_signal(sig)
    out, err = child.communicate(timeout=60)
    assert child.returncode == status, f"saved, then ended by {sig.name}: expected {status}, got {child.returncode}: {err}"
    assert f"{sig.name} at step" in out and "--resume" in out, out
    state = torch.load(resolve_checkpoint_dir(tmp_path / "ckpt") / STATE_FILE, weights_only=True)
    stopped_at = int(out.split(f"{sig.name} at step ")[1].split(":")[0])
    assert state["step"] == stopped_at >= 3


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
    train(*tiny_args(corpus, tmp_path / "big", "--batch_size", "4", "--max_steps", "3"))
    train(*tiny_args(corpus, tmp_path / "acc", "--batch_size", "2", "--grad_accum", "2", "--max_steps", "3"))
    torch.testing.assert_close(train_losses(tmp_path / "acc"), train_losses(tmp_path / "big"), rtol=1e-5, atol=1e-5)


# ---- several processes ---------------------------------------------------------------------------


def test_two_process_ddp_matches_one_process(corpus, tmp_path):
    """torchrun with 2 gloo processes of batch 2 == one process of batch 4: the same global batches,
    gradients averaged, so the same losses up to float summation order."""
    prepare_data(tiny_config(corpus, tmp_path), Runtime(torch.device("cpu")), 384, None)  # warm the cache
    ddp_out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), *tiny_args(corpus, ddp_out, "--batch_size", "2", "--max_steps", "4")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("step 4/4") == 1, "only rank 0 prints"
    train(*tiny_args(corpus, tmp_path / "single", "--batch_size", "4", "--max_steps", "4"))
    torch.testing.assert_close(train_losses(ddp_out), train_losses(tmp_path / "single"), rtol=1e-5, atol=1e-5)
    assert last(ddp_out, "val_loss") == pytest.approx(last(tmp_path / "single", "val_loss"), rel=1e-5)


# ---- bad input -----------------------------------------------------------------------------------


def error_line(argv) -> str:
    run = run_script("train.py", *argv)
    err = run.err.strip()
    assert run.code != 0
    assert "\n" not in err and "Traceback" not in err, f"expected one line, got:\n{err}"
    return err


def test_bad_inputs_give_one_line(corpus, tmp_path):
    assert "unrecognized arguments: --max_stepz" in error_line(["--max_stepz", "3"])
    assert "invalid int value" in error_line(["--max_steps", "three"])
    assert "out of range: --batch_size 0" in error_line(tiny_args(corpus, tmp_path, "--batch_size", "0"))
    missing = tmp_path / "nowhere.txt"
    assert f"data path {missing} does not exist" in error_line(tiny_args(corpus, tmp_path, "--data", str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.txt").write_text("\n\n")
    (empty / "val.txt").write_text("some text\n")
    msg = error_line(tiny_args(corpus, tmp_path, "--data", str(empty)))
    assert "the training split" in msg and "is empty" in msg
    msg = error_line(tiny_args(corpus, tmp_path, "--seq_len", "64", "--max_seq_len", "32"))
    assert "--seq_len 64 exceeds the model's max_seq_len 32" in msg
    assert "expected auto, cpu" in error_line(tiny_args(corpus, tmp_path, "--device", "tpu"))
    assert "needs CUDA" in error_line(tiny_args(corpus, tmp_path, "--dtype", "float16"))
    assert "does not exist" in error_line(tiny_args(corpus, tmp_path, "--resume", "--out_dir", str(tmp_path / "new")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    assert f"{bad}:2: expected an object with a string \"text\" field" in error_line(
        tiny_args(corpus, tmp_path, "--data", str(bad)))


def test_a_nan_training_loss_stops_naming_the_step_and_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    """The model's loss turns NaN at the third training step (forced here): the run stops there, saves
    nothing more, and names the step the kept checkpoint holds (2, with --eval_every 2)."""
    from llama_min import Llama

    forward, calls = Llama.forward, []

    def nan_from_the_third_step(self, tokens, targets=None, **kwargs):
        logits, loss = forward(self, tokens, targets, **kwargs)
        if targets is not None and self.training:
            calls.append(1)
            if len(calls) >= 3:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(Llama, "forward", nan_from_the_third_step)
    msg = error_line(tiny_args(corpus, tmp_path, "--eval_every", "2"))
    assert "training loss is nan at step 3" in msg and "holds step 2" in msg and "lower --lr" in msg, msg
    assert torch.load(tmp_path / "ckpt" / STATE_FILE, weights_only=True)["step"] == 2


def test_jsonl_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first doc"}\n\n{"text": "second", "id": 2}\n')
    assert read_documents(path) == ["first doc", "second"]


# ---- the default run, shortened ------------------------------------------------------------------


def test_default_config_runs_a_few_steps(tmp_path):
    """`python train.py` with nothing changed but its length: shipped data, tiny preset, own tokenizer."""
    run = train("--max_steps", "2", "--eval_every", "2", "--eval_tokens", "2048", "--sample_tokens", "8",
                "--log_every", "1", "--out_dir", str(tmp_path))
    assert "--- sample (greedy) ---" in run.out and "--- sample (temperature 0.8) ---" in run.out
    records = metrics(tmp_path)
    assert records[-1]["step"] == 2 and math.isfinite(last(tmp_path, "val_bpb"))
    assert train_losses(tmp_path)[0] == pytest.approx(math.log(PRESETS[TrainConfig().model]["vocab_size"]), rel=0.05), (
        "a fresh model should start near the uniform loss ln(vocab)")
    assert set(records[0]) == {"step", "train_loss", "val_loss", "val_bpb", "dev_accuracy", "lr", "tokens_per_s", "elapsed_s"}
    assert (tmp_path / "loss.png").stat().st_size > 0 and f"loss curve: {tmp_path / 'loss.png'}" in run.out
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.model", STATE_FILE]


def test_help_explains_every_flag():
    help_text = build_parser().format_help()
    for f in fields(TrainConfig):
        if f.metadata.get("help"):
            assert f"--{f.name}" in help_text
    for flag in ("--max_steps", "--batch_size", "--grad_accum", "--lr", "--out_dir", "--resume", "--device",
                 "--dtype", "--seed", "--data", "--eval_every", "--init_from", "--method", "--dim", "--compile"):
        assert flag in help_text, flag
