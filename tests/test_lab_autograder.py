"""The Gradescope autograder (lab/autograder.py, lab/isolate.py, lab/record.py), run end to end as Gradescope
would, without Docker: a zip built for labs 1 and 2 with hidden tests, unpacked into a temporary /autograder,
then ``run_autograder`` on a correct, a wrong and two malicious submissions.

The student's code must run as an unprivileged user for it to be unable to delete the grader's files. As root,
these tests use (or create, with useradd) the user ``labstudent``; when this Python lives under a directory
that user cannot enter (/root/.pyenv), ``run_autograder`` runs in a private mount namespace (unshare) in which
that directory is reachable. Where neither is possible, the test of the deleting submission checks what still
holds without a user switch (the change is detected and scores 0) and says so in its skip/assert messages."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from lab.manifest import REPO
from lab.source import function_span

MARKER = "HIDDEN-MARKER-q7zx"  # only ever in a hidden test's name and message

MARKER_TEST = f'''
import torch

from lab.graders.check import LabFixtures, check
from llama_min.rmsnorm import RMSNorm


def test_{MARKER.replace("-", "_")}():
    case = LabFixtures(1).case("forward.eps")
    norm = RMSNorm(case["weight"].shape[0], case.params["eps"])
    with torch.no_grad():
        norm.weight.copy_(case["weight"])
        check(norm(case["x"]), case, "{MARKER} RMSNorm of the large-eps case")
'''


def with_body(file: str, qualname: str, body: str, prefix: str = "") -> str:
    """The reference ``file`` with the body of ``qualname`` (after its docstring) replaced by ``body``, and
    ``prefix`` added after the imports' first line."""
    source = (REPO / file).read_text()
    span = function_span(source, qualname)
    lines = source.splitlines()
    lines[span.body - 1:span.end] = [span.indent + line for line in body.strip("\n").splitlines()]
    text = "\n".join(lines) + "\n"
    return text.replace("import torch\n", "import torch\n" + prefix, 1) if prefix else text


def submission(tmp: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    return tmp


def sandbox_user() -> str | None:
    """An unprivileged user for the children (created if need be), or None when this does not run as root."""
    if os.geteuid() != 0:
        return None
    try:
        import pwd
        pwd.getpwnam("labstudent")
        return "labstudent"
    except KeyError:
        pass
    if shutil.which("useradd") and subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                                                   "/usr/sbin/nologin", "labstudent"]).returncode == 0:
        return "labstudent"
    return "nobody"


def private_python_prefix() -> Path | None:
    """The directory directly under a private home (mode without o+x) that holds this Python, if any."""
    parts = Path(sys.prefix).parts
    for i in range(2, len(parts)):
        folder = Path(*parts[:i])
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return Path(*parts[:i + 1])
    return None


