"""Audio in and out: FFT resampling, ComfyUI AUDIO dicts ({"waveform": [B, C, N], "sample_rate": int}), and
user audio prepared for the audio VAE (stereo, 51.2 kHz, exactly 2048 samples per latent)."""

import logging

import torch

from .audio_vae import HOP, SAMPLE_RATE

log = logging.getLogger(__name__)

OUTPUT_RATE = 44100


def resample(waveform: torch.Tensor, from_rate: int, to_rate: int) -> torch.Tensor:
    """Band-limited resampling of [..., N] along the last dim by Fourier-domain truncation or zero padding
    (what the official pipeline does with scipy.signal.resample), to int(N·to/from) samples."""
    if from_rate == to_rate:
        return waveform
    n = waveform.shape[-1]
    m = int(n * to_rate / from_rate)
    spectrum = torch.fft.rfft(waveform.float(), dim=-1)  # [..., n//2+1]
    kept = min(n, m)
    out = spectrum.new_zeros(*spectrum.shape[:-1], m // 2 + 1)
    out[..., : kept // 2 + 1] = spectrum[..., : kept // 2 + 1]
    if kept % 2 == 0:  # an even-length band edge is one shared Nyquist bin: split or join it like scipy
        out[..., kept // 2] *= 2.0 if m < n else 0.5
    return torch.fft.irfft(out, m, dim=-1) * (m / n)


def to_audio(waveform: torch.Tensor, rate: int = SAMPLE_RATE) -> dict:
    """A decoded [1, 2, N] waveform at ``rate`` -> ComfyUI AUDIO at 44.1 kHz, stereo kept stereo."""
    return {"waveform": resample(waveform.float().cpu(), rate, OUTPUT_RATE), "sample_rate": OUTPUT_RATE}


def from_audio(audio: dict, latent_frames: int) -> torch.Tensor:
    """ComfyUI AUDIO (any rate, mono or stereo; the first of a batch) -> [1, 2, 2048·latent_frames] at
    51.2 kHz for the audio VAE: mono is duplicated, longer audio is cut, shorter audio padded with silence."""
    try:
        waveform, rate = audio["waveform"], int(audio["sample_rate"])
    except (TypeError, KeyError) as e:
        raise ValueError(
            f"expected a ComfyUI AUDIO dict with 'waveform' and 'sample_rate', got {e!r}"
        ) from None
    if waveform.ndim == 2:
        waveform = waveform.unsqueeze(0)
    if waveform.ndim != 3 or waveform.shape[1] not in (1, 2) or waveform.shape[-1] == 0:
        raise ValueError(
            f"driving audio must be mono or stereo [batch, channels, samples]; got {list(waveform.shape)}"
        )
    waveform = waveform[:1].float()
    if waveform.shape[1] == 1:
        waveform = waveform.expand(-1, 2, -1)
    waveform = resample(waveform, rate, SAMPLE_RATE)
    needed = HOP * latent_frames
    if waveform.shape[-1] < needed:
        log.warning(
            "driving audio is %.2f s, the clip needs %.2f s: padding with silence",
            waveform.shape[-1] / SAMPLE_RATE,
            needed / SAMPLE_RATE,
        )
        waveform = torch.nn.functional.pad(waveform, (0, needed - waveform.shape[-1]))
    return waveform[..., :needed].contiguous()
