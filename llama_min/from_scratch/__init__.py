"""What the rest of the package takes from a library, written out in plain Python and tensor operations, to be
read and, in the course labs, written by students: a byte-level BPE tokenizer (beside the sentencepiece one of
tokenizer.py), cross-entropy, AdamW and gradient-norm clipping (beside torch's), and a training loop built from
them (beside train.py's). The tests prove each agrees with the library version it stands beside.

    bpe.py            byte-level BPE: train merges, encode, decode (Sennrich et al. 2016; GPT-2)
    cross_entropy.py  the language-modelling loss, with a stable log-sum-exp
    adamw.py          AdamW (Loshchilov & Hutter 2019), as torch.optim.AdamW computes it
    clip.py           clipping the global gradient norm (Pascanu et al. 2013)
    loop.py           the training loop: micro-batches, the loss, backward, clipping, the step
"""
