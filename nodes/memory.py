"""Our models under ComfyUI's memory management. The DiT (14-30 GB) is registered with ComfyUI through a
ModelPatcher, so ComfyUI makes room for it, offloads it when another model needs the GPU and releases it on
"unload models". Encoders and decoders, used for seconds per run, visit the GPU only while they work."""

from contextlib import contextmanager

import comfy.model_management as mm
import torch
from comfy.model_patcher import ModelPatcher
from torch import nn


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

    def use(self) -> nn.Module:
        # Whole or not at all: ComfyUI's low-VRAM partial load leaves weights in system memory for layers
        # that cast them on the fly, which ours do not. Block swap is this pack's low-memory path.
        mm.load_models_gpu([self.patcher], force_full_load=True)
        return self.model


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