def run_sandboxed(command: list[str], env: dict, user: str | None) -> subprocess.CompletedProcess:
    """Run ``command`` (the autograder, which switches to ``user`` for the students' code); when this Python
    lives in a private home, in a mount namespace where that home is a readable directory holding only it."""
    env = {**env, "LAB_PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)  # the autograder finds its own lab package in source/handout
    if user:
        env["LAB_SANDBOX_USER"] = user
    hidden_home = private_python_prefix() if user else None
    if hidden_home is not None and shutil.which("unshare"):
        stand_in = Path(tempfile.mkdtemp(prefix="lab_home_"))
        stand_in.chmod(0o755)
        (stand_in / hidden_home.name).mkdir()
        script = (f'mount --bind "{hidden_home}" "{stand_in / hidden_home.name}" && '
                  f'mount --rbind "{stand_in}" "{hidden_home.parent}" && exec "$@"')
        command = ["unshare", "-m", "sh", "-c", script, "sh", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


def run_autograder(root: Path, user: str | None) -> subprocess.CompletedProcess:
    return run_sandboxed(["bash", str(root / "source" / "run_autograder")],
                         {**os.environ, "LAB_AUTOGRADER_ROOT": str(root)}, user)


@pytest.fixture(scope="module")
def autograder(tmp_path_factory):
    """The autograder zip for labs 1 and 2, with the shipped example hidden tests and a marker test."""
    tmp = tmp_path_factory.mktemp("autograder")
    hidden = tmp / "hidden"
    shutil.copytree(REPO / "lab" / "hidden_examples", hidden)
    (hidden / "test_lab01_marker.py").write_text(MARKER_TEST)
    build = subprocess.run([sys.executable, "-m", "lab.pack", "--autograder", "--lab", "1", "--lab", "2",
                            "--hidden", str(hidden), "--time-limit", "120", "--out", str(tmp / "autograder.zip")],
                           cwd=REPO, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr
    return tmp / "autograder.zip"


def grade(autograder: Path, files: dict[str, str], tmp: Path, time_limit: float | None = None,
          user: str | None = "auto") -> tuple[dict, Path, subprocess.CompletedProcess]:
    root = tmp / "autograder"
    root.mkdir()
    root.chmod(0o755)
    with zipfile.ZipFile(autograder) as z:
        z.extractall(root / "source")
    (root / "source" / "run_autograder").chmod(0o755)
    if time_limit is not None:
        config = json.loads((root / "source" / "config.json").read_text())
        (root / "source" / "config.json").write_text(json.dumps({**config, "time_limit_s": time_limit}))
    submission(root / "submission", files)
    (root / "results").mkdir()
    run = run_autograder(root, sandbox_user() if user == "auto" else user)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads((root / "results" / "results.json").read_text()), root, run


def pinned_tests(autograder: Path) -> int:
    """How many tests (public and hidden) ran on the reference when the zip was built."""
    return sum(len(tests) for tests in json.loads(zipfile.ZipFile(autograder).read("config.json"))["pins"].values())


def by_name(results: dict) -> dict[str, dict]:
    return {t["name"]: t for t in results["tests"]}


def visible_text(results: dict) -> str:
    """Everything a student sees before the grades are published."""
    return results["output"] + json.dumps([t for t in results["tests"] if t["visibility"] == "visible"])


def assert_nothing_hidden_visible(results: dict) -> None:
    hidden = [t for t in results["tests"] if t["visibility"] != "visible"]
    assert hidden and all("hidden" in t["tags"] and t["visibility"] == "after_published" for t in hidden)
    for t in hidden:
        assert t["name"] not in visible_text(results) and t["name"].split(": ")[1] not in visible_text(results)
    assert MARKER not in visible_text(results) and MARKER.replace("-", "_") not in visible_text(results)


CORRECT = {"llama_min/rmsnorm.py": (REPO / "llama_min/rmsnorm.py").read_text(),
           "llama_min/feedforward.py": (REPO / "llama_min/feedforward.py").read_text()}


def test_the_zip_holds_what_gradescope_runs_and_no_reference(autograder):
    z = zipfile.ZipFile(autograder)
    names = set(z.namelist())
    for needed in ("setup.sh", "run_autograder", "config.json", "handout/lab/graders/test_lab01_rmsnorm.py",
                   "handout/lab/fixtures/lab02.safetensors", "handout/lab/isolate.py", "handout/lab/record.py",
                   "hidden/test_lab01_shapes.py", "hidden/rubric.toml", "hidden/test_lab01_marker.py"):
        assert needed in names, needed
    assert not any(n.startswith(("handout/tests/", "handout/lab/make_fixtures", "handout/lab/mutations"))
                   for n in names)
    assert stat.S_IMODE(z.getinfo("run_autograder").external_attr >> 16) & 0o111
    setup = z.read("setup.sh").decode()
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in setup and "useradd" in setup
    rmsnorm = z.read("handout/llama_min/rmsnorm.py").decode()
    assert "NotImplementedError" in rmsnorm and "rsqrt" not in rmsnorm, "the reference answer is in the zip"
    config = json.loads(z.read("config.json"))
    assert config["labs"] == [1, 2]
    assert config["pins"]["1"]["test_lab01_rmsnorm.py::test_float32"] == [[1, "forward.float32"]]


def test_a_correct_submission_scores_every_point_and_the_dry_run_says_the_same(autograder, tmp_path):
    results, _, run = grade(autograder, CORRECT, tmp_path)
    tests = by_name(results)
    assert all(t["status"] == "passed" for t in tests.values()), run.stdout
    assert results["score"] == sum(t["max_score"] for t in tests.values())
    assert len(tests) == pinned_tests(autograder)
    assert tests["Lab 1: test_flattened_rows"]["max_score"] == 2  # the hidden rubric
    assert_nothing_hidden_visible(results)
    # python -m lab.pack --autograder --dry-run on the same zip and submission: the same JSON
    submitted = submission(tmp_path / "submitted", CORRECT)
    dry = run_sandboxed([sys.executable, "-m", "lab.pack", "--autograder", "--dry-run", str(submitted), "--zip",
                         str(autograder), "--json", str(tmp_path / "dry.json")], dict(os.environ), sandbox_user())
    assert dry.returncode == 0, dry.stdout + dry.stderr
    ours = json.loads((tmp_path / "dry.json").read_text())
    assert f"score {ours['score']:g} of {ours['score']:g}" in dry.stdout, dry.stdout
    assert {**ours, "execution_time": 0} == {**results, "execution_time": 0}


def test_a_wrong_submission_loses_its_points_and_one_broken_lab_costs_only_itself(autograder, tmp_path):
    eps_outside = "x32 = x.float()\nnormed = x32 / (x32.pow(2).mean(dim=-1, keepdim=True).sqrt() + self.eps)\n" \
                  "return normed.type_as(x) * self.weight"
    files = {"llama_min/rmsnorm.py": with_body("llama_min/rmsnorm.py", "RMSNorm.forward", eps_outside),
             "llama_min/feedforward.py": CORRECT["llama_min/feedforward.py"].replace("def forward", "def forward(", 1)}
    results, _, _ = grade(autograder, files, tmp_path)
    tests = by_name(results)
    lab1 = [t for t in tests.values() if "lab1" in t["tags"] and "hidden" not in t["tags"]]
    assert 0 < sum(t["score"] for t in lab1) < sum(t["max_score"] for t in lab1), "the eps mistake must cost some of lab 1's points, not all"
    assert tests["Lab 1: test_uses_its_own_eps"]["status"] == "failed"
    assert tests["Lab 2: test_forward"]["score"] == 0 and "SyntaxError" in tests["Lab 2: test_forward"]["output"]
    marker = tests[f"Lab 1: test_{MARKER.replace('-', '_')}"]
    assert marker["status"] == "failed" and MARKER in marker["output"], "the marker test must fail with its marker"
    assert_nothing_hidden_visible(results)
    assert "2   SwiGLU feed-forward" in results["output"]


def test_a_submission_that_patches_the_checker_exits_and_carries_its_own_graders_scores_zero(autograder, tmp_path):
    files = {
        # one line makes every torch.allclose in the student's process say yes; the output is all zeros
        "llama_min/rmsnorm.py": with_body("llama_min/rmsnorm.py", "RMSNorm.forward", "return torch.zeros_like(x)",
                                          prefix="torch.allclose = lambda *a, **k: True\n"),
        "llama_min/feedforward.py": with_body("llama_min/feedforward.py", "FeedForward.forward",
                                              "import os\nos._exit(0)"),
        "lab/rubric.toml": "[lab1]\ntest_float32 = 1000\n",
        "lab/graders/test_lab01_rmsnorm.py": "def test_float32():\n    pass\n",
        "lab/graders/test_lab02_swiglu.py": "def test_forward():\n    pass\n",
        "lab/graders/check.py": "def check(*args):\n    pass\n",
    }
    results, _, _ = grade(autograder, files, tmp_path)
    assert results["score"] == 0, [(t["name"], t["score"]) for t in results["tests"] if t["score"]]
    tests = by_name(results)
    assert len(tests) == pinned_tests(autograder), "the submission's own graders added or removed tests"
    assert "largest difference" in tests["Lab 1: test_float32"]["output"], "judged on the real comparison"
    assert "os._exit" in tests["Lab 2: test_forward"]["output"] and "exit status 0" in tests["Lab 2: test_forward"]["output"]
    assert all(t["max_score"] < 1000 for t in tests.values())
    assert_nothing_hidden_visible(results)


def test_an_endless_loop_and_a_deleting_body_score_zero_and_delete_nothing(autograder, tmp_path):
    root = tmp_path / "autograder"
    deleting = (f"import shutil\nshutil.rmtree({str(root / 'source')!r})\nshutil.rmtree({str(root / 'results')!r})\n"
                "return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))")
    files = {"llama_min/rmsnorm.py": with_body("llama_min/rmsnorm.py", "RMSNorm.forward", "while True:\n    pass"),
             "llama_min/feedforward.py": with_body("llama_min/feedforward.py", "FeedForward.forward", deleting)}
    # 15 s: the endless loop costs that twice (public and hidden tests run in their own children)
    results, root, run = grade(autograder, files, tmp_path, time_limit=15)
    tests = by_name(results)
    assert results["score"] == 0, [(t["name"], t["score"]) for t in results["tests"] if t["score"]]
    assert "time limit (15 s)" in tests["Lab 1: test_float32"]["output"]
    assert len(tests) == pinned_tests(autograder), "every test, hidden ones included, has its result"
    forward = tests["Lab 2: test_forward"]["output"]
    if "unprivileged user labstudent" in run.stdout or "unprivileged user nobody" in run.stdout:
        assert "PermissionError" in forward, forward  # the child could not delete, and the test failed on it
        assert (root / "source" / "handout" / "lab" / "graders" / "test_lab02_swiglu.py").is_file()
        assert (root / "source" / "hidden" / "test_lab02_batches.py").is_file()
    else:
        # no user to switch to (not root, or the user cannot run this Python): the child could delete the
        # grader's files; the judge, which loaded everything before, notices and scores the lab 0
        assert "changed or deleted files outside" in forward, forward
    assert_nothing_hidden_visible(results)
