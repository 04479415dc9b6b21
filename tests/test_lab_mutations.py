"""The mistake catalogue (lab/mutations.py, lab/catalogue/): every entry applies to the reference, survives edits
that leave the code's syntax alone, and the committed fixtures are exactly what the committed script writes."""

import ast
import filecmp

import pytest

from lab import make_fixtures
from lab.manifest import LAB_DIR, REPO, load_labs
from lab.mutations import CATALOGUE
from lab.source import function_span


def function_tree(source: str, qualname: str) -> str:
    """ast.dump of one function of ``source`` (comments, layout and quotes do not show)."""
    span = function_span(source, qualname)
    lines = source.splitlines()[span.start - 1:span.end]
    indent = len(lines[0]) - len(lines[0].lstrip())
    return ast.dump(ast.parse("\n".join(line[indent:] for line in lines)))


def commented(source: str, qualname: str) -> str:
    """``source`` with a comment line before every statement of the function."""
    span = function_span(source, qualname)
    lines = source.splitlines()
    node = ast.parse(source)
    starts = sorted({n.lineno for n in ast.walk(node) if isinstance(n, ast.stmt) and span.body <= n.lineno <= span.end})
    for number in reversed(starts):
        text = lines[number - 1]
        lines.insert(number - 1, text[:len(text) - len(text.lstrip())] + "# a reader's note, with (parentheses")
    return "\n".join(lines) + "\n"


def reformatted(source: str) -> str:
    """The whole file as ast.unparse writes it: other quotes, line breaks and parentheses, no comments."""
    return ast.unparse(ast.parse(source)) + "\n"


@pytest.mark.parametrize("mutation", CATALOGUE, ids=[mu.name for mu in CATALOGUE])
def test_mutation_survives_harmless_edits(mutation):
    source = (REPO / mutation.file).read_text(encoding="utf-8")
    qualname = mutation.function.partition("::")[2]
    want = function_tree(mutation.apply(source), qualname)
    assert want != function_tree(source, qualname), f"{mutation.name} changes nothing"
    for edited in (commented(source, qualname), reformatted(source)):
        assert function_tree(mutation.apply(edited), qualname) == want


def test_catalogue_covers_every_lab():
    labs = load_labs()
    assert {mu.lab for mu in CATALOGUE} == set(labs)
    for mu in CATALOGUE:
        assert any(b.name == mu.function for b in labs[mu.lab].blanks), f"{mu.name}: {mu.function} not in lab {mu.lab}"


def test_fixtures_are_what_the_script_writes(tmp_path):
    make_fixtures.main(["--out", str(tmp_path)])
    for number in load_labs():
        for suffix in ("json", "safetensors"):
            name = f"lab{number:02d}.{suffix}"
            assert filecmp.cmp(tmp_path / name, LAB_DIR / "fixtures" / name, shallow=False), (
                f"lab/fixtures/{name} differs from what python -m lab.make_fixtures writes: run it and commit")
