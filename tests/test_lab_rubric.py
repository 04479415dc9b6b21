"""lab/rubric.toml: [labN] gives the points of the grader tests, [labN.handin] those of the hand-ins a person
grades; the grader scores only the first, a bad file is a one-line error, and the shipped rubric prices every
hand-in file and every written question of every lab."""

import shutil
from pathlib import Path

import pytest

from lab.grade import main as grade_main, parse_rubric, read_rubric, score
from lab.manifest import LAB_DIR, load_labs

from conftest import hand_in_questions

RUBRIC = """
[lab1]
test_float32 = 4
"test_apply[bf16]" = 1.5

[lab1.handin]
"handin/01/answers.md#1" = 2
"handin/01/plot.png" = 3

[lab2]
test_forward = 10
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rubric.toml"
    path.write_text(text)
    return path


def test_hand_ins_are_read_apart_from_the_grader_tests(tmp_path):
    tests, handins = parse_rubric(write(tmp_path, RUBRIC))
    assert tests == {1: {"test_float32": 4.0, "test_apply[bf16]": 1.5}, 2: {"test_forward": 10.0}}
    assert handins == {1: {"handin/01/answers.md#1": 2.0, "handin/01/plot.png": 3.0}}
    assert read_rubric(tmp_path / "rubric.toml") == tests
    assert parse_rubric(tmp_path / "missing.toml") == ({}, {})


def test_the_grader_scores_only_the_tests(tmp_path):
    rubric = read_rubric(write(tmp_path, RUBRIC))
    files = [(1, Path("test_lab01_rmsnorm.py"), False)]
    outcomes = {("test_lab01_rmsnorm.py", "test_float32"): (True, ""),
                ("test_lab01_rmsnorm.py", "test_apply[bf16]"): (True, "")}
    results = score([1], files, outcomes, {}, rubric, {})
    assert [(r.name, r.points) for r in results] == [("test_float32", 4.0), ("test_apply[bf16]", 1.5)]


@pytest.mark.parametrize("text, says", [
    ("[written]\nq1 = 2\n", "[written] is not a lab"),
    ("[lab1]\ntest_a = 1\n[lab1.plots]\nx = 1\n", "[lab1] plots = {'x': 1}: points must be a number"),
    ("[lab1]\ntest_a = \"two\"\n", "[lab1] test_a = 'two': points must be a number"),
    ("[lab1]\ntest_a = -1\n", "points must be a number >= 0"),
    ("[lab1]\ntest_a = true\n", "points must be a number >= 0"),
    ("[lab1]\nhandin = 3\n", "lab1.handin must be a table"),
    ("[lab1.handin]\n\"handin/01/answers.md#1\" = \"x\"\n", "[lab1.handin] handin/01/answers.md#1 = 'x'"),
    ("[lab1\n", "is not valid TOML"),
])
def test_a_bad_rubric_is_a_clear_error(tmp_path, text, says):
    with pytest.raises(ValueError, match="rubric.toml") as error:
        parse_rubric(write(tmp_path, text))
    assert says in str(error.value)


def test_lab_grade_says_what_is_wrong_with_the_rubric(tmp_path, monkeypatch):
    (tmp_path / "lab").mkdir()
    shutil.copy(LAB_DIR / "manifest.toml", tmp_path / "lab" / "manifest.toml")
    (tmp_path / "lab" / "rubric.toml").write_text("[written]\nq1 = 2\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        grade_main(["--lab", "1"])
    assert str(stop.value).startswith("lab.grade: error: ") and "[written] is not a lab" in str(stop.value)
    assert "\n" not in str(stop.value)


def questions(lab) -> int:
    """How many numbered questions the lab's handout asks in its Hand in section."""
    return hand_in_questions((LAB_DIR / lab.handout).read_text(encoding="utf-8"))


def test_the_shipped_rubric_prices_every_hand_in_of_every_lab():
    tests, handins = parse_rubric(LAB_DIR / "rubric.toml")
    for number, lab in load_labs().items():
        assert tests.get(number), f"lab {number} has no [lab{number}] section"
        priced = handins.get(number, {})
        for entry in priced:
            file, _, question = entry.partition("#")
            assert file in lab.handin, f"[lab{number}.handin] {entry}: {file} is not a hand-in of lab {number}"
            assert not question.isdigit() or 1 <= int(question) <= questions(lab), \
                f"[lab{number}.handin] {entry}: the handout has no question {question}"
        for file in lab.handin:
            wanted = ([f"{file}#{q}" for q in range(1, questions(lab) + 1)] if file.endswith("answers.md")
                      else [file])
            missing = [w for w in wanted if w not in priced]
            assert not missing, f"[lab{number}.handin] prices no {missing[0]}"
