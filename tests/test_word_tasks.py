"""The word-task set labs 7 and 8 fine-tune on (data/word_tasks/tasks.jsonl): it is exactly what its seeded
generator writes, it loads as instruction records, every answer is right, and the held-out quarter that
`--val_fraction 0.25` (and lab.plots.word_tasks) holds out is the held-out words' records, no word shared."""

from experiments.make_course_tasks import REPO, write_course_tasks
from experiments.tasks import TASKS, make_words, split_words
from lab.plots.word_tasks import TASKS as SHIPPED, held_out
from llama_min.finetune.instructions import read_records


def test_the_shipped_file_is_what_the_generator_writes(tmp_path):
    assert SHIPPED == REPO / "data" / "word_tasks" / "tasks.jsonl"
    assert write_course_tasks(tmp_path).read_bytes() == SHIPPED.read_bytes(), \
        "data/word_tasks/tasks.jsonl is stale: run python -m experiments.make_course_tasks"


def test_it_loads_and_every_answer_is_right():
    records = read_records(SHIPPED)
    by_instruction = {task.instruction: task for task in TASKS.values()}
    assert len(records) == 240 * len(TASKS)
    for r in records:
        assert r.output == by_instruction[r.instruction].answer(r.input), r  # an independent recomputation


def test_the_held_out_quarter_is_the_held_out_words():
    records = read_records(SHIPPED)
    tune_words, heldout_words = split_words(make_words(240, 0), 60)
    heldout = held_out(SHIPPED, 0.25)
    assert {r.input for r in heldout} == set(heldout_words)
    assert {r.input for r in records[:-len(heldout)]} == set(tune_words)
    assert not set(tune_words) & set(heldout_words)
    assert {r.instruction for r in heldout} == {t.instruction for t in TASKS.values()}
