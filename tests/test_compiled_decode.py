"""The compiled decode step (llama_min/compiled_decode.py) against the plain one: the one-row product written
as a multiply and a sum must be the matrix product, and the compiled step must give the plain step's logits.
These compile for real (torch.compile's CPU code generation), on the tiny model: seconds each."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_model, random_tokens, tiny_config
from llama_min.compiled_decode import OneRowLinear, compile_decode_step, use_one_row_products
from llama_min.generation import decode_step
from llama_min.quantize import Int8Linear, quantize_model


def test_one_row_products_keep_the_parameters_and_the_eager_outputs():
    model = random_model(tiny_config(tie_embeddings=True))
    before = {name: p for name, p in model.state_dict(keep_vars=True).items()}
    tokens = random_tokens(model.config, 2, 7)
    logits, _ = model(tokens)
    use_one_row_products(model)
    assert all(type(m) is not nn.Linear for m in model.modules()), "a plain nn.Linear was left"
    assert isinstance(model.output, OneRowLinear)
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before), "parameters were replaced"
    assert model.output.weight is model.tok_embeddings.weight, "the tied head was untied"
    assert torch.equal(model(tokens)[0], logits), "outside compiled code the layer must be nn.Linear itself"


def test_quantised_layers_keep_their_own_product():
    model = quantize_model(random_model(tiny_config()), "int8")
    use_one_row_products(model)
    assert type(model.layers[0].attention.wq) is Int8Linear


@pytest.mark.parametrize("rows", [1, 3])
def test_the_compiled_multiply_and_sum_is_the_matrix_product(rows):
    """One row takes the multiply-and-sum inside compiled code; several rows take F.linear there too."""
    torch._dynamo.reset()
    layer = OneRowLinear(48, 80, bias=False)
    x = torch.randn(2, rows, 48)
    compiled = torch.compile(layer)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", ["", "int8"])
def test_compiled_decode_step_gives_the_plain_steps_logits(quantize):
    torch._dynamo.reset()
    plain_model = random_model(tiny_config(tie_embeddings=True))
    if quantize:
        quantize_model(plain_model, quantize)
    model = copy.deepcopy(plain_model)
    step, seconds = compile_decode_step(model)
    assert seconds > 0
    assert isinstance(model.output, Int8Linear if quantize else OneRowLinear)
    prompt = random_tokens(model.config, 1, 9)
    plain_model.setup_cache(1, model.config.max_seq_len)
    with torch.no_grad():
        plain_logits, _ = plain_model(prompt, last_only=True)
        logits, _ = model(prompt, last_only=True)
        torch.testing.assert_close(logits, plain_logits)
        for position in range(9, 20):
            ids = plain_logits[:, -1].argmax(-1)
            plain_logits = decode_step(plain_model, ids, position, None)
            logits = step(model, ids, position, None)
            torch.testing.assert_close(logits, plain_logits, rtol=1e-4, atol=1e-4)
