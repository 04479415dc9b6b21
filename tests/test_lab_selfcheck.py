"""The proof that the labs work, as CI runs it (``python -m lab.selfcheck``): every lab blanked alone fails
exactly its own grader, the reference pasted back passes everything, and the mutation catalogue is caught by
the owning lab's grader and named in its message."""

import json
import subprocess
import sys

from lab.manifest import REPO, load_labs
from lab.mutations import CATALOGUE


def test_isolation_and_the_mutation_catalogue(tmp_path):
    run = subprocess.run([sys.executable, "-m", "lab.selfcheck", "--json", str(tmp_path / "report.json")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["reference"], report["reference"]
    for number, check in report["isolation"].items():
        assert check["lab_tests_failed"] == check["lab_tests"] > 0, (number, check)
        assert check["other_tests_failed"] == 0, (number, check["problems"])
        assert not check["filled_differs"] and not check["filled_failures"], (number, check)
    mutations = report["mutations"]
    assert len(mutations) == len(CATALOGUE) >= 127
    assert {m["lab"] for m in mutations} == set(load_labs())
    assert all(m["caught"] for m in mutations), [m["name"] for m in mutations if not m["caught"]]
    assert sum(m["named"] for m in mutations) >= 0.9 * len(mutations), [m["name"] for m in mutations if not m["named"]]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
