"""Clips longer than one window: the base stage and super-resolution run window by window (see
:mod:`.windows`), each window after the first holding the previous window's last latent frames clean and, with
driving audio, taking exactly its slice of it. Only one window is on the device at a time, so memory does not
grow with the clip's length; the finished windows' latents wait in CPU memory (tens of MB a minute at the
base size)."""

from dataclasses import replace

import torch

from .latent import MagiLatent
from .loops import Hooks
from .requests import DEFAULT_STEPS, BaseRequest, SRRequest, StageRequest
from .sizes import ClipSize
from .stages import generate_base, generate_sr
from .windows import Window, plan_windows


def start_window(hooks: Hooks, window: Window, count: int, steps: int) -> Hooks:
    """A window starts: report it, check Cancel (between windows; inside one the loop checks before every
    model call), and return the hooks seen from inside it, whose steps count over the whole run (window n,
    step i is step n·steps + i of count·steps) so that one progress bar covers every window."""
    if hooks.on_window:
        hooks.on_window(window.index + 1, count)
    if hooks.check_cancel:
        hooks.check_cancel()
    on_step = hooks.on_step
    if on_step is None:
        return hooks
    offset = window.index * steps
    return replace(hooks, on_step=lambda i, n, video, audio: on_step(offset + i, count * n, video, audio))


def held_frames(previous: torch.Tensor, window: Window, request: StageRequest) -> torch.Tensor:
    """The clean first latent frames [1, 48, held, h, w] of a window after the first: the previous window's
    last ones, the first of them replaced by the reference image when it anchors every window."""
    held = previous[:, :, -window.held :]
    if not request.windows.anchor:
        return held
    return torch.cat([request.image_latent[:, :, :1].to(held), held[:, :, 1:]], dim=2)


def generate_long(dit, request: BaseRequest) -> MagiLatent:
    """The base stage of a clip of any length: one :func:`generate_base` when it fits one window, else one
    per window. Window n is seeded ``seed + n``, uses ``request.prompts[n]`` (or the last prompt, or
    ``request.text``), and holds clean: the reference image (window 0) or the previous window's last
    ``overlap`` latent frames; with driving audio its slice of ``request.audio``'s latent, else the previous
    window's audio over the overlap. ``request.audio`` comes from :func:`.stages.driving_audio` with the same
    ``windows``. With ``windows.anchor`` the reference image also takes the first held slot of every window
    (:func:`held_frames`). The result's sound is the whole driving waveform itself."""
    windows = plan_windows(request.size, request.windows)
    if len(windows) == 1 and not request.prompts:
        return generate_base(dit, request)
    steps = DEFAULT_STEPS[request.mode] if request.steps is None else request.steps
    audio_latent, waveform = request.audio if request.audio is not None else (None, None)
    prompts = request.prompts or (request.text,)
    videos, audios, previous = [], [], None
    for window in windows:
        part = replace(
            request,
            size=window.size,
            text=prompts[min(window.index, len(prompts) - 1)],
            seed=request.seed + window.index,
            hooks=start_window(request.hooks, window, len(windows), steps),
            prompts=(),
        )
        if previous is not None:
            part = replace(part, image_latent=held_frames(previous.video, window, request))
        if audio_latent is not None:
            first = window.audio_start
            part = replace(part, audio=(audio_latent[:, first : first + window.size.audio_frames], None))
        elif previous is not None:
            part = replace(part, audio_prefix=previous.audio[:, -window.held_audio :])
        previous = generate_base(dit, part)
        videos.append(previous.video[:, :, window.held :].cpu())  # [1, 48, new frames, h, w]
        audios.append(previous.audio[:, window.held_audio :].cpu())  # [1, new audio latents, 64]
    video, audio = torch.cat(videos, dim=2), torch.cat(audios, dim=1)
    return MagiLatent(video, audio, request.size.seconds, "base", source_audio=waveform)


def generate_long_sr(sr_dit, latent: MagiLatent, request: SRRequest) -> MagiLatent:
    """Super-resolution of a latent of any length, window by window like the base stage: window n refines
    its slice of the base latent (video and audio), holding clean the reference image at the SR size
    (window 0) or the previous window's last SR latent frames (anchored: with the reference first). The
    sound is carried over unchanged."""
    windows = plan_windows(request.size, request.windows)
    if len(windows) == 1:
        return generate_sr(sr_dit, latent, request)
    if abs(request.size.seconds - latent.seconds) > 1e-9:
        raise ValueError(
            f"the SR request is for a {request.size.seconds:g} s clip, the latent is {latent.seconds:g} s"
        )
    steps = request.settings.steps
    videos, previous = [], None
    for window in windows:
        size = ClipSize(window.size.seconds, request.size.width, request.size.height)
        part = replace(
            request,
            size=size,
            seed=request.seed + window.index,
            hooks=start_window(request.hooks, window, len(windows), steps),
        )
        if previous is not None:
            part = replace(part, image_latent=held_frames(previous, window, request))
        base = MagiLatent(
            latent.video[:, :, window.start : window.start + size.latent_frames],
            latent.audio[:, window.audio_start : window.audio_start + size.audio_frames],
            size.seconds,
        )
        previous = generate_sr(sr_dit, base, part).video
        videos.append(previous[:, :, window.held :].cpu())
    return replace(latent, video=torch.cat(videos, dim=2), stage="sr")
