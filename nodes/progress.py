"""What a sampling node reports while it works: a ComfyUI progress bar per stage with a preview of the current
clean estimate (middle frame), and a cancel check between model calls that ComfyUI's Cancel triggers."""

import logging

import comfy.model_management as mm
import comfy.utils
import numpy as np
import torch

from ..pipeline.sampling.loops import Hooks

log = logging.getLogger(__name__)

PREVIEW_SIZE = 512


def status_text(text: str) -> None:
    """A note shown under the running node in ComfyUI's interface (the pipeline logs it as well)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:  # outside a ComfyUI server (tests, scripts): the log line is all there is
        return
    context, server = get_executing_context(), getattr(PromptServer, "instance", None)  # set once it runs
    if context is not None and server is not None:
        server.send_progress_text(text, context.node_id)


def _rgb_factors() -> tuple[torch.Tensor, torch.Tensor] | None:
    """ComfyUI's linear latent-to-RGB approximation for the Wan2.2 latent space (our latent space)."""
    try:
        from comfy.latent_formats import Wan22
    except ImportError:
        return None
    fmt = Wan22()
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)  # [48, 3]
    bias = torch.tensor(getattr(fmt, "latent_rgb_factors_bias", None) or [0.0, 0.0, 0.0])
    return factors, bias


def preview(video: torch.Tensor):
    """The middle latent frame of [1, 48, F, h, w] as a small RGB picture for the progress bar."""
    rgb_factors = _rgb_factors()
    if rgb_factors is None:
        return None
    from PIL import Image

    factors, bias = rgb_factors
    frame = video[0, :, video.shape[2] // 2].float().cpu()  # [48, h, w]
    rgb = torch.einsum("chw,cr->hwr", frame, factors) + bias  # [h, w, 3] in about [-1, 1]
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return "JPEG", Image.fromarray(np.ascontiguousarray(pixels)), PREVIEW_SIZE


def sampling_hooks(steps: int) -> Hooks:
    bar = comfy.utils.ProgressBar(steps)

    def on_step(step: int, total: int, video: torch.Tensor, audio: torch.Tensor) -> None:
        bar.update_absolute(step, total, preview(video))

    def on_window(index: int, count: int) -> None:  # the bar then counts the steps of every window
        log.info("MagiHuman: window %d of %d", index, count)

    return Hooks(
        on_step=on_step, check_cancel=mm.throw_exception_if_processing_interrupted, on_window=on_window
    )
