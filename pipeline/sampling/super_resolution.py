"""Latent super-resolution: upsample the base latent, re-noise it (variance preserving, ZeroSNR index 220),
and refine it with the SR DiT in 5 UniPC steps while the audio input stays a fixed noisy copy of the base
audio. The output audio is the base stage's."""

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .loops import NO_OPTIONS, LoopOptions, Velocities, denoise
from .scheduler import DEFAULT_SHIFT, UniPC, flow_schedule
from .sizes import check_steps

NOISE_INDEX = 220  # √ᾱ = 0.83891 of the ZeroSNR table: SNR ≈ 2.38
AUDIO_NOISE_SCALE = 0.7


@dataclass(frozen=True)
class SRGuidance:
    """Optional guidance of the SR model (off by default, as shipped): video scale ``scale``, capped at
    ``trick_value`` on the first ``trick_frames`` latent frames (avoids over-exposure with an image)."""

    scale: float = 3.5
    trick_frames: int = 13
    trick_value: float = 2.0

    def frame_scales(self, frames: int) -> torch.Tensor:
        scales = torch.full((1, 1, frames, 1, 1), self.scale)  # [1, 1, F, 1, 1]
        scales[:, :, : self.trick_frames] = min(self.trick_value, self.scale)
        return scales

    def mix(self, cond: Velocities, uncond: Velocities, scales: torch.Tensor) -> Velocities:
        return uncond[0] + scales.to(cond[0].device) * (cond[0] - uncond[0]), cond[1]


def zero_snr_sqrt_alphas(steps: int = 1000) -> torch.Tensor:
    """√ᾱ of the SD scaled-linear schedule (β from 0.00085 to 0.012, linear in √β) rescaled to zero terminal
    SNR, indexed from clean ([0] ≈ 0.99957) to pure noise ([steps − 1] = 0); float32 like the official one."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    sqrt_alphas = torch.tensor(np.cumprod(1.0 - betas.numpy()), dtype=torch.float32).sqrt()
    first, last = sqrt_alphas[0].clone(), sqrt_alphas[-1].clone()
    sqrt_alphas -= last
    sqrt_alphas *= first / (first - last)
    return sqrt_alphas


def renoise(
    base_video: torch.Tensor,
    height: int,
    width: int,
    generator: torch.Generator,
    noise_index: int = NOISE_INDEX,
) -> torch.Tensor:
    """Trilinear upsampling of [1,48,F,h,w] to latent size (height, width), then a·up + √(1−a²)·ε."""
    frames = base_video.shape[2]
    up = F.interpolate(base_video, size=(frames, height, width), mode="trilinear", align_corners=True)
    if noise_index == 0:
        return up
    noise = torch.randn(up.shape, generator=generator, device=up.device, dtype=up.dtype)
    a = zero_snr_sqrt_alphas()[noise_index].to(up.device)
    return up * a + noise * (1 - a**2) ** 0.5


def noisy_audio(base_audio: torch.Tensor, generator: torch.Generator, scale: float = AUDIO_NOISE_SCALE):
    """The SR model's fixed audio input: scale·ε + (1 − scale)·base audio."""
    noise = torch.randn(
        base_audio.shape, generator=generator, device=base_audio.device, dtype=base_audio.dtype
    )
    return noise * scale + base_audio * (1 - scale)


@dataclass(frozen=True)
class SRSettings:
    """How a super-resolution run refines: ``steps`` UniPC steps on a ``shift``-ed schedule, the upsampled
    latent re-noised to ZeroSNR ``noise_index``, the audio input ``audio_noise_scale`` noise, and optional
    ``guidance`` (None = off, as shipped)."""

    steps: int = 5
    shift: float = DEFAULT_SHIFT
    noise_index: int = NOISE_INDEX
    audio_noise_scale: float = AUDIO_NOISE_SCALE
    guidance: SRGuidance | None = None


def sample_sr(
    model,
    base_video: torch.Tensor,
    base_audio: torch.Tensor,
    texts: tuple[torch.Tensor, torch.Tensor | None],
    latent_size: tuple[int, int],
    generator: torch.Generator,
    settings: SRSettings = SRSettings(),
    options: LoopOptions = NO_OPTIONS,
) -> torch.Tensor:
    """Refine ``base_video`` at ``latent_size`` (latent height, latent width); returns the SR video latent.
    ``texts`` = (prompt, negative prompt or None; the negative is needed only with guidance). Noise is drawn
    video first, then audio (the official order). ``options.image_latent`` is the reference image encoded at
    the SR size; the audio is always held (``options.hold_audio`` does not apply)."""
    text, negative = texts
    if not 0 <= settings.noise_index < 1000:
        raise ValueError(f"noise index must be in [0, 1000), got {settings.noise_index}")
    guidance = settings.guidance
    if guidance is not None and negative is None:
        raise ValueError("SR guidance needs the negative prompt's embedding")
    schedule = flow_schedule(check_steps(settings.steps), settings.shift)
    start = time.perf_counter()
    video = renoise(base_video, *latent_size, generator, settings.noise_index)
    audio = noisy_audio(base_audio, generator, settings.audio_noise_scale)
    if guidance is None:
        texts, mix = [text], lambda outputs, t: outputs[0]
    else:
        scales = guidance.frame_scales(video.shape[2])
        texts, mix = [text, negative], lambda outputs, t: guidance.mix(outputs[0], outputs[1], scales)
    video, _ = denoise(model, video, audio, texts, schedule, (UniPC(schedule), None), mix, options)
    if options.hooks.on_stage:
        options.hooks.on_stage("super-resolution", time.perf_counter() - start)
    return video
