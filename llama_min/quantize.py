"""Weight-only quantisation for generation: int8 per output channel and 4-bit in groups.

Decoding one token reads every weight once, so on a CPU its speed is the speed of reading the weights
(docs/performance.md). Storing them in fewer bits reads fewer bytes; the activations stay in floating
point ("weight-only", as in gpt-fast and llama.cpp's Q8_0/Q4_1; Dettmers et al. 2022, "LLM.int8()",
section 2 for absmax quantisation per row).

    int8, per output channel n:   s_n = max_k |W_nk| / 127          q_nk = round(W_nk / s_n) in [-127, 127]
                                  W_nk ≈ q_nk · s_n                 (symmetric: 0 stays exactly 0)
    int4, per group of G inputs:  lo, hi = min, max of the group    s = (hi - lo) / 15
                                  z = lo + 8·s  (the value of the middle code)
                                  q = round((W - z) / s) + 8 in [0, 15]        W ≈ (q - 8)·s + z

``quantize_model`` swaps every ``nn.Linear`` of a model (the output head included) for an
``Int8Linear`` or ``Int4Linear`` holding the codes and their scales; ``print(model)`` shows them. With
tied embeddings the head gets its own quantised copy and the embedding lookup stays exact.

Two formulations of each product live side by side: ``linear_int8_reference``/``linear_int4_reference``
dequantise the weight and call ``F.linear`` (the formula above, for the reader); ``linear_int8_kernel``
/``linear_int4_kernel`` call PyTorch's CPU kernels (``torch.ops.aten._weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``), which read the codes directly. ``tests/test_quantize.py`` proves they
agree. The kernels take bfloat16 activations (with float32 ones they are several times slower), so the
scales are stored in bfloat16 and the kernel path rounds the activations to bfloat16 on the way in.
On other devices (CUDA) the modules use the reference path; ``torch.compile`` fuses its dequantisation
into the product there, which is how gpt-fast runs int8 on GPUs.

Quantised checkpoints (``weights_convert.py SRC DST --quantize int8``) store the codes and scales under
the module's names (``layers.0.attention.wq.weight`` int8, ``layers.0.attention.wq.scales``) with the
scheme in config.json's ``quantization``; loading builds the quantised modules directly, never a
float32 copy of the weights.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .cli import UsageError
from .config import Quantization

SCALE_DTYPE = torch.bfloat16  # what the CPU kernels take, with bfloat16 activations
INT4_KERNEL_TILES = 2  # the kernel's packing parameter (inner k tiles), as gpt-fast uses on CPU


# ---- int8, one scale per output channel ---------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (N, K) float -> codes int8 (N, K) and scales bfloat16 (N,), with w ≈ codes · scales[:, None].
    The codes are rounded against the stored (bfloat16) scales, so they fit the scales a reader gets."""
    scales = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-12).to(SCALE_DTYPE)  # (N,); all-zero rows: any s
    codes = torch.round(w.float() / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes int8 (N, K), scales (N,) -> float32 (N, K)."""
    return codes.float() * scales.float()[:, None]


def linear_int8_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> (..., N): dequantise, then the ordinary product, in x's dtype."""
    return F.linear(x, dequantize_int8(codes, scales).to(x.dtype))


def linear_int8_kernel(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The same product by PyTorch's int8 kernel: x rounded to bfloat16, the result back in x's dtype."""
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(SCALE_DTYPE), codes, scales)
    return y.reshape(*x.shape[:-1], codes.shape[0]).to(x.dtype)


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights, one scale per output feature. Buffers: ``weight``
    int8 (out_features, in_features), ``scales`` bfloat16 (out_features,)."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=SCALE_DTYPE, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if x.device.type == "cpu":
            return linear_int8_kernel(x, self.weight, self.scales)
        return linear_int8_reference(x, self.weight, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output channel"


# ---- 4-bit, one scale and zero point per group of inputs --------------------------------------------

def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: (N, K) float -> codes uint8 (N, K) in [0, 15], scales and zeros bfloat16 (N, K / group_size),
    with w ≈ (codes - 8) · scale + zero inside each group. Asymmetric (min to max), as llama.cpp's Q4_1."""
    N, K = w.shape
    groups = w.float().reshape(N, K // group_size, group_size)  # (N, K/G, G)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, K/G)
    scales = ((hi - lo) / 15).clamp(min=1e-12).to(SCALE_DTYPE)
    zeros = (lo + 8 * scales.float()).to(SCALE_DTYPE)
    codes = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None]) + 8
    return codes.clamp(0, 15).to(torch.uint8).reshape(N, K), scales, zeros


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """codes (N, K) in [0, 15], scales and zeros (N, K/G) -> float32 (N, K)."""
    N, K = codes.shape
    groups = codes.float().reshape(N, scales.shape[1], -1)  # (N, K/G, G)
    return ((groups - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(N, K)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> uint8 (N, K/2): element 2i in the low four bits, 2i+1 in the high."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> uint8 (N, K), the inverse of ``pack_nibbles``."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def linear_int4_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> (..., N): unpack, dequantise, then the ordinary product, in x's dtype."""
    return F.linear(x, dequantize_int4(unpack_nibbles(packed), scales, zeros).to(x.dtype))


def int4_kernel_layout(packed: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our nibbles, scales and zeros -> what ``_weight_int4pack_mm_for_cpu`` reads: the codes in the
    kernel's own (tiled) byte order, and scales and zeros interleaved as (K/G, N, 2)."""
    kernel_codes = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(packed).to(torch.int32),
                                                                      INT4_KERNEL_TILES)
    return kernel_codes, torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()


def linear_int4_kernel(x: torch.Tensor, kernel_codes: torch.Tensor, scales_zeros: torch.Tensor,
                       group_size: int) -> torch.Tensor:
    """The same product by PyTorch's 4-bit CPU kernel, on ``int4_kernel_layout``'s tensors."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).to(SCALE_DTYPE), kernel_codes,
                                                   group_size, scales_zeros)
    return y.reshape(*x.shape[:-1], scales_zeros.shape[1]).to(x.dtype)


def int4_kernel_fits(out_features: int) -> bool:
    """The CPU kernel packs 16 output features at a time."""
    return out_features % 16 == 0


class Int4Linear(nn.Module):
    """A bias-free linear layer with 4-bit weights, a scale and zero point per group of ``group_size``
    inputs. Buffers (what a checkpoint stores): ``weight`` uint8 (out_features, in_features / 2), two
    codes a byte (``pack_nibbles``); ``scales``, ``zeros`` bfloat16 (out_features, in_features / group_size).
    On a CPU, ``use_kernel_layout()`` adds the kernel's copy of them (non-persistent; 4 more bits a
    weight), which ``quantize_model`` and the checkpoint loader call."""

    def __init__(self, in_features: int, out_features: int, group_size: int,
                 device: torch.device | str | None = None):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4 groups of {group_size} do not divide a layer's {in_features} inputs; choose a "
                             "group size that divides every layer's input width (e.g. 32)")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("zeros", torch.empty(out_features, n_groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("kernel_codes", None, persistent=False)
        self.register_buffer("kernel_scales_zeros", None, persistent=False)

    def use_kernel_layout(self) -> None:
        """Prepare the CPU kernel's copy of the codes (after quantising or loading; again if the
        buffers are replaced). Layers whose width the kernel cannot pack keep the reference path."""
        if self.weight.device.type == "cpu" and int4_kernel_fits(self.out_features):
            self.kernel_codes, self.kernel_scales_zeros = int4_kernel_layout(self.weight, self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if x.device.type == "cpu" and self.kernel_codes is not None:
            return linear_int4_kernel(x, self.kernel_codes, self.kernel_scales_zeros, self.group_size)
        return linear_int4_reference(x, self.weight, self.scales, self.zeros)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 in groups of {self.group_size}")


def quantization_scheme(kind: str, group_size: int) -> Quantization | None:
    """The scheme of the command-line flags --quantize KIND --group_size N (None without --quantize);
    a bad value is a one-line error naming the choices."""
    if not kind:
        return None
    try:
        return Quantization(kind, group_size if kind == "int4" else None)
    except ValueError as e:
        raise UsageError(f"--quantize {kind} --group_size {group_size}: {e}") from None


# ---- the model ---------------------------------------------------------------------------------------

def quantized_linear(linear: nn.Linear, scheme: Quantization) -> nn.Module:
    if linear.bias is not None:
        raise ValueError("weight-only quantisation here covers bias-free linear layers (LLaMA has no biases)")
    module = empty_quantized_linear(linear, scheme)
    for name, tensor in quantized_tensors("", linear.weight, scheme).items():
        setattr(module, name.removeprefix("."), tensor)  # "" + ".weight" -> the module's "weight"
    return module


def empty_quantized_linear(linear: nn.Linear, scheme: Quantization) -> nn.Module:
    """A quantised layer of ``linear``'s shape, without values, on its device (the loader fills it)."""
    if scheme.kind == "int8":
        return Int8Linear(linear.in_features, linear.out_features, device=linear.weight.device)
    return Int4Linear(linear.in_features, linear.out_features, scheme.group_size, device=linear.weight.device)


def swap_linears(model: nn.Module, make) -> None:
    """Replace every ``nn.Linear`` below ``model`` by ``make(linear)``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))


@torch.no_grad()
def quantize_model(model: nn.Module, kind: str, group_size: int = 32) -> nn.Module:
    """Quantise every linear layer of a Llama in place (kind "int8" or "int4"; group_size for int4) and
    record the scheme in ``model.config.quantization``; returns the model. Embeddings and norms stay
    as they are. The float weights of the swapped layers are freed as each is replaced."""
    scheme = Quantization(kind, group_size if kind == "int4" else None)
    if getattr(model.config, "quantization", None):
        raise ValueError(f"the model is already quantised ({model.config.quantization.kind})")
    widths = sorted({m.in_features for m in model.modules() if type(m) is nn.Linear})
    if kind == "int4" and any(w % group_size for w in widths):  # checked before anything is swapped
        raise ValueError(f"int4 groups of {group_size} do not divide every layer's input width "
                         f"({', '.join(map(str, widths))}); choose a group size that does")
    swap_linears(model, lambda linear: quantized_linear(linear, scheme))
    model.config = replace(model.config, quantization=scheme)
    use_kernel_layouts(model)
    return model


def prepare_quantized_skeleton(model: nn.Module, scheme: Quantization) -> None:
    """For loading a quantised checkpoint: swap the (meta-device) linear layers for empty quantised ones
    of the same shapes, so that the stored codes and scales load into them directly."""
    swap_linears(model, lambda linear: empty_quantized_linear(linear, scheme))


def use_kernel_layouts(model: nn.Module) -> None:
    """After loading: scales in the kernels' dtype (the loader may have converted floating tensors;
    bfloat16 values survive float32 and back exactly), and the int4 kernel layouts on a CPU."""
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            code_dtype = torch.int8 if isinstance(module, Int8Linear) else torch.uint8
            if module.weight.dtype != code_dtype:
                raise ValueError(f"{name}.weight is {module.weight.dtype}; a {type(module).__name__} stores "
                                 f"{code_dtype} codes: the checkpoint does not match its config's quantization")
            module.scales = module.scales.to(SCALE_DTYPE)
        if isinstance(module, Int4Linear):
            module.zeros = module.zeros.to(SCALE_DTYPE)
            module.use_kernel_layout()


def quantized_tensors(layer: str, weight: torch.Tensor, scheme: Quantization) -> dict[str, torch.Tensor]:
    """What a quantised checkpoint stores for the linear layer named ``layer`` (e.g. "output") whose
    float weight is ``weight``: the same tensors, under the same names, as the layer's module holds."""
    if scheme.kind == "int8":
        codes, scales = quantize_int8(weight)
        return {f"{layer}.weight": codes, f"{layer}.scales": scales}
    codes, scales, zeros = quantize_int4(weight, scheme.group_size)
    return {f"{layer}.weight": pack_nibbles(codes), f"{layer}.scales": scales, f"{layer}.zeros": zeros}


def quantized_layer_names(model: nn.Module) -> list[str]:
    """The names of a model's quantised layers ("layers.0.attention.wq", ..., "output")."""
    return [name for name, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))]
