"""Bf16Linear: the block-linear contract (bf16 math, experts stacked along dim 0, routing by row splits)."""

import pytest
import torch
from conftest import FIXTURES
from magihuman.fp8.checkpoint import Checkpoint
from magihuman.pipeline.dit.config import PRESETS
from magihuman.pipeline.dit.linear import Bf16Linear
from magihuman.pipeline.dit.model import MagiDiT


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


def test_the_dit_injects_its_block_linears_and_routes_by_modality():
    """The DiT builds every block linear through ``linear_cls`` and calls it as the contract says: rows
    grouped (video, audio, text) with their counts for per-modality layers, ``splits=None`` otherwise."""
    calls = []

    class RecordingLinear(Bf16Linear):
        def forward(self, x, splits=None):
            calls.append((self.num_experts, splits, x.shape[0]))
            return super().forward(x, splits)

    with Checkpoint(FIXTURES / "dit_tiny_weights") as ckpt:
        state = {key: ckpt.load(key) for key in ckpt.keys()}
    model = MagiDiT(PRESETS["tiny"], linear_cls=RecordingLinear, device="meta")
    assert sum(isinstance(m, RecordingLinear) for m in model.modules()) == 24  # 6 layers x 4
    model.load_state_dict(state, strict=True, assign=True)
    model(torch.randn(1, 48, 2, 2, 4), torch.randn(1, 5, 64), torch.randn(1, 3, 3584))
    assert len(calls) == 24
    for experts, splits, rows in calls:
        assert rows == 4 + 5 + 3
        assert splits == ((4, 5, 3) if experts == 3 else None)
