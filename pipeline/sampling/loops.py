"""Sampling loops: the distilled model's 8 re-noising steps and the base model's 32 guided UniPC steps, with
image conditioning (clean latent frame 0), audio conditioning (clean user audio), progress hooks and cancel.

A model is any callable ``model(video [1,48,F,h,w], audio [1,A,64], text [1,L,3584]) -> (v_video, v_audio)``
predicting flow velocities (v = noise − x0); one with ``forward_many`` can run both guidance branches at once.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .scheduler import DEFAULT_SHIFT, Renoise, Schedule, UniPC, flow_schedule
from .sizes import ClipSize, check_steps

Velocities = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    """Text guidance: v = v_uncond + scale·(v_cond − v_uncond), video and audio with their own scale; the
    video scale drops to ``video_scale_late`` once the timestep is ≤ ``switch_t``."""

    video_scale: float = 5.0
    video_scale_late: float = 2.0
    switch_t: int = 500
    audio_scale: float = 5.0

    def mix(self, cond: Velocities, uncond: Velocities, t: int) -> Velocities:
        video_scale = self.video_scale if t > self.switch_t else self.video_scale_late
        return (
            uncond[0] + video_scale * (cond[0] - uncond[0]),
            uncond[1] + self.audio_scale * (cond[1] - uncond[1]),
        )


@dataclass(frozen=True)
class Hooks:
    """Callbacks of a sampling run. ``on_step(step, total, x0_video, x0_audio)`` after each step (1-based)
    with the current clean estimates; ``check_cancel()`` before every model call, raising to stop (its
    exception is never caught here); ``on_stage(name, seconds)`` when a stage ends; ``on_window(index,
    count)`` (1-based) when a window of a long clip starts."""

    on_step: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None
    check_cancel: Callable[[], None] | None = None
    on_stage: Callable[[str, float], None] | None = None
    on_window: Callable[[int, int], None] | None = None


NO_HOOKS = Hooks()


@dataclass(frozen=True)
class LoopOptions:
    """What a sampling loop holds fixed and whom it reports to. ``image_latent`` [1, 48, k, h, w]: kept as the
    clean first k latent frames (k = 1: the reference image; k ≥ 1: the last frames of the previous window of
    a long clip); ``hold_audio`` keeps the audio input as given (driving audio); ``audio_prefix`` [1, m, 64]:
    kept as the clean first m audio latents (the previous window's sound over the overlap); ``batch_cfg``
    runs the guidance branches in one batched call when the model can."""

    image_latent: torch.Tensor | None = None
    hold_audio: bool = False
    hooks: Hooks = NO_HOOKS
    batch_cfg: bool = False
    audio_prefix: torch.Tensor | None = None

    def hold(self, video: torch.Tensor, audio: torch.Tensor) -> None:
        """Write the held clean frames into the current latents, in place."""
        if self.image_latent is not None:
            video[:, :, : self.image_latent.shape[2]] = self.image_latent
        if self.audio_prefix is not None:
            audio[:, : self.audio_prefix.shape[1]] = self.audio_prefix


NO_OPTIONS = LoopOptions()


def initial_noise(
    size: ClipSize, generator: torch.Generator, device: torch.device, user_audio: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting latents in the official draw order: audio noise (unless the user gave audio), then video."""
    audio = user_audio
    if audio is None:
        audio = torch.randn(size.audio_shape(), generator=generator, device=device)  # [1, A, 64]
    video = torch.randn(size.video_shape(), generator=generator, device=device)  # [1, 48, F, h, w]
    return video, audio


def forward(
    model, video: torch.Tensor, audio: torch.Tensor, texts: list[torch.Tensor], hooks: Hooks, batch: bool
) -> list[Velocities]:
    """One model call per text (cond, uncond), or one batched call when asked and the model can."""
    if batch and len(texts) > 1 and hasattr(model, "forward_many"):
        if hooks.check_cancel:
            hooks.check_cancel()
        return model.forward_many([(video, audio, text) for text in texts])
    outputs = []
    for text in texts:
        if hooks.check_cancel:
            hooks.check_cancel()
        outputs.append(model(video, audio, text))
    return outputs


def denoise(
    model,
    video: torch.Tensor,
    audio: torch.Tensor,
    texts: list[torch.Tensor],
    schedule: Schedule,
    solvers: tuple,
    mix: Callable[[list[Velocities], int], Velocities],
    options: LoopOptions = NO_OPTIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop every stage shares. ``solvers`` = (video solver, audio solver or None to hold the audio fixed:
    user audio, or the SR input)."""
    video_solver, audio_solver = solvers
    hooks = options.hooks
    timesteps = schedule.timesteps.tolist()
    video, audio = video.clone(), audio.clone()
    for i, t in enumerate(timesteps):
        options.hold(video, audio)  # e.g. the reference image is the clean first latent frame
        v_video, v_audio = mix(forward(model, video, audio, texts, hooks, options.batch_cfg), t)
        if hooks.on_step:
            sigma = schedule.sigmas[i]
            hooks.on_step(i + 1, len(timesteps), video - sigma * v_video, audio - sigma * v_audio)
        video = video_solver.step(v_video, i, video)
        if audio_solver is not None:
            audio = audio_solver.step(v_audio, i, audio)
    options.hold(video, audio)
    return video, audio


def sample_distilled(
    model,
    video: torch.Tensor,
    audio: torch.Tensor,
    text: torch.Tensor,
    generator: torch.Generator,
    steps: int = 8,
    shift: float = DEFAULT_SHIFT,
    options: LoopOptions = NO_OPTIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distilled model: one forward per step, no guidance; each step re-noises (video, then audio) with
    fresh noise from ``generator``. ``options.hold_audio`` keeps ``audio`` as given (driving audio)."""
    schedule = flow_schedule(check_steps(steps), shift)
    start = time.perf_counter()
    solvers = (Renoise(schedule, generator), None if options.hold_audio else Renoise(schedule, generator))
    result = denoise(model, video, audio, [text], schedule, solvers, lambda outputs, t: outputs[0], options)
    if options.hooks.on_stage:
        options.hooks.on_stage("distilled sampling", time.perf_counter() - start)
    return result


def sample_guided(
    model,
    video: torch.Tensor,
    audio: torch.Tensor,
    texts: tuple[torch.Tensor, torch.Tensor],
    steps: int = 32,
    shift: float = DEFAULT_SHIFT,
    guidance: Guidance = Guidance(),
    options: LoopOptions = NO_OPTIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model: a conditional and an unconditional forward per step (``texts`` = (prompt, negative
    prompt)), mixed by ``guidance``, advanced by UniPC (separate video and audio histories)."""
    schedule = flow_schedule(check_steps(steps), shift)
    start = time.perf_counter()
    solvers = (UniPC(schedule), None if options.hold_audio else UniPC(schedule))
    result = denoise(
        model,
        video,
        audio,
        list(texts),
        schedule,
        solvers,
        lambda outputs, t: guidance.mix(outputs[0], outputs[1], t),
        options,
    )
    if options.hooks.on_stage:
        options.hooks.on_stage("guided sampling", time.perf_counter() - start)
    return result
