"""torch.compile of the model: what the CUDA path relies on, checked on the CPU with a backend that only
counts graphs (no code generation, so it runs in seconds)."""

import torch

from conftest import random_model, random_tokens, tiny_config
from llama_min import generate
from llama_min.generation import decode_step


class CountingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts the graphs it is given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def test_training_forward_has_no_graph_break_over_batches_of_several_widths():
    """Instruction batches are padded to their longest record, so T varies: one dynamic graph, no break
    (a symbolic `mask is None and T > 1` would break it in every layer)."""
    torch._dynamo.reset()
    model = random_model(tiny_config())
    explanation = torch._dynamo.explain(model)(random_tokens(model.config, 2, 9), random_tokens(model.config, 2, 9))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for width in (5, 7, 9, 12, 16, 20):
        tokens = random_tokens(model.config, 2, width)
        compiled(tokens, tokens)
    assert backend.graphs == 1, f"{backend.graphs} graphs for six batch widths"


def test_generating_between_training_steps_does_not_recompile_the_training_graph():
    """Samples and dev evaluations allocate and release the KV cache; the compiled training graph must
    survive them (the cache is a submodule from the start, only its buffers come and go)."""
    torch._dynamo.reset()
    model = random_model(tiny_config())
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    tokens = random_tokens(model.config, 2, 16)
    compiled(tokens, tokens)
    graphs = backend.graphs
    generate(model, [tokens[0, :4].tolist()], 6)  # the plain model, as train.py samples with it
    compiled(tokens, tokens)
    assert backend.graphs == graphs, "generation in between made the training graph recompile"


def test_compiled_decode_step_with_a_full_length_cache_compiles_once_for_every_prompt_length():
    """generate.py --compile compiles the named ``decode_step`` (never the model's forward in place),
    allocates the cache once at max_seq_len and generate_stream reuses it: one dynamic graph over twelve
    prompt lengths (a cache sized per call recompiled for each, then fell back to eager after about
    eight), and the same tokens as the plain step."""
    torch._dynamo.reset()
    model = random_model(tiny_config())
    backend = CountingBackend()
    step = torch.compile(decode_step, backend=backend, dynamic=True)
    model.setup_cache(1, model.config.max_seq_len)
    for length in range(3, 15):
        prompt = random_tokens(model.config, 1, length, seed=length)[0].tolist()
        assert generate(model, [prompt], 4, decode_step=step) == generate(model, [prompt], 4)
    assert model.layers[0].attention.cache.active, "generation must leave a cache it did not allocate in place"
    assert "forward" not in vars(model), "the model's forward was replaced on the instance"
    assert backend.graphs == 1, f"{backend.graphs} graphs of the decode step for 12 prompt lengths"
