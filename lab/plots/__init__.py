"""Plots that make the labs' ideas visible, each a small script writing a PNG:

    python -m lab.plots.rope --out rope.png                                    # lab 3: RoPE's rotation
    python -m lab.plots.attention_maps --checkpoint out/ckpt --out attention.png   # lab 6: a trained model
    python -m lab.plots.peft --metrics out/lora/metrics.jsonl --out lora_norms.png  # labs 7, 8: PEFT runs
    python -m lab.plots.word_tasks --checkpoint out/lab06/ckpt --peft out/lab07/peft --out word_tasks.png  # 7, 8
    python -m lab.plots.multimodal score --base B --world W --runs R1 R2 --out bars.png  # lab 13
    python -m lab.plots.bpe_compare --out handin/09/compare.png                # lab 9: your BPE against ours
    python -m lab.plots.scratch_loop --out handin/11/loss.png                  # lab 11: your loop against train.py
    python -m lab.plots.curves --runs out/exp/lr1e-3 out/exp/lr3e-3 --out lr_sweep.png   # the experiments page

They run your own code (RotaryEmbedding and apply_rotary, your model's attention), so they show what your
implementation does.
"""


def pyplot():
    """matplotlib's pyplot on the file-only backend, or a message naming what to install."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("these plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, out):
    """Lay the figure out, write it to ``out`` (a PNG) and free it; returns ``out``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
