"""Finding a function in Python source by its qualified name, and rewriting exactly its lines.

The ast module gives each function's lines: its decorators, its docstring, its last statement. A function's
region ends after its last statement plus any comment lines still indented inside it, so that a trailing
comment (which may hold part of the answer) goes with the body it belongs to.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Line numbers (1-based, inclusive) of one function in its file."""
    start: int  # first decorator, or the def line
    body: int  # first line after the docstring (the def's first statement when there is no docstring)
    end: int  # last line of the function's region
    indent: str  # the indentation of the body's statements


def _find(tree: ast.Module, qualname: str) -> ast.FunctionDef:
    scope: list[ast.stmt] = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            raise LookupError(f"no {part!r} (of {qualname}) in this file")
        scope = node.body
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise LookupError(f"{qualname} is a class, not a function")
    return node


def function_span(source: str, qualname: str) -> Span:
    """Where ``qualname`` (``apply_rotary``, ``RotaryEmbedding.forward``) sits in ``source``."""
    node = _find(ast.parse(source), qualname)
    lines = source.splitlines()
    first = node.body[0]
    if first.lineno == node.lineno:
        raise ValueError(f"{qualname}: its body shares the def line; put it on lines of its own")
    has_doc = ast.get_docstring(node, clean=False) is not None
    body = first.end_lineno + 1 if has_doc else first.lineno
    end = node.end_lineno
    def_indent = node.col_offset
    for number in range(end + 1, len(lines) + 1):  # trailing comments still inside the function
        text = lines[number - 1]
        if not text.strip():
            continue
        if len(text) - len(text.lstrip()) > def_indent and text.lstrip().startswith("#"):
            end = number
        else:
            break
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    indent = " " * first.col_offset
    return Span(start, body, end, indent)


def not_implemented(todo: str, indent: str, width: int = 110) -> list[str]:
    """``raise NotImplementedError("...")`` with the message wrapped into string literals of ``width``."""
    chunks = textwrap.wrap(todo, width - len(indent) - 6, break_long_words=False, break_on_hyphens=False)
    literals = ['"' + c.replace("\\", "\\\\").replace('"', '\\"') + (" " if i < len(chunks) - 1 else "") + '"'
                for i, c in enumerate(chunks)]
    return [f"{indent}raise NotImplementedError(", *(f"{indent}    {s}" for s in literals[:-1]),
            f"{indent}    {literals[-1]})"]


def blank_function(source: str, qualname: str, todo: str) -> str:
    """``source`` with the body of ``qualname`` after its docstring replaced by raise NotImplementedError(todo)."""
    span = function_span(source, qualname)
    lines = source.splitlines()
    lines[span.body - 1:span.end] = not_implemented(todo, span.indent)
    return "\n".join(lines) + "\n"


def replace_function(source: str, qualname: str, donor: str) -> str:
    """``source`` with the whole of ``qualname`` (decorators to last line) taken from ``donor``'s."""
    mine, theirs = function_span(source, qualname), function_span(donor, qualname)
    lines = source.splitlines()
    lines[mine.start - 1:mine.end] = donor.splitlines()[theirs.start - 1:theirs.end]
    return "\n".join(lines) + "\n"
