"""Bf16Linear: the block-linear contract (bf16 math, experts stacked along dim 0, routing by row splits)."""

import pytest
import torch
from magihuman.pipeline.linear import Bf16Linear


def filled(linear: Bf16Linear, seed: int) -> Bf16Linear:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in linear.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return linear


def test_single_expert_is_a_bf16_matmul_with_bf16_output():
    linear = filled(Bf16Linear(16, 24), 0)
    assert linear.weight.shape == (24, 16) and linear.weight.dtype == torch.bfloat16
    assert linear.bias is None and [k for k, _ in linear.state_dict().items()] == ["weight"]
    x = torch.randn(5, 16)  # fp32 input is cast to bf16 first, as the official _BF16ComputeLinear does
    out = linear(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.matmul(x.to(torch.bfloat16), linear.weight.t()))


@pytest.mark.parametrize("splits", [(3, 2, 4), (0, 5, 1), (4, 0, 0)])
def test_experts_route_row_groups_to_their_weight_chunks(splits):
    linear = filled(Bf16Linear(16, 8, num_experts=3), 1)
    assert linear.weight.shape == (24, 16)
    x = torch.randn(sum(splits), 16).to(torch.bfloat16)
    out = linear(x, splits)
    assert out.shape == (sum(splits), 8)
    start = 0
    for expert, n in enumerate(splits):
        weight = linear.weight[expert * 8 : (expert + 1) * 8]  # video, audio, text chunks in order
        assert torch.equal(out[start : start + n], torch.matmul(x[start : start + n], weight.t()))
        start += n


def test_bias_is_added_in_bf16_per_expert():
    linear = filled(Bf16Linear(16, 8, num_experts=3, bias=True), 2)
    assert linear.bias.shape == (24,) and linear.bias.dtype == torch.bfloat16
    x = torch.randn(6, 16).to(torch.bfloat16)
    out = linear(x, (2, 2, 2))
    expected = torch.matmul(x[4:], linear.weight[16:].t()) + linear.bias[16:]
    assert torch.equal(out[4:], expected)


def test_meta_construction_allocates_nothing():
    linear = Bf16Linear(5120, 27304, num_experts=3, device="meta")
    assert linear.weight.is_meta and linear.weight.shape == (81912, 5120)
    assert not linear.weight.requires_grad
