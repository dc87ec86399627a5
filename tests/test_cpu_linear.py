"""The compiled linear for decode steps' few rows (``kernels/cpu_linear.py``) against
``F.linear``, and its installation into a model and the engine."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import cpu_linear
from kernels.cpu_linear import (
    MAX_ROWS,
    MIN_ROWS,
    RowsLinear,
    install_rows_linears,
    small_rows_linear,
)
from tests.helpers import greedy, hf_greedy, make_engine


def test_compiled_linear_builds_here():
    """This machine has a C compiler, so the engine's decode linears are the compiled ones."""
    assert cpu_linear.load_small_linear() is not None


@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 8, 13, 16, 32, 40])
@pytest.mark.parametrize(("out_features", "in_features"), [(7, 5), (64, 64), (130, 576), (4, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_small_rows_linear_matches_f_linear(num_rows, out_features, in_features, with_bias):
    gen = torch.Generator().manual_seed(num_rows * 1000 + out_features)
    x = torch.randn(num_rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    torch.testing.assert_close(
        small_rows_linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-4, rtol=1e-5
    )


def test_small_rows_linear_takes_strided_and_batched_inputs():
    """Leading dims are kept; rows that are not contiguous (a slice) are read in place or
    copied; an empty input gives an empty output."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 16, generator=gen)
    wide = torch.randn(1, 6, 40, generator=gen)
    x = wide[..., 8:24]  # rows 40 floats apart
    out = small_rows_linear(x, weight, None)
    assert out.shape == (1, 6, 24)
    torch.testing.assert_close(out, F.linear(x, weight), atol=1e-5, rtol=1e-5)
    columns = torch.randn(16, 6, generator=gen).t()  # last dim not contiguous
    torch.testing.assert_close(
        small_rows_linear(columns, weight, None), F.linear(columns, weight), atol=1e-5, rtol=1e-5
    )
    assert small_rows_linear(torch.empty(0, 16), weight, None).shape == (0, 24)


def test_small_rows_linear_rejects_what_it_cannot_compute():
    weight = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        small_rows_linear(torch.randn(4, 5), weight, None)
    with pytest.raises(RuntimeError, match="float32"):
        small_rows_linear(torch.randn(4, 4, dtype=torch.float64), weight.double(), None)
    with pytest.raises(RuntimeError, match="contiguous"):
        small_rows_linear(torch.randn(4, 4), torch.randn(4, 8).t(), None)


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 50))
    net[3].weight = nn.Parameter(torch.randn(50, 48))
    net.register_module("tied", nn.Linear(32, 50, bias=False))
    net.tied.weight = net[0].weight  # tied to the embedding, as an LM head can be
    return net


def test_install_keeps_parameters_keys_and_ties():
    net = _tiny_net()
    reference = copy.deepcopy(net)
    keys = list(net.state_dict())
    assert install_rows_linears(net) == 3
    assert all(isinstance(net[i], RowsLinear) for i in (1, 3)) and isinstance(net.tied, RowsLinear)
    assert list(net.state_dict()) == keys
    assert net.tied.weight is net[0].weight
    assert install_rows_linears(net) == 0  # already swapped
    hidden = torch.randn(MAX_ROWS + 1, 32)
    with torch.inference_mode():
        for num_rows in (1, 3, MAX_ROWS + 1):  # torch's own product: identical
            assert torch.equal(net[1](hidden[:num_rows]), reference[1](hidden[:num_rows]))
        for num_rows in (MIN_ROWS, 8, MAX_ROWS):  # the kernel: the same up to rounding
            torch.testing.assert_close(
                net.tied(hidden[:num_rows]), reference.tied(hidden[:num_rows]), atol=1e-5, rtol=1e-5
            )


def test_gradients_still_flow_through_torch():
    """With autograd on (not the engine's case) the kernel is bypassed, so backward works."""
    net = _tiny_net()
    install_rows_linears(net)
    x = torch.randn(8, 32)
    net[1](x).sum().backward()
    assert net[1].weight.grad is not None


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("TARRY_NATIVE_LINEAR", "0")
    cpu_linear.load_small_linear.cache_clear()
    try:
        net = _tiny_net()
        assert install_rows_linears(net) == 0
        assert type(net[1]) is nn.Linear
    finally:
        monkeypatch.delenv("TARRY_NATIVE_LINEAR")
        cpu_linear.load_small_linear.cache_clear()
    assert cpu_linear.load_small_linear() is not None


def test_engine_decode_batches_use_the_kernel_and_match_hf(tiny_model_dirs):
    """An engine on the CPU swaps its model's linears; 6 sequences decoded together (a bucket
    of 8 rows, the kernel's range) still give HF's greedy tokens."""
    model_dir = tiny_model_dirs["qwen2"]  # q/k/v projections with a bias
    engine = make_engine(model_dir)
    try:
        linears = [m for m in engine.model_runner.model.modules() if isinstance(m, RowsLinear)]
        assert linears and not any(
            type(m) is nn.Linear for m in engine.model_runner.model.modules()
        )
        assert any(m.bias is not None for m in linears)
        prompts = [[5 + i, 17, 300 + 7 * i, 42, 9] for i in range(6)]
        outputs = engine.generate(prompts, greedy(12))
        assert [out.new_token_ids for out in outputs] == hf_greedy(model_dir, prompts, 12)
        assert engine.model_runner.decode is not None
        assert engine.model_runner.decode.num_runs_by_bucket[8] > 0
    finally:
        engine.close()
