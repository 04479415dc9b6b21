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
# In a handout, the blanked files as handed out: grading a lab takes every other lab's files from here, so that
# one lab's broken file cannot fail another (lab/handout.py writes it, lab/isolate.py reads it).
STARTER = "lab/starter"


def inside(path: str, where: str) -> str:
    """``path`` when it is a plain relative path that stays inside the directory it is relative to (no
    absolute path, no ``..``, no backslash, no empty part); a ValueError naming ``where`` otherwise. The tools
    write, blank and zip these paths, so one that escapes would touch files outside the handout."""
    parts = path.split("/") if isinstance(path, str) else [""]
    if (not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or ":" in parts[0]
            or any(part in ("", ".", "..") for part in parts)):
        raise ValueError(f"{where}: {path!r} must be a relative path inside the repository, like "
                         "llama_min/rope.py (no '..', no leading '/')")
    return path


@dataclass(frozen=True)
class Blank:
    file: str  # path inside the repository, e.g. "llama_min/rope.py"
    qualname: str  # "apply_rotary" or "RotaryEmbedding.forward"
    todo: str  # what to implement, with shapes and the convention: the NotImplementedError message

    def __post_init__(self):
        if not inside(self.file, f"lab function {self.file}::{self.qualname}").endswith(".py"):
            raise ValueError(f"lab function {self.file}::{self.qualname}: {self.file!r} must be a Python file")

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

    def __post_init__(self):
        for path in (self.handout, self.grader, *self.handin):
            inside(path, f"lab {self.number}")

    @property
    def files(self) -> list[str]:
        """The source files a student edits in this lab."""
        return sorted({b.file for b in self.blanks})


def load_labs(path: Path = LAB_DIR / "manifest.toml") -> dict[int, Lab]:
    """The labs by number, in order. Every path in it is checked to stay inside the repository."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    labs = {}
    for entry in data["lab"]:
        where = f"{path}: lab {entry['number']}"
        blanks = []
        for b in entry["blank"]:
            file, sep, qualname = b["function"].partition("::")
            if not sep:
                raise ValueError(f"{where}: {b['function']!r} must read FILE::QUALNAME")
            try:
                blanks.append(Blank(file, qualname, " ".join(b["todo"].split())))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        try:
            labs[entry["number"]] = Lab(entry["number"], entry["slug"], entry["title"], entry["handout"],
                                        entry["grader"], tuple(entry.get("handin", ())), tuple(blanks),
                                        tuple(entry.get("also_shows", ())))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return dict(sorted(labs.items()))


def choose_labs(numbers: list[int], labs: dict[int, Lab]) -> list[Lab]:
    """The labs with these numbers; an unknown number is an error naming the known ones."""
    unknown = sorted(set(numbers) - set(labs))
    if unknown:
        raise ValueError(f"unknown lab numbers {unknown}; the labs are "
                         + ", ".join(f"{n} ({lab.title})" for n, lab in labs.items()))
    return [labs[n] for n in sorted(set(numbers))]
