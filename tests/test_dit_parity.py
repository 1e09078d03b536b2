"""The tiny DiT against the official model's recorded run (golden dit_tiny_v2 and dit_tiny_v1_local, both on
the dit_tiny_weights checkpoint), and the batched forward against separate calls.

Why the tolerances are not bitwise. The fixtures were made on another CPU: its fp32 and bf16 GEMMs sum in a
different order than this machine's (even the fp32 text embedder differs by ~3e-6). Every such 1e-6 difference
that lands next to a bf16 rounding boundary flips that bf16 value by one ulp, and the 6 layers amplify the
flips; the fixture's own sensitivity study (_sensitivity_dit.json) moves the velocities by 9e-3 (attention in
float64) to 3e-2 (FA-like P rounding) max-abs, 3e-3 to 1e-2 rel-L2, for comparable perturbations. So:
* each layer is checked alone (fed the official residual), where matched numerics agree to ~1e-4 of the
  layer's own update, with at most one-ulp bf16 flips;
* whole-model outputs are checked against the bounds of the sensitivity study.
The local-attention case also fails these bounds by an order of magnitude without its local mask (last test).
"""

import dataclasses

import pytest
import torch
from conftest import FIXTURES
from magihuman.fp8.checkpoint import Checkpoint
from magihuman.pipeline.dit.attention import StreamAttention, fp32_attention, sdpa_attention
from magihuman.pipeline.dit.config import DiTConfig
from magihuman.pipeline.dit.model import MagiDiT
from magihuman.pipeline.dit.tokens import pack, stream_coords
from safetensors.torch import load_file

# (fixture, variant, frame receptive field): the local case lowered the field from 11 to 1 so that the
# window matters at 5 latent frames (golden README).
CASES = {"v2": ("dit_tiny_v2", "base", 11), "v1_local": ("dit_tiny_v1_local", "sr_1080p", 1)}


@pytest.fixture(scope="module")
def checkpoint():
    with Checkpoint(FIXTURES / "dit_tiny_weights") as ckpt:
        shapes = {key: ckpt.info(key).shape for key in ckpt.keys()}
        return shapes, {key: ckpt.load(key) for key in ckpt.keys()}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    name, variant, receptive_field = CASES[request.param]
    return request.param, variant, receptive_field, load_file(FIXTURES / name / "tensors.safetensors")


def build(checkpoint, variant, receptive_field, attention) -> MagiDiT:
    shapes, state = checkpoint
    config = dataclasses.replace(
        DiTConfig.from_shapes(shapes, variant), frame_receptive_field=receptive_field
    )
    model = MagiDiT(config, attention=attention, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def inputs(golden):
    return golden["input.video_latent"], golden["input.audio_latent"], golden["input.text_embedding"]


def official_local_fallback(n_audio_text: int, n_total: int):
    """The fixtures' attention numerics, as a kernel: exact fp32 attention with a bf16 output; in local layers
    the official fallback attends a video frame's window and the audio+text keys separately, rounds both
    partial outputs to bf16 and merges them by log-sum-exp. StreamAttention hands a video query block its
    window keys followed by the n_audio_text audio/text keys, so the split point is known."""

    def partial(q, k, v):
        group = q.shape[1] // k.shape[1]
        k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k) / q.shape[-1] ** 0.5  # [H, Sq, Sk]
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype), scores.logsumexp(-1)

    def kernel(q, k, v):
        if q.shape[0] in (n_audio_text, n_total):  # audio/text queries, or a full layer: one range
            return partial(q, k, v)[0]
        split = k.shape[0] - n_audio_text
        out_w, lse_w = partial(q, k[:split], v[:split])
        out_at, lse_at = partial(q, k[split:], v[split:])
        top = torch.maximum(lse_w, lse_at)
        e_w, e_at = torch.exp(lse_w - top), torch.exp(lse_at - top)
        w_w, w_at = (e_w / (e_w + e_at)).T.unsqueeze(-1), (e_at / (e_w + e_at)).T.unsqueeze(-1)
        return (out_w * w_w + out_at * w_at).to(q.dtype)

    return kernel


def matched_kernel(name, golden):
    if name == "v2":
        return fp32_attention
    stream, *_ = pack([inputs(golden)], (48, 64, 3584))
    sample = stream.samples[0]
    return official_local_fallback(sample.audio + sample.text, sample.total)


def test_adapter_matches_within_fp32_gemm_reordering(checkpoint, case):
    name, variant, receptive_field, golden = case
    model = build(checkpoint, variant, receptive_field, fp32_attention)
    _, video, audio, text = pack([inputs(golden)], (48, 64, 3584))
    # fp32 embedders, K up to 3584: only the GEMM summation order differs (measured 3e-6 on |x| ~ 1).
    torch.testing.assert_close(model.adapter(video, audio, text), golden["adapter.out"], rtol=0, atol=1e-5)


def test_each_layer_reproduces_the_official_layer(checkpoint, case):
    name, variant, receptive_field, golden = case
    kernel = matched_kernel(name, golden)
    model = build(checkpoint, variant, receptive_field, kernel)
    stream, *_ = pack([inputs(golden)], (48, 64, 3584))
    rope = model.adapter.rope(stream_coords(stream, model.config.coords_style))
    attend = StreamAttention(kernel, stream, receptive_field, torch.device("cpu"))
    residual = golden["adapter.out"]
    for i, layer in enumerate(model.block.layers):
        expected = golden[f"layer_out.{i}"]
        out = layer(residual.clone(), rope, stream.splits, attend)
        error = out - expected
        # Matched numerics: a few elements flip by one bf16 ulp of the block outputs (|.| < 8, so
        # <= 2^-5); the layer's update (expected - residual) is reproduced to 1e-3 (measured <= 3e-4).
        assert error.abs().max() <= 2**-5, f"layer {i}"
        assert error.norm() / (expected - residual).norm() < 1e-3, f"layer {i}"
        residual = expected


