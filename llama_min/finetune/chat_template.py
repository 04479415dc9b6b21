"""A checkpoint's own chat template: the Jinja program that lays out a conversation for the model, as
Hugging Face models ship it, run the way ``transformers`` runs it (``apply_chat_template``).

    DIR/chat_template.jinja       the template, verbatim (Hugging Face's file name; older models keep it
                                  as "chat_template" in tokenizer_config.json, which is read too)
    DIR/generation_config.json    Hugging Face's generation config, verbatim; generate.py reads only its
                                  eos_token_id (one id or a list): generation also stops at those tokens

weights_convert.py carries both files through every conversion (a GGUF file's tokenizer.chat_template
becomes chat_template.jinja). generate.py uses the template as ``--template auto``, its default for a
checkpoint that has one and records no named template (templates.py).

Rendering, as transformers does it: a sandboxed Jinja environment with trim_blocks and lstrip_blocks
(a block tag takes its line's indentation and newline with it) and the loop controls extension; the
variables ``messages`` (a list of {"role", "content"}), ``add_generation_prompt`` (True: the text ends
where the assistant's answer begins), the tokenizer's special tokens by role (``bos_token``,
``eos_token``, ...); the functions ``raise_exception(message)`` and ``strftime_now(format)``, and a
``tojson`` filter that keeps non-ASCII text as it is. The rendered text is then encoded with the special
tokens' text read as those tokens, and nothing added: the template writes the bos token itself.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence

from ..cli import one_line
from .templates import Message, stop_ids

CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
ANSWER_MARK = "LLAMA_MIN_ANSWER"  # stands for an answer when looking for what a template writes after one


def read_chat_template(directory: str | Path) -> str | None:
    """DIR's chat template: chat_template.jinja, else tokenizer_config.json's "chat_template" (a text, or a
    list of {"name", "template"} from which the one named "default" is taken); None when there is none."""
    directory = Path(directory)
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config_file = directory / TOKENIZER_CONFIG_FILE
    if not config_file.is_file():
        return None
    try:
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{config_file}: not a JSON object ({e})") from None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def read_generation_config(directory: str | Path) -> dict | None:
    path = Path(directory) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object like {{\"eos_token_id\": 2}}")
    return config


def generation_eos_ids(directory: str | Path) -> list[int]:
    """The eos ids DIR/generation_config.json names (none when there is no such file)."""
    eos = (read_generation_config(directory) or {}).get("eos_token_id")
    return [i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]


def import_jinja2():
    try:
        import jinja2
        import jinja2.sandbox
    except ImportError as e:
        raise ImportError("running a checkpoint's chat template needs the optional package `jinja2`: "
                          "pip install jinja2 (or choose a named template with --template)") from e
    return jinja2


# A chat template is a program from a downloaded file: its output, its running time and the size of any
# value it builds are bounded (a prompt longer than any model's context is already far below these).
MAX_RENDERED_CHARS = 1_000_000
MAX_RENDER_SECONDS = 10.0


class Budget:
    """The limits of one rendering: characters written and time spent, checked as the template runs."""

    def __init__(self, origin: str):
        self.origin, self.deadline = origin, time.monotonic() + MAX_RENDER_SECONDS

    def check_time(self):
        if time.monotonic() > self.deadline:
            raise ValueError(f"{self.origin}: the template ran for more than {MAX_RENDER_SECONDS:.0f} s; a chat "
                             "template that loops this long is broken or hostile: choose one with --template")

    def check_size(self, n: int):
        if n > MAX_RENDERED_CHARS:
            raise ValueError(f"{self.origin}: the template builds a text of more than {MAX_RENDERED_CHARS:,} "
                             "characters; a chat template that does is broken or hostile: choose one with --template")


def compile_template(text: str, origin: str):
    """The template compiled in a Jinja environment set up as transformers sets it up (module docstring),
    within the bounds above: ``range`` and the operators that build large values (``*``, ``**``) are
    checked against the current rendering's budget (``ChatTemplate.render`` sets it)."""
    jinja2 = import_jinja2()

    class BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])
        budget: Budget | None = None

        def call_binop(self, context, operator, left, right):
            if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
                left, right = right, left
            if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
                self.budget.check_size(len(left) * right)
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                self.budget.check_size(right * abs(left).bit_length() // 4)  # about its decimal digits
            return super().call_binop(context, operator, left, right)

    def bounded_range(*args):
        env.budget.check_time()  # a loop inside a loop calls range again and again

        def steps():
            for i, value in enumerate(jinja2.sandbox.safe_range(*args)):
                if i % 1024 == 0:
                    env.budget.check_time()
                yield value
        return steps()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       range=bounded_range)
    try:
        tree = env.parse(text)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"{origin}: not a valid Jinja template (line {e.lineno}: {e.message})") from None
    other_files = next(tree.find_all((jinja2.nodes.Include, jinja2.nodes.Import, jinja2.nodes.FromImport,
                                      jinja2.nodes.Extends)), None)
    if other_files is not None:
        raise ValueError(f"{origin}: line {other_files.lineno} reads another template file ({{% "
                         f"{type(other_files).__name__.lower()} %}}); a chat template must be self-contained: "
                         "inline that file, or choose a template with --template")
    return env.from_string(tree)


