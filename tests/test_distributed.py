"""Training across processes and in less memory: FSDP2 under torchrun (two gloo processes on the CPU)
agrees with one process, writes checkpoints a plain process loads, and resumes to the bit; activation
checkpointing leaves every gradient as it was; each process draws its own noise; a signal stops every
process with a checkpoint and the status a scheduler expects.

torchrun runs are the expensive part (two interpreters each): the runs are shared through module
fixtures, and every model is tiny."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_min import Llama, ModelConfig, generate
from llama_min.checkpoint import STATE_FILE, load_checkpoint
from llama_min.peft import PeftConfig, apply_peft
from llama_min.tokenizer import Tokenizer
from llama_min.training.distributed import checkpoint_activations, seed_process
from llama_min.training.runtime import Runtime
from conftest import DEV_RECORDS, EXPECTED_ACCURACY
from scripts import ROOT, last, metrics, run_script, shakespeare_slice, train, train_losses

TINY = ["--dim", "32", "--n_layers", "2", "--n_heads", "2", "--n_kv_heads", "1", "--vocab_size", "384",
        "--multiple_of", "16"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    shakespeare_slice(root)
    train(*args(root, root / "warm", "--max_steps", "1", "--eval_every", "1"))  # the token cache, built once
    return root


def args(corpus, out_dir, *extra, model=TINY):
    return [*model, "--data", corpus / "data", "--cache_dir", corpus / "cache", "--out_dir", out_dir, "--seq_len", "32",
            "--batch_size", "8", "--max_steps", "40", "--warmup_steps", "4", "--lr", "3e-3", "--log_every", "1",
            "--eval_every", "20", "--eval_tokens", "1024", "--sample_tokens", "0", *extra]


def torchrun(*argv, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ROOT / "train.py",
           *argv]
    done = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def single(corpus):
    """One process, batch 8, 40 steps: the reference, and the base the LoRA runs fine-tune."""
    out = corpus / "single"
    train(*args(corpus, out, "--sample_tokens", "12"))
    return out


@pytest.fixture(scope="module")
def sharded(corpus):
    """Two processes under --fsdp, each 2 micro-batches of 2 (the same 8 rows a step), 40 steps."""
    out = corpus / "fsdp"
    run = torchrun(*args(corpus, out, "--fsdp", "--batch_size", "2", "--grad_accum", "2", "--sample_tokens", "12"))
    return out, run.stdout


def greedy_sample(stdout: str) -> str:
    return stdout.split("--- sample (greedy) ---\n")[1].split("\n--- sample")[0]


def assert_same_tensors(a: dict, b: dict, tolerance: float, what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tolerance, msg=f"{what}: {name}")


def test_fsdp_on_two_processes_matches_one_process(single, sharded):
    """The same 8 rows a step, split over two processes and two micro-batches with the gradient
    reduce-scattered at the last one only, give one process's losses and weights (float summation
    order apart) after 40 steps."""
    out, stdout = sharded
    assert stdout.count("step 40/40") == 1, "only rank 0 prints"
    torch.testing.assert_close(train_losses(out), train_losses(single), rtol=0, atol=1e-5)
    assert last(out, "val_loss") == pytest.approx(last(single, "val_loss"), abs=1e-5)
    assert_same_tensors(load_checkpoint(out / "ckpt").state_dict(), load_checkpoint(single / "ckpt").state_dict(),
                        1e-5, "weights after 40 steps")


def test_an_fsdp_checkpoint_loads_in_a_plain_process_and_generates_the_same_text(sharded):
    """The sharded run gathers its weights into the one-process format: a plain load (no process group)
    greedily continues the prompt exactly as the sharded model did at the end of its run."""
    out, stdout = sharded
    assert (out / "ckpt" / "config.json").is_file() and (out / "ckpt" / "model.safetensors").is_file()
    model = load_checkpoint(out / "ckpt")
    tokenizer = Tokenizer(next((out / "ckpt").glob("tokenizer.*")))
    prompt = tokenizer.encode("", bos=True)
    new = generate(model, [prompt], 12, temperature=0.0, stop_ids=[tokenizer.eos_id], seed=1337, truncate=True,
                   bos_id=tokenizer.bos_id)[0]
    assert tokenizer.decode(prompt) + tokenizer.decode(new) == greedy_sample(stdout)
    script = run_script("generate.py", "--checkpoint", out / "ckpt", "--prompt", "", "--max_new_tokens", "12",
                        "--temperature", "0")
    assert script.code == 0 and tokenizer.decode(new) in script.out, script.err


def test_fsdp_resume_is_bit_exact(corpus, sharded):
    """20 steps, then --resume to 40, under --fsdp: the uninterrupted run's losses and weights to the bit
    (the optimiser state was gathered by parameter name and sharded again on load)."""
    out, _ = sharded
    halves = corpus / "fsdp_halves"
    common = ["--fsdp", "--batch_size", "2", "--grad_accum", "2", "--decay_steps", "40"]
    torchrun(*args(corpus, halves, *common, "--max_steps", "20"))
    saved = torch.load(halves / "ckpt" / STATE_FILE, weights_only=True)
    assert "layers.0.attention.wq.weight" in saved["optimizer"]["state"], "AdamW state keyed by parameter name"
    torchrun(*args(corpus, halves, *common, "--resume"))
    assert train_losses(halves) == train_losses(out)
    for (name, p), q in zip(load_checkpoint(out / "ckpt").state_dict().items(),
                            load_checkpoint(halves / "ckpt").state_dict().values()):
        assert torch.equal(p, q), f"{name} differs after resuming"


def test_fsdp_lora_matches_one_process(corpus, single):
    """Frozen base tensors and trainable LoRA tensors in the same sharded blocks: two processes of 4 rows
    give one process of 8 rows; the checkpoint holds the adapter only, as on one process. (No dropout:
    each process draws its own masks, so two processes cannot draw one process's.) 40 steps, as for full
    fine-tuning. --merge gathers the sharded model to rank 0 and writes the same merged checkpoint."""
    lora = ["--init_from", single / "ckpt", "--method", "lora", "--lora_dropout", "0", "--merge"]
    torchrun(*args(corpus, corpus / "lora_fsdp", *lora, "--fsdp", "--batch_size", "4", model=[]))
    train(*args(corpus, corpus / "lora_single", *lora, model=[]))
    torch.testing.assert_close(train_losses(corpus / "lora_fsdp"), train_losses(corpus / "lora_single"),
                               rtol=0, atol=1e-5)
    sharded, plain = (load_file(corpus / run / "peft" / "peft.safetensors") for run in ("lora_fsdp", "lora_single"))
    assert sharded and all("lora_" in name for name in sharded), "only the adapter is saved"
    assert_same_tensors(sharded, plain, 1e-5, "LoRA tensors after 40 steps")
    merged, merged_plain, base = (load_checkpoint(path).state_dict() for path in (
        corpus / "lora_fsdp" / "merged", corpus / "lora_single" / "merged", single / "ckpt"))
    assert_same_tensors(merged, merged_plain, 1e-5, "--merge's checkpoint")
    assert not torch.equal(merged["layers.0.attention.wq.weight"], base["layers.0.attention.wq.weight"]), \
        "the merged checkpoint holds the base weights (control)"


def test_fsdp_l2sp_matches_one_process(corpus, single):
    """--l2sp under --fsdp: the anchors θ₀ are taken after sharding, so each process holds and pulls its
    1/N of every tensor; two processes of 4 rows give one process of 8. The pull is real: without --l2sp
    the weights end elsewhere (the control)."""
    common = ["--init_from", single / "ckpt", "--method", "full", "--weight_decay", "0", "--max_steps", "10",
              "--eval_every", "10"]
    torchrun(*args(corpus, corpus / "l2sp_fsdp", *common, "--l2sp", "5", "--fsdp", "--batch_size", "4", model=[]))
    train(*args(corpus, corpus / "l2sp_single", *common, "--l2sp", "5", model=[]))
    train(*args(corpus, corpus / "no_l2sp", *common, model=[]))
    torch.testing.assert_close(train_losses(corpus / "l2sp_fsdp"), train_losses(corpus / "l2sp_single"),
                               rtol=0, atol=1e-5)
    sharded, plain, free = (load_checkpoint(corpus / run / "ckpt").state_dict()
                            for run in ("l2sp_fsdp", "l2sp_single", "no_l2sp"))
    assert_same_tensors(sharded, plain, 1e-5, "weights after 10 steps with --l2sp")
    assert max((plain[k] - free[k]).abs().max() for k in plain) > 1e-3, "--l2sp 5 changed nothing (control)"


def test_fsdp_dev_scores_are_the_known_scores(crafted, tmp_path):
    """--dev_every under --fsdp scores the whole model (rank 0, gathered on every process): on the crafted
    records the unchanged base (--lr 0) scores exactly 3/8 at every evaluation, and every process stops
    after --patience evaluations without improvement, as one process does."""
    common = ["--init_from", crafted["base_dir"], "--method", "lora", "--data", crafted["path"], "--val_fraction",
              "0.3333", "--seq_len", "160", "--lr", "0", "--max_steps", "10", "--eval_every", "100", "--dev_every", "1",
              "--patience", "2", "--dev_records", str(DEV_RECORDS), "--sample_tokens", "0"]
    torchrun(*common, "--fsdp", "--batch_size", "2", "--out_dir", tmp_path / "fsdp")
    train(*common, "--batch_size", "4", "--out_dir", tmp_path / "single")
    for run in ("fsdp", "single"):
        scores = [r["dev_accuracy"] for r in metrics(tmp_path / run) if r["dev_accuracy"] is not None]
        assert scores == [EXPECTED_ACCURACY] * 3, f"{run}: {scores}"


def test_fsdp_dev_selection_and_early_stopping_match_one_process(word_bench, tmp_path):
    """--dev_every under --fsdp: rank 0 scores the model gathered whole on every process, every process
    joins in saving the best adapter, all stop after the same evaluation, and --merge folds in the best
    adapter, not the last one: the same scores, choices, best adapter and merged weights as one process."""
    common = ["--init_from", word_bench / "base" / "ckpt", "--method", "lora", "--lora_dropout", "0", "--merge",
              "--data", word_bench / "benchmark" / "instructions" / "train.jsonl", "--seq_len", "160",
              "--max_steps", "40", "--warmup_steps", "2", "--lr", "1e-2", "--log_every", "5", "--eval_every", "40",
              "--dev_every", "5", "--dev_records", "8", "--patience", "2", "--sample_tokens", "0"]
    torchrun(*common, "--fsdp", "--batch_size", "2", "--out_dir", tmp_path / "fsdp")
    train(*common, "--batch_size", "4", "--out_dir", tmp_path / "single")
    runs = {name: tmp_path / name for name in ("fsdp", "single")}
    scores = {name: [r["dev_accuracy"] for r in metrics(out) if r["dev_accuracy"] is not None] for name, out in runs.items()}
    assert scores["fsdp"] == scores["single"] and len(scores["single"]) >= 3, scores
    chosen = {name: json.loads((out / "early_stopping.json").read_text()) for name, out in runs.items()}
    assert chosen["fsdp"]["chosen_step"] == chosen["single"]["chosen_step"], chosen
    assert chosen["fsdp"]["stopped_at"] == chosen["single"]["stopped_at"] < 40, chosen
    best, best_plain, last_saved = (load_file(out / "peft.safetensors") for out in (
        runs["fsdp"] / "best", runs["single"] / "best", runs["single"] / "peft"))
    assert_same_tensors(best, best_plain, 1e-5, "the best dev adapter")
    assert not all(torch.equal(best_plain[k], last_saved[k]) for k in best_plain), "best and last adapters (control)"
    assert_same_tensors(load_checkpoint(runs["fsdp"] / "merged").state_dict(),
                        load_checkpoint(runs["single"] / "merged").state_dict(), 1e-5, "--merge of the best adapter")


def test_fsdp_without_torchrun_is_one_clear_line(corpus, tmp_path):
    run = run_script("train.py", *args(corpus, tmp_path, "--fsdp"))
    err = run.err.strip()
    assert run.code == 1 and "\n" not in err and "--fsdp shards the model across the processes torchrun starts" in err


# ---- activation checkpointing ----------------------------------------------------------------------


def method_model(method: str) -> Llama:
    torch.manual_seed(0)
    model = Llama(ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                              max_seq_len=32))
    if method == "partial":
        model.requires_grad_(False)
        model.layers[-1].requires_grad_(True)
    elif method != "full":  # LoRA with dropout: the recomputed forward must draw the same masks
        extra = {"lora": {"lora_dropout": 0.3}, "adapter": {"adapter_layers": 2}}.get(method, {})
        apply_peft(model, PeftConfig(method=method, **extra))
        for p in model.parameters():  # the new branches start at zero: move them, so that they carry gradient
            if p.requires_grad:
                p.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("method", ["full", "partial", "adapter", "lora", "bottleneck"])
def test_activation_checkpointing_gives_the_same_gradients(method):
    """Recomputing every block in backward gives exactly the gradients of keeping the activations, for
    every method; and the blocks really keep less (autograd saves fewer bytes)."""
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    grads, saved = [], []
    for recompute in (False, True):
        model = method_model(method).train()
        if recompute:
            checkpoint_activations(model)
        nbytes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: nbytes.append(t.nbytes) or t, lambda t: t):
            torch.manual_seed(2)
            loss = model(tokens[:, :-1], tokens[:, 1:])[1]
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        saved.append(sum(nbytes))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), f"{method}: {name}'s gradient changed"
    assert saved[1] < saved[0] / 2, f"{method}: checkpointed blocks saved {saved[1]} bytes, plain {saved[0]}"


# ---- each process its own noise; signals -----------------------------------------------------------


def test_each_process_draws_its_own_noise():
    """Under torchrun the ranks' generators part from one another (dropout masks and NEFTune noise
    differ), repeatably from --seed; one process keeps its stream untouched."""
    draws = []
    for rank in (0, 1, 1):
        torch.manual_seed(7)
        seed_process(1337, Runtime(torch.device("cpu"), rank=rank, world_size=2))
        draws.append(torch.rand(8))
    assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[1], draws[2])
    torch.manual_seed(7)
    expected = torch.rand(8)
    torch.manual_seed(7)
    seed_process(1337, Runtime(torch.device("cpu")))
    assert torch.equal(torch.rand(8), expected)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_one_process_stops_both_with_a_checkpoint_and_status_143(corpus, tmp_path):
    """The two processes torchrun would start (its environment set by hand, so that each one's exit status
    is visible): SIGTERM, as a scheduler sends it, reaching only rank 1 still stops both after the same
    step, rank 0 saves, and both exit with 128 + 15."""
    port = free_port()
    procs = [subprocess.Popen(list(map(str, [sys.executable, ROOT / "train.py", *args(
        corpus, tmp_path, "--fsdp", "--max_steps", "100000", "--eval_every", "100000")])),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port)}) for r in (0, 1)]
    for line in procs[0].stdout:
        if line.startswith("step 3/"):
            break
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [err[-1500:] for _, err in outs]
    stopped_at = int(outs[0][0].split("SIGTERM at step ")[1].split(":")[0])
    assert torch.load(tmp_path / "ckpt" / STATE_FILE, weights_only=True)["step"] == stopped_at >= 3


def test_ctrl_c_under_torchrun_saves_and_leaves_no_process_behind(corpus, tmp_path):
    """Ctrl-C in the terminal: SIGINT to torchrun and its workers (one process group). The workers finish
    their step, rank 0 saves, everything ends promptly, and no worker outlives torchrun. (torchrun reports
    the signal itself and exits with status 1; the workers' own status is 130.)"""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ROOT / "train.py",
           *args(corpus, tmp_path, "--fsdp", "--max_steps", "100000", "--eval_every", "100000")]
    child = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                             start_new_session=True)  # its own process group, as a terminal's foreground job
    for line in child.stdout:
        if line.startswith("step 3/"):
            break
    os.killpg(child.pid, signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode != 0 and "SIGINT at step" in out, err[-1500:]
    stopped_at = int(out.split("SIGINT at step ")[1].split(":")[0])
    assert torch.load(tmp_path / "ckpt" / STATE_FILE, weights_only=True)["step"] == stopped_at >= 3
    left = [p for p in Path("/proc").glob("[0-9]*") if str(tmp_path).encode() in read_bytes(p / "cmdline")]
    assert not left, f"processes left behind: {left}"


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a process that ended meanwhile
        return b""
