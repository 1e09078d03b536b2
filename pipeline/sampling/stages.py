"""The stages of a generation, shared by the ComfyUI nodes and the command line: conditioning (reference
image, driving audio), the base stage (distilled or guided), super-resolution, decoding to frames and
sound."""

from collections.abc import Iterator
from dataclasses import replace

import torch

from ..codecs.audio_io import from_audio, to_audio
from ..codecs.audio_vae import HOP, SAMPLE_RATE, OobleckVAE
from ..media.frames import image_to_video_input, to_image
from .latent import MagiLatent
from .loops import LoopOptions, initial_noise, sample_distilled, sample_guided
from .requests import DEFAULT_STEPS, BaseRequest, SRRequest, StageRequest
from .sizes import TEMPORAL, ClipSize, check_steps
from .super_resolution import sample_sr
from .windows import DEFAULT_WINDOWS, WindowSettings, plan_windows


def reference_latent(vae, image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A reference image (IMAGE [B,H,W,3] or [H,W,3] in 0..1) as the clean first latent frame
    [1, 48, 1, height/16, width/16] for a clip of that size (centre crop, resize, Wan2.2 encode)."""
    return vae.encode(image_to_video_input(image, width, height))


def driving_audio(
    audio_vae: OobleckVAE, audio: dict, size: ClipSize, windows: WindowSettings = DEFAULT_WINDOWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ComfyUI AUDIO as (latent [1, A, 64] held clean during sampling, waveform [1, 2, 2048·A] at 51.2 kHz
    returned as the clip's sound). A clip longer than one window is encoded window by window (memory flat in
    length): each window's slice of the waveform on its own, as the model saw clips in training; where
    windows overlap the earlier window's latents are kept, which the later window then holds clean."""
    waveform = from_audio(audio, size.audio_frames)
    parts = []
    for window in plan_windows(size, windows):
        first = window.audio_start
        piece = waveform[..., HOP * first : HOP * (first + window.size.audio_frames)]  # [1, 2, 2048·A_w]
        parts.append(audio_vae.encode(piece)[:, window.held_audio :])
    return torch.cat(parts, dim=1), waveform  # [1, A, 64]


def generate_base(dit, request: BaseRequest) -> MagiLatent:
    """The first stage at ``request.size``; ``request.audio`` = :func:`driving_audio` output for lip-sync."""
    steps = check_steps(DEFAULT_STEPS[request.mode] if request.steps is None else request.steps)
    device = torch.device(request.device)
    generator = torch.Generator(device).manual_seed(request.seed)
    audio_latent, waveform = request.audio if request.audio is not None else (None, None)
    user_audio = None if audio_latent is None else audio_latent.to(device)
    video, audio_start = initial_noise(request.size, generator, device, user_audio)
    options = loop_options(request, device, hold_audio=user_audio is not None)
    dit = parallel_dit(dit, request)
    if request.audio_prefix is not None:
        options = replace(options, audio_prefix=request.audio_prefix.to(device))
    text = request.text.tokens().to(device)
    if request.mode == "distill":
        video, audio_out = sample_distilled(
            dit, video, audio_start, text, generator, steps, request.shift, options
        )
    else:
        texts = (text, request.negative.tokens().to(device))
        video, audio_out = sample_guided(
            dit, video, audio_start, texts, steps, request.shift, request.guidance, options
        )
    return MagiLatent(video, audio_out, request.size.seconds, "base", source_audio=waveform)


def generate_sr(sr_dit, latent: MagiLatent, request: SRRequest) -> MagiLatent:
    """Super-resolve a base latent to ``request.size``. The sound is carried over unchanged."""
    size = request.size
    if abs(size.seconds - latent.seconds) > 1e-9:
        raise ValueError(
            f"the SR request is for a {size.seconds:g} s clip, the latent is {latent.seconds:g} s"
        )
    device = torch.device(request.device)
    generator = torch.Generator(device).manual_seed(request.seed)
    negative = None if request.negative is None else request.negative.tokens().to(device)
    video = sample_sr(
        parallel_dit(sr_dit, request),
        latent.video.to(device),
        latent.audio.to(device),
        (request.text.tokens().to(device), negative),
        (size.latent_height, size.latent_width),
        generator,
        request.settings,
        loop_options(request, device),
    )
    return replace(latent, video=video, stage="sr")


def loop_options(request: StageRequest, device: torch.device, hold_audio: bool = False) -> LoopOptions:
    image = None if request.image_latent is None else request.image_latent.to(device)
    # CFG-parallel needs both branches in one call, which it then spreads over the ranks.
    batch = request.batch_cfg or (request.parallel is not None and request.parallel.cfg)
    return LoopOptions(image, hold_audio, request.hooks, batch)


def parallel_dit(dit, request: StageRequest):
    """The DiT run by ``request.parallel``'s group (every rank calls this with the same request), or the
    DiT itself."""
    return dit if request.parallel is None else request.parallel.wrap(dit)


def decode(
    latent: MagiLatent, video_decoder, audio_vae: OobleckVAE | None, **decode_options
) -> tuple[torch.Tensor, dict]:
    """(IMAGE [T, H, W, 3] in 0..1, AUDIO {"waveform": [1, 2, N], "sample_rate": 44100}): see
    :func:`clip_sound` for the sound."""
    frames = to_image(video_decoder.decode(latent.video, **decode_options)).cpu()
    return frames, clip_sound(latent, audio_vae, frames.shape[0])


def decode_stream(
    latent: MagiLatent, video_decoder, audio_vae: OobleckVAE | None
) -> tuple[Iterator[torch.Tensor], dict]:
    """As :func:`decode`, but the frames come as an iterator of IMAGE pieces [t, H, W, 3], one decoder
    window at a time, for a writer that takes them in turn: a clip of any length decodes in the memory of
    one window (a minute at 1080p is 37 GB of float32 frames held whole)."""
    frames = TEMPORAL * latent.video.shape[2] - (TEMPORAL - 1)  # both decoders give 4·F − 3
    sound = clip_sound(latent, audio_vae, frames)
    return (to_image(piece) for piece in video_decoder.stream(latent.video)), sound


def clip_sound(latent: MagiLatent, audio_vae: OobleckVAE | None, frames: int) -> dict:
    """The clip's AUDIO: the driving audio itself when the clip was made from one, otherwise the decoded
    audio latent; cut to ``frames`` pictures' duration (the latents carry up to 3 frames more audio than
    the decoders give pictures)."""
    if latent.source_audio is not None:
        sound = to_audio(latent.source_audio)
    elif audio_vae is None:
        raise ValueError("decoding the sound needs the audio VAE")
    else:
        sound = to_audio(decode_audio(audio_vae, latent.audio), SAMPLE_RATE)
    samples = round(frames / latent.fps * sound["sample_rate"])
    return {"waveform": sound["waveform"][..., :samples], "sample_rate": sound["sample_rate"]}


AUDIO_CHUNK = 250  # audio latents (10 s) decoded at a time, so a long clip's sound takes flat memory
AUDIO_CONTEXT = 32  # latents of context each side, twice the decoder's reach (about 16 latents)


def decode_audio(audio_vae: OobleckVAE, latent: torch.Tensor, chunk: int = AUDIO_CHUNK) -> torch.Tensor:
    """Audio latents [1, A, 64] -> waveform [1, 2, 2048·A] at 51.2 kHz, ``chunk`` latents at a time with
    context on both sides that is cut off again: the same sound as one decode, in memory that does not grow
    with the clip (the decoder is convolutional, its reach a few latents)."""
    total = latent.shape[1]
    if total <= chunk + 2 * AUDIO_CONTEXT:
        return audio_vae.decode(latent)
    parts = []
    for start in range(0, total, chunk):
        end = min(total, start + chunk)
        first, last = max(0, start - AUDIO_CONTEXT), min(total, end + AUDIO_CONTEXT)
        wave = audio_vae.decode(latent[:, first:last])  # [1, 2, 2048·(last − first)]
        parts.append(wave[..., HOP * (start - first) : HOP * (end - first)].cpu())
    return torch.cat(parts, dim=-1)
