"""Activation memory of the FP8 linear's fp8-matmul path (counted with the live-storage counter on CPU, whose
torch build has a _scaled_mm): chunked quantization, no copy of the padded output; and the device-free
memory model agrees with the same forward counted on real tensors."""

import dataclasses

import pytest
import torch
from conftest import FIXTURES
from magihuman.benchmarks.live_bytes import LiveBytes
from magihuman.benchmarks.memory_model import measure_forward_cpu, predict_forward
from magihuman.fp8 import linear as fp8_linear
from magihuman.fp8.linear import Fp8Linear
from magihuman.fp8.quantize import quantize
from magihuman.pipeline.codecs import turbo_vae
from magihuman.pipeline.dit import model as dit_model
from magihuman.pipeline.dit.config import PRESETS
from magihuman.pipeline.dit.loading import load_dit
from magihuman.pipeline.media.frames import to_image


def test_quantization_keeps_no_whole_activation_in_float32(monkeypatch):
    tokens, k, n = 2000, 1000, 200  # K pads to 1008, N to 208 (like down_proj and linear_qkv)
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    layer = Fp8Linear.from_fp8(quantize(weight), mode="fp8-matmul")
    x = torch.randn(tokens, k, dtype=torch.bfloat16)
    reference = layer(x).float()  # quantized in one chunk
    monkeypatch.setattr(fp8_linear, "QUANT_ELEMENTS", 1 << 16)
    with LiveBytes(device="cpu") as counter:
        y = layer(x)
    output, operand = tokens * 208 * 2, tokens * 1008
    # Before: two float32 copies of x (8 MB each) and a copy of the output. Now: the FP8 operand, the padded
    # output and float32 chunks of 64K elements (256 KB), plus the scale.
    assert counter.peak <= output + operand + 4 * (1 << 16) + 4096
    assert y.stride() == (208, 1) and y.shape == (tokens, n)  # the padded output's view, not a copy
    assert torch.equal(y.float(), reference)


def test_the_fake_forward_counts_what_a_real_forward_holds():
    config = PRESETS["tiny"]
    predicted = predict_forward(config, "fp8", "256p", frame_scale=0.125)
    resident, activations = measure_forward_cpu(config, "256p", frame_scale=0.125)
    assert predicted.resident == resident
    assert abs(predicted.activations - activations) <= 0.02 * activations


def test_to_image_holds_one_float32_frame_beside_its_result():
    video = torch.rand(1, 3, 9, 32, 48, dtype=torch.bfloat16) * 2 - 1
    with LiveBytes(device="cpu") as counter:
        image = to_image(video)
    expected = video[0].float().mul(0.5).add(0.5).clamp(0, 1).permute(1, 2, 3, 0)
    assert torch.equal(image, expected)
    frame = 3 * 32 * 48 * 4
    assert counter.peak <= image.nbytes + 2 * frame


def test_turbo_vae_norm_and_upsample_keep_values_without_whole_float32_copies(monkeypatch):
    monkeypatch.setattr(turbo_vae, "CHUNK_ELEMENTS", 1 << 12)
    x = torch.randn(1, 16, 6, 10, 12, dtype=torch.bfloat16)
    expected = (x * torch.rsqrt(x.float().pow(2).mean(1, keepdim=True) + 1e-6)).to(x.dtype)
    with LiveBytes(device="cpu") as counter:
        y = turbo_vae.rms_channels(x, 1e-6)
    assert torch.equal(y, expected)
    # Output, the float32 variance [1, 1, 6, 10, 12] and float32 slices of 4K elements, not 2 x 46 KB copies.
    assert counter.peak <= y.nbytes + 6 * 10 * 12 * 4 + 3 * 4 * (1 << 12)
    frames = torch.randn(5, 16, 10, 12, dtype=torch.bfloat16)
    up = turbo_vae.NearestUp2x()(frames)
    reference = torch.nn.functional.interpolate(frames.float(), scale_factor=2.0, mode="nearest-exact")
    assert up.dtype == torch.bfloat16 and torch.equal(up.float(), reference)


class ConvSizes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest input and output element counts any convolution op sees."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.conv3d, torch.ops.aten.convolution):
            self.largest = max(self.largest, args[0].numel(), out.numel())
        return out


def test_turbo_convolutions_above_the_limit_run_in_exact_frame_chunks(monkeypatch):
    config = turbo_vae.TurboConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=(1, 1, 1, 1, 1))
    torch.manual_seed(0)
    decoder = turbo_vae.Decoder3d(config).to(torch.bfloat16).eval()
    z = torch.randn(1, 48, 3, 4, 6, dtype=torch.bfloat16)
    with torch.inference_mode(), ConvSizes() as whole:
        expected = decoder(z, first_chunk=False)
    limit = 4000  # elements; the decoder's widest Conv3d sees 221K
    monkeypatch.setattr(turbo_vae, "CONV_SPLIT_ELEMENTS", limit)
    monkeypatch.setattr(turbo_vae, "CONV_CHUNK_ELEMENTS", limit * 10)
    with torch.inference_mode(), ConvSizes() as split:
        result = decoder(z, first_chunk=False)
    assert whole.largest > 50 * limit
    assert split.largest <= 10 * limit  # every conv above the limit ran in chunks of the chunk size
    assert torch.equal(result, expected)


