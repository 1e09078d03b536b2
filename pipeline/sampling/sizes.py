"""Clip lengths and sizes: frames, latent frames, audio latents, and pixel sizes snapped to what the model
takes. Every user-facing number is checked here, before any model runs."""

import logging
import math
from dataclasses import dataclass

from ...fp8.errors import InputError

log = logging.getLogger(__name__)

FPS = 25  # video frames and audio latents per second
SPATIAL = 16  # pixels per video-latent cell (Wan2.2 VAE: 2x2 patchify x 8x downsampling)
TEMPORAL = 4  # pixel frames per video-latent frame after the first
SNAP = 32  # latent sides must be even (the DiT packs 2x2 patches): pixel sides are multiples of 32
MIN_SIDE, MAX_SIDE = 64, 4096
MAX_SECONDS = 600.0  # a whole clip; past one window it is made window by window
MAX_WINDOW_SECONDS = 60.0  # one DiT pass (its tokens grow with length)
MAX_STEPS = 1000
# The official sizes (width, height): the base stage and the two super-resolution targets.
BASE_SIZE = (448, 256)
SR_TARGETS = {"540p": (896, 512), "1080p": (1920, 1088)}


@dataclass(frozen=True)
class ClipSize:
    """A validated clip: ``seconds`` long at ``width`` x ``height`` pixels (multiples of 32)."""

    seconds: float
    width: int
    height: int

    @property
    def frames(self) -> int:
        """Pixel frames the audio spans: 25·seconds + 1."""
        return round(FPS * self.seconds) + 1

    @property
    def latent_frames(self) -> int:
        """Video latent frames: (frames − 1) // 4 + 1 (the first frame is causal, then 4 per latent)."""
        return (self.frames - 1) // TEMPORAL + 1

    @property
    def decoded_frames(self) -> int:
        """Pixel frames the video decoders give back: 4·latent_frames − 3."""
        return TEMPORAL * self.latent_frames - 3

    @property
    def audio_frames(self) -> int:
        """Audio latents (25 per second): 25·seconds + 1."""
        return self.frames

    @property
    def latent_height(self) -> int:
        return self.height // SPATIAL

    @property
    def latent_width(self) -> int:
        return self.width // SPATIAL

    def video_shape(self, channels: int = 48) -> tuple[int, int, int, int, int]:
        return (1, channels, self.latent_frames, self.latent_height, self.latent_width)

    def audio_shape(self, channels: int = 64) -> tuple[int, int, int]:
        return (1, self.audio_frames, channels)


def snap(side: int, name: str) -> int:
    """Round a pixel side down to a multiple of 32 (as the official code does), saying so when it changes."""
    if not isinstance(side, int) or side < MIN_SIDE or side > MAX_SIDE:
        raise InputError(
            f"{name} must be a whole number of pixels from {MIN_SIDE} to {MAX_SIDE}, got {side!r}"
        )
    snapped = side // SNAP * SNAP
    if snapped != side:
        log.warning("%s %d is not a multiple of %d: using %d", name, side, SNAP, snapped)
    return snapped


def clip_size(seconds: float, width: int, height: int) -> ClipSize:
    """Validate a request and snap its size. ``seconds`` must give a whole number of 25 fps frames."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or not 0 < seconds <= MAX_SECONDS:
        raise InputError(f"seconds must be more than 0 and at most {MAX_SECONDS:g}, got {seconds!r}")
    if abs(FPS * seconds - round(FPS * seconds)) > 1e-6:
        raise InputError(
            f"seconds must be a multiple of 1/{FPS} (whole frames at {FPS} fps), got {seconds!r}; "
            f"e.g. {round(FPS * seconds) / FPS:g}"
        )
    return ClipSize(float(seconds), snap(width, "width"), snap(height, "height"))


def check_steps(steps: int, name: str = "steps") -> int:
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"{name} must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")
    return steps
