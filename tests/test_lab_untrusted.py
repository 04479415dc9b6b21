"""The course tools given bad input, as a careless instructor or a prankster student would: manifest paths that
leave the repository, output paths that would overwrite the solution or copy the package into itself, a full
disk, and submissions with links and ``..`` in them. Each is refused with a one-line error and loses nothing.
(lab.grade and the autograder on hostile student code: tests/test_lab_autograder.py and test_lab_grade.py.)"""

import errno
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lab.handout
from lab.autograder import unpack
from lab.handout import main as handout_main, write_handout
from lab.isolate import child_tree
from lab.manifest import REPO, load_labs
from lab.pack import main as pack_main, pack

LABS = load_labs()
MANIFEST = (REPO / "lab" / "manifest.toml").read_text()


@pytest.mark.parametrize("change", [
    ('function = "llama_min/rmsnorm.py::RMSNorm.forward"', 'function = "../../outside.py::RMSNorm.forward"'),
    ('function = "llama_min/rmsnorm.py::RMSNorm.forward"', 'function = "/etc/passwd::RMSNorm.forward"'),
    ('handin = ["handin/01/answers.md"]', 'handin = ["../../../etc/passwd"]'),
    ('handin = ["handin/01/answers.md"]', 'handin = ["/etc/passwd"]'),
    ('grader = "graders/test_lab01_rmsnorm.py"', 'grader = "graders/../../x.py"'),
], ids=["function-dotdot", "function-absolute", "handin-dotdot", "handin-absolute", "grader-dotdot"])
def test_manifest_paths_that_leave_the_repository_are_refused(tmp_path, change):
    assert change[0] in MANIFEST
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "manifest.toml").write_text(MANIFEST.replace(change[0], change[1]))
    with pytest.raises(ValueError, match="must be a relative path inside the repository"):
        load_labs(tmp_path / "lab" / "manifest.toml")
    # lab.pack reads the handout's manifest: it refuses before zipping anything (no /etc/passwd in a zip)
    with pytest.raises(ValueError, match="relative path inside"):
        pack(tmp_path, [1], tmp_path / "submission.zip")
    assert not (tmp_path / "submission.zip").exists()


@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    out = tmp_path_factory.mktemp("untrusted") / "h"
    write_handout([LABS[1]], out)
    return out


@pytest.mark.parametrize("target", ["llama_min/rmsnorm.py", "lab/rubric.toml", "llama_min/out.zip", "notes.txt",
                                    "other.zip"])
def test_pack_never_writes_over_the_code_or_a_file_it_did_not_write(handout, target, monkeypatch, capsys):
    monkeypatch.chdir(handout)
    path = handout / target
    if not path.exists():
        path.write_bytes(b"not a zip of lab.pack" if target != "other.zip" else zipfile_bytes(handout))
    before = path.read_bytes()
    with pytest.raises(SystemExit, match="lab.pack: error"):
        pack_main(["--labs", "1", "--out", target])
    assert path.read_bytes() == before, f"lab.pack changed {target}"


def zipfile_bytes(where: Path) -> bytes:
    """A zip someone else wrote."""
    with zipfile.ZipFile(where / "someone.zip", "w") as z:
        z.writestr("x.txt", "mine")
    data = (where / "someone.zip").read_bytes()
    (where / "someone.zip").unlink()
    return data


def test_pack_replaces_its_own_zip_whole(handout, monkeypatch):
    monkeypatch.chdir(handout)
    pack_main(["--labs", "1", "--out", "submission.zip"])
    pack_main(["--labs", "1", "--out", "submission.zip"])  # over its own zip: allowed
    assert set(zipfile.ZipFile(handout / "submission.zip").namelist()) == {"lab/handout.json", "llama_min/rmsnorm.py"}
    assert not list(handout.glob(".submission.zip*")), "a partial file was left behind"


@pytest.mark.parametrize("inside", ["llama_min/h", "lab/h", "data/shakespeare/h", "."])
def test_handout_refuses_an_out_inside_what_it_copies(inside, capsys):
    out = REPO / inside
    existed = out.exists()
    with pytest.raises(SystemExit):
        handout_main(["--labs", "1", "--out", str(out)])
    error = capsys.readouterr().err
    assert "lab.handout: error" in error and ("inside" in error or "not empty" in error), error
    assert out.exists() == existed


def test_a_full_disk_leaves_no_partial_handout_and_a_retry_works(tmp_path, monkeypatch, capsys):
    copies = {"n": 0}
    real = shutil.copy2

    def copy_until_full(src, dst, *args, **kwargs):
        copies["n"] += 1
        if copies["n"] > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(lab.handout.shutil, "copy2", copy_until_full)
    with pytest.raises(SystemExit):
        handout_main(["--labs", "1", "--out", str(tmp_path / "h")])
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "a partial handout (or its temporary directory) was left behind"
    monkeypatch.setattr(lab.handout.shutil, "copy2", real)
    handout_main(["--labs", "1", "--out", str(tmp_path / "h")])
    assert (tmp_path / "h" / "lab" / "handout.json").is_file()


def test_a_submission_link_or_dotdot_path_is_not_taken(handout, tmp_path):
    secret = tmp_path / "secret.py"
    secret.write_text("SECRET = 'the hidden tests'\n")
    submitted = tmp_path / "submission"
    (submitted / "llama_min").mkdir(parents=True)
    (submitted / "llama_min" / "rmsnorm.py").symlink_to(secret)
    notes = child_tree(handout, submitted, LABS[1], None, tmp_path / "tree")
    assert "SECRET" not in (tmp_path / "tree" / "llama_min" / "rmsnorm.py").read_text()
    assert notes == ["llama_min/rmsnorm.py: not handed in; graded the handout's version"]
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../escaped.py", "x")
        z.writestr("/tmp/absolute_escape_lab.py", "x")
        z.writestr("llama_min/rmsnorm.py", "y")
    unpack(evil, tmp_path / "unpacked")
    assert not (tmp_path / "escaped.py").exists() and not Path("/tmp/absolute_escape_lab.py").exists()
    assert (tmp_path / "unpacked" / "llama_min" / "rmsnorm.py").read_text() == "y"
