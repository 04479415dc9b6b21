"""Prompt templates: how a conversation is laid out as tokens for a model trained on that layout.

A model fine-tuned on instructions answers well only when it is prompted in the format it was trained
on. Four formats, each a function from a conversation to a list of text segments and BOS/EOS markers
(the markers are token ids, never text, so a user who types "</s>" cannot end a turn):

    raw          BOS, then the texts as they are: plain continuation, for base models
    alpaca       the Stanford Alpaca instruction format (Taori et al. 2023), one
                 "### Instruction: / ### Response:" record per turn; the format the fine-tuning in this
                 repository trains on (instructions.py)
    llama2-chat  Llama 2-Chat (Touvron et al. 2023b, section 3): BOS [INST] user [/INST] answer EOS,
                 the system prompt inside <<SYS>> … <</SYS>> in the first turn
    chatml       ChatML: <|im_start|>role\\n text <|im_end|>\\n for every message

A conversation is a list of (role, text) with roles "system" (optional, first), "user" and "assistant",
ending with a user message: the model writes the next assistant message.

Which template a checkpoint wants is recorded in ``DIR/generation.json`` as {"template": NAME}
(``record_template``); ``template_for_checkpoint`` reads it, and generate.py uses it unless --template
says otherwise. A checkpoint may also carry its own Jinja chat template, as Hugging Face models do
(chat_template.py); generate.py calls that one ``auto``.

Generation ends at EOS, and at the template's end-of-turn token when the tokenizer has it as one token
(``stop_ids``: chatml's <|im_end|> in a tokenizer that has it); otherwise at its text (``stop_strings``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Sequence

from .instructions import InstructionRecord

Message = tuple[str, str]  # (role, text); role is "system", "user" or "assistant"
METADATA_FILE = "generation.json"


class Marker(Enum):
    """A special token inside a rendered prompt."""
    BOS = "bos"
    EOS = "eos"


Segment = str | Marker


def stop_ids(tokenizer, stop_strings: Sequence[str]) -> list[int]:
    """The ids generation stops at: EOS, and each stop string that is one special token of ``tokenizer``."""
    specials = tokenizer.special_tokens
    return [tokenizer.eos_id] + [specials[s] for s in stop_strings if s in specials and specials[s] != tokenizer.eos_id]


def split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    """Check the conversation's shape and take the optional leading system message off it."""
    system = messages[0][1] if messages and messages[0][0] == "system" else None
    turns = list(messages[1:] if system is not None else messages)
    expected = ["user", "assistant"] * (len(turns) // 2) + ["user"]
    if [role for role, _ in turns] != expected[:len(turns)] or not turns or turns[-1][0] != "user":
        roles = [role for role, _ in messages]
        raise ValueError(f"a conversation is an optional system message, then user and assistant messages "
                         f"alternating, ending with a user message; got roles {roles}")
    return system, turns


def pairs(turns: list[Message]) -> list[tuple[str, str | None]]:
    """[(user, assistant), ..., (last user, None)] from alternating turns."""
    users, answers = [t for _, t in turns[0::2]], [t for _, t in turns[1::2]]
    return list(zip(users, answers + [None]))


# ---- the formats ------------------------------------------------------------------------------------

def raw(messages: Sequence[Message]) -> list[Segment]:
    """The texts one after another: the model continues the last one."""
    system, turns = split_system(messages)
    return [Marker.BOS] + ([system] if system else []) + [text for _, text in turns]


def alpaca(messages: Sequence[Message]) -> list[Segment]:
    """Every turn is a complete Alpaca record, BOS prompt answer EOS, laid out by the fine-tuning data
    code itself (instructions.py), so training and generation cannot drift apart. A system message,
    when given, comes before the first record."""
    system, turns = split_system(messages)
    segments: list[Segment] = []
    for i, (user, answer) in enumerate(pairs(turns)):
        prompt = InstructionRecord(instruction=user, output="").prompt()
        segments += [Marker.BOS, f"{system}\n\n{prompt}" if i == 0 and system else prompt]
        if answer is not None:
            segments += [answer, Marker.EOS]
    return segments


def llama2_chat(messages: Sequence[Message]) -> list[Segment]:
    """BOS [INST] user [/INST] answer EOS per exchange; the system prompt opens the first user message."""
    system, turns = split_system(messages)
    segments: list[Segment] = []
    for i, (user, answer) in enumerate(pairs(turns)):
        if i == 0 and system:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        segments += [Marker.BOS, f"[INST] {user.strip()} [/INST]"]
        if answer is not None:
            segments[-1] += f" {answer.strip()} "
            segments.append(Marker.EOS)
    return segments


def chatml(messages: Sequence[Message]) -> list[Segment]:
    """<|im_start|>role\\ntext<|im_end|>\\n per message, then the opening of the assistant's message."""
    split_system(messages)  # only to check the shape
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return [Marker.BOS, text + "<|im_start|>assistant\n"]


@dataclass(frozen=True)
class Template:
    name: str
    render: Callable[[Sequence[Message]], list[Segment]]
    stop_strings: tuple[str, ...] = ()  # text that ends the answer besides EOS (the next turn's opening)

    def encode(self, tokenizer, messages: Sequence[Message]) -> list[int]:
        """The conversation as token ids, ready for generation."""
        ids: list[int] = []
        for segment in self.render(messages):
            if segment in (Marker.BOS, Marker.EOS):
                special = tokenizer.bos_id if segment is Marker.BOS else tokenizer.eos_id
                ids += [special] if special >= 0 else []  # -1: the tokenizer has none (as encode() leaves it out)
            else:
                ids += tokenizer.encode(segment, bos=False)
        return ids

    def stop_ids(self, tokenizer) -> list[int]:
        return stop_ids(tokenizer, self.stop_strings)


TEMPLATES = {
    "raw": Template("raw", raw),
    "alpaca": Template("alpaca", alpaca, stop_strings=("### Instruction:",)),
    "llama2-chat": Template("llama2-chat", llama2_chat, stop_strings=("[INST]",)),
    "chatml": Template("chatml", chatml, stop_strings=("<|im_end|>", "<|im_start|>")),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; choose one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


# ---- the checkpoint's choice ------------------------------------------------------------------------

def record_template(directory: str | Path, name: str) -> None:
    """Note in a checkpoint (or adapter) directory which template its model was trained with."""
    get_template(name)
    path = Path(directory) / METADATA_FILE
    meta = json.loads(path.read_text()) if path.exists() else {}
    meta["template"] = name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(path)  # atomic: a reader sees the old file or the new one


def template_for_checkpoint(*directories: str | Path | None) -> str | None:
    """The template recorded in the first of these directories that records one (an adapter directory
    before its base checkpoint), or None."""
    for directory in directories:
        path = Path(directory) / METADATA_FILE if directory is not None else None
        if path is None or not path.exists():
            continue
        try:
            name = json.loads(path.read_text()).get("template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{path} is not a JSON object like {{\"template\": \"alpaca\"}}: {e}") from None
        if name is not None:
            get_template(name)
            return name
    return None
