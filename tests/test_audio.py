"""The Stable Audio Open VAE against the official tiny run, its checkpoint layouts, the 51.2 -> 44.1 kHz
resampler, and AUDIO conversions. fp32 throughout, as the official code; bounds are fp32 summation order
(measured ≤ 9e-8 on waveforms of |x| ≈ 0.2)."""

import pytest
import torch
from conftest import FIXTURES, load_tensors
from magihuman.fp8.checkpoint import CheckpointError
from magihuman.pipeline.codecs.audio_io import from_audio, resample, to_audio
from magihuman.pipeline.codecs.audio_vae import load_audio_vae
from safetensors.torch import load_file, save_file

WEIGHTS = FIXTURES / "oobleck_tiny" / "weights.safetensors"


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURES / "oobleck_tiny" / "tensors.safetensors")


@pytest.fixture(scope="module")
def vae():
    return load_audio_vae(WEIGHTS)


def test_decode_and_deterministic_encode_match_the_official_run(golden, vae):
    waveform = vae.decode(golden["decode.input_latent"])  # pipeline layout [1, A, 64]
    assert waveform.shape == (1, 2, 2048 * 6)
    torch.testing.assert_close(waveform, golden["decode.waveform"], rtol=0, atol=1e-6)
    mean = vae.encode(golden["encode.input_waveform"])  # [1, 2, 8192] -> [1, 4, 64]
    assert mean.shape == (1, 4, 64)
    torch.testing.assert_close(mean.transpose(1, 2), golden["encode.mean"], rtol=0, atol=1e-6)


def test_resampler_matches_the_official_fft_resample(golden):
    resampled = resample(golden["decode.waveform"][0], 51200, 44100).T  # [N', 2]
    assert resampled.shape == golden["decode.resampled_44k1"].shape == (10584, 2)  # int(12288·441/512)
    # Same algorithm (Fourier truncation) in torch instead of scipy: measured max |Δ| 6e-8, rel-L2 2e-7.
    torch.testing.assert_close(resampled, golden["decode.resampled_44k1"], rtol=0, atol=1e-6)


def test_full_checkpoint_comfy_layout_and_plain_weights_load_the_same(tmp_path, golden, vae):
    weights = load_tensors(WEIGHTS)
    full = {"pretransform.model." + key: tensor for key, tensor in weights.items()}
    full["model.model.transformer.layers.0.weight"] = torch.zeros(3)  # the diffusion model: skipped
    full["conditioner.conditioners.prompt.weight"] = torch.zeros(3)
    save_file(full, tmp_path / "model.safetensors")
    comfy = {}
    for key, tensor in weights.items():
        for old, new in (
            (".weight_g", ".parametrizations.weight.original0"),
            (".weight_v", ".parametrizations.weight.original1"),
        ):
            key = key.replace(old, new)
        comfy[key] = tensor
    save_file(comfy, tmp_path / "stable_audio_vae.safetensors")
    latent = golden["decode.input_latent"]
    reference = vae.decode(latent)
    for name in ("model.safetensors", "stable_audio_vae.safetensors"):
        assert torch.equal(load_audio_vae(tmp_path / name).decode(latent), reference), name


def test_wrong_files_name_the_file_and_key(tmp_path):
    save_file({"encoder.layers.0.weight": torch.zeros(1)}, tmp_path / "not_audio.safetensors")
    with pytest.raises(CheckpointError, match="not_audio.safetensors: not a Stable Audio Open VAE"):
        load_audio_vae(tmp_path / "not_audio.safetensors")
    weights = load_tensors(WEIGHTS)
    del weights["decoder.layers.6.beta"]
    save_file(weights, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="partial.safetensors: .*missing 'decoder.layers.6.beta'"):
        load_audio_vae(tmp_path / "partial.safetensors")


def test_output_audio_is_stereo_44k1_of_the_right_length(vae):
    latent = torch.randn(1, 26, 64)
    audio = to_audio(vae.decode(latent))
    assert audio["sample_rate"] == 44100
    assert audio["waveform"].shape == (1, 2, int(2048 * 26 * 441 / 512))
    assert audio["waveform"].dtype == torch.float32


@pytest.mark.parametrize("rate, channels, seconds", [(16000, 1, 1.5), (48000, 2, 0.5), (51200, 2, 1.0)])
def test_user_audio_becomes_stereo_51k2_of_exact_length(rate, channels, seconds):
    waveform = torch.randn(1, channels, int(rate * seconds))
    prepared = from_audio({"waveform": waveform, "sample_rate": rate}, latent_frames=26)
    assert prepared.shape == (1, 2, 2048 * 26)
    if channels == 1:
        assert torch.equal(prepared[:, 0], prepared[:, 1])
    if seconds < 26 * 2048 / 51200:  # shorter than the clip: the tail is silence
        assert prepared[..., -100:].abs().max() == 0


def test_resampling_keeps_a_tone():
    t = torch.arange(48000) / 48000
    tone = torch.sin(2 * torch.pi * 440 * t)
    out = resample(tone, 48000, 51200)
    expected = torch.sin(2 * torch.pi * 440 * torch.arange(51200) / 51200)
    assert out.shape == (51200,) and (out - expected).abs().max() < 1e-3


def test_bad_user_audio_is_a_clear_error():
    with pytest.raises(ValueError, match="mono or stereo"):
        from_audio({"waveform": torch.zeros(1, 6, 1000), "sample_rate": 48000}, 26)
    with pytest.raises(ValueError, match="AUDIO dict"):
        from_audio({"samples": torch.zeros(1, 2, 10)}, 26)


def test_the_example_voice_is_speech_like_and_installed_once(tmp_path):
    from magihuman.pipeline.media.example_voice import NAME, RATE, example_voice, install_example_voice
    from magihuman.pipeline.media.files import read_audio

    voice = example_voice()["waveform"][0, 0]  # [N]
    assert voice.shape == (4 * RATE,) and voice.abs().max() == pytest.approx(0.5)
    loud = (voice.unfold(0, 160, 160).abs().amax(1) > 0.05).float()  # [frames of 10 ms]
    assert 0.4 < loud.mean() < 0.9, "phrases with pauses between them"
    assert (loud[1:] != loud[:-1]).sum() >= 20, "syllables start and stop"
    path = install_example_voice(tmp_path / "input")
    assert path.name == NAME and path.stat().st_size < 200_000
    audio = read_audio(path)
    assert audio["sample_rate"] == RATE and audio["waveform"].shape == (1, 1, 4 * RATE)
    path.write_bytes(b"the user's own file")
    install_example_voice(tmp_path / "input")
    assert path.read_bytes() == b"the user's own file"
