"""Answers that a handout would leak: a blanked function's computation written again elsewhere in the package.

A statement of a blanked body (an assignment's value, a returned or evaluated expression) is compared with
every such statement in the package's other code, on its syntax tree with the names of attributes' owners
dropped (``self.theta`` and ``theta``, ``self.gate`` and ``prompt.gate`` read alike) and without the
``device=``/``dtype=`` keywords. Only expressions of some size count: a repeated ``x.float()`` gives nothing away.
``python -m lab.handout`` prints one note per leak, naming the file and line to blank or rewrite.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .manifest import Lab
from .source import function_span

MIN_NODES = 10  # smaller expressions are common idioms, not answers
PLACEMENT = {"device", "dtype"}


class _Normalise(ast.NodeTransformer):
    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.value, ast.Name):
            return ast.Name(node.attr, ast.Load())  # self.theta, prompt.gate -> theta, gate
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        node.keywords = [k for k in node.keywords if k.arg not in PLACEMENT]
        return node


def _expressions(tree: ast.AST, lines: range | None = None) -> dict[str, int]:
    """Normalised dump -> line, for the values of the statements in ``tree`` (within ``lines`` if given)."""
    found = {}
    for node in ast.walk(tree):
        value = getattr(node, "value", None) if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign,
                                                                  ast.Return, ast.Expr)) else None
        if value is None or (lines is not None and node.lineno not in lines):
            continue
        normal = _Normalise().visit(ast.parse(ast.unparse(value), mode="eval"))
        if sum(1 for _ in ast.walk(normal)) >= MIN_NODES:
            found.setdefault(ast.dump(normal), node.lineno)
    return found


def duplicated_answers(repo: Path, labs: list[Lab], package: str = "llama_min") -> list[str]:
    """Notes for the instructor: where the package repeats a computation of a function the handout blanks."""
    spans = {}  # file -> line ranges of the functions this handout blanks
    answers = {}  # normalised expression -> (lab, function)
    for lab in labs:
        for b in lab.blanks:
            source = (repo / b.file).read_text(encoding="utf-8")
            span = function_span(source, b.qualname)
            spans.setdefault(b.file, []).append(range(span.body, span.end + 1))
            for dump in _expressions(ast.parse(source), range(span.body, span.end + 1)):
                answers.setdefault(dump, (lab, b))
    notes = []
    for path in sorted((repo / package).rglob("*.py")):
        file = path.relative_to(repo).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for dump, line in _expressions(tree).items():
            if dump in answers and not any(line in r for r in spans.get(file, [])):
                lab, b = answers[dump]
                notes.append(f"lab {lab.number}'s answer ({b.name}) is written again at {file}:{line}, which "
                             "this handout keeps: blank or rewrite it there")
    return notes
