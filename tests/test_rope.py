"""RoPE: bands and Fourier embedding against the official ElementWiseFourierEmbed outputs, and the partial
rotate-half rotation against an independent complex-number formulation."""

import math

import pytest
import torch
from conftest import FIXTURES
from magihuman.pipeline.dit.rope import apply_rope, default_bands, fourier_embed
from magihuman.pipeline.dit.tokens import pack, stream_coords
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def proxy():
    return load_file(FIXTURES / "data_proxy" / "tensors.safetensors")


@pytest.mark.parametrize("head_dim", [128, 16])
def test_default_bands_equal_the_official_buffer(proxy, head_dim):
    assert torch.equal(default_bands(head_dim), proxy[f"rope.bands_head_dim{head_dim}"])


@pytest.mark.parametrize("style", ["v1", "v2"])
@pytest.mark.parametrize("head_dim", [128, 16])
def test_fourier_embed_is_bit_identical_to_the_official(proxy, style, head_dim):
    bands = proxy[f"rope.bands_head_dim{head_dim}"]
    embed = fourier_embed(proxy[f"{style}.coords"], bands)
    assert embed.shape == (23, 6 * head_dim // 8)
    assert torch.equal(embed, proxy[f"{style}.rope_head_dim{head_dim}"])


def test_fourier_embed_single_text_token_v2(proxy):
    embed = fourier_embed(proxy["v2.L1.coords"], proxy["rope.bands_head_dim128"])
    assert torch.equal(embed, proxy["v2.L1.rope_head_dim128"])


@pytest.mark.parametrize(("case", "style"), [("dit_tiny_v2", "v2"), ("dit_tiny_v1_local", "v1")])
def test_dit_case_rope_from_packed_inputs(case, style):
    tensors = load_file(FIXTURES / case / "tensors.safetensors")
    inputs = (tensors["input.video_latent"], tensors["input.audio_latent"], tensors["input.text_embedding"])
    stream, *_ = pack([inputs], (48, 64, 3584))
    embed = fourier_embed(stream_coords(stream, style), default_bands(16))
    assert torch.equal(embed, tensors["rope.sin_cos"])


def reference_rope(x, angles):
    """Rotate pairs (j, j+n) as complex numbers z = x_j + i·x_{j+n} multiplied by e^{i·angle_j}."""
    n = angles.shape[-1]
    z = torch.complex(x[..., :n].double(), x[..., n : 2 * n].double()) * torch.polar(
        torch.ones_like(angles, dtype=torch.float64), angles.double()
    ).unsqueeze(1)
    return torch.cat([z.real, z.imag, x[..., 2 * n :].double()], dim=-1)


def test_apply_rope_rotates_the_first_three_quarters_as_complex_pairs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 5, 128, generator=gen)
    angles = torch.randn(11, 48, generator=gen) * 3
    out = apply_rope(x, angles.sin(), angles.cos(), out_dtype=torch.float32)
    # fp32 math vs float64: a few fp32 ulps.
    torch.testing.assert_close(out.double(), reference_rope(x, angles), rtol=0, atol=1e-5)
    assert torch.equal(out[..., 96:], x[..., 96:])  # the last quarter passes through untouched
    bf16 = apply_rope(x, angles.sin(), angles.cos())
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, out.to(torch.bfloat16))


def test_rope_scores_depend_only_on_the_position_difference():
    """q·k after RoPE at positions (p, p') equals the score at (p + s, p' + s) for every axis."""
    gen = torch.Generator().manual_seed(1)
    bands = default_bands(128)
    q, k = torch.randn(1, 1, 128, generator=gen), torch.randn(1, 1, 128, generator=gen)

    def score(pos_q, pos_k):
        coords = torch.tensor([[*pos_q, 9, 9, 9, 9, 9, 9], [*pos_k, 9, 9, 9, 9, 9, 9]], dtype=torch.float32)
        sin, cos = fourier_embed(coords, bands).chunk(2, dim=-1)
        rq = apply_rope(q, sin[:1], cos[:1], out_dtype=torch.float32)
        rk = apply_rope(k, sin[1:], cos[1:], out_dtype=torch.float32)
        return (rq * rk).sum().item()

    base = score((1.0, 2.0, 3.0), (4.0, 0.0, 5.0))
    assert math.isclose(base, score((3.0, 5.0, 1.0), (6.0, 3.0, 3.0)), abs_tol=1e-4)
    assert not math.isclose(base, score((1.0, 2.0, 3.0), (4.0, 1.0, 5.0)), abs_tol=1e-2)
