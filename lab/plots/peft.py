"""How a parameter-efficient fine-tuning run learns (labs 7 and 8), from the run's metrics.jsonl.

    python -m lab.plots.peft --metrics out/lab07/metrics.jsonl --out lora_norms.png
    python -m lab.plots.peft --metrics out/lab08/metrics.jsonl --out adapter_gates.png

train.py logs, at each log step of a PEFT run, one value per layer (llama_min.peft.peft_stats): for
LLaMA-Adapter the gate factor averaged over the heads (g, or tanh(g) with --gate_tanh), which starts at 0;
for LoRA the norm ‖(alpha/r)·B·A‖_F of the layer's update, which starts at 0 because B does. One line per layer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import pyplot, save

TITLES = {"adapter_gate": ("LLaMA-Adapter: gate factor per layer (mean over heads)", "gate factor"),
          "lora_delta_norm": ("LoRA: ‖(α/r)·B·A‖_F per layer", "Frobenius norm of the update")}


def read_peft_records(path: Path) -> dict[str, tuple[list[int], list[list[float]]]]:
    """For each statistic in the file: the steps, and per step the values of every layer."""
    series: dict[str, tuple[list[int], list[list[float]]]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for key, values in (record.get("peft") or {}).items():
            steps, rows = series.setdefault(key, ([], []))
            steps.append(record["step"])
            rows.append(values)
    return series


def plot_peft(metrics: Path, out: Path) -> Path:
    series = read_peft_records(metrics)
    if not series:
        raise SystemExit(f"lab.plots.peft: error: {metrics} has no \"peft\" records; it comes from a run with "
                         "--method adapter or --method lora")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(6.5 * len(series), 4), squeeze=False)
    for ax, (key, (steps, rows)) in zip(axes[0], series.items()):
        for layer in range(len(rows[0])):
            ax.plot(steps, [row[layer] for row in rows], marker=".", label=f"layer {layer}")
        title, ylabel = TITLES.get(key, (key, key))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.legend(fontsize=8)
    return save(fig, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.plots.peft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", type=Path, required=True, help="OUT_DIR/metrics.jsonl of a PEFT run")
    parser.add_argument("--out", type=Path, default=Path("peft.png"))
    args = parser.parse_args(argv)
    print(f"wrote {plot_peft(args.metrics, args.out)}")


if __name__ == "__main__":
    main()
