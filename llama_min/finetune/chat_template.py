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
from datetime import datetime
from pathlib import Path
from typing import Sequence

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


def compile_template(text: str, origin: str):
    """The template compiled in a Jinja environment set up as transformers sets it up (module docstring)."""
    jinja2 = import_jinja2()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(text)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"{origin}: not a valid Jinja template (line {e.lineno}: {e.message})") from None


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
        try:
            return self.program.render(messages=chat, add_generation_prompt=add_generation_prompt, tools=None,
                                       documents=None, **self.variables)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"{self.origin} refused the conversation: {e}") from None

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
