"""Our models under ComfyUI's memory management. The DiT (14-30 GB) is registered with ComfyUI through a
ModelPatcher, so ComfyUI makes room for it, offloads it when another model needs the GPU and releases it on
"unload models". Encoders and decoders, used for seconds per run, visit the GPU only while they work."""

from contextlib import contextmanager

import comfy.model_management as mm
import torch
from comfy.model_patcher import ModelPatcher
from torch import nn

from ..pipeline.dit.device_memory import (  # noqa: F401 (the samplers take them from here)
    ACTIVATION_BASE_BYTES,
    BYTES_PER_TOKEN,
    dit_activations,
    dit_tokens,
)


def module_bytes(module: nn.Module, device: torch.device | None = None) -> int:
    """Bytes of parameters and buffers (those on ``device`` only, when given)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.nbytes for t in tensors if device is None or t.device == device)


class Managed:
    """A model the nodes share, registered with ComfyUI; ``use()`` returns it on the compute device.

    ``moved`` is what ComfyUI may move between devices (default: the whole model); with block swap it is
    everything but the swapped layers, which stay in system memory and are streamed in by the block swap."""

    def __init__(self, model: nn.Module, moved: nn.Module | None = None):
        self.model = model
        moved = model if moved is None else moved
        self.patcher = ModelPatcher(
            moved,
            load_device=mm.get_torch_device(),
            offload_device=mm.unet_offload_device(),
            size=module_bytes(moved),
        )

    def use(self, activations: int = 0) -> nn.Module:
        """``activations``: bytes the run needs beyond the weights (see :func:`dit_activations`); ComfyUI
        frees that much besides the model, offloading other models if needed, instead of its 0.8 GB
        default reserve."""
        # Whole or not at all: ComfyUI's low-VRAM partial load leaves weights in system memory for layers
        # that cast them on the fly, which ours do not. Block swap is this pack's low-memory path.
        mm.load_models_gpu([self.patcher], memory_required=activations, force_full_load=True)
        return self.model


AUTO_SWAP = -1  # the DiT loader's swap_layers value that asks for the fewest layers the card needs
# What each variant's sampler runs by default, as (latent frames, height, width): 5 s clips (32 latent frames)
# at 448x256 (distilled, base), 896x512 (540p SR), 1920x1088 (1080p SR).
DEFAULT_LATENTS = {
    "distill": (32, 16, 28),
    "base": (32, 16, 28),
    "sr_540p": (32, 32, 56),
    "sr_1080p": (32, 68, 120),
}


@contextmanager
def on_device(model, nbytes: int):
    """Bring a briefly used model (text encoder, VAE) to the compute device, making room for it first
    (ComfyUI offloads other models, ours included), and send it back to system memory afterwards."""
    device = mm.get_torch_device()
    mm.free_memory(nbytes, device)
    model.to(device)
    try:
        yield model
    finally:
        model.to(mm.unet_offload_device())
        mm.soft_empty_cache()


# Peak decode activations per output pixel (frames x height x width) of what is on the device at once, from
# `bench memory` (bf16, 5 s clips): Turbo keeps 80 B per pixel of the whole clip (256p, 540p), or per
# pixel of one 36-frame window when finished windows go to system memory (1080p: 146 B); Wan 113 B per pixel.
DECODE_BYTES_PER_PIXEL = {"turbo": 90, "turbo_window": 160, "wan": 120}
TURBO_WINDOW_FRAMES = 36  # 9 latent frames with their context, 4x in time


def decode_activations(decoder: str, latent_shape, offload_frames: bool, tile: int) -> int:
    """Bytes a decode of a latent [1, 48, F, h, w] needs beside the decoder's weights."""
    _, _, frames, h, w = latent_shape
    if decoder == "turbo" and offload_frames:
        return DECODE_BYTES_PER_PIXEL["turbo_window"] * TURBO_WINDOW_FRAMES * 256 * h * w
    if decoder == "wan" and tile:
        h, w = min(h, tile), min(w, tile)  # one spatial tile at a time
    return DECODE_BYTES_PER_PIXEL[decoder] * (4 * frames - 3) * 256 * h * w
