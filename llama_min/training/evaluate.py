"""Held-out measurement: the loss and bits per byte of plain text, the answer loss of instruction data.

Work is shared out across ranks and the sums added up, so every process count gives the same figure.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..cli import DataError
from ..finetune.instructions import instruction_batch
from ..model import IGNORE_INDEX, Llama
from .config import TrainConfig
from .data import Data, batch_images, windows
from .distributed import unsharded
from .runtime import Runtime


def evaluate(model: Llama, data: Data, cfg: TrainConfig, rt: Runtime) -> tuple[float, float | None]:
    """Mean held-out loss per token (nats) and bits per byte; for instruction data the answer loss and
    None (the answers are a sliver of the text; a per-byte figure means little). A model sharded with
    --fsdp is gathered whole on every process meanwhile: their shares differ by a batch."""
    with unsharded(model):
        if data.is_instructions:
            return answer_loss(model, data.val, data.tokenizer.eos_id, cfg.batch_size, rt, data.image_features), None
        return bits_per_byte(model, data.val, data.byte_lengths, cfg.seq_len, cfg.batch_size, cfg.eval_tokens, rt)


def bits_per_byte(model: Llama, tokens: np.ndarray, byte_lengths: np.ndarray, seq_len: int, batch_size: int,
                  max_tokens: int, rt: Runtime) -> tuple[float, float]:
    """Mean loss per token (nats) and bits per byte over consecutive windows of a token stream.

    bits per byte = total nats / ln 2 / total UTF-8 bytes of the predicted text: a figure that does not
    depend on the tokenizer, since a coarser vocabulary predicts fewer, longer tokens.
    tokens: (N,) ids; byte_lengths: (vocab_size,) bytes of text per token (data.token_byte_lengths).
    """
    n_windows = min(len(tokens) - 1, max_tokens) // seq_len
    if n_windows == 0:
        raise DataError(f"the held-out split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                        "give more held-out text or a smaller --seq_len")
    mine = np.arange(rt.rank, n_windows, rt.world_size) * seq_len
    batches = []
    for i in range(0, len(mine), batch_size):
        x, y = windows(tokens, mine[i:i + batch_size], seq_len)
        batches.append((torch.from_numpy(x), torch.from_numpy(y), None, int(byte_lengths[y].sum())))
    nats, n_tokens, n_bytes = summed_loss(model, batches, rt)
    return nats / n_tokens, nats / math.log(2) / n_bytes


def answer_loss(model: Llama, examples: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                rt: Runtime | None = None, image_features: dict[str, torch.Tensor] | None = None) -> float:
    """Mean cross-entropy per answer token (EOS included) of encoded instruction examples given their
    prompts (and images: image_features by the id each example carries third): the loss fine-tuning
    minimises, measured on held-out records."""
    rt = rt or Runtime(model.tok_embeddings.weight.device)
    mine = np.arange(rt.rank, len(examples), rt.world_size)
    picks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    batches = [(*instruction_batch(examples, p, pad_id), batch_images(image_features, examples, p), 0) for p in picks]
    nats, n_answer, _ = summed_loss(model, batches, rt)
    return nats / n_answer


@torch.no_grad()
def summed_loss(model: Llama, batches: list[tuple], rt: Runtime) -> list[float]:
    """The loss (nats), the target tokens and the bytes of text, each summed over this process's
    ``batches`` of (inputs, targets, images or None, bytes of the targets' text) and over every process,
    in evaluation mode (no dropout or noise)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)
    for x, y, images, n_bytes in batches:
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast():
            logits, _ = model(x, images=None if images is None else images.to(rt.device))
        totals[0] += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum").double()
        totals[1] += (y != IGNORE_INDEX).sum()
        totals[2] += n_bytes
    if rt.world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    return totals.tolist()
