"""The base-stage samplers: the distilled model (8 steps, no guidance) and the base model (32 steps, text
guidance with separate video and audio scales). Both output a MagiHuman latent (video + audio together)."""

import logging

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..fp8.errors import InputError
from ..pipeline.sampling.long_clips import generate_long
from ..pipeline.sampling.loops import Guidance
from ..pipeline.sampling.requests import DEFAULT_STEPS, BaseRequest
from ..pipeline.sampling.scheduler import DEFAULT_SHIFT
from ..pipeline.sampling.sizes import FPS, MAX_SECONDS, ClipSize, clip_size
from ..pipeline.sampling.stages import driving_audio, reference_latent
from ..pipeline.sampling.windows import DEFAULT_WINDOWS
from .memory import dit_activations, dit_tokens, module_bytes, on_device
from .progress import sampling_hooks
from .types import AUDIO_VAE, CONDITIONING, DIT, LATENT, VIDEO_VAE, LoadedDiT, MagiConditioning, VideoVAEs
from .windows import DEFAULT_LONG_CLIP, WINDOWS

log = logging.getLogger(__name__)

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def guidance_scale(name: str, default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=1.0, max=20.0, step=0.1, tooltip=tooltip)


def common_inputs(steps: int) -> list:
    return [
        DIT.Input("dit", tooltip="From MagiHuman DiT Loader."),
        CONDITIONING.Input("conditioning", tooltip="From MagiHuman Conditioning."),
        io.Float.Input("seconds", default=4.0, min=0.0, max=MAX_SECONDS, step=0.04, round=0.04,
                       tooltip="Clip length at 25 fps, a multiple of 0.04 s (trained on 4-5 s clips; longer "
                       "clips are made window by window). 0 = as long as the driving audio."),
        io.Int.Input("width", default=448, min=64, max=4096, step=32,
                     tooltip="Base-stage width in pixels (multiple of 32). 448x256 as in the official "
                     "examples; super-resolve afterwards for 540p or 1080p."),
        io.Int.Input("height", default=256, min=64, max=4096, step=32, tooltip="Base-stage height, pixels."),
        io.Int.Input("seed", default=42, min=0, max=MAX_SEED, control_after_generate=True,
                     tooltip="Noise seed: the same seed gives the same clip on the same device."),
        io.Int.Input("steps", default=steps, min=1, max=1000, tooltip=f"Sampling steps (official: {steps})."),
        io.Float.Input("shift", default=DEFAULT_SHIFT, min=0.1, max=20.0, step=0.1,
                       tooltip="Noise-schedule shift (official: 5.0)."),
        VIDEO_VAE.Input("vae", optional=True,
                        tooltip="Needed with a reference image (its Wan2.2 VAE encodes the picture)."),
        AUDIO_VAE.Input("audio_vae", optional=True, tooltip="Needed with driving audio (encodes the sound)."),
        WINDOWS.Input("windows", optional=True,
                      tooltip="From MagiHuman Long Clip Windows: window length, overlap and per-window "
                      "prompts of long clips (default: 4.96 s windows, 1 latent overlap)."),
    ]  # fmt: skip


def clip_seconds(seconds: float, cond: MagiConditioning) -> float:
    """The seconds widget; 0 = the driving audio's length, to the nearest frame (the clip's audio then
    spans it and at most 20 ms more of silence)."""
    if seconds != 0:
        return seconds  # clip_size checks it
    if cond.audio is None:
        raise InputError("seconds 0 means 'as long as the driving audio', but the conditioning has no audio")
    audio = cond.audio
    return max(1, round(audio["waveform"].shape[-1] / int(audio["sample_rate"]) * FPS)) / FPS


def conditioning_latents(
    cond: MagiConditioning, size: ClipSize, vae: VideoVAEs | None, audio_vae, windows=None
):
    """(reference image latent or None, driving audio (latent, waveform) or None) at ``size``."""
    image = sound = None
    if cond.image is not None:
        if vae is None or vae.wan is None:
            raise InputError(
                "a reference image needs the Wan2.2 VAE: connect a MagiHuman Video VAE Loader (with wan_vae "
                "set) to the vae input"
            )
        with on_device(vae.wan, module_bytes(vae.wan)) as wan:
            image = reference_latent(wan, cond.image, size.width, size.height)
    if cond.audio is not None:
        if audio_vae is None:
            raise InputError(
                "driving audio needs the audio VAE: connect a MagiHuman Audio VAE Loader to audio_vae"
            )
        with on_device(audio_vae, module_bytes(audio_vae)) as encoder:
            sound = driving_audio(encoder, cond.audio, size, windows or DEFAULT_WINDOWS)
    return image, sound


