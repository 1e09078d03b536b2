"""Attention kernels and the stream decomposition: block-diagonal samples and 1080p-SR frame windows must
equal dense attention under the explicit mask, and the windows must be the official FFA ranges."""

import importlib.util

import pytest
import torch
from conftest import FIXTURES
from magihuman.pipeline.dit.attention import (
    StreamAttention,
    fp32_attention,
    frame_windows,
    make_attention,
    sdpa_attention,
)
from magihuman.pipeline.dit.tokens import SampleShape, TokenStream
from safetensors.torch import load_file


def stream_mask(stream: TokenStream, receptive_field: int, local: bool) -> torch.Tensor:
    """[S, S] boolean: query row may attend key column. Built directly from the rule, token by token."""
    s = stream.total
    sample, frame = torch.full((s,), -1), torch.full((s,), -1)  # frame -1 marks audio/text tokens
    for i, shape in enumerate(stream.samples):
        video, audio, text = stream.sample_rows(i)
        for rows in (video, audio, text):
            sample[rows.start : rows.stop] = i
        frame[video.start : video.stop] = torch.arange(shape.video) // shape.tokens_per_frame
    mask = sample[:, None] == sample[None, :]
    if local:
        video_query = frame[:, None] >= 0
        video_key = frame[None, :] >= 0
        near = (frame[:, None] - frame[None, :]).abs() <= receptive_field
        mask &= ~(video_query & video_key) | near
    return mask


