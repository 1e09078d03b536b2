"""Audio in and out: FFT resampling, ComfyUI AUDIO dicts ({"waveform": [B, C, N], "sample_rate": int}), and
user audio prepared for the audio VAE (stereo, 51.2 kHz, exactly 2048 samples per latent)."""

import logging
import math

import torch

from ...fp8.errors import InputError
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


def check_audio(audio, what: str = "driving audio") -> tuple[torch.Tensor, int]:
    """(waveform [B, C, N], rate) of a ComfyUI AUDIO, checked: mono or stereo, not empty, finite."""
    try:
        waveform, rate = audio["waveform"], int(audio["sample_rate"])
    except (TypeError, KeyError, ValueError) as e:
        raise InputError(
            f"{what}: expected a ComfyUI AUDIO dict with 'waveform' and 'sample_rate', got {e!r}"
        ) from None
    if not isinstance(waveform, torch.Tensor) or rate <= 0:
        raise InputError(f"{what} needs a waveform tensor and a positive sample rate, got rate {rate}")
    if waveform.ndim == 2:
        waveform = waveform.unsqueeze(0)
    if waveform.ndim != 3 or waveform.shape[1] not in (1, 2) or waveform.shape[-1] == 0:
        raise InputError(
            f"{what} must be mono or stereo [batch, channels, samples]; got {list(waveform.shape)}"
        )
    if not bool(torch.isfinite(waveform[:1]).all()):
        raise InputError(f"{what} holds NaN or Inf samples")
    return waveform, rate


def from_audio(audio: dict, latent_frames: int) -> torch.Tensor:
    """ComfyUI AUDIO (any rate, mono or stereo; the first of a batch) -> [1, 2, 2048·latent_frames] at
    51.2 kHz for the audio VAE: mono is duplicated, longer audio is cut, shorter audio padded with silence."""
    waveform, rate = check_audio(audio)
    needed = HOP * latent_frames
    # Only what the clip uses (plus a tenth of a second, so the resampler's edge lies outside it) is
    # resampled: a 10-minute recording costs no more than the clip.
    keep = math.ceil(needed * rate / SAMPLE_RATE) + rate // 10
    if waveform.shape[-1] > keep:
        log.warning(
            "driving audio is %.1f s; the clip uses its first %.2f s, the remaining %.1f s are unused",
            waveform.shape[-1] / rate, needed / SAMPLE_RATE, waveform.shape[-1] / rate - needed / SAMPLE_RATE,
        )  # fmt: skip
        waveform = waveform[..., :keep]
    waveform = waveform[:1].float()
    if waveform.shape[1] == 1:
        waveform = waveform.expand(-1, 2, -1)
    waveform = resample(waveform, rate, SAMPLE_RATE)
    if waveform.shape[-1] < needed:
        log.warning(
            "driving audio is %.2f s, the clip needs %.2f s: padding with silence",
            waveform.shape[-1] / SAMPLE_RATE,
            needed / SAMPLE_RATE,
        )
        waveform = torch.nn.functional.pad(waveform, (0, needed - waveform.shape[-1]))
    return waveform[..., :needed].contiguous()
