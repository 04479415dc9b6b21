"""The grader with points (lab/grade.py) and the submission packer (lab/pack.py), run as a student and an
instructor would: in a generated handout, with a blanked lab, hidden tests and a rubric.

The Gradescope check encodes the results format documented at
https://gradescope-autograders.readthedocs.io/en/latest/specs/ ("Output format"): the keys allowed at the top
level and in each test, their types, and the allowed status and visibility values."""

import json
import subprocess
import sys
import zipfile

import pytest

from lab.handout import write_handout
from lab.manifest import REPO, load_labs
from lab.pack import pack

LABS = load_labs()

# From the documented format: every key is optional except that "score" is needed at the top or per test.
TOP_LEVEL = {"score": (int, float), "execution_time": (int, float), "output": str, "output_format": str,
             "test_output_format": str, "test_name_format": str, "visibility": str, "stdout_visibility": str,
             "extra_data": dict, "tests": list, "leaderboard": list}
PER_TEST = {"score": (int, float), "max_score": (int, float), "status": str, "name": str, "name_format": str,
            "number": str, "output": str, "output_format": str, "tags": list, "visibility": str, "extra_data": dict}
VISIBILITY = {"hidden", "after_due_date", "after_published", "visible"}
STATUS = {"passed", "failed"}

HIDDEN_TEST = '''
import torch
from llama_min.rmsnorm import RMSNorm


def test_unit_gain_keeps_unit_rms():
    y = RMSNorm(8, 1e-6)(torch.full((2, 8), 3.0))
    assert torch.allclose(y, torch.ones(2, 8), atol=1e-5)


def test_always_fails():
    assert False, "a hidden failure"
'''


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """A handout with lab 2 blanked, graded with a hidden tests directory."""
    root = tmp_path_factory.mktemp("grade")
    write_handout([LABS[2]], root / "h")
    hidden = root / "hidden"
    hidden.mkdir()
    (hidden / "test_lab01_hidden.py").write_text(HIDDEN_TEST)
    (hidden / "rubric.toml").write_text("[lab1]\ntest_unit_gain_keeps_unit_rms = 5\n")
    run = subprocess.run([sys.executable, "-m", "lab.grade", "--json", str(root / "results.json"), "--hidden",
                          str(hidden)], cwd=root / "h", capture_output=True, text=True, timeout=300)
    return run, json.loads((root / "results.json").read_text())


def test_results_follow_gradescopes_documented_format(graded):
    _, results = graded
    assert set(results) <= set(TOP_LEVEL), set(results) - set(TOP_LEVEL)
    for key, kind in TOP_LEVEL.items():
        assert key not in results or isinstance(results[key], kind), key
    assert results["visibility"] in VISIBILITY and results["stdout_visibility"] in VISIBILITY
    for test in results["tests"]:
        assert set(test) <= set(PER_TEST), set(test) - set(PER_TEST)
        for key, kind in PER_TEST.items():
            assert key not in test or isinstance(test[key], kind), (key, test)
        assert test["status"] in STATUS and test["visibility"] in VISIBILITY
        assert all(isinstance(tag, str) for tag in test["tags"])
        assert 0 <= test["score"] <= test["max_score"]
    assert results["score"] == pytest.approx(sum(t["score"] for t in results["tests"]))


def test_scores_follow_the_rubric_and_the_blanked_lab(graded):
    run, results = graded
    assert run.returncode == 1, "some tests failed, so the exit status is 1"
    by_lab = {}
    for test in results["tests"]:
        by_lab.setdefault(test["tags"][0], []).append(test)
    assert all(t["status"] == "failed" and t["score"] == 0 for t in by_lab["lab2"])
    assert "not written yet" in by_lab["lab2"][0]["output"]
    public = [t for lab, tests in by_lab.items() if lab != "lab2" for t in tests if "hidden" not in t["tags"]]
    assert public and all(t["status"] == "passed" and t["score"] == t["max_score"] for t in public)
    hidden = {t["name"]: t for t in results["tests"] if "hidden" in t["tags"]}
    assert hidden["Lab 1: test_unit_gain_keeps_unit_rms"]["score"] == 5.0
    assert hidden["Lab 1: test_always_fails"]["max_score"] == 1.0  # not in the hidden rubric: 1 point
    assert all(t["visibility"] == "after_published" for t in hidden.values())
    assert "2   SwiGLU feed-forward" in run.stdout and "0/10" in run.stdout


def test_hidden_tests_stay_out_of_what_students_see_at_once(graded):
    run, results = graded
    assert "a hidden failure" in run.stdout, "the instructor's own table shows the hidden failure"
    visible = results["output"] + json.dumps([t for t in results["tests"] if t["visibility"] == "visible"])
    for marker in ("a hidden failure", "test_always_fails", "test_unit_gain_keeps_unit_rms", "(hidden)"):
        assert marker not in visible, f"{marker!r} is visible before the grades are published"


def test_one_labs_broken_file_costs_only_that_lab(tmp_path):
    """llama_min/__init__.py imports every module: a SyntaxError in lab 2's file must not fail lab 1."""
    write_handout([LABS[1], LABS[2]], tmp_path / "h")
    rmsnorm = tmp_path / "h/llama_min/rmsnorm.py"
    rmsnorm.write_text((REPO / "llama_min/rmsnorm.py").read_text())
    feedforward = tmp_path / "h/llama_min/feedforward.py"
    feedforward.write_text(feedforward.read_text().replace("def forward(", "def forward((", 1))
    run = subprocess.run([sys.executable, "-m", "lab.grade", "--lab", "1", "--lab", "2", "--json",
                          str(tmp_path / "r.json")], cwd=tmp_path / "h", capture_output=True, text=True, timeout=600)
    tests = {t["name"]: t for t in json.loads((tmp_path / "r.json").read_text())["tests"]}
    assert all(t["status"] == "passed" for name, t in tests.items() if name.startswith("Lab 1")), run.stdout
    assert tests["Lab 2: test_forward"]["status"] == "failed" and "SyntaxError" in tests["Lab 2: test_forward"]["output"]


def test_pack_bundles_the_edited_files_and_names_missing_hand_ins(tmp_path):
    write_handout([LABS[7]], tmp_path / "h")
    (tmp_path / "h/handin/07").mkdir(parents=True)
    (tmp_path / "h/handin/07/answers.md").write_text("1. ...")
    present, missing = pack(tmp_path / "h", [7], tmp_path / "submission.zip")
    names = set(zipfile.ZipFile(tmp_path / "submission.zip").namelist())
    assert names == {"lab/handout.json", "llama_min/peft/lora.py", "handin/07/answers.md"} == set(present)
    assert missing == ["handin/07/lora_norms.png", "handin/07/word_tasks.png"]
