"""Long clips as a chain of windows: the arithmetic of where each window sits on the clip's latent timeline.

A window is a clip of its own (at most ``WindowSettings.seconds``). Window n + 1 starts ``held`` latent
frames before window n ends: those frames are window n's last latent frames, held clean (like a reference
image), and are dropped from window n + 1's output, so the clip's latent is the windows' new frames laid end
to end. ``held`` is the overlap, plus one when the reference image anchors every window: the reference then
takes the first held slot (its picture replaces that frame; its sound is kept), so the reference's identity
conditions every window, not only the first. Latent frame g sits at pixel frame 4·g and at audio latent 4·g
(both run at 25 per second), so a window starting at latent frame s takes audio latents [4·s, 4·s + A) and
the first 4·(held − 1) + 1 of them are the previous window's last ones.
"""

from dataclasses import dataclass

from .sizes import FPS, MAX_WINDOW_SECONDS, TEMPORAL, ClipSize

# Windows are whole latent frames: 4 pixel frames = 0.16 s.
WINDOW_STEP_SECONDS = TEMPORAL / FPS


@dataclass(frozen=True)
class WindowSettings:
    """How a long clip is cut: windows of ``seconds`` (a multiple of 0.16 s) that overlap by ``overlap``
    latent frames (1 latent = 1 shared pixel frame; each more adds 4). The default, 4.96 s = 32 latent
    frames, is the model's training length: the official 5 s clips (also 32 latent frames) stay one pass.
    ``anchor``: every window after the first holds the reference image in its first latent slot (then
    ``overlap`` + 1 frames are held and windows advance one frame less); the front ends set it only when a
    reference image is given, since it needs one."""

    seconds: float = 4.96
    overlap: int = 1
    anchor: bool = False

    def __post_init__(self):
        latents = FPS * self.seconds / TEMPORAL
        if not 0 < self.seconds <= MAX_WINDOW_SECONDS or abs(latents - round(latents)) > 1e-6:
            raise ValueError(
                f"window seconds must be a multiple of {WINDOW_STEP_SECONDS:g} (whole latent frames) from "
                f"{WINDOW_STEP_SECONDS:g} to {MAX_WINDOW_SECONDS:g}, got {self.seconds!r}; e.g. "
                f"{max(1, round(latents)) * WINDOW_STEP_SECONDS:g}"
            )
        top = self.latent_frames - 1 - self.anchor  # at least one new frame per window
        if not isinstance(self.overlap, int) or not 1 <= self.overlap <= top:
            anchored = ", one slot going to the reference image" if self.anchor else ""
            raise ValueError(
                f"window overlap must be a whole number of latent frames from 1 to {top} "
                f"(a {self.seconds:g} s window has {self.latent_frames}{anchored}), got {self.overlap!r}"
            )

    @property
    def latent_frames(self) -> int:
        return round(FPS * self.seconds) // TEMPORAL + 1

    @property
    def held(self) -> int:
        """Latent frames each window after the first holds clean: the overlap, (+1 anchored)."""
        return self.overlap + self.anchor


@dataclass(frozen=True)
class Window:
    """One window: ``index`` (0-based), its own clip ``size``, its first latent frame ``start`` on the clip's
    timeline, and ``held`` = latent frames it takes clean from the previous window (0 for the first)."""

    index: int
    start: int
    size: ClipSize
    held: int

    @property
    def audio_start(self) -> int:
        """The window's first audio latent on the clip's timeline."""
        return TEMPORAL * self.start

    @property
    def held_audio(self) -> int:
        """Audio latents shared with the previous window: 4·(held − 1) + 1, or 0 for the first window."""
        return TEMPORAL * (self.held - 1) + 1 if self.held else 0

    @property
    def new_frames(self) -> slice:
        """The latent frames only this window makes, on the clip's timeline."""
        return slice(self.start + self.held, self.start + self.size.latent_frames)

    @property
    def new_audio(self) -> slice:
        """The audio latents only this window makes (or takes from the driving audio), on the timeline."""
        return slice(self.audio_start + self.held_audio, self.audio_start + self.size.audio_frames)


DEFAULT_WINDOWS = WindowSettings()


def plan_windows(size: ClipSize, settings: WindowSettings = DEFAULT_WINDOWS) -> list[Window]:
    """The windows of a clip: one window (the clip itself) when it fits, else full windows advancing by
    (window latent frames − held frames) and a last one with the rest (at least held + 1 latent frames). The
    windows' new frames cover the clip's latent frames, and their new audio its audio latents, exactly
    once."""
    total, length, held = size.latent_frames, settings.latent_frames, settings.held
    if total <= length:
        return [Window(0, 0, size, 0)]
    windows, start = [], 0
    while True:
        last = total - start <= length
        # A full window spans 4·(length − 1) pixel frames; the last one runs to the clip's end (25·seconds
        # frames, which may end inside a latent: its audio then has up to 3 latents more, as any clip).
        frames = size.frames - 1 - TEMPORAL * start if last else TEMPORAL * (length - 1)
        window_size = ClipSize(frames / FPS, size.width, size.height)
        windows.append(Window(len(windows), start, window_size, held if windows else 0))
        if last:
            return windows
        start += length - held
