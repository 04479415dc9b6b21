"""What the loop trains on: two kinds of data, one loop.

Plain text is one long stream of token ids (corpus.py) cut into random windows; instruction data is a
list of encoded Alpaca records, each a whole sequence with its prompt masked out of the loss
(finetune/instructions.py). Only the batches, the evaluation and the sampler's length differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..cli import DataError, UsageError
from ..finetune.images import ImageRecord, read_image_records
from ..finetune.instructions import InstructionRecord, encode_record, encode_records, instruction_batch, read_records
from ..finetune.perturb import perturb_records
from ..model import IGNORE_INDEX
from ..peft.visual import load_encoder
from ..tokenizer import Tokenizer, load_tokenizer
from .config import TrainConfig
from .corpus import split_documents, token_byte_lengths, tokenize_to_memmap, train_tokenizer
from .runtime import Runtime

DEV_ANSWER_TOKENS = 16  # --dev_every generates answers this long at most, as experiments/evaluate.py does


def is_instruction_data(path: str | Path) -> bool:
    """Instruction data is a .json file (a list of records) or a .jsonl file whose first record has an
    "instruction" field; anything else (.txt, .jsonl of {"text"}, a directory) is plain text."""
    path = Path(path)
    if path.is_dir() and (path / "train.jsonl").is_file() and is_instruction_data(path / "train.jsonl"):
        raise DataError(f"{path} holds instruction records; pass the file itself (--data {path / 'train.jsonl'}): "
                        "instruction data is one .json/.jsonl file, its last --val_fraction held out")
    if not path.is_file() or path.suffix not in (".json", ".jsonl"):
        return False
    if path.suffix == ".json":
        return True  # plain text never comes as .json
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False  # read_documents will say what is wrong with the file
    return isinstance(record, dict) and "instruction" in record


@dataclass
class Data:
    tokenizer: Tokenizer
    train: np.ndarray | list  # (N_train,) token ids, or instruction examples [(tokens, targets), ...]
    val: np.ndarray | list  # (N_val,) token ids, or instruction examples
    byte_lengths: np.ndarray | None  # (vocab_size,) UTF-8 bytes per token, for bits per byte (plain text only)
    dev: list[InstructionRecord] | None = None  # instruction data: the held-out records themselves (--dev_every)
    # image-instruction data (--image_root): the frozen encoder, and every record's image features,
    # computed once (image id -> (C_v,)); examples then carry their image id third: (tokens, targets, id)
    image_encoder: object | None = None
    image_features: dict[str, torch.Tensor] | None = None

    @property
    def is_instructions(self) -> bool:
        """Instruction records (no byte lengths: bits per byte is a plain-text measure), not plain text."""
        return self.byte_lengths is None


def prepare_instructions(cfg: TrainConfig, tokenizer_path: Path | None, say) -> Data:
    """Alpaca records, the last val_fraction of them held out, encoded with the base's tokenizer.
    A record longer than seq_len tokens is dropped whole (instructions.py explains why) and counted."""
    if tokenizer_path is None:
        raise UsageError("instruction data needs the tokenizer of the model it fine-tunes: pass --init_from "
                         "(a checkpoint with its tokenizer.model) or --tokenizer")
    tokenizer = load_tokenizer(tokenizer_path)
    records = read_image_records(cfg.data, cfg.image_root) if cfg.image_root else read_records(cfg.data)
    if len(records) < 2:
        raise DataError(f"{cfg.data} holds {len(records)} record; at least 2 are needed (one is held out)")
    cut = len(records) - max(1, round(len(records) * cfg.val_fraction))
    # --perturb: text-level augmentation of the training prompts only (perturb.py); the held-out records
    # stay clean, so the held-out loss measures the same thing with and without it.
    train_records = perturb_records(records[:cut], cfg.perturb, cfg.seed) if cfg.perturb else records[:cut]

    def encode(records: list) -> tuple[list, int]:  # the records that fit in --seq_len, and how many did not
        examples, dropped = encode_records(records, tokenizer, cfg.seq_len)
        if cfg.image_root:  # each example carries its record's image id third
            fitting = [r for r in records if len(encode_record(r, tokenizer)[0]) <= cfg.seq_len]
            examples = [(*example, r.image) for example, r in zip(examples, fitting)]
        return examples, dropped

    (train_examples, dropped_train), (val_examples, dropped_val) = encode(train_records), encode(records[cut:])
    if dropped_train or dropped_val:
        say(f"dropped {dropped_train} training and {dropped_val} held-out records longer than --seq_len {cfg.seq_len}")
    data = Data(tokenizer, train_examples, val_examples, None, dev=records[cut:])
    if cfg.image_root:
        encode_images(data, records, cfg, say)
    return data


def encode_images(data: Data, records: list[ImageRecord], cfg: TrainConfig, say) -> None:
    """Load the frozen image encoder and compute every record's image features once: the encoder never
    trains, so the loop reads them from memory (the paper's frozen CLIP, section 4.3)."""
    encoder = load_encoder(cfg.image_encoder or "lab")
    ids = sorted({r.image for r in records})
    data.image_encoder = encoder
    data.image_features = dict(zip(ids, encoder.features(cfg.image_root, ids)))
    say(f"images: {len(ids)} encoded by {encoder.spec} into {encoder.dim} features each (frozen, computed once)")


def batch_images(image_features: dict[str, torch.Tensor] | None, examples: list, indices) -> torch.Tensor | None:
    """(B, C_v) image features of the chosen examples (each carries its image id third), or None for text."""
    if image_features is None:
        return None
    return torch.stack([image_features[examples[i][2]] for i in indices])


def prepare_data(cfg: TrainConfig, rt: Runtime, vocab_size: int, tokenizer_path: Path | None) -> Data:
    """Tokenizer and token files, built once by rank 0 while the others wait, then opened by all."""
    if is_instruction_data(cfg.data):
        return prepare_instructions(cfg, tokenizer_path, rt.say)
    if cfg.perturb:
        raise UsageError(f"--perturb {cfg.perturb} edits instruction records, but {cfg.data} is plain text; "
                         "drop --perturb or pass a .json/.jsonl file of instruction records")
    if cfg.dev_every:
        raise UsageError(f"--dev_every {cfg.dev_every} scores exact-match answers to held-out instruction records, but "
                         f"{cfg.data} is plain text; pass instruction data, or rely on --eval_every's held-out loss")
    train_docs, val_docs = split_documents(cfg.data, cfg.val_fraction)
    cache = Path(cfg.cache_dir)
    if rt.world_size > 1 and not rt.master:
        dist.barrier()  # until rank 0 has built what the cache lacks; then read it
    tok = load_tokenizer(tokenizer_path) if tokenizer_path else train_tokenizer(train_docs, cache, vocab_size)
    data = Data(tok, tokenize_to_memmap(train_docs, tok, cache, "train"), tokenize_to_memmap(val_docs, tok, cache, "val"),
                token_byte_lengths(tok))
    if rt.world_size > 1 and rt.master:
        dist.barrier()  # built: the other processes may read it
    return data


def make_sampler(data: Data, cfg: TrainConfig) -> WindowSampler:
    """Random window starts in the token stream, or random record indices (windows of length 0)."""
    return WindowSampler(len(data.train), 0 if data.is_instructions else cfg.seq_len, cfg.seed)


def dev_split(data: Data, cfg: TrainConfig, max_seq_len: int) -> list[InstructionRecord]:
    """--dev_every's records: the first --dev_records held-out records whose prompt leaves room in the
    model's context for a DEV_ANSWER_TOKENS answer. Kept small, the score costs a few batches of greedy
    decoding, so it can run often."""
    room = max_seq_len - DEV_ANSWER_TOKENS
    fits = [r for r in data.dev if len(data.tokenizer.encode(r.prompt(), bos=True)) <= room]
    if not fits:
        raise UsageError(f"--dev_every: no held-out record's prompt fits in {room} tokens (max_seq_len {max_seq_len} "
                         f"minus a {DEV_ANSWER_TOKENS}-token answer); use shorter records or a larger --val_fraction")
    return fits[:cfg.dev_records]


def get_batch(data: Data, sampler: WindowSampler, cfg: TrainConfig,
              rt: Runtime) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inputs, targets and images for this rank, on its device: (batch_size, seq_len) windows of the
    token stream, or (batch_size, longest) instruction examples padded on the right (targets
    IGNORE_INDEX); images (batch_size, C_v) for image-instruction data, else None."""
    picks = sampler.starts(cfg.batch_size, rt.rank, rt.world_size)
    if data.is_instructions:
        x, y = instruction_batch(data.train, picks, data.tokenizer.eos_id)
    else:
        x, y = map(torch.from_numpy, windows(data.train, picks, cfg.seq_len))
    images = batch_images(data.image_features, data.train, picks)  # (None for text)
    if rt.device.type == "cuda":  # pinned memory lets the copy overlap with compute
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True), (
        None if images is None else images.to(rt.device))


def count_targets(batches: list[tuple[torch.Tensor, ...]], rt: Runtime) -> torch.Tensor:
    """How many target tokens count in the loss over a step's micro-batches on every process: the mean
    of the step's loss is taken over all of them, so that N micro-batches of B rows give exactly the loss
    and gradient of one batch of N·B rows, even when the rows hold answers of different lengths."""
    total = sum((y != IGNORE_INDEX).sum() for _, y, *_ in batches).double()
    if rt.world_size > 1:
        dist.all_reduce(total)
    return total


# ---- random windows of the token stream ---------------------------------------------------------------


class WindowSampler:
    """Random window starts for every step, reproducible and resumable.

    Every process draws the same *global* batch of starts from the same seeded generator and keeps
    its own rows, so ranks see different windows, and N processes with batch B see exactly the
    batches one process with batch N·B sees. ``state_dict`` captures the generator for --resume.
    """

    def __init__(self, n_tokens: int, seq_len: int, seed: int):
        if n_tokens < seq_len + 1:
            raise DataError(f"the training split has {n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                            "give more text or a smaller --seq_len")
        self.n_windows = n_tokens - seq_len  # window i covers tokens i .. i+seq_len
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def starts(self, batch_size: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """(batch_size,) window starts for this rank."""
        global_starts = self.rng.integers(0, self.n_windows, size=batch_size * world_size)
        return global_starts[rank * batch_size:(rank + 1) * batch_size]

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets, each (len(starts), seq_len) int64."""
    rows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    return rows[:, :-1], rows[:, 1:]