def run_with_probes(model, sample):
    raw = {}
    model.final_linear_video.register_forward_hook(lambda m, i, o: raw.__setitem__("video", o))
    model.final_linear_audio.register_forward_hook(lambda m, i, o: raw.__setitem__("audio", o))
    video, audio = model(*sample)
    return video, audio, raw


def assert_velocities(video, audio, raw, golden, max_abs, rel_l2):
    nv, na = raw["video"].shape[0], raw["audio"].shape[0]
    pairs = [
        (video, golden["output.video_velocity"]),
        (audio, golden["output.audio_velocity"]),
        (raw["video"], golden["model.raw_out"][:nv]),
        (raw["audio"], golden["model.raw_out"][nv : nv + na, :64]),
    ]
    for ours, ref in pairs:
        assert ours.shape == ref.shape and ours.dtype == torch.float32
        assert (ours - ref).abs().max() <= max_abs
        assert (ours - ref).norm() / ref.norm() <= rel_l2
    assert torch.all(golden["model.raw_out"][nv + na :] == 0)  # text rows carry no output


def test_velocities_match_with_the_fixture_attention_numerics(checkpoint, case):
    name, variant, receptive_field, golden = case
    model = build(checkpoint, variant, receptive_field, matched_kernel(name, golden))
    # Measured 1.5e-2 / 5e-3 (v2) and 2.2e-2 / 7.6e-3 (v1_local) max-abs / rel-L2; bounds from the
    # sensitivity study (3e-2 / 1e-2) with headroom for another CPU's GEMM order.
    assert_velocities(*run_with_probes(model, inputs(golden)), golden, max_abs=5e-2, rel_l2=1.5e-2)


def test_velocities_match_with_default_bf16_sdpa(checkpoint, case):
    _, variant, receptive_field, golden = case
    model = build(checkpoint, variant, receptive_field, sdpa_attention)
    # A real bf16 kernel: documented 2.9e-2 / 1.0e-2 (v2) and 3.1e-2 / 8.7e-3 (local); here also the exact
    # window (no bf16 rounding of partials) and this CPU's GEMM order add up. Measured 2.4e-2 / 7.4e-3 (v2),
    # 4.0e-2 / 9.2e-3 (v1_local).
    assert_velocities(*run_with_probes(model, inputs(golden)), golden, max_abs=6e-2, rel_l2=2e-2)


def test_fp16_text_gives_the_same_result(checkpoint):
    golden = load_file(FIXTURES / "dit_tiny_v2" / "tensors.safetensors")
    model = build(checkpoint, "base", 11, sdpa_attention)
    video, audio, text = inputs(golden)  # the fixture's text is fp16-rounded, so .half() is exact
    for ours, ref in zip(model(video, audio, text.half()), model(video, audio, text), strict=True):
        assert torch.equal(ours, ref)


def test_without_local_attention_the_local_case_is_far_off(checkpoint):
    golden = load_file(FIXTURES / "dit_tiny_v1_local" / "tensors.safetensors")
    model = build(checkpoint, "sr_540p", 1, fp32_attention)  # v1 coordinates, every layer full
    video, _ = model(*inputs(golden))
    assert (video - golden["output.video_velocity"]).abs().max() > 0.1  # documented: 0.235


def random_sample(gen, frames, h, w, audio, text):
    return (
        torch.randn(1, 48, frames, h, w, generator=gen),
        torch.randn(1, audio, 64, generator=gen),
        torch.randn(1, text, 3584, generator=gen),
    )


@pytest.mark.parametrize(("variant", "receptive_field"), [("base", 11), ("sr_1080p", 1)])
def test_forward_many_equals_separate_calls(checkpoint, variant, receptive_field):
    model = build(checkpoint, variant, receptive_field, sdpa_attention)
    gen = torch.Generator().manual_seed(0)
    samples = [
        random_sample(gen, 4, 4, 6, 13, 5),
        random_sample(gen, 4, 4, 6, 13, 9),
        random_sample(gen, 2, 2, 4, 5, 2),
    ]
    for (video, audio), sample in zip(model.forward_many(samples), samples, strict=True):
        ref_video, ref_audio = model(*sample)
        # The batched GEMMs have more rows, so the CPU sums some rows in another order (bf16 flips, as
        # above): measured <= 1.6e-2. Attention leaking across samples moves outputs by 0.3-0.7.
        torch.testing.assert_close(video, ref_video, rtol=0, atol=3e-2)
        torch.testing.assert_close(audio, ref_audio, rtol=0, atol=3e-2)


@pytest.mark.parametrize(("variant", "receptive_field"), [("base", 11), ("sr_1080p", 1)])
def test_samples_in_one_stream_never_see_each_other(checkpoint, variant, receptive_field):
    """Same shapes, so the same GEMM order: sample 0 must be bit-identical whatever sample 1 holds."""
    model = build(checkpoint, variant, receptive_field, sdpa_attention)
    gen = torch.Generator().manual_seed(1)
    first = random_sample(gen, 3, 2, 4, 9, 6)
    (video_a, audio_a), _ = model.forward_many([first, random_sample(gen, 3, 2, 4, 9, 4)])
    (video_b, audio_b), _ = model.forward_many([first, random_sample(gen, 3, 2, 4, 9, 4)])
    assert torch.equal(video_a, video_b) and torch.equal(audio_a, audio_b)
