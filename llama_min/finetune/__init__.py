"""Fine-tuning beyond the choice of parameters (which is llama_min/peft and training/trainable.py):

    instructions.py    Alpaca records: the prompt masked out of the loss, EOS appended
    images.py          image-instruction records, PNG files, and the seeded image world of the labs
    templates.py       prompt formats for generation (raw, alpaca, llama2-chat, chatml)
    chat_template.py   a checkpoint's own Jinja chat template, run as transformers runs it
    exact_match.py     exact-match accuracy of greedy answers
    early_stopping.py  keep the best checkpoint by a dev metric, stop when it stops improving
    l2sp.py            L2-SP: pull the weights toward the pretrained ones
    neftune.py         NEFTune: noisy input embeddings while training
    perturb.py         seeded typos, case changes and distractors in instructions
    interpolate.py     WiSE-FT: the model part of the way from the base to the fine-tuned one
    load.py            a fine-tuned model to use: a checkpoint with its adapter, or interpolated
"""