def run_base_stage(dit: LoadedDiT, cond: MagiConditioning, vaes: tuple, widgets: dict, mode: str,
                   guidance: Guidance | None = None, batch: str = "sequential"):  # fmt: skip
    """One base stage from a sampler's widgets (seconds, width, height, seed, steps, shift); ``vaes`` =
    (video VAEs or None, audio VAE or None) for the reference image and driving audio; ``widgets["windows"]``
    (optional): the long-clip settings."""
    if dit.variant.startswith("sr_"):
        raise InputError(
            f"the dit input is the {dit.variant} DiT ({dit.description}); the {mode} sampler needs the "
            f"{mode} DiT ({mode}_fp8/). Super-resolution DiTs go into MagiHuman Super-Resolution"
        )
    if dit.variant != mode:
        log.warning("the %s sampler is running the %s DiT (%s)", mode, dit.variant, dit.description)
    long = widgets.get("windows") or DEFAULT_LONG_CLIP
    size = clip_size(clip_seconds(widgets["seconds"], cond), widgets["width"], widgets["height"])
    windows = long.windows(reference=cond.image is not None)
    image, sound = conditioning_latents(cond, size, *vaes, windows)
    frames = min(size.latent_frames, windows.latent_frames)  # a long clip runs one window at a time
    tokens = dit_tokens(frames, size.latent_height, size.latent_width)
    device = mm.get_torch_device()
    model = dit.managed.use(dit_activations(tokens, batch == "batched"))
    if batch == "auto":  # decided with the DiT loaded: free memory is then what is left beside it
        batch = "batched" if mm.get_free_memory(device) > 3 * dit_activations(tokens, False) else "sequential"
    request = BaseRequest(
        size=size, text=cond.prompt, seed=widgets["seed"], negative=cond.negative, image_latent=image,
        hooks=sampling_hooks(widgets["steps"]), device=device, batch_cfg=batch == "batched", mode=mode,
        steps=widgets["steps"], shift=widgets["shift"], guidance=guidance or Guidance(), audio=sound,
        windows=windows, prompts=long.prompts,
    )  # fmt: skip
    if dit.workers is None:
        latent = generate_long(model, request)
    else:  # every device runs the stage, this process returns it
        latent = dit.workers.run("base", model, request)
    latent = latent.check_finite(f"{mode} sampling", dit.description)
    return latent.to(mm.intermediate_device())


class DistillSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MagiHumanDistillSampler",
            display_name="MagiHuman Sampler (distilled)",
            category="MagiHuman/sampling",
            description="The distilled model: 8 steps, no guidance (fast). Use with the distill DiT.",
            inputs=common_inputs(DEFAULT_STEPS["distill"]),
            outputs=[LATENT.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, dit, conditioning, vae=None, audio_vae=None, **widgets):
        return io.NodeOutput(run_base_stage(dit, conditioning, (vae, audio_vae), widgets, "distill"))


class BaseSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MagiHumanBaseSampler",
            display_name="MagiHuman Sampler (base, guided)",
            category="MagiHuman/sampling",
            description="The base model: 32 UniPC steps with text guidance against the negative prompt, "
            "video and audio guided separately. Use with the base DiT.",
            inputs=common_inputs(DEFAULT_STEPS["base"])
            + [
                guidance_scale(
                    "video_cfg",
                    5.0,
                    "Video guidance scale while the timestep is above the switch (official 5).",
                ),
                guidance_scale(
                    "video_cfg_late",
                    2.0,
                    "Video guidance scale once the timestep is at or below the switch (official 2).",
                ),
                io.Int.Input(
                    "cfg_switch_t",
                    default=500,
                    min=0,
                    max=1000,
                    tooltip="Timestep (of 1000) at which the video scale drops (official 500).",
                ),
                guidance_scale("audio_cfg", 5.0, "Audio guidance scale, all steps (official 5)."),
                io.Combo.Input(
                    "batch_cfg",
                    options=["auto", "batched", "sequential"],
                    default="auto",
                    tooltip="Run the conditional and unconditional passes together (faster, more "
                    "memory) or one after the other; auto decides from free GPU memory.",
                ),
            ],  # fmt: skip
            outputs=[LATENT.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, dit, conditioning, vae=None, audio_vae=None, **widgets):
        names = ("video_cfg", "video_cfg_late", "cfg_switch_t", "audio_cfg")
        guidance = Guidance(*(widgets.pop(name) for name in names))
        batch_cfg = widgets.pop("batch_cfg")
        if torch.device(mm.get_torch_device()).type == "cpu" and batch_cfg == "auto":
            batch_cfg = "sequential"  # no gain from batching on a CPU
        latent = run_base_stage(dit, conditioning, (vae, audio_vae), widgets, "base", guidance, batch_cfg)
        return io.NodeOutput(latent)
