"""Peak memory and time of weights_convert.py on a large model, against the size of its weights.

Writes a random Hugging Face-format LLaMA of TinyLlama-1.1B's shape (dim 2048, 22 layers, 32 query /
4 kv heads, SwiGLU 5632, vocabulary 32000: 1.1B parameters) in bfloat16, as sharded safetensors with
an index (streamed, so building it needs little memory either), and the same shape in Meta's layout as
two model-parallel shards, into a temporary directory. Then runs the converter in fresh processes (so
each peak is its own) to llama_min and back to Hugging Face, and reports wall time and the converter's
peak RSS (VmHWM). Everything is deleted at the end.

Safetensors sources are read with plain reads; Meta's .pth shards are memory-mapped, and the pages of a
map the process has touched count in its resident set (the kernel can drop them, as they are clean
file pages). The figure to compare with is the size of the weights.

    python benchmarks/convert_memory.py [--layers 22] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama_min import Llama, ModelConfig
from llama_min.checkpoint import stored_state_dict
from llama_min.safetensors_file import SafetensorsStream
from llama_min.hf_format import config_to_hf, tensor_to_hf

ROOT = Path(__file__).resolve().parents[1]


def write_random_hf(config: ModelConfig, directory: Path, shard_bytes: int = 2**30) -> int:
    """A random model in Hugging Face's sharded layout, one tensor in memory at a time. Returns bytes."""
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in stored_state_dict(Llama(config)).items()}
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        hf_name = tensor_to_hf(name, torch.empty(shape, device="meta"), config)[0]
        current[hf_name] = (name, shape)
        size += torch.Size(shape).numel() * 2
        if size >= shard_bytes:
            shards, current, size = shards + [current], {}, 0
    shards += [current] if current else []
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        stream = SafetensorsStream(directory / file, {h: (s, torch.bfloat16) for h, (_, s) in shard.items()},
                                   metadata={"format": "pt"})
        for hf_name, (_, shape) in shard.items():
            scale = 1.0 if len(shape) == 1 else shape[-1] ** -0.5
            stream.write(hf_name, torch.randn(shape) * scale)
            weight_map[hf_name] = file
            total += torch.Size(shape).numel() * 2
        stream.close()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                         "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config_to_hf(config)))
    return total


def write_random_meta(config: ModelConfig, directory: Path, n_shards: int = 2) -> None:
    """The same shape in Meta's layout: params.json and n_shards model-parallel consolidated.NN.pth,
    each shard's slices drawn directly (random weights need no unsharded original)."""
    from llama_min.convert.meta import concat_dim

    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in stored_state_dict(Llama(config)).items()}
    for i in range(n_shards):
        shard = {}
        for name, shape in shapes.items():
            dim = concat_dim(name)
            piece = list(shape)
            if dim is not None:
                piece[dim] //= n_shards
            shard[name] = torch.randn(piece, dtype=torch.bfloat16)
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
        del shard
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size, "multiple_of": 256,
              "norm_eps": config.norm_eps, "rope_theta": config.rope_theta}
    (directory / "params.json").write_text(json.dumps(params))


def timed_convert(*args: str) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "weights_convert.py"), *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr)
    return time.perf_counter() - start, next(l for l in result.stdout.splitlines() if "peak RSS" in l)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--dir", default=None, help="where to build the model (default: the system temp dir)")
    args = p.parse_args()
    config = ModelConfig(dim=2048, n_layers=args.layers, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                         vocab_size=32000, norm_eps=1e-5, max_seq_len=2048)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="convert_memory_") as tmp:
        tmp = Path(tmp)
        (tmp / "hf").mkdir()
        start = time.perf_counter()
        nbytes = write_random_hf(config, tmp / "hf")
        params = nbytes // 2
        print(f"built a random {params / 1e9:.2f}B-parameter model ({nbytes / 2**30:.2f} GiB bfloat16, "
              f"{len(list((tmp / 'hf').glob('*.safetensors')))} shards) in {time.perf_counter() - start:.0f} s")
        (tmp / "meta").mkdir()
        write_random_meta(config, tmp / "meta")
        runs = [("hf -> llama_min", (str(tmp / "hf"), str(tmp / "ours"))),
                ("llama_min -> hf", (str(tmp / "ours"), str(tmp / "hf2"), "--to", "hf")),
                ("hf -> llama_min float32", (str(tmp / "hf"), str(tmp / "ours32"), "--dtype", "float32")),
                ("meta (2 shards) -> llama_min", (str(tmp / "meta"), str(tmp / "from_meta")))]
        for label, run_args in runs:
            seconds, report = timed_convert(*run_args)
            print(f"{label:>24}: {seconds:6.1f} s wall (process included); {report}")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
