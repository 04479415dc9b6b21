"""The instructor's answer keys (lab/key/) never reach a student version: lab.handout copies no file of that
directory, no sentence of a key appears anywhere in a handout of every lab, and lab.pack zips none even when
run in the instructor's repository."""

import zipfile

from lab.handout import write_handout
from lab.manifest import LAB_DIR, REPO, load_labs
from lab.pack import pack


def test_answer_keys_stay_out_of_the_handout(tmp_path):
    keys = sorted((LAB_DIR / "key").glob("*.md"))
    assert keys, "lab/key/ holds the answer keys"
    out = tmp_path / "handout"
    write_handout(list(load_labs().values()), out)
    assert not (out / "lab" / "key").exists()
    sentences = {line.strip() for key in keys for line in key.read_text(encoding="utf-8").splitlines()
                 if len(line.strip()) > 60}
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".md", ".py", ".toml", ".json", ".txt"):
            text = path.read_text(encoding="utf-8", errors="replace")
            leaked = [s for s in sentences if s in text]
            assert not leaked, f"{path.relative_to(out)} holds the answer key: {leaked[0][:80]}"


def test_every_key_answers_its_handout_questions():
    """A key for lab N answers as many questions as lab N's handout asks in its Hand in section."""
    labs = {f"{lab.number:02d}": lab for lab in load_labs().values()}
    for key in sorted((LAB_DIR / "key").glob("*.md")):
        lab = labs[key.name[:2]]
        handout = (LAB_DIR / lab.handout).read_text(encoding="utf-8").split("## Hand in", 1)[1]
        asked = sum(line[:3] in {f"{i}. " for i in range(1, 10)} for line in handout.splitlines())
        answered = sum(line[:3] in {f"{i}. " for i in range(1, 10)} for line in key.read_text(encoding="utf-8").splitlines())
        assert asked == answered > 0, (key.name, asked, answered)


def test_labs_1_to_12_have_a_key():
    keys = {int(key.name[:2]) for key in (LAB_DIR / "key").glob("[0-9][0-9]_*.md")}
    assert set(range(1, 13)) <= keys, f"no answer key for labs {sorted(set(range(1, 13)) - keys)}"


def test_pack_never_zips_a_key(tmp_path):
    packed, _ = pack(REPO, list(load_labs()), tmp_path / "submission.zip")
    names = zipfile.ZipFile(tmp_path / "submission.zip").namelist()
    assert packed and names, "pack wrote an empty zip"
    assert not [n for n in names if n.startswith("lab/key/") or "/key/" in n], names
