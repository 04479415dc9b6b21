"""The instructor's answer keys (lab/key/): every lab whose handout asks written questions has one, answering
as many as it asks, and none reaches a student version: lab.handout copies no file of that directory, no
sentence of a key appears anywhere in a handout of every lab, and lab.pack zips none even when run in the
instructor's repository."""

import zipfile
from pathlib import Path

from lab.handout import write_handout
from lab.manifest import LAB_DIR, REPO, load_labs
from lab.pack import pack

from conftest import hand_in_questions, numbered_items


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
        asked = hand_in_questions((LAB_DIR / lab.handout).read_text(encoding="utf-8"))
        answered = numbered_items(key.read_text(encoding="utf-8"))
        assert asked == answered > 0, (key.name, asked, answered)


def test_every_lab_that_asks_questions_has_a_key():
    """lab/key/ holds a key named like the handout (NN_<slug>.md) for every lab whose handout asks numbered
    questions in a Hand in section, so that a new lab cannot ship its questions without answers."""
    asking = {number: lab for number, lab in load_labs().items()
              if hand_in_questions((LAB_DIR / lab.handout).read_text(encoding="utf-8"))}
    assert set(range(1, 14)) <= set(asking), \
        f"labs {sorted(set(range(1, 14)) - set(asking))} ask no numbered questions under '## Hand in' any more"
    missing = [f"lab/key/{Path(lab.handout).name}" for lab in asking.values()
               if not (LAB_DIR / "key" / Path(lab.handout).name).is_file()]
    assert not missing, f"no answer key {missing[0]} for a handout that asks written questions: write one"


def test_pack_never_zips_a_key(tmp_path):
    packed, _ = pack(REPO, list(load_labs()), tmp_path / "submission.zip")
    names = zipfile.ZipFile(tmp_path / "submission.zip").namelist()
    assert packed and names, "pack wrote an empty zip"
    assert not [n for n in names if n.startswith("lab/key/") or "/key/" in n], names
