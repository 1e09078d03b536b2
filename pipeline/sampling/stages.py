"""The stages of a generation, shared by the ComfyUI nodes and the command line: conditioning (reference
image, driving audio), the base stage (distilled or guided), super-resolution, decoding to frames and
sound."""

from dataclasses import replace

import torch

from ..codecs.audio_io import from_audio, to_audio
from ..codecs.audio_vae import SAMPLE_RATE, OobleckVAE
from ..codecs.text_encoder import TextEmbedding
from ..media.frames import image_to_video_input, to_image
from .latent import MagiLatent
from .loops import NO_HOOKS, Guidance, Hooks, initial_noise, sample_distilled, sample_guided
from .scheduler import DEFAULT_SHIFT
from .sizes import ClipSize, check_steps, clip_size
from .super_resolution import AUDIO_NOISE_SCALE, NOISE_INDEX, SRGuidance, sample_sr

MODES = ("distill", "base")
DEFAULT_STEPS = {"distill": 8, "base": 32, "sr": 5}


def reference_latent(vae, image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A reference image (IMAGE [B,H,W,3] or [H,W,3] in 0..1) as the clean first latent frame
    [1, 48, 1, height/16, width/16] for a clip of that size (centre crop, resize, Wan2.2 encode)."""
    return vae.encode(image_to_video_input(image, width, height))


def driving_audio(audio_vae: OobleckVAE, audio: dict, size: ClipSize) -> tuple[torch.Tensor, torch.Tensor]:
    """A ComfyUI AUDIO as (latent [1, A, 64] held clean during sampling, waveform [1, 2, 2048·A] at 51.2 kHz
    returned as the clip's sound)."""
    waveform = from_audio(audio, size.audio_frames)
    return audio_vae.encode(waveform), waveform


def generate_base(
    dit,
    text: TextEmbedding,
    size: ClipSize,
    seed: int,
    mode: str = "distill",
    negative: TextEmbedding | None = None,
    steps: int | None = None,
    shift: float = DEFAULT_SHIFT,
    guidance: Guidance | None = None,
    image_latent: torch.Tensor | None = None,
    audio: tuple[torch.Tensor, torch.Tensor] | None = None,
    hooks: Hooks = NO_HOOKS,
    device: torch.device | str = "cpu",
    batch_cfg: bool = False,
) -> MagiLatent:
    """The first stage at ``size``: ``mode`` "distill" (8 re-noising steps) or "base" (32 guided UniPC
    steps against ``negative``). ``audio`` = :func:`driving_audio` output for lip-sync to given sound."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "base" and negative is None:
        raise ValueError("the base model's guidance needs the negative prompt's embedding")
    steps = check_steps(DEFAULT_STEPS[mode] if steps is None else steps)
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    audio_latent, waveform = audio if audio is not None else (None, None)
    user_audio = None if audio_latent is None else audio_latent.to(device)
    video, audio_start = initial_noise(size, generator, device, user_audio)
    image = None if image_latent is None else image_latent.to(device)
    common = dict(image_latent=image, hold_audio=user_audio is not None, hooks=hooks)
    if mode == "distill":
        video, audio_out = sample_distilled(
            dit, video, audio_start, text.tokens().to(device), generator, steps, shift, **common
        )
    else:
        video, audio_out = sample_guided(
            dit,
            video,
            audio_start,
            text.tokens().to(device),
            negative.tokens().to(device),
            steps,
            shift,
            guidance or Guidance(),
            batch_cfg=batch_cfg,
            **common,
        )
    return MagiLatent(video, audio_out, size.seconds, "base", source_audio=waveform)


def generate_sr(
    sr_dit,
    latent: MagiLatent,
    text: TextEmbedding,
    width: int,
    height: int,
    seed: int,
    steps: int = DEFAULT_STEPS["sr"],
    shift: float = DEFAULT_SHIFT,
    noise_index: int = NOISE_INDEX,
    audio_noise_scale: float = AUDIO_NOISE_SCALE,
    guidance: SRGuidance | None = None,
    negative: TextEmbedding | None = None,
    image_latent: torch.Tensor | None = None,
    hooks: Hooks = NO_HOOKS,
    device: torch.device | str = "cpu",
) -> MagiLatent:
    """Super-resolve a base latent to ``width`` x ``height`` (snapped to multiples of 32). The sound is
    carried over unchanged. ``image_latent``: the reference image encoded at the SR size."""
    size = clip_size(latent.seconds, width, height)
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    video = sample_sr(
        sr_dit,
        latent.video.to(device),
        latent.audio.to(device),
        text.tokens().to(device),
        size.latent_height,
        size.latent_width,
        generator,
        steps,
        shift,
        noise_index,
        audio_noise_scale,
        guidance,
        None if negative is None else negative.tokens().to(device),
        None if image_latent is None else image_latent.to(device),
        hooks,
    )
    return replace(latent, video=video, stage="sr")


def decode(
    latent: MagiLatent, video_decoder, audio_vae: OobleckVAE | None, **decode_options
) -> tuple[torch.Tensor, dict]:
    """(IMAGE [T, H, W, 3] in 0..1, AUDIO {"waveform": [1, 2, N], "sample_rate": 44100}). The sound is the
    driving audio itself when the clip was made from one, otherwise the decoded audio latent; it is cut to
    the video's duration (the latents carry up to 3 frames more audio than the decoders give pictures)."""
    frames = to_image(video_decoder.decode(latent.video, **decode_options)).cpu()
    if latent.source_audio is not None:
        sound = to_audio(latent.source_audio)
    elif audio_vae is None:
        raise ValueError("decoding the sound needs the audio VAE")
    else:
        sound = to_audio(audio_vae.decode(latent.audio), SAMPLE_RATE)
    samples = round(frames.shape[0] / latent.fps * sound["sample_rate"])
    return frames, {"waveform": sound["waveform"][..., :samples], "sample_rate": sound["sample_rate"]}
