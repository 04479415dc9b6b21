"""Autoregressive generation with the KV cache: prefill once, then decode one token at a time.

    prompt ids ──prefill (one pass, fused causal attention)──> logits of the last position
    repeat:  pick a token (greedy or sampled) ──> one-token forward through the cache ──> logits

The model computes the keys and values of the whole prompt in one pass and stores them in its
preallocated cache (kv_cache.py); every later step feeds only the newest token, reads the earlier keys
and values from the cache and sends only that one position through the output head. Nothing is
allocated per token except that token's activations.

Batches of prompts of different lengths are *left*-padded so that every row's next token sits in the
same cache slot; ``pad_lens`` tells the model how much padding each row has, so that row b's first real
token gets rotary position 0 and no row ever attends to padding (model.py, attention.py). Greedy output
of a prompt is therefore the same whether it is generated alone or in a batch.

Choosing the next token from the logits z (one row of the vocabulary):
  greedy       argmax z                                  (temperature 0)
  temperature  sample from softmax(z / T)                (Ackley et al. 1985; T → 0 approaches greedy)
  top-k        keep the k largest z, then sample         (Fan et al. 2018, "Hierarchical Neural Story
                                                          Generation", section 5.4)
  top-p        keep the smallest set of tokens whose probability adds up to at least p, then sample
               (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", section 3.1)

This file works on token ids only. Stop *strings* need text, so they live in ``TextStream`` at the end of
this file, which turns a row's ids into text for a tokenizer (generate.py uses it).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .model import Llama


# ---- choosing the next token ------------------------------------------------------------------------

def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits (B, V) -> the same with everything below the k-th largest value of each row set to -inf."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """logits (B, V) -> the same with every token outside the nucleus set to -inf.

    The nucleus is the smallest set of most probable tokens whose total probability is at least p:
    walking down the sorted probabilities, a token is kept while the mass *before* it is still below p,
    so the most probable token is always kept.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def choose_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits: float32 (B, V) for the last position -> next token ids (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ---- memory layout for decoding ---------------------------------------------------------------------

@torch.no_grad()
def store_weights_column_major(model: nn.Module) -> nn.Module:
    """Keep every weight matrix's shape and values but store it transposed in memory; returns the model.

    Why: a decode step multiplies one activation row by every weight, y = x Wᵀ, a matrix-vector product
    whose speed is the speed of reading W. With nn.Linear's row-major W each output is a dot product
    along a row, and the CPU BLAS kernel for that shape reads memory at well under the machine's
    bandwidth (benchmarks/decode.py measures both; docs/results.md has the figures); with W
    stored column-major, x Wᵀ is a vector times a row-major matrix, which streams through memory. The
    numbers are the same tensors, so the model's outputs are unchanged up to float rounding
    (tests/test_generation.py). Large-batch matrix products (training, long prefills) prefer the
    default layout, so this is a step taken for generation, explicitly, never a side effect of it.
    Tensors in this layout are not contiguous: call ``.contiguous()`` before ``.view`` on them.
    """
    for p in model.parameters():  # a tied embedding / output head is one parameter, visited once
        if p.dim() == 2:
            p.data = p.data.t().contiguous().t()
    return model


# ---- checking the request ---------------------------------------------------------------------------

def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse a request that cannot be sampled, naming the argument (a NaN temperature would otherwise
    fail deep inside torch.multinomial)."""
    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1 (an integer), got {max_new_tokens!r}")
    if not 0 <= temperature < float("inf"):  # also false for NaN
        raise ValueError(f"temperature must be >= 0 and finite (0 means greedy), got {temperature}")
    if top_k is not None and (type(top_k) is not int or top_k < 1):
        raise ValueError(f"top_k must be a positive number of tokens (or None for no limit), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {top_p}")


def check_prompts(prompts, vocab_size: int) -> None:
    """Prompts are a list of token-id lists, each id in the vocabulary: the usual mistakes (a string, a
    tensor, one flat list of ids) are named with the call that fixes them."""
    if isinstance(prompts, str) or isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], str):
        raise TypeError("prompts are token ids, not text: pass [tokenizer.encode(text)]")
    if isinstance(prompts, torch.Tensor):
        raise TypeError(f"prompts must be lists of token ids, got a tensor of shape {tuple(prompts.shape)}: pass "
                        "tensor.tolist() for a (B, T) tensor, [tensor.tolist()] for a (T,) one")
    if not isinstance(prompts, Sequence) or not all(isinstance(p, Sequence) for p in prompts):
        raise TypeError("prompts must be a list of token-id lists (one per prompt), e.g. [tokenizer.encode(text)]")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with the tokenizer's BOS id)")
    if not all(type(t) is int for p in prompts for t in p):
        raise TypeError("token ids must be Python ints: pass tensor.tolist() rather than a list of tensors")
    bad = sorted({t for p in prompts for t in p if not 0 <= t < vocab_size})
    if bad:
        raise ValueError(f"prompt token ids {bad[:10]} are outside the model's vocabulary of {vocab_size}; "
                         "was the prompt encoded with this checkpoint's tokenizer?")


def fit_context(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_seq_len: int,
                truncate: bool = False, bos_id: int | None = None) -> list[list[int]]:
    """Check that every prompt plus max_new_tokens fits in the model's max_seq_len.

    With ``truncate`` a prompt that is too long keeps only its last tokens (the most recent context,
    which matters most for the continuation), after its first token when that is ``bos_id``: the model
    was trained on sequences that begin with BOS. Without ``truncate`` it is an error naming the numbers.
    """
    if max_new_tokens >= max_seq_len:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in this model's "
                         f"context of max_seq_len {max_seq_len}; ask for fewer new tokens")
    room = max_seq_len - max_new_tokens
    fitted = []
    for i, prompt in enumerate(prompts):
        prompt = list(prompt)
        if len(prompt) > room:
            if not truncate:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens {max_new_tokens} "
                                 f"that is {len(prompt) + max_new_tokens} positions, more than the model's "
                                 f"max_seq_len {max_seq_len}: shorten the prompt, ask for fewer new tokens, "
                                 "or allow truncation of the prompt's start (truncate=True; generate.py --truncate)")
            head = prompt[:1] if bos_id is not None and prompt[0] == bos_id and room > 1 else []
            prompt = head + prompt[len(prompt) - (room - len(head)):]
        fitted.append(prompt)
    return fitted


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token lists of different lengths -> tokens (B, T) padded on the left, and pad_lens (B,), or None
    when all prompts have the same length (then the model can use its plain causal path). The padding
    id is irrelevant: padded slots are masked out of attention and their outputs are never read."""
    longest = max(len(p) for p in prompts)
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    pad_lens = torch.tensor([longest - len(p) for p in prompts], device=device)
    return tokens, (pad_lens if pad_lens.any() else None)


# ---- the decode loop ----------------------------------------------------------------------------------

def decode_step(model: Llama, ids: torch.Tensor, start_pos: int, pad_lens: torch.Tensor | None,
                images: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row through the KV cache: ids (B,) at cache slot ``start_pos`` (with images
    (B, C_v) for a multimodal adapter) -> logits (B, 1, V). The function a compiled generation compiles
    (generate.py --compile)."""
    return model(ids[:, None], start_pos=start_pos, pad_lens=pad_lens, last_only=True, images=images)[0]


@torch.no_grad()  # not inference_mode: tensors a module caches while generating stay usable in training
def generate_stream(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    stop_ids: Sequence[int] | None = (), seed: int | None = None,
                    truncate: bool = False, bos_id: int | None = None,
                    decode_step: Callable = decode_step,
                    images: torch.Tensor | None = None) -> Iterator[list[int | None]]:
    """Generate for a batch of prompts, yielding after every step.

    prompts: B lists of token ids. Each step yields a list of B entries: the new token of each prompt,
    or None for a prompt that has already stopped. A prompt stops at any of ``stop_ids`` (the stop id
    itself is not yielded: it ends the text, it is not part of it) or after max_new_tokens tokens.
    seed makes sampling repeatable (greedy needs none). truncate, bos_id: see ``fit_context``.
    decode_step: the function that runs one token through the cache (``decode_step`` below, or a
    compiled version of it: ``torch.compile(decode_step, dynamic=True)``, as generate.py --compile does).
    images: (B, C_v) one image's features per prompt, for a multimodal adapter (passed at every step:
    the adapter's prompts are recomputed at each call).
    The iterator may be abandoned early (``break``); a cache this call allocated is released either way.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    check_prompts(prompts, model.config.vocab_size)
    prompts = fit_context(prompts, max_new_tokens, model.config.max_seq_len, truncate, bos_id)

    device = model.tok_embeddings.weight.device
    if images is not None and images.shape[0] != len(prompts):
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts: give one image per prompt")
    images = None if images is None else images.to(device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    tokens, pad_lens = left_pad(prompts, device)
    batch, prompt_len = tokens.shape
    stops = torch.tensor(sorted(set(stop_ids or ())), dtype=torch.long, device=device)  # None: no stop ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    def decode(ids: torch.Tensor, step: int) -> torch.Tensor:
        # Rows that have stopped keep decoding (their outputs are ignored): the batch keeps one shape.
        return decode_step(model, ids, prompt_len + step, pad_lens, images)

    # A caller that generates often (a compiled chat) may allocate the cache once, at full length; a
    # cache this call allocates itself is sized for it and released at the end.
    owns_cache = not model.cache_fits(batch, prompt_len + max_new_tokens)
    if owns_cache:
        model.setup_cache(batch, prompt_len + max_new_tokens)
    ahead = runs_asynchronously(device)
    try:
        logits, _ = model(tokens, pad_lens=pad_lens, last_only=True, images=images)  # prefill: (B, 1, V)
        for step in range(max_new_tokens):
            next_ids = choose_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            finished |= torch.isin(next_ids, stops)
            last = step == max_new_tokens - 1
            if ahead and not last:  # queued before the host waits for this step's ids: the GPU keeps busy
                logits = decode(next_ids, step)
            ids, done = torch.stack((next_ids, finished.long())).tolist()  # the one host sync per token
            yield [None if d else i for i, d in zip(ids, done)]  # a stop id is None, like every step after it
            if last or all(done):
                return
            if not ahead:
                logits = decode(next_ids, step)
    finally:
        if owns_cache:
            model.drop_cache()


def runs_asynchronously(device: torch.device) -> bool:
    """Whether kernels on ``device`` run while the host goes on (CUDA), so that the next decode step is
    worth queueing before the host reads the current token; on the CPU it would only delay each token."""
    return device.type == "cuda"


def generate(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_ids: Sequence[int] = (),
             seed: int | None = None, truncate: bool = False, bos_id: int | None = None,
             decode_step: Callable = decode_step, images: torch.Tensor | None = None) -> list[list[int]]:
    """The new token ids of each prompt (without the stop id that ended it). Same arguments as
    ``generate_stream``; this collects its steps."""
    new: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids, seed, truncate,
                                bos_id, decode_step, images):
        for row, token in zip(new, step):
            if token is not None:
                row.append(token)
    return new


# ---- text: incremental decoding and stop strings -----------------------------------------------------

class TextStream:
    """Turns one prompt's new token ids into text as they arrive, and ends it at a stop string.

    ``push(id)`` returns the text that has become final; it holds back two kinds of text that may
    still change: an incomplete UTF-8 character (byte-fallback tokens produce one byte at a time, shown
    as U+FFFD until the character is complete) and a tail that could be the start of a stop string.
    When a stop string appears, the text ends just before it and ``stopped`` becomes True. ``finish()``
    returns whatever was held back once generation is over.

    Sentencepiece drops the leading space of the first piece it decodes, so the ids are decoded after
    an *anchor*, the prompt's last token, and the anchor's own text is cut off again.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), anchor: int | None = None):
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop_strings if s]
        self.anchor = [] if anchor is None else [anchor]
        self.anchor_text = tokenizer.decode(self.anchor)
        self.ids: list[int] = []
        self.text = ""  # the text handed out so far
        self.stopped = False

    def _decoded(self) -> str:
        full = self.tokenizer.decode(self.anchor + self.ids)
        return full[len(self.anchor_text):] if full.startswith(self.anchor_text) else self.tokenizer.decode(self.ids)

    def _emit(self, upto: str) -> str:
        new, self.text = upto[len(self.text):], upto
        return new

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        decoded = self._decoded()
        hits = [i for i in (decoded.find(s, len(self.text)) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(decoded[:min(hits)])
        final = len(decoded.rstrip("\ufffd"))  # an incomplete UTF-8 character may still change
        final -= stop_string_prefix(decoded[:final], self.stop_strings)
        return self._emit(decoded[:max(final, len(self.text))])

    def finish(self) -> str:
        return "" if self.stopped else self._emit(self._decoded())


def stop_string_prefix(text: str, stop_strings: Sequence[str]) -> int:
    """The length of the longest tail of ``text`` that some stop string starts with (0 if none): that
    much must be held back, since the next tokens may complete the stop string. E.g. "Hello ##" with
    the stop string "###" holds back 2 characters."""
    longest = 0
    for stop in stop_strings:
        for n in range(1, min(len(stop), len(text) + 1)):  # n < len(stop): a whole stop string is a hit
            if text.endswith(stop[:n]):
                longest = max(longest, n)
    return longest