def test_a_frame_chunked_conv_equals_the_whole_conv_at_every_chunk_size():
    torch.manual_seed(1)
    conv = turbo_vae.Conv3d(6, 5, 3)
    x = torch.randn(1, 6, 7, 5, 4)
    expected = conv(x)
    for frames in (1, 2, 3, 7):
        per_frame = 6 * 5 * 4
        chunked = conv.forward_in_frame_chunks(x, per_frame * (frames + 2))
        assert chunked.shape == expected.shape
        assert torch.allclose(chunked, expected, rtol=0, atol=1e-6), frames


def test_a_frame_chunked_conv_may_write_its_result_into_its_input():
    torch.manual_seed(2)
    conv = turbo_vae.Conv3d(6, 6, 3)
    x = torch.randn(1, 6, 7, 5, 4)
    expected = conv(x)
    per_frame = 6 * 5 * 4
    for frames in (1, 2, 3, 7):
        source = x.clone()
        result = conv.forward_in_frame_chunks(source, per_frame * (frames + 2), overwrite_input=True)
        assert result.data_ptr() == source.data_ptr()  # no second activation
        assert torch.allclose(result, expected, rtol=0, atol=1e-6), frames


def test_a_width_changing_resblock_adds_its_shortcut_in_frame_chunks_with_the_same_values(monkeypatch):
    torch.manual_seed(3)
    block = turbo_vae.ResBlock(8, 4, 1e-6).to(torch.bfloat16).eval()
    x = torch.randn(1, 8, 5, 3, 4, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = block(x)
        monkeypatch.setattr(turbo_vae, "CHUNK_ELEMENTS", 8 * 3 * 4)  # one frame at a time
        sizes = []
        shortcut = block.conv_shortcut.forward
        monkeypatch.setattr(block.conv_shortcut, "forward", lambda t: sizes.append(t.shape[2]) or shortcut(t))
        chunked = block(x)
    assert sizes == [1] * 5 and torch.equal(chunked, expected)


def test_one_1080p_turbo_window_is_predicted_within_12_gb():
    from magihuman.benchmarks.memory_codecs import predict_decode

    window = predict_decode("turbo", "1080p")  # fake tensors: nothing is allocated
    assert window.resident + window.activations <= 12e9


@pytest.mark.parametrize("variant", ["base", "sr_1080p"])
def test_long_streams_run_the_dit_in_row_chunks_with_the_same_velocities(monkeypatch, variant):
    """Block linears, the MLP activation, q/k norm + RoPE and the attention gate go in row chunks once a
    stream is long (here: made long by small chunk sizes); the velocities do not change by one bit."""
    model, _ = load_dit(FIXTURES / "dit_tiny_fp8" / "checkpoint", variant, compute="fp8-matmul")
    model.config = dataclasses.replace(model.config, frame_receptive_field=1)  # local windows matter
    torch.manual_seed(0)
    sample = (torch.randn(1, 48, 5, 4, 6), torch.randn(1, 17, 64), torch.randn(1, 5, 3584))
    mlp, attention = model.block.layers[5].mlp, model.block.layers[0].attention  # sandwich layers
    activations, norms = [], []
    activation, norm_rope = mlp.activation, attention.norm_rope
    monkeypatch.setattr(mlp, "activation", lambda u: activations.append(u.shape[0]) or activation(u))
    monkeypatch.setattr(attention, "norm_rope", lambda *a: norms.append(a[0].shape[0]) or norm_rope(*a))
    with torch.inference_mode():
        expected = model(*sample)
        assert activations == [52] and norms == [52, 52]  # 30 video + 17 audio + 5 text rows, whole
        # The linears in chunks of 12 rows (not of 1: a one-row GEMM takes the CPU's GEMV, which sums in
        # another order; real chunks have thousands of rows), the up_gate output activated chunk by chunk.
        monkeypatch.setattr(fp8_linear, "ROW_CHUNK_ELEMENTS", 8192)
        activations.clear()
        linears_chunked = model(*sample)
        assert activations == [12, 12, 6, 12, 5, 5]  # video, audio, text rows, never across modalities
        monkeypatch.undo()
        # The attention's row-wise work in chunks of 7 rows (q: 8 heads x 16), the linears whole.
        monkeypatch.setattr(attention, "norm_rope", lambda *a: norms.append(a[0].shape[0]) or norm_rope(*a))
        monkeypatch.setattr(dit_model, "rows_per_chunk", lambda width: 7 * 128 // width)
        norms.clear()
        attention_chunked = model(*sample)
    # q's video, audio and text rows in chunks that stay in one modality; k (2 heads) in chunks of 28.
    assert norms == [7, 7, 7, 7, 2, 7, 7, 3, 5] + [28, 2, 17, 5]
    for velocities in (linears_chunked, attention_chunked):
        for a, b in zip(velocities, expected, strict=True):
            assert torch.equal(a, b)


def test_1080p_sr_forward_activations_are_predicted_within_6_gb():
    """The full-width 1080p-SR forward on fake tensors (nothing allocated): one layer of each kind (sandwich
    gelu7 with local attention, shared swiglu7 with global attention, sandwich swiglu7) at 65.6k tokens."""
    config = dataclasses.replace(
        PRESETS["sr_1080p"], num_layers=3, mm_layers=(0, 2), gelu7_layers=(0,), local_attn_layers=(0, 2)
    )
    predicted = predict_forward(config, "fp8", "1080p")
    assert predicted.tokens == 65606
    assert predicted.activations <= 6e9
