"""The super-resolution node: a base latent refined to 540p, 1080p or any size by an SR DiT."""

import logging
from dataclasses import replace

import comfy.model_management as mm
from comfy_api.latest import io

from ..fp8.errors import InputError
from ..pipeline.sampling.long_clips import generate_long_sr
from ..pipeline.sampling.requests import DEFAULT_STEPS, SRRequest
from ..pipeline.sampling.scheduler import DEFAULT_SHIFT
from ..pipeline.sampling.sizes import SR_TARGETS, clip_size
from ..pipeline.sampling.super_resolution import AUDIO_NOISE_SCALE, NOISE_INDEX, SRGuidance, SRSettings
from .memory import dit_activations, dit_tokens
from .progress import sampling_hooks
from .samplers import MAX_SEED, conditioning_latents, guidance_scale
from .types import CONDITIONING, DIT, LATENT, VIDEO_VAE
from .windows import DEFAULT_LONG_CLIP, WINDOWS

log = logging.getLogger(__name__)


def _target_inputs() -> list:
    """The SR size: 540p, 1080p, or custom with a width and height that show only for custom (a dynamic
    combo, ComfyUI 0.33's V3 API); where io has no DynamicCombo, the plain combo and both sizes."""
    tooltip = "540p = 896x512, 1080p = 1920x1088 (use the 1080p SR DiT), or custom: a width and height."
    custom = [
        io.Int.Input("width", default=1280, min=64, max=4096, step=32, tooltip="Custom target width."),
        io.Int.Input("height", default=704, min=64, max=4096, step=32, tooltip="Custom target height."),
    ]
    if not hasattr(io, "DynamicCombo"):
        return [
            io.Combo.Input("target", options=[*SR_TARGETS, "custom"], default="540p", tooltip=tooltip),
            *custom,
        ]
    options = [io.DynamicCombo.Option(name, []) for name in SR_TARGETS] + [
        io.DynamicCombo.Option("custom", custom)
    ]
    return [io.DynamicCombo.Input("target", options=options, tooltip=tooltip)]


def _target_size(widgets: dict) -> tuple[str, tuple[int, int]]:
    """(target name, (width, height)) from the widgets: a dynamic combo arrives as one dict (its key under
    its own name, the chosen option's widgets beside it), the fallback as separate values."""
    target = widgets["target"]
    chosen = target if isinstance(target, dict) else widgets
    name = target["target"] if isinstance(target, dict) else target
    return name, SR_TARGETS.get(name) or (chosen["width"], chosen["height"])


class SuperResolution(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MagiHumanSuperResolution",
            display_name="MagiHuman Super-Resolution",
            category="MagiHuman/sampling",
            description="Upsamples a MagiHuman latent, re-noises it and refines it with the 540p or 1080p SR "
            "DiT in 5 steps. The sound is kept from the input latent.",
            inputs=[
                DIT.Input("sr_dit", tooltip="An SR DiT (540p_sr_fp8/ or 1080p_sr_fp8/) from the DiT loader."),
                LATENT.Input("latent", tooltip="A base-stage latent from a MagiHuman sampler."),
                CONDITIONING.Input("conditioning", tooltip="The same conditioning as the base stage."),
                *_target_inputs(),
                io.Int.Input(
                    "seed",
                    default=42,
                    min=0,
                    max=MAX_SEED,
                    control_after_generate=True,
                    tooltip="Seed of the re-noising noise.",
                ),
                io.Int.Input(
                    "steps",
                    default=DEFAULT_STEPS["sr"],
                    min=1,
                    max=100,
                    tooltip="Refinement steps (official 5).",
                ),
                io.Float.Input(
                    "shift",
                    default=DEFAULT_SHIFT,
                    min=0.1,
                    max=20.0,
                    step=0.1,
                    tooltip="Noise-schedule shift (official 5.0).",
                ),
                io.Int.Input(
                    "noise_index",
                    default=NOISE_INDEX,
                    min=0,
                    max=999,
                    tooltip="How much of the upsampled latent is re-noised (ZeroSNR index; official 220; "
                    "0 = none, higher = more freedom to redraw).",
                ),
                io.Float.Input(
                    "audio_noise_scale",
                    default=AUDIO_NOISE_SCALE,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Noise share of the audio the SR model hears (official 0.7).",
                ),
                guidance_scale(
                    "sr_cfg", 1.0, "SR guidance scale; 1 = off as shipped (the official alternative is 3.5)."
                ),
                io.Int.Input(
                    "cfg_trick_frames",
                    default=13,
                    min=0,
                    max=1000,
                    tooltip="With guidance: the first latent frames get a capped scale (less over-exposure).",
                ),
                guidance_scale(
                    "cfg_trick_value", 2.0, "With guidance: the cap on those frames (official 2.0)."
                ),
                VIDEO_VAE.Input(
                    "vae",
                    optional=True,
                    tooltip="Needed with a reference image: it is re-encoded at the SR size.",
                ),
                WINDOWS.Input(
                    "windows",
                    optional=True,
                    tooltip="From MagiHuman Long Clip Windows: how a long clip is refined window by window "
                    "(default: 4.96 s windows, 1 latent overlap).",
                ),
            ],  # fmt: skip
            outputs=[LATENT.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, sr_dit, latent, conditioning, vae=None, windows=None, **widgets):
        if not sr_dit.variant.startswith("sr_"):
            raise InputError(
                f"sr_dit is the '{sr_dit.variant}' DiT ({sr_dit.description}); super-resolution needs an SR "
                "DiT (540p_sr_fp8/ or 1080p_sr_fp8/), loaded with variant auto, sr_540p or sr_1080p"
            )
        target, (width, height) = _target_size(widgets)
        if target == "1080p" and sr_dit.variant != "sr_1080p":
            log.warning(
                "1080p super-resolution with the %s DiT: the 1080p SR DiT is made for it", sr_dit.variant
            )
        size = clip_size(latent.seconds, width, height)
        image, _ = conditioning_latents(replace(conditioning, audio=None), size, vae, None)  # sound is kept
        scale, trick = widgets["sr_cfg"], (widgets["cfg_trick_frames"], widgets["cfg_trick_value"])
        guidance = None if scale <= 1.0 else SRGuidance(scale, *trick)
        settings = SRSettings(
            widgets["steps"], widgets["shift"], widgets["noise_index"], widgets["audio_noise_scale"], guidance
        )
        request = SRRequest(
            size=size, text=conditioning.prompt, seed=widgets["seed"], negative=conditioning.negative,
            image_latent=image, hooks=sampling_hooks(settings.steps), device=mm.get_torch_device(),
            settings=settings, windows=(windows or DEFAULT_LONG_CLIP).windows(image is not None),
        )  # fmt: skip
        frames = min(size.latent_frames, request.windows.latent_frames)  # one window at a time
        tokens = dit_tokens(frames, size.latent_height, size.latent_width)
        model = sr_dit.managed.use(dit_activations(tokens, batched=False))
        if sr_dit.workers is None:
            result = generate_long_sr(model, latent, request)
        else:  # every device runs the stage, this process returns it
            result = sr_dit.workers.run("sr", model, latent, request)
        result.check_finite("super-resolution", sr_dit.description)
        return io.NodeOutput(result.to(mm.intermediate_device()))
