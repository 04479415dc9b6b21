"""What the three scripts share: flags made from a configuration dataclass, the one error type a user
sees as one line, the choice of device, and reading the user's text and JSONL files.

A configuration is a dataclass whose fields carry their help text (``flag``); ``add_flags`` turns every
field into a command-line flag with that help and its default, so a script's flags, its ``--help`` and
its configuration cannot drift apart. Flags that are not given are left out of the parsed namespace
(``argparse.SUPPRESS``), so a script can tell what the user actually typed (``--resume`` keeps the saved
value of everything else) and the dataclass supplies the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

import torch


class UsageError(ValueError):
    """A bad flag, file or input. Scripts print it as one line, without a traceback, and exit with
    status 1; the message says what was wrong, what was expected and what to do."""


class DataError(UsageError):
    """A problem with the user's data (a training file, instruction records, a prompt file)."""


def flag(default: Any, help: str, *, group: str | None = None, positional: bool = False, **argparse_options) -> Any:
    """A dataclass field that is also a command-line flag: ``dim: int = flag(64, "width")``.
    ``group`` names the ``--help`` section; ``positional`` makes it an argument without a dash (no
    default); other keywords go to ``add_argument`` (``choices``, ...)."""
    metadata = {"help": help, "group": group, "positional": positional, "argparse": argparse_options}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line and takes no abbreviations (``--max_step``
    is not silently read as ``--max_steps``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("usage", "%(prog)s [--flag VALUE ...]  (flags by topic below)")
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        """As argparse, but a flag named in ``self.once`` given twice is an error: argparse would keep the
        last (``--method lora --method adapter`` trains an adapter) and say nothing."""
        args = sys.argv[1:] if args is None else list(args)
        for name in getattr(self, "once", ()):
            if sum(a.split("=")[0] == name for a in args) > 1:
                self.error(f"{name} given twice; give it once")
        return super().parse_known_args(args, namespace)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag_kind(annotation) -> tuple[type, bool]:
    """(element type, repeated) of a field's type: int | None -> (int, False), tuple[str, ...] -> (str, True)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _flag_kind(next(a for a in typing.get_args(annotation) if a is not type(None)))
    if origin in (list, tuple):
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_flags(parser: argparse.ArgumentParser, cls, *, dest_prefix: str = "", skip: tuple[str, ...] = (),
              help: Callable[[dataclasses.Field], str | None] | None = None, group: str | None = None,
              show_defaults: bool = True, choices: dict[str, tuple] | None = None) -> None:
    """One flag per field of the dataclass ``cls``: ``--name``, stored as ``dest_prefix + name``.

    Fields without help text are left out unless ``help`` gives one (``show_defaults=False``: it says
    the default itself); ``choices`` gives the allowed values of fields by name. Each flag goes into the ``--help``
    section its field's ``group`` names (or ``group``, for all of them), made once per parser, in the
    order first named. Booleans get ``--x/--no-x``; list and tuple fields take several values.
    """
    hints = typing.get_type_hints(cls)
    sections = parser.__dict__.setdefault("flag_sections", {})
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help") if help is None else help(f)
        if f.name in skip or text is None:
            continue
        title = group or f.metadata.get("group")
        if title and title not in sections:
            sections[title] = parser.add_argument_group(title)
        target = sections[title] if title else parser
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind, repeated = _flag_kind(hints[f.name])
        options = dict(dest=dest_prefix + f.name, default=argparse.SUPPRESS, **f.metadata.get("argparse", {}))
        if choices and f.name in choices:
            options["choices"] = choices[f.name]
        if show_defaults and default not in ("", None, [], dataclasses.MISSING):
            text += f" (default: {' '.join(map(str, default)) if repeated else default})"
        if f.metadata.get("positional"):
            target.add_argument(options["dest"], metavar=f.name.upper(), type=kind, help=f.metadata["help"])
        elif kind is bool:
            target.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=text, **options)
        else:
            if repeated and options.get("action") != "append":
                options["nargs"] = "+"
            metavar = "{" + ",".join(map(str, options["choices"])) + "}" if "choices" in options else f.name.upper()
            target.add_argument(f"--{f.name}", type=kind, metavar=metavar, help=text, **options)


def given_flags(namespace: argparse.Namespace, dest_prefix: str = "") -> dict[str, Any]:
    """The flags of one ``add_flags`` call that were given on the command line, by field name."""
    return {k.removeprefix(dest_prefix): v for k, v in vars(namespace).items()
            if k.startswith(dest_prefix) and (dest_prefix or "." not in k)}


def pick_device(name: str) -> torch.device:
    """``--device``: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:") and name[5:].isdigit():
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
        return torch.device(name)
    raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An exception's message with its line breaks folded: for errors quoted inside our own. With
    `limit`, only its first sentence, cut to `limit` characters: a library's message can go on to give
    advice that is wrong for our files (torch.load's suggests weights_only=False)."""
    text = " ".join(str(error).split())
    if limit is None:
        return text
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[:limit - 1] + "…"


def read_text(path: str | Path, what: str = "file") -> str:
    """A user's text file, read as UTF-8; a file in another encoding is one error naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {path} is not UTF-8 text (byte {e.start} cannot be decoded); "
                        "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def read_jsonl(path: str | Path, expected: str) -> list[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSONL file; a line that is not JSON is one
    error naming the file, the line and ``expected`` (what each line should hold)."""
    rows = []
    for n, line in enumerate(read_text(path, "data file").splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); expected {expected} per line") from None
    return rows


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to this program alone; ru_maxrss
    would also count the parent's memory when it was started by fork + exec (a benchmark, a test)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    scale = 2**20 if sys.platform == "darwin" else 2**10  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
