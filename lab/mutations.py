"""The catalogue of student mistakes, written once and used twice: ``python -m lab.make_fixtures`` runs every
mistake on the graders' inputs and stores its output beside the reference's, so that a grader names the
mistake when a student's output equals it; ``python -m lab.selfcheck`` patches every mistake into a reference
version and checks that the owning lab's grader fails (caught) with a message containing its cause (named).

A mistake is a list of (find, replace) edits on one reference function. They are matched on the function's
canonical text, ``ast.unparse`` of its syntax tree indented as in the file: comments, line breaks, quotes,
redundant parentheses and the docstring do not matter, so an edit that leaves the code's syntax alone leaves
every mistake applicable (``tests/test_lab_mutations.py`` proves it on every entry). Each ``find`` must
occur exactly once in that text; write it as ``ast.unparse`` would (single quotes are used for strings).

The entries live one file per lab, ``lab/catalogue/labNN_<slug>.py``, beside the inputs they are tried on.
"""

from __future__ import annotations

import ast
import importlib
import textwrap
from dataclasses import dataclass

from .manifest import LAB_DIR
from .source import function_span


@dataclass(frozen=True)
class Mutation:
    name: str
    lab: int
    function: str  # FILE::QUALNAME
    edits: tuple[tuple[str, str], ...]
    cause: str  # what the mistake is: the grader's message must contain it (case-insensitive)
    why: str = ""  # what the student should do instead, shown after the cause

    @property
    def file(self) -> str:
        return self.function.partition("::")[0]

    @property
    def message(self) -> str:
        """What a grader says when a student's output is this mistake's."""
        return f"{self.cause}: {self.why}" if self.why else self.cause

    def apply(self, source: str) -> str:
        """``source`` (the whole file) with this mistake made inside the function (in canonical form)."""
        qualname = self.function.partition("::")[2]
        span = function_span(source, qualname)
        lines = source.splitlines()
        text = canonical(lines[span.start - 1:span.end])
        for find, replace in self.edits:
            find = next((f for f in normalise(find) if f in text), find)
            if text.count(find) != 1:
                raise ValueError(f"mutation {self.name}: {find!r} occurs {text.count(find)} times in the canonical "
                                 f"text of {self.function}:\n{text}")
            text = text.replace(find, replace)
        lines[span.start - 1:span.end] = text.splitlines()
        mutated = "\n".join(lines) + "\n"
        try:
            ast.parse(mutated)
        except SyntaxError as e:
            raise ValueError(f"mutation {self.name} makes {self.file} invalid Python: {e}") from None
        return mutated


def canonical(lines: list[str]) -> str:
    """One function's lines as ``ast.unparse`` writes them, indented as the def was."""
    indent = len(lines[0]) - len(lines[0].lstrip()) if lines else 0
    tree = ast.parse(textwrap.dedent("\n".join(lines)))
    return textwrap.indent(ast.unparse(tree), " " * indent)


def normalise(fragment: str) -> tuple[str, ...]:
    """A find written in the file's style, in ast.unparse's: as written with single quotes, and, when it parses
    as an expression or as statements, unparsed (no redundant parentheses, a tuple assigned in parentheses)."""
    forms = [fragment.replace('"', "'")]
    prefix, suffix = fragment[:len(fragment) - len(fragment.lstrip())], fragment[len(fragment.rstrip()):]
    for mode in ("eval", "exec"):
        try:
            forms.append(prefix + ast.unparse(ast.parse(fragment.strip(), mode=mode)) + suffix)
        except SyntaxError:
            pass
    if fragment.rstrip().endswith(":"):  # a block's header: unparse it with a body, keep the header line
        try:
            header = ast.unparse(ast.parse(fragment.strip() + "\n    pass")).splitlines()[0]
            forms.append(prefix + header + suffix)
        except SyntaxError:
            pass
    return tuple(forms)


def m(name: str, lab: int, function: str, cause: str, *edits: tuple[str, str], why: str = "") -> Mutation:
    return Mutation(name, lab, function, tuple(edits), cause, why)


def catalogue() -> list[Mutation]:
    """Every lab's mistakes, in lab order (``MUTATIONS`` of each ``lab/catalogue/labNN_*.py``)."""
    found = []
    for path in sorted((LAB_DIR / "catalogue").glob("lab[0-9][0-9]_*.py")):
        found += importlib.import_module(f"lab.catalogue.{path.stem}").MUTATIONS
    names = [mu.name for mu in found]
    doubles = sorted({n for n in names if names.count(n) > 1})
    if doubles:
        raise ValueError(f"mutation names used twice: {doubles}")
    return found


CATALOGUE: list[Mutation] = catalogue()
