"""Generate text from a llama_min checkpoint, streamed to the terminal as it is produced.

    python generate.py --checkpoint out/ckpt --prompt "ROMEO:"                # sample a continuation
    python generate.py --checkpoint out/ckpt --prompt "To be" --prompt "KING:" --temperature 0
    python generate.py --checkpoint DIR --template alpaca --prompt "Reverse the word: stone"
    python generate.py --checkpoint DIR --template chatml --interactive      # a chat that remembers
    python generate.py --checkpoint HF_CONVERTED --prompt "Hi"               # its own chat_template.jinja (auto)
    python generate.py --checkpoint BASE --peft ADAPTER --prompt "..."      # with a fine-tuned adapter
    python generate.py --checkpoint BASE --peft ADAPTER --interpolate 0.5   # half of the adapter's effect
    python generate.py --checkpoint TUNED --base BASE --interpolate 0.5     # halfway between two checkpoints
    python generate.py --checkpoint DIR --prompt "ROMEO:" --quantize int8    # weight-only int8 (or int4)
    python generate.py --checkpoint BASE --peft MM_ADAPTER --image cat.png --prompt "What colour is it?"

Reading order: the configuration (a dataclass, every field a flag), loading the model, generating one
answer with its timing, the chat loop, the command line. Generation itself is
``llama_min.generation``; prompt formats are ``llama_min.finetune.templates``. The generated text goes to
standard output; the figures (prompt tokens, new tokens, time to first token, tokens/s) go to standard
error, so that the text can be piped on its own.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

import torch

from llama_min import Llama, Tokenizer
from llama_min.checkpoint import resolve_checkpoint_dir, tokenizer_file
from llama_min.tokenizer import load_tokenizer
from llama_min.cli import OneLineParser, UsageError, add_flags, flag, pick_device, read_text
from llama_min.finetune.load import check_interpolation_flags, load_finetuned
from llama_min.finetune.chat_template import ChatTemplate, generation_eos_ids, read_chat_template
from llama_min.finetune.templates import TEMPLATES, Message, Template, get_template, template_for_checkpoint
from llama_min.generation import (TextStream, check_sampling, decode_step, fit_context, generate_stream,
                                  store_weights_column_major)
from llama_min.compiled_decode import compile_decode_step
from llama_min.peft.visual import load_encoder
from llama_min.quantize import quantization_scheme, quantize_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


MODEL, PROMPT, SAMPLING = "model", "prompt", "sampling"


@dataclass
class GenerateConfig:
    # model
    checkpoint: str = flag("", "checkpoint directory (config.json, model.safetensors, tokenizer), e.g. out/ckpt",
                           group=MODEL)
    peft: str = flag("", "an adapter directory (peft.json + peft.safetensors from train.py --method ...) to apply "
                     "to the checkpoint's model", group=MODEL)
    interpolate: float | None = flag(None, "a in [0, 1]: the model at (1 - a)*base + a*fine-tuned (0: the base, "
                                     "1: the fine-tuned model; needs --peft or --base) (default: off)",
                                     group=MODEL)
    base: str = flag("", "with --interpolate: the base checkpoint of a fully or partially fine-tuned --checkpoint",
                     group=MODEL)
    allow_other_base: bool = flag(False, "apply --peft even if --checkpoint is not the base it was trained on "
                                  "(its recorded fingerprint differs; same shape required anyway)", group=MODEL)
    device: str = flag("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N", group=MODEL)
    dtype: str = flag("float32", f"weight dtype: {', '.join(DTYPES)} (float16 on CUDA only)", group=MODEL)
    compile: bool = flag(False, "torch.compile the decode step (llama_min/compiled_decode.py): about a minute to "
                         "start for a 135M model, its compile time is reported; then decodes faster on a CPU",
                         group=MODEL)
    # prompt
    prompt: list[str] = flag([], "a prompt; repeat the flag for several", action="append", group=PROMPT)
    prompt_file: str = flag("", "a file with one prompt per line (blank lines skipped); - reads standard input",
                            group=PROMPT)
    template: str = flag("", f"prompt format: auto (the checkpoint's own chat_template.jinja, run with jinja2), "
                         f"{', '.join(TEMPLATES)} (default: the one the checkpoint records, else auto when it "
                         "has a chat template, else raw: give --template raw to continue a text with a chat model)",
                         group=PROMPT)
    system: str = flag("", "system message for the chat templates", group=PROMPT)
    interactive: bool = flag(False, "chat: each answer stays in the context of the next question", group=PROMPT)
    truncate: bool = flag(False, "drop the start of a prompt that is too long for the context (its BOS is kept) "
                          "instead of stopping with an error", group=PROMPT)
    # sampling
    max_new_tokens: int = flag(128, "new tokens at most per answer", group=SAMPLING)
    temperature: float = flag(0.8, "sampling temperature; 0 is greedy", group=SAMPLING)
    top_k: int = flag(0, "sample only among the k most likely tokens (0: no limit)", group=SAMPLING)
    top_p: float = flag(1.0, "sample only within the nucleus of this probability mass (1: no limit)", group=SAMPLING)
    seed: int = flag(-1, "seed for sampling (-1: a different sample every run)", group=SAMPLING)
    stop: list[str] = flag([], "a stop string: the answer ends before it (repeatable; the template adds its own)",
                           action="append", group=SAMPLING)
    quantize: str = flag("", "int8 or int4: quantise every linear layer's weights after loading (weight-only, "
                         "llama_min/quantize.py; a checkpoint written by weights_convert.py --quantize is quantised "
                         "already)", choices=["", "int8", "int4"], group=MODEL)
    group_size: int = flag(32, "inputs per scale with --quantize int4 (32, 64, 128 or 256)", group=MODEL)
    # images (a multimodal adapter)
    image: list[str] = flag([], "an image (PNG) for a multimodal adapter (--peft trained with --image_root): one for "
                            "every prompt, or repeat the flag for one per prompt", action="append", group=PROMPT)
    image_root: str = flag("", "--image: the directory the image paths are relative to (their ids in a features: "
                           "file, as in the training records)", group=PROMPT)


# ---- loading ------------------------------------------------------------------------------------------

def load(cfg: GenerateConfig) -> tuple[Llama, Tokenizer, Template | ChatTemplate, list[int]]:
    """The model (on the chosen device, in the chosen dtype), its tokenizer, the prompt template and the
    token ids that end an answer (EOS, the template's end of turn, generation_config.json's eos ids)."""
    if not cfg.checkpoint:
        raise UsageError("--checkpoint DIR is required (a directory written by train.py or weights_convert.py)")
    if cfg.dtype not in DTYPES:
        raise UsageError(f"--dtype {cfg.dtype!r}: expected one of {', '.join(DTYPES)}")
    if cfg.top_k < 0:  # the command line's "no limit" is 0, the library's None
        raise UsageError(f"--top_k {cfg.top_k}: expected a positive number of tokens, or 0 for no limit")
    try:
        check_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p)  # before the slow load
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    check_interpolation_flags(cfg.interpolate, cfg.peft, cfg.base)
    device = pick_device(cfg.device)
    if cfg.dtype == "float16" and device.type != "cuda":
        raise UsageError("--dtype float16 is for CUDA; on a CPU use bfloat16 (same size, float32's range)")
    tokenizer_path = tokenizer_file(cfg.checkpoint)
    if tokenizer_path is None:
        raise UsageError(f"{cfg.checkpoint} holds no tokenizer.model or tokenizer.json; generation needs the "
                         "tokenizer the model was trained with (copy it into the checkpoint directory)")
    tokenizer = load_tokenizer(tokenizer_path)
    scheme = quantization_scheme(cfg.quantize, cfg.group_size)  # a bad choice fails before the slow load
    model = load_finetuned(cfg.checkpoint, cfg.peft, cfg.base, cfg.interpolate, device, DTYPES[cfg.dtype],
                           check_base=not cfg.allow_other_base)
    if scheme and model.config.quantization:
        raise UsageError(f"{cfg.checkpoint} is quantised already ({model.config.quantization.kind}): drop --quantize")
    if scheme:
        quantize_model(model, scheme.kind, scheme.group_size)
    elif device.type == "cpu" and not cfg.compile:  # a compiled step streams the weights in their own layout
        store_weights_column_major(model)  # faster one-row products on CPU BLAS (see its docstring)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(f"the tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but the model "
                         f"({resolve_checkpoint_dir(cfg.checkpoint) / 'config.json'}) only {model.config.vocab_size}: "
                         "they do not belong together; put the tokenizer the model was trained with beside it")
    directory = resolve_checkpoint_dir(cfg.checkpoint)
    name = (cfg.template or template_for_checkpoint(cfg.peft or None, directory)
            or ("auto" if read_chat_template(directory) is not None else "raw"))
    try:
        template = ChatTemplate.from_checkpoint(directory, tokenizer) if name == "auto" else get_template(name)
    except ImportError as e:  # jinja2 missing
        raise UsageError(str(e)) from None
    stop_ids = list(dict.fromkeys(template.stop_ids(tokenizer) + generation_eos_ids(directory)))
    return model, tokenizer, template, stop_ids


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompt_file:
        if cfg.prompt_file == "-":
            text = sys.stdin.read()
        elif not Path(cfg.prompt_file).is_file():
            raise UsageError(f"--prompt_file {cfg.prompt_file} does not exist")
        else:
            text = read_text(cfg.prompt_file, "--prompt_file")
        prompts += [line for line in text.splitlines() if line.strip()]
    return prompts


# ---- one answer -------------------------------------------------------------------------------------

@dataclass
class Answer:
    text: str
    prompt_tokens: int
    new_tokens: int
    first_token_s: float  # from the call to the first new token: prefill plus one sampling step
    total_s: float

    def figures(self) -> str:
        decode = (f"{(self.new_tokens - 1) / (self.total_s - self.first_token_s):.1f} tokens/s"
                  if self.new_tokens > 1 else "n/a tokens/s")
        return (f"[{self.prompt_tokens} prompt tokens, {self.new_tokens} new tokens, time to first token "
                f"{self.first_token_s * 1e3:.0f} ms, {decode}]")


def answer(model: Llama, tokenizer: Tokenizer, template: Template | ChatTemplate, stop_ids: list[int],
           ids: list[int], cfg: GenerateConfig, out: TextIO, step: Callable = decode_step,
           image: torch.Tensor | None = None) -> Answer:
    """Generate the answer to prompt ``ids`` (about ``image``, (C_v,) features, if given), writing its text
    to ``out`` as it is produced. It ends at one of ``stop_ids``, at a stop string (the template's or
    --stop) or after --max_new_tokens tokens."""
    stream = TextStream(tokenizer, template.stop_strings + tuple(cfg.stop), anchor=ids[-1])
    steps = generate_stream(model, [ids], cfg.max_new_tokens, temperature=cfg.temperature,
                            top_k=cfg.top_k or None, top_p=cfg.top_p, stop_ids=stop_ids,
                            seed=None if cfg.seed < 0 else cfg.seed, decode_step=step,
                            images=None if image is None else image[None])
    start, first, new_tokens = time.perf_counter(), None, 0
    try:
        for step in steps:
            first = first or time.perf_counter()
            if step[0] is None:  # EOS: the end of the text, never printed
                break
            new_tokens += 1
            out.write(stream.push(step[0]))
            out.flush()
            if stream.stopped:
                break
    except KeyboardInterrupt:  # Ctrl-C: what was generated stays on the screen, whole
        out.write(stream.finish())
        out.flush()
        raise
    finally:
        steps.close()  # releases the KV cache at once when we stopped early
    out.write(stream.finish())
    out.flush()
    return Answer(stream.text, len(ids), new_tokens, first - start, time.perf_counter() - start)


def fit(ids: list[int], model: Llama, tokenizer: Tokenizer, cfg: GenerateConfig) -> list[int]:
    """The prompt, shortened from the start when --truncate allows; otherwise the clear overflow error."""
    fitted = fit_context([ids], cfg.max_new_tokens, model.config.max_seq_len, cfg.truncate, tokenizer.bos_id)[0]
    if len(fitted) < len(ids):
        print(f"(prompt truncated: kept {len(fitted)} of its {len(ids)} tokens; the oldest text was cut)", file=sys.stderr)
    return fitted


# ---- the chat loop -------------------------------------------------------------------------------------

def chat(model: Llama, tokenizer: Tokenizer, template: Template | ChatTemplate, stop_ids: list[int],
         cfg: GenerateConfig, step: Callable = decode_step, image: torch.Tensor | None = None) -> None:
    """Read a message per line; the whole conversation is the prompt of each answer (about ``image``, if
    given). When it would no longer fit in the context, the oldest exchanges are forgotten, and the user
    is told."""
    system: list[Message] = [("system", cfg.system)] if cfg.system else []
    turns: list[Message] = []
    room = model.config.max_seq_len - cfg.max_new_tokens
    print(f"chat with {cfg.checkpoint} ({template.name} template, {model.config.max_seq_len}-token context); "
          "/reset forgets, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            turns = []
            continue
        if not line.strip():
            continue
        turns.append(("user", line))
        ids = template.encode(tokenizer, system + turns)
        forgotten = 0
        while len(ids) > room and len(turns) > 1:
            turns, forgotten = turns[2:], forgotten + 1  # the oldest question and its answer
            ids = template.encode(tokenizer, system + turns)
        if forgotten:
            print(f"(the conversation no longer fits in the {model.config.max_seq_len}-token context with "
                  f"{cfg.max_new_tokens} new tokens: forgot the oldest {forgotten} exchange(s))", file=sys.stderr)
        if len(ids) > room and not cfg.truncate:
            print(f"(that message is {len(ids)} tokens: too long for the context of {room} prompt tokens; "
                  "write a shorter one or ask for fewer --max_new_tokens)", file=sys.stderr)
            turns.pop()
            continue
        result = answer(model, tokenizer, template, stop_ids, fit(ids, model, tokenizer, cfg), cfg, sys.stdout, step,
                        image)
        print()
        print(result.figures(), file=sys.stderr)
        turns.append(("assistant", result.text))


# ---- images for a multimodal adapter ------------------------------------------------------------------------

def encode_images(model: Llama, cfg: GenerateConfig) -> torch.Tensor | None:
    """(N, C_v) features of the --image files, by the frozen encoder the adapter was trained with (its
    peft.json names it), or None without --image."""
    if not cfg.image:
        return None
    config = model.peft_config
    if config is None or not config.visual_dim or not config.image_encoder:
        raise UsageError("--image needs a multimodal adapter: --peft DIR written by train.py --method adapter "
                         "--image_root ... (its peft.json names the image encoder)")
    encoder = load_encoder(config.image_encoder)
    return encoder.features(cfg.image_root, cfg.image).to(model.tok_embeddings.weight.device)


# ---- the command line ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    add_flags(parser, GenerateConfig)
    cfg = GenerateConfig(**vars(parser.parse_args(argv)))
    try:
        prompts = read_prompts(cfg)
        if not prompts and not cfg.interactive:
            raise UsageError("nothing to do: give --prompt TEXT (repeatable), --prompt_file FILE or --interactive")
        if cfg.image and not cfg.peft:
            raise UsageError("--image needs --peft DIR, a multimodal adapter (train.py --method adapter --image_root)")
        if len(cfg.image) > 1 and (cfg.interactive or len(cfg.image) != len(prompts)):
            raise UsageError(f"{len(cfg.image)} --image flags for {len(prompts)} prompts"
                             f"{' and a chat' if cfg.interactive else ''}: give one image for all, or one per prompt")
        if cfg.image_root and not cfg.image:
            raise UsageError("--image_root locates --image files; add --image PATH or drop --image_root")
        model, tokenizer, template, stop_ids = load(cfg)
        step = decode_step
        if cfg.compile:
            step, seconds = compile_decode_step(model)
            print(f"(compiled the decode step in {seconds:.1f} s)", file=sys.stderr)
        images = encode_images(model, cfg)
        system: list[Message] = [("system", cfg.system)] if cfg.system else []
        for i, prompt in enumerate(prompts):
            ids = fit(template.encode(tokenizer, system + [("user", prompt)]), model, tokenizer, cfg)
            print(prompt, end="" if template.name == "raw" else "\n", flush=True)
            image = None if images is None else images[i if len(images) > 1 else 0]
            result = answer(model, tokenizer, template, stop_ids, ids, cfg, sys.stdout, step, image)
            print("\n" if i < len(prompts) - 1 else "")
            print(result.figures(), file=sys.stderr)
        if cfg.interactive:
            chat(model, tokenizer, template, stop_ids, cfg, step, None if images is None else images[0])
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C: stop where we are, as a shell expects (128 + SIGINT)
        print(flush=True)
        print("generate.py: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
