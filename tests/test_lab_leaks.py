"""lab.handout names reference code that a handout keeps and that repeats a blanked lab's computation."""

import inspect

from lab.handout import write_handout
from lab.leaks import duplicated_answers
from lab.manifest import REPO, load_labs
from llama_min.peft.adapter import AdapterPrompt

LABS = load_labs()


def test_a_repeated_computation_is_named():
    """peft_stats computes LLaMA-Adapter's gate factor with lab 8's own line; its attribute owner differs
    (prompt.gate, not self.gate), which the comparison ignores."""
    notes = duplicated_answers(REPO, [LABS[8]])
    assert any("llama_min/peft/report.py:" in n and "AdapterPrompt.forward" in n for n in notes), notes


def test_no_note_without_a_repetition_or_inside_blanked_code():
    assert duplicated_answers(REPO, [LABS[2]]) == []  # SwiGLU is written once
    assert not any("rope.py" in n for n in duplicated_answers(REPO, [LABS[3]]))  # its own body is not a leak
    both = duplicated_answers(REPO, [LABS[4], LABS[8]])  # the adapter's softmax line is blanked with lab 8
    # ... and so are prompt_kv's GQA repeats; only the multimodal add_image (lab 13, not in this handout) repeats one
    lines, first = inspect.getsourcelines(AdapterPrompt.add_image)
    kept = {f"again at llama_min/peft/adapter.py:{n}," for n in range(first, first + len(lines))}
    adapter_notes = [n for n in both if "again at llama_min/peft/adapter.py" in n]
    assert all(any(k in n for k in kept) for n in adapter_notes), adapter_notes


def test_the_handout_prints_it(tmp_path):
    notes = write_handout([LABS[8]], tmp_path / "out")
    assert any("llama_min/peft/report.py" in n for n in notes), notes
