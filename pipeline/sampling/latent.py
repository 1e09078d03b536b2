"""The MagiHuman latent: video and audio latents travelling together with what later stages need to know."""

from dataclasses import dataclass, replace

import torch

from ...fp8.errors import CheckpointError
from .sizes import FPS, SPATIAL


@dataclass(frozen=True)
class MagiLatent:
    """One generated clip in latent space.

    video: [1, 48, F, h, w] fp32 in Wan2.2-normalised space (F = latent frames, h, w = pixels / 16).
    audio: [1, A, 64] fp32 raw Stable Audio Open latents, A = 25·seconds + 1 (25 Hz).
    stage: "base" (coordinates v2) or "sr" (a super-resolution result, coordinates v1).
    source_audio: the user's driving audio [1, 2, N] at 51.2 kHz when the clip was made from one (then
        ``audio`` is its encoding, held fixed, and the clip's sound is this waveform itself).
    """

    video: torch.Tensor
    audio: torch.Tensor
    seconds: float
    stage: str = "base"
    source_audio: torch.Tensor | None = None
    fps: int = FPS

    def __post_init__(self):
        if self.video.ndim != 5 or self.audio.ndim != 3:
            raise ValueError(
                f"MagiLatent needs video [1,48,F,h,w] and audio [1,A,64]; got {list(self.video.shape)} and "
                f"{list(self.audio.shape)}"
            )

    def check_finite(self, stage: str, dit: str) -> "MagiLatent":
        """Refuse a stage result with NaN/Inf in it (two reductions per stage), naming the DiT that made it:
        later stages and the decoders would only turn it into noise or a cryptic encoder error."""
        for name, tensor in (("video", self.video), ("audio", self.audio)):
            if not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(
                    f"the {stage} stage produced NaN or Inf values in its {name} latent. The DiT weights "
                    f"({dit}) are the likely cause: re-download that checkpoint; if it persists, try "
                    "compute bf16 or dequantize"
                )
        return self

    @property
    def user_audio(self) -> bool:
        return self.source_audio is not None

    @property
    def width(self) -> int:
        return self.video.shape[-1] * SPATIAL

    @property
    def height(self) -> int:
        return self.video.shape[-2] * SPATIAL

    def with_video(self, video: torch.Tensor, stage: str) -> "MagiLatent":
        return replace(self, video=video, stage=stage)

    def to(self, device: torch.device | str) -> "MagiLatent":
        return replace(self, video=self.video.to(device), audio=self.audio.to(device))
