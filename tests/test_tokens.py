"""Token packing, unpacking and coordinates against the official data proxy (golden ``data_proxy`` case, whose
inputs are value-coded so every position can be read off the numbers) and the DiT cases' packed tokens."""

import pytest
import torch
from conftest import FIXTURES
from magihuman.pipeline.dit.tokens import (
    SampleShape,
    TokenStream,
    pack,
    patchify_video,
    stream_coords,
    unpack,
)
from safetensors.torch import load_file

CHANNELS = (48, 64, 3584)


@pytest.fixture(scope="module")
def proxy():
    return load_file(FIXTURES / "data_proxy" / "tensors.safetensors")


def proxy_sample(proxy, text_len=6):
    """The case's inputs; its text is padded to 10 rows of which the first ``txt_feat_len`` = 6 are real."""
    return proxy["input.video_latent"], proxy["input.audio_latent"], proxy["input.text_padded"][:, :text_len]


def test_pack_matches_the_official_token_sequence(proxy):
    stream, video, audio, text = pack([proxy_sample(proxy)], CHANNELS)
    golden = proxy["tokens"]  # [23, 3584]: [video | audio | text] rows, zero-padded channels
    assert stream.splits == (12, 5, 6)
    assert torch.equal(video, golden[:12, :192])
    assert torch.equal(audio, golden[12:17, :64])
    assert torch.equal(text, golden[17:23])
    # Channel-major patch features: row 0 = (c=0: 0, 1, 10, 11), then c=1: 1000, ...
    assert video[0, :8].tolist() == [0, 1, 10, 11, 1000, 1001, 1010, 1011]


def test_pack_matches_the_dit_case_tokens_and_upcasts_fp16_text():
    case = load_file(FIXTURES / "dit_tiny_v2" / "tensors.safetensors")
    text = case["input.text_embedding"].half()  # the fixture's text went through fp16: this cast is exact
    stream, video, audio, text = pack(
        [(case["input.video_latent"], case["input.audio_latent"], text)], CHANNELS
    )
    golden = case["packed.tokens"]
    assert stream.splits == (18, 9, 7)
    assert text.dtype == torch.float32
    assert torch.equal(torch.cat([video, torch.zeros(18, 3584 - 192)], 1), golden[:18])
    assert torch.equal(audio, golden[18:27, :64])
    assert torch.equal(text, golden[27:])


@pytest.mark.parametrize("style", ["v1", "v2"])
def test_coordinates_match_the_official_data_proxy(proxy, style):
    stream, *_ = pack([proxy_sample(proxy)], CHANNELS)
    assert torch.equal(stream_coords(stream, style), proxy[f"{style}.coords"])


@pytest.mark.parametrize(("case", "style"), [("dit_tiny_v2", "v2"), ("dit_tiny_v1_local", "v1")])
def test_coordinates_match_the_dit_cases(case, style):
    tensors = load_file(FIXTURES / case / "tensors.safetensors")
    inputs = (tensors["input.video_latent"], tensors["input.audio_latent"], tensors["input.text_embedding"])
    stream, *_ = pack([inputs], CHANNELS)
    assert torch.equal(stream_coords(stream, style), tensors["packed.coords"])
    counts = torch.bincount(tensors["packed.modality"], minlength=3).tolist()
    assert list(stream.splits) == counts


def test_single_text_token_v2_is_defined_and_v1_is_a_clear_error(proxy):
    stream, *_ = pack([proxy_sample(proxy, text_len=1)], CHANNELS)
    # v2: the text axis has size 1 and reference 1, so its scale is 1 and the token sits at time -1.
    assert torch.equal(stream_coords(stream, "v2"), proxy["v2.L1.coords"])
    # v1: reference 2 over 1 position is a division by zero; the official code asserts ("scales has inf").
    assert proxy["v1.L1.coords"][-1].tolist() == [0, 0, 0, 1, 1, 1, 2, 1, 1]
    with pytest.raises(ValueError, match="at least 2 text tokens"):
        stream_coords(stream, "v1")