class ChatTemplate:
    """A Jinja chat template bound to a tokenizer (whose special tokens it reads); the same interface as
    templates.Template: ``encode(tokenizer, messages)``, ``stop_strings``, ``stop_ids(tokenizer)``."""

    name = "auto"

    def __init__(self, text: str, tokenizer, origin: str = "the chat template"):
        self.text, self.origin = text, origin
        self.program = compile_template(text, origin)
        self.variables = tokenizer.special_tokens_map
        end = self.end_of_turn()
        self.stop_strings = (end,) if end else ()

    @classmethod
    def from_checkpoint(cls, directory: str | Path, tokenizer) -> "ChatTemplate":
        text = read_chat_template(directory)
        if text is None:
            raise ValueError(f"--template auto: {directory} has no chat template ({CHAT_TEMPLATE_FILE}, or "
                             f"\"chat_template\" in {TOKENIZER_CONFIG_FILE}); name a template with --template instead")
        return cls(text, tokenizer, str(Path(directory) / CHAT_TEMPLATE_FILE))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation laid out as text, ending where the assistant's answer begins."""
        jinja2 = import_jinja2()
        chat = [{"role": role, "content": content} for role, content in messages]
        budget = self.program.environment.budget = Budget(self.origin)
        pieces, size = [], 0
        try:
            # Piece by piece, so that the limits hold while the template runs, not after.
            for piece in self.program.generate(messages=chat, add_generation_prompt=add_generation_prompt,
                                               tools=None, documents=None, **self.variables):
                size += len(piece)
                budget.check_size(size)
                budget.check_time()
                pieces.append(piece)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"{self.origin} refused the conversation: {one_line(e, 200)}") from None
        except (RecursionError, OverflowError, MemoryError) as e:
            raise ValueError(f"{self.origin}: the template failed ({type(e).__name__}); choose one with "
                             "--template") from None
        return "".join(pieces)

    def encode(self, tokenizer, messages: Sequence[Message]) -> list[int]:
        return tokenizer.encode_with_special_tokens(self.render(messages))

    def end_of_turn(self) -> str | None:
        """What the template writes after an assistant's answer, up to the end of that line ("<|im_end|>",
        "</s>", "<|eot_id|>"): the model ends its answer by writing it. None when it writes nothing there."""
        try:
            text = self.render([("user", "?"), ("assistant", ANSWER_MARK)], add_generation_prompt=False)
        except ValueError:  # a template that wants, say, a system message first
            return None
        after = text.partition(ANSWER_MARK)[2].strip()
        return after.splitlines()[0] if after else None

    def stop_ids(self, tokenizer) -> list[int]:
        return stop_ids(tokenizer, self.stop_strings)
