"""The student version (lab/handout.py): exactly the manifest's function bodies are blanked, with their
signatures and docstrings kept; pasting the reference back restores every file byte for byte; the version
holds what a student needs and none of the answers (no tests/, no instructor tools, no history)."""

import ast
import json

import pytest

from lab.handout import fill_handout, main as handout_main, write_handout
from lab.manifest import REPO, load_labs
from lab.source import function_span

LABS = load_labs()


def function_node(source: str, qualname: str) -> ast.FunctionDef:
    scope = ast.parse(source).body
    for part in qualname.split("."):
        node = next(n for n in scope if getattr(n, "name", None) == part)
        scope = node.body
    return node


@pytest.fixture(scope="module")
def every_lab_blanked(tmp_path_factory):
    out = tmp_path_factory.mktemp("handout") / "all"
    write_handout(list(LABS.values()), out)
    return out


def test_each_blanked_body_is_the_docstring_and_one_raise(every_lab_blanked):
    for lab in LABS.values():
        for blank in lab.blanks:
            mine = function_node((every_lab_blanked / blank.file).read_text(), blank.qualname)
            reference = function_node((REPO / blank.file).read_text(), blank.qualname)
            assert ast.dump(mine.args) == ast.dump(reference.args), f"{blank.name}: signature changed"
            assert [ast.dump(d) for d in mine.decorator_list] == [ast.dump(d) for d in reference.decorator_list]
            assert ast.get_docstring(mine) == ast.get_docstring(reference), f"{blank.name}: docstring changed"
            body = mine.body[1:] if ast.get_docstring(mine) else mine.body
            assert len(body) == 1 and isinstance(body[0], ast.Raise), f"{blank.name}: body is not one raise"
            call = body[0].exc
            assert call.func.id == "NotImplementedError"
            message = ast.literal_eval(call.args[0])
            assert message == f"Lab {lab.number} ({lab.title}): {blank.todo}", blank.name


def test_pasting_the_reference_back_restores_every_file(every_lab_blanked, tmp_path):
    changed = fill_handout(every_lab_blanked)
    assert changed == sorted({b.file for lab in LABS.values() for b in lab.blanks})
    for path in sorted((REPO / "llama_min").rglob("*.py")):
        mine = every_lab_blanked / path.relative_to(REPO)
        assert mine.read_bytes() == path.read_bytes(), f"{path.relative_to(REPO)} differs after --fill"


def test_the_handout_holds_what_a_student_needs_and_no_answers(tmp_path):
    out = tmp_path / "h"
    write_handout([LABS[3], LABS[7]], out)
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    for needed in ("train.py", "generate.py", "data/shakespeare/train.txt", "data/word_tasks/tasks.jsonl",
                   "lab/grade.py", "lab/pack.py", "lab/rubric.toml", "lab/leaderboard.py", "lab/experiments.md",
                   "lab/curves/lr_sweep.png", "lab/curves/ablations.png", "lab/03_rope.md", "lab/07_lora.md", "lab/plots/rope.py", "README.md",
                   *(f"lab/{lab.grader}" for lab in LABS.values()), *(f"lab/fixtures/lab{n:02d}.json" for n in LABS)):
        assert needed in present, f"the handout lacks {needed}"
    for absent in ("tests/", "experiments/", ".git/", ".ci/", "lab/make_fixtures.py", "lab/mutations.py",
                   "lab/catalogue/", "lab/leaks.py", "lab/selfcheck.py", "lab/handout.py", "lab/source.py",
                   "lab/README.md", "lab/01_rmsnorm.md"):
        assert not any(p.startswith(absent) for p in present), f"the handout ships {absent}"
    assert json.loads((out / "lab/handout.json").read_text())["labs"] == [3, 7]
    assert 'testpaths = ["lab/graders"]' in (out / "pyproject.toml").read_text()
    rope = (out / "llama_min/rope.py").read_text()
    span = function_span(rope, "apply_rotary")
    assert "unflatten" not in "\n".join(rope.splitlines()[span.body - 1:span.end]), "the rotation's code is still there"


def test_the_command_line_refuses_bad_requests(tmp_path, capsys):
    with pytest.raises(SystemExit):
        handout_main(["--labs", "99", "--out", str(tmp_path / "a")])
    assert "unknown lab numbers [99]" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SystemExit):
        handout_main(["--labs", "1", "--out", str(tmp_path / "full")])
    assert "is not empty" in capsys.readouterr().err
    handout_main(["--labs", "4", "--out", str(tmp_path / "b")])
    assert "AdapterPrompt.forward" in capsys.readouterr().out, "no note that lab 8's code shows lab 4's answer"
