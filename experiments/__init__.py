"""Experiments and research reports: the instruction-tuning word-task benchmark (exact-match tasks, generated
by seeded code, no download) and the reports built on it. Not the course labs: those are in lab/.

    python -m experiments.make_benchmark --out runs/benchmark          # pretraining mix, instruction records, tokenizer
    python -m experiments.evaluate --checkpoint BASE [--peft DIR] --records runs/benchmark/instructions/eval.jsonl

tasks.py makes the words and the facts, make_benchmark.py writes them to disk, evaluate.py scores a model by
greedy generation. Why the benchmark is built this way is explained at the top of tasks.py.
"""
