"""The labs as ``manifest.toml`` lists them: number, handout, grader, the functions a student writes and what
a student hands in. Every lab tool reads the labs from here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        raise SystemExit("the labs read TOML files: on Python 3.10, pip install tomli (3.11 has it built in)") from None

LAB_DIR = Path(__file__).resolve().parent
REPO = LAB_DIR.parent


@dataclass(frozen=True)
class Blank:
    file: str  # path inside the repository, e.g. "llama_min/rope.py"
    qualname: str  # "apply_rotary" or "RotaryEmbedding.forward"
    todo: str  # what to implement, with shapes and the convention: the NotImplementedError message

    @property
    def name(self) -> str:
        return f"{self.file}::{self.qualname}"


@dataclass(frozen=True)
class Lab:
    number: int
    slug: str
    title: str
    handout: str  # file name in lab/
    grader: str  # path inside lab/
    handin: tuple[str, ...]  # files a student adds besides the code, relative to the repository root
    blanks: tuple[Blank, ...]
    also_shows: tuple[str, ...]  # FILE::QUALNAME of other labs' functions that give this lab's answer away

    @property
    def files(self) -> list[str]:
        """The source files a student edits in this lab."""
        return sorted({b.file for b in self.blanks})


def load_labs(path: Path = LAB_DIR / "manifest.toml") -> dict[int, Lab]:
    """The labs by number, in order."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    labs = {}
    for entry in data["lab"]:
        blanks = []
        for b in entry["blank"]:
            file, sep, qualname = b["function"].partition("::")
            if not sep:
                raise ValueError(f"{path}: lab {entry['number']}: {b['function']!r} must read FILE::QUALNAME")
            blanks.append(Blank(file, qualname, " ".join(b["todo"].split())))
        labs[entry["number"]] = Lab(entry["number"], entry["slug"], entry["title"], entry["handout"], entry["grader"],
                                    tuple(entry.get("handin", ())), tuple(blanks), tuple(entry.get("also_shows", ())))
    return dict(sorted(labs.items()))


def choose_labs(numbers: list[int], labs: dict[int, Lab]) -> list[Lab]:
    """The labs with these numbers; an unknown number is an error naming the known ones."""
    unknown = sorted(set(numbers) - set(labs))
    if unknown:
        raise ValueError(f"unknown lab numbers {unknown}; the labs are "
                         + ", ".join(f"{n} ({lab.title})" for n, lab in labs.items()))
    return [labs[n] for n in sorted(set(numbers))]
