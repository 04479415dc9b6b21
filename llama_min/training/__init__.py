"""What train.py's loop calls, one job per file, in the order the loop meets them:

    config.py     TrainConfig (every field a flag, by topic), its checks, the command line
    runtime.py    device, dtype and processes (under torchrun); stop signals
    out_dir.py    one run per OUT_DIR: never over another run or its own base; the lock file
    trainable.py  the model to train and which of its parameters learn
    distributed.py  DDP or FSDP2 across processes, activation checkpointing, per-process seeds
    corpus.py     text in, token ids out: documents, the cached tokenizer and token files
    data.py       what the loop trains on: token windows or instruction records, sampled and batched
    optim.py      AdamW and the learning-rate schedule
    robust.py     the robust fine-tuning options: L2-SP, dev-set selection and early stopping
    evaluate.py   held-out loss, bits per byte, answer loss
    progress.py   the progress line, MFU, metrics.jsonl, loss.png
    state.py      checkpoints of a run, and resuming from them
"""
