"""Lab 2, SwiGLU: the mistakes students make in ``FeedForward.forward`` and the input that shows them."""

from ..mutations import m
from . import Case, generator, randn

FFN = "llama_min/feedforward.py::FeedForward.forward"
SILU = "silu(z) = z · sigmoid(z)"

MUTATIONS = [
    m("swiglu_silu_on_w3", 2, FFN, "SiLU on the wrong branch",
      ("F.silu(self.w1(x)) * self.w3(x)", "self.w1(x) * F.silu(self.w3(x))"),
      why="the gate is silu(w1 x); w3 x is the linear branch"),
    m("swiglu_relu", 2, FFN, "ReLU instead of SiLU", ("F.silu", "F.relu"), why=SILU + " (Swish-1)"),
    m("swiglu_sigmoid", 2, FFN, "sigmoid instead of SiLU", ("F.silu", "torch.sigmoid"),
      why="that is the original GLU; " + SILU),
    m("swiglu_gelu", 2, FFN, "GELU instead of SiLU", ("F.silu", "F.gelu"), why="that would be GEGLU; " + SILU),
    m("swiglu_added", 2, FFN, "the branches are added", (") * self.w3", ") + self.w3"),
      why="SwiGLU multiplies them element-wise"),
    m("swiglu_no_linear_branch", 2, FFN, "the linear branch w3 x is missing", (" * self.w3(x)", ""),
      why="SwiGLU multiplies silu(w1 x) element-wise by w3 x"),
    m("swiglu_silu_of_product", 2, FFN, "SiLU applied to the product",
      ("F.silu(self.w1(x)) * self.w3(x)", "F.silu(self.w1(x) * self.w3(x))"),
      why="it applies to the w1 branch only: silu(w1 x) * (w3 x)"),
    m("swiglu_w2_w1_swapped", 2, FFN, "the projections are used in the wrong roles",
      ("self.w2(F.silu(self.w1(x)) * self.w3(x))", "self.w2(F.silu(self.w3(x)) * self.w1(x))"),
      why="LLaMA's names: w1 is the gated branch, w3 the linear one, w2 projects back"),
    m("swiglu_gate_after_w2", 2, FFN, "the gate is applied after the down projection",
      ("self.w2(F.silu(self.w1(x)) * self.w3(x))", "F.silu(self.w2(self.w1(x) * self.w3(x)))"),
      why="FFN(x) = w2(silu(w1 x) * w3 x): w2 is last"),
]


def cases():
    g = generator(2)
    dim, hidden = 32, 48
    w1, w3 = randn(g, hidden, dim, std=1.5 / dim ** 0.5), randn(g, hidden, dim, std=1.5 / dim ** 0.5)
    w2 = randn(g, dim, hidden, std=1.5 / hidden ** 0.5)

    def run(code, t):
        ff = code.FeedForward(dim, hidden)
        for name in ("w1", "w2", "w3"):
            getattr(ff, name).weight.copy_(t[name])
        return ff(t["x"])
    yield Case("forward", {"x": randn(g, 2, 5, dim), "w1": w1, "w2": w2, "w3": w3}, run,
               params={"dim": dim, "hidden": hidden}, hint="FFN(x) = w2(silu(w1 x) * w3 x)")