def dense_masked(q, k, v, mask):
    """float64 softmax(q kᵀ/√Dh + mask) v with GQA, materialising every score (small cases only)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def float64_kernel(q, k, v):
    return sdpa_attention(q.double(), k.double(), v.double())


CASES = [
    # (samples (frames, h', w', audio, text), receptive field, heads q, heads kv)
    ([(7, 2, 3, 9, 4)], 2, 4, 1),  # windows clip at both ends, GQA 4:1
    ([(6, 1, 2, 5, 3)], 0, 2, 2),  # each frame sees only itself
    ([(5, 2, 2, 4, 2)], 1, 6, 3),  # GQA 2:1
    ([(3, 2, 2, 3, 2)], 5, 4, 2),  # window covers the whole clip: one dense call
    ([(5, 2, 2, 7, 3), (4, 1, 3, 5, 6), (1, 1, 1, 1, 1)], 1, 4, 2),  # several samples, different lengths
]


@pytest.mark.parametrize("local", [True, False])
@pytest.mark.parametrize(("samples", "receptive_field", "heads_q", "heads_kv"), CASES)
def test_stream_attention_equals_dense_masked_attention(samples, receptive_field, heads_q, heads_kv, local):
    stream = TokenStream(tuple(SampleShape(*s) for s in samples))
    gen = torch.Generator().manual_seed(len(samples) * 100 + receptive_field)
    s, dh = stream.total, 16
    q = torch.randn(s, heads_q, dh, generator=gen, dtype=torch.float64)
    k = torch.randn(s, heads_kv, dh, generator=gen, dtype=torch.float64)
    v = torch.randn(s, heads_kv, dh, generator=gen, dtype=torch.float64)
    attend = StreamAttention(float64_kernel, stream, receptive_field, torch.device("cpu"))
    expected = dense_masked(q, k, v, stream_mask(stream, receptive_field, local))
    # Both sides are float64: the decomposition is exact, only summation order differs.
    torch.testing.assert_close(attend(q, k, v, local), expected, rtol=0, atol=1e-12)


def test_the_local_mask_is_not_trivial():
    """Guards the test above: on its first case the window really hides keys from video queries."""
    stream = TokenStream((SampleShape(7, 2, 3, 9, 4),))
    mask = stream_mask(stream, 2, local=True)
    assert not mask.all() and mask[42:].all() and mask[:, 42:].all()
    assert mask[:6].sum(1).tolist() == [3 * 6 + 13] * 6  # frame 0 sees frames 0..2 plus 13 audio/text keys


def per_frame_key_ranges(frames, tokens_per_frame, receptive_field):
    ranges = []
    for f0, f1, lo, hi in frame_windows(frames, receptive_field):
        ranges += [[lo * tokens_per_frame, hi * tokens_per_frame]] * (f1 - f0)
    return ranges


def test_frame_windows_are_the_official_ranges_of_the_local_case():
    case = load_file(FIXTURES / "dit_tiny_v1_local" / "tensors.safetensors")
    q_ranges, k_ranges = case["local_attn.q_ranges"].tolist(), case["local_attn.k_ranges"].tolist()
    frames, tpf, nv, n = 5, 6, 30, 54  # video [1,48,5,4,6] -> 6 tokens per frame; 17 audio + 7 text
    assert q_ranges[:frames] == [[f * tpf, (f + 1) * tpf] for f in range(frames)]
    assert k_ranges[:frames] == per_frame_key_ranges(frames, tpf, receptive_field=1)
    # Then: all video queries see audio+text; audio+text queries see everything (StreamAttention's rule).
    assert (q_ranges[frames], k_ranges[frames]) == ([0, nv], [nv, n])
    assert (q_ranges[frames + 1], k_ranges[frames + 1]) == ([nv, n], [0, n])


@pytest.mark.parametrize(("style", "receptive_field"), [("v1", 1), ("v1", 11), ("v2", 1), ("v2", 11)])
def test_frame_windows_match_the_data_proxy_ranges(style, receptive_field):
    proxy = load_file(FIXTURES / "data_proxy" / "tensors.safetensors")
    k_ranges = proxy[f"{style}.frf{receptive_field}.k_ranges"].tolist()
    assert k_ranges[:2] == per_frame_key_ranges(frames=2, tokens_per_frame=6, receptive_field=receptive_field)


def test_frame_windows_group_equal_windows():
    assert frame_windows(4, 5) == [(0, 4, 0, 4)]
    assert frame_windows(5, 1) == [(0, 1, 0, 2), (1, 2, 0, 3), (2, 3, 1, 4), (3, 4, 2, 5), (4, 5, 3, 5)]


def test_sdpa_matches_the_fp32_reference_within_bf16_rounding():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(40, 8, 64, generator=gen).to(torch.bfloat16)
    k = torch.randn(40, 2, 64, generator=gen).to(torch.bfloat16)
    v = torch.randn(40, 2, 64, generator=gen).to(torch.bfloat16)
    out, ref = sdpa_attention(q, k, v), fp32_attention(q, k, v)
    assert out.shape == (40, 8, 64) and out.dtype == ref.dtype == torch.bfloat16
    # bf16 kernels round P and accumulate differently: outputs (|o| < 1) agree to ~2 bf16 ulps.
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2)


def test_make_attention_resolves_names_once():
    assert make_attention() is sdpa_attention
    assert make_attention("fp32") is fp32_attention
    if not torch.cuda.is_available():
        assert make_attention("auto") is sdpa_attention
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        make_attention("xformers")


@pytest.mark.parametrize(
    ("name", "module", "hint"),
    [("flash", "flash_attn", "flash-attn"), ("sage", "sageattention", "sageattention")],
)
def test_missing_backend_error_gives_the_pip_line(name, module, hint):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(ImportError, match=f"pip install {hint}"):
        make_attention(name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sdpa", "flash", "sage"])
def test_gpu_kernels_match_the_reference_on_a_local_stream(name):
    if (
        name != "sdpa"
        and importlib.util.find_spec({"flash": "flash_attn", "sage": "sageattention"}[name]) is None
    ):
        pytest.skip(f"{name} not installed")
    stream = TokenStream((SampleShape(9, 4, 6, 37, 20), SampleShape(3, 4, 6, 13, 9)))
    gen = torch.Generator().manual_seed(4)
    q, k, v = (
        torch.randn(stream.total, h, 128, generator=gen).to("cuda", torch.bfloat16) for h in (40, 8, 8)
    )
    out = StreamAttention(make_attention(name), stream, 2, torch.device("cuda"))(q, k, v, local=True)
    expected = dense_masked(
        q.cpu().double(), k.cpu().double(), v.cpu().double(), stream_mask(stream, 2, True)
    )
    # bf16 kernels: ~1 % of |o|; SageAttention quantises QK to int8, hence its wider bound.
    atol = 6e-2 if name == "sage" else 2e-2
    torch.testing.assert_close(out.double().cpu(), expected, rtol=0, atol=atol)
