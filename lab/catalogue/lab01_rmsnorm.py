"""Lab 1, RMSNorm: the mistakes students make in ``RMSNorm.forward`` and the inputs that show them."""

import torch

from ..mutations import m
from . import EXACT_BF16, Case, generator, randn

RMS = "llama_min/rmsnorm.py::RMSNorm.forward"
NO_EPS = ("eps goes under the square root, x / sqrt(mean(x²) + eps); without it an input with a tiny or zero root "
          "mean square blows up or gives NaN")
HARD_CODED = "use self.eps: it comes from the checkpoint's config (1e-6 in LLaMA-1, 1e-5 in Llama 2)"

MUTATIONS = [
    m("rmsnorm_no_eps", 1, RMS, "RMSNorm without eps", (" + self.eps)", ")"), why=NO_EPS),
    m("rmsnorm_eps_outside_sqrt", 1, RMS, "eps added outside the square root",
      ("torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)",
       "1 / (torch.sqrt(x32.pow(2).mean(dim=-1, keepdim=True)) + self.eps)"),
      why="the denominator is sqrt(mean(x²) + eps), not sqrt(mean(x²)) + eps"),
    m("rmsnorm_wrong_axis", 1, RMS, "mean over the wrong axis", ("mean(dim=-1", "mean(dim=0"),
      why="the statistics are per vector, over the last axis (dim=-1, keepdim=True)"),
    m("rmsnorm_subtracts_mean", 1, RMS, "subtracts the mean",
      ("x32 = x.float()", "x32 = x.float()\n        x32 = x32 - x32.mean(dim=-1, keepdim=True)"),
      why="that is LayerNorm; RMSNorm only rescales, x / RMS(x), no centring"),
    m("rmsnorm_in_bf16", 1, RMS, "computed in bfloat16", ("x32 = x.float()", "x32 = x"),
      why="mean(x²) over many bfloat16 values loses precision; upcast x to float32 for the statistics (x.float()) "
          "and cast back afterwards"),
    m("rmsnorm_no_gain", 1, RMS, "the gain self.weight is not applied", (" * self.weight", ""),
      why="y = x / RMS(x) · g"),
    m("rmsnorm_sqrt_not_rsqrt", 1, RMS, "multiplies by the root mean square", ("torch.rsqrt", "torch.sqrt"),
      why="divide by it (rsqrt, or 1 / sqrt)"),
    m("rmsnorm_sum_not_mean", 1, RMS, "sum of squares instead of the mean", (".mean(dim=-1", ".sum(dim=-1"),
      why="RMS is sqrt(mean(x²)), the mean over the last axis (dim)"),
    m("rmsnorm_fixed_eps", 1, RMS, "eps is hard-coded", ("self.eps", "1e-06"), why=HARD_CODED),
    m("rmsnorm_fixed_eps_1e5", 1, RMS, "eps is hard-coded", ("self.eps", "1e-05"), why=HARD_CODED),
    m("rmsnorm_gain_before_cast", 1, RMS, "the gain is applied before casting back",
      ("return normed.type_as(x) * self.weight", "return (normed * self.weight).type_as(x)"),
      why="LLaMA casts the normalised x back to x's dtype first, then multiplies by the gain "
          "(normed.type_as(x) * weight)"),
    m("rmsnorm_not_cast_back", 1, RMS, "returned in float32", ("normed.type_as(x)", "normed"),
      why="cast the normalised x back to x's dtype (normed.type_as(x)) before the gain"),
    m("rmsnorm_mean_of_abs", 1, RMS, "mean of |x| instead of the root mean square", ("x32.pow(2)", "x32.abs()"),
      why="RMS(x) = sqrt(mean(x²))"),
    m("rmsnorm_mean_over_wrong_length", 1, RMS, "the mean is over the wrong length",
      ("x32.pow(2).mean(dim=-1, keepdim=True)", "x32.pow(2).sum(dim=-1, keepdim=True) / (x.shape[-1] - 1)"),
      why="mean(x²) divides the sum of squares by dim, the number of features (.mean(dim=-1))"),
    m("rmsnorm_std_not_rms", 1, RMS, "the standard deviation instead of the root mean square",
      ("x32.pow(2).mean(dim=-1, keepdim=True)", "x32.var(dim=-1, keepdim=True)"),
      why="RMSNorm divides by sqrt(mean(x²) + eps); the variance subtracts the mean first"),
    m("rmsnorm_eps_squared_wrong", 1, RMS, "eps multiplied instead of added", (" + self.eps", " * (1 + self.eps)"),
      why="eps is added under the square root: sqrt(mean(x²) + eps)"),
]


def rms_case(name: str, x, weight, eps: float, **meta) -> Case:
    def run(code, t):
        norm = code.RMSNorm(t["weight"].shape[0], eps).to(t["weight"].dtype)
        norm.weight.copy_(t["weight"])
        return norm(t["x"])
    return Case(name, {"x": x, "weight": weight}, run, params={"eps": eps}, **meta)


def cases():
    g = generator(1)
    dim = 64
    x = randn(g, 3, 5, dim)
    x[0, 1] *= 1e-3  # a tiny root mean square: where eps matters
    x[1, 2] = 0.0  # an all-zero vector: NaN without eps
    weight = torch.rand(dim, generator=g) + 0.5
    yield rms_case("forward.float32", x, weight, 1e-5, hint="y = x / sqrt(mean(x², last axis) + eps) · weight")
    # A large eps on small inputs: a hard-coded one shows.
    yield rms_case("forward.eps", randn(g, 2, 4, dim, std=0.05), weight, 0.1,
                   hint="y = x / sqrt(mean(x², last axis) + self.eps) · weight: the mean over all dim features, "
                        "the module's own eps under the square root")
    dim = 256
    x = randn(g, 3, 4, dim, std=3.0).bfloat16()
    weight = (torch.rand(dim, generator=g) + 0.5).bfloat16()
    yield rms_case("forward.bfloat16", x, weight, 1e-5, tol=EXACT_BF16,
                   dtype_cause="Normalise in float32, cast back to x's dtype, then multiply by the gain.")