def test_single_audio_frame_v1_is_a_clear_error():
    stream = TokenStream((SampleShape(frames=3, height=1, width=1, audio=1, text=4),))
    with pytest.raises(ValueError, match="at least 2 audio latent frames"):
        stream_coords(stream, "v1")
    assert stream_coords(stream, "v2")[3].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("style", ["v1", "v2"])
def test_unpack_is_the_official_channel_minor_depack(proxy, style):
    stream, *_ = pack([proxy_sample(proxy)], CHANNELS)
    out = proxy[f"{style}.depack_in"]  # [23, 192], value n*1000 + k
    [(video, audio)] = unpack(out[:12], out[12:17, :64], stream)
    assert torch.equal(video, proxy[f"{style}.depack_video"])
    assert torch.equal(audio, proxy[f"{style}.depack_audio"])


def test_unpack_is_not_the_inverse_of_pack(proxy):
    """The asymmetry is real: feeding the packed tokens straight back does not restore the latent."""
    video = proxy["input.video_latent"]
    shape = SampleShape(2, 2, 3, 5, 6)
    [(restored, _)] = unpack(patchify_video(video), torch.zeros(5, 64), TokenStream((shape,)))
    assert restored.shape == video.shape
    assert not torch.equal(restored, video)
    # Output channel k of pixel (0, 0) reads packed feature k = input channel k // 4 at patch offset k % 4.
    expected = [(k // 4) * 1000 + (0, 1, 10, 11)[k % 4] for k in range(48)]
    assert restored[0, :, 0, 0, 0].tolist() == expected


def test_multi_sample_stream_is_modality_major():
    a, b = SampleShape(2, 2, 3, 5, 4), SampleShape(1, 1, 2, 3, 7)
    stream = TokenStream((a, b))
    assert stream.splits == (14, 8, 11) and stream.total == 33
    assert stream.sample_rows(0) == (range(0, 12), range(14, 19), range(22, 26))
    assert stream.sample_rows(1) == (range(12, 14), range(19, 22), range(26, 33))
    coords = stream_coords(stream, "v2")
    assert coords[12:14, 3:6].tolist() == [[1, 1, 2]] * 2  # sample b's video grid size
    assert coords[19, 3:].tolist() == [3, 1, 1, 1, 1, 1]  # sample b's first audio frame: ref (3-1)//4+1


@pytest.mark.parametrize(
    ("video", "audio", "text", "message"),
    [
        ((1, 48, 2, 3, 4), (1, 5, 64), (1, 3, 3584), "even"),
        ((1, 16, 2, 4, 4), (1, 5, 64), (1, 3, 3584), r"video latent must be \[1,48,F,h,w\]"),
        ((2, 48, 2, 4, 4), (1, 5, 64), (1, 3, 3584), r"video latent must be"),
        ((1, 48, 2, 4, 4), (1, 5, 32), (1, 3, 3584), r"audio latent must be \[1,A>=1,64\]"),
        ((1, 48, 2, 4, 4), (1, 5, 64), (1, 0, 3584), "trimmed to its real length"),
    ],
)
def test_pack_rejects_malformed_inputs(video, audio, text, message):
    with pytest.raises(ValueError, match=message):
        pack([(torch.zeros(video), torch.zeros(audio), torch.zeros(text))], CHANNELS)


def test_pack_rejects_integer_latents_and_names_the_sample():
    good = (torch.zeros(1, 48, 1, 2, 2), torch.zeros(1, 1, 64), torch.zeros(1, 1, 3584))
    bad = (good[0], torch.zeros(1, 1, 64, dtype=torch.int64), good[2])
    with pytest.raises(ValueError, match="sample 1: audio must be a float tensor"):
        pack([good, bad], CHANNELS)


@pytest.mark.gpu
def test_gpu_stream_coordinates_need_no_host_sync():
    stream = TokenStream((SampleShape(3, 2, 4, 9, 5), SampleShape(2, 2, 2, 5, 7)))
    expected = stream_coords(stream, "v2")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        coords = stream_coords(stream, "v2", torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(coords.cpu(), expected)
